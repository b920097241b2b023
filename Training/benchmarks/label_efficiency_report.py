"""The label-efficiency report: Markdown tables in the shape of the method's Tables III and IV, JSON, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from DiffusionSegLib.atomic import atomic_path, write_text
from DiffusionSegLib.organs import ORGANS
from DiffusionSegLib.preprocessing import PreprocessingSpec, labels_to_model_space, to_model_space
from DiffusionSegLib.strategies import ALL_STRATEGIES
from DiffusionSegLib.strategies import TABLE as STRATEGY_TABLE

from .label_efficiency import LabelledCT, Run, is_curated, prediction_path

NAMES = {s.name: s.title for s in STRATEGY_TABLE}
DESCRIPTIONS = {s.name: s.description for s in STRATEGY_TABLE}
_COLOURS = np.zeros((256, 3), dtype=np.float32)
for _organ in ORGANS:
    _COLOURS[_organ.label] = _organ.color


def strategy_name(strategy: str, timestep: int, timesteps: list[int]) -> str:
    """The row name; the timestep is shown when the strategy runs at several or at a non-zero one."""
    name = NAMES.get(strategy, strategy)
    return f"{name}, t={timestep}" if len(timesteps) > 1 or timestep != 0 else name


def budget_name(budget: str, rows: list[dict]) -> str:
    """A column title with the slice counts the budget came to (a range when training CTs differ)."""
    counts = sorted({n for r in rows if r["budget"] == budget for sizes in r["train_slices"].values() for n in sizes})
    span = "-" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    unit = "slice" if counts == [1] else "slices"
    if is_curated(budget):
        return f"{budget} slices (organ cover)"
    return f"{budget} ({span} {unit})"


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if std else f"{100 * mean:.1f}"


def _row_keys(rows: list[dict]) -> list[tuple[str, int]]:
    keys = {(r["strategy"], r["timestep"]) for r in rows}
    return sorted(keys, key=lambda k: (ALL_STRATEGIES.index(k[0]) if k[0] in ALL_STRATEGIES else 9, k[1]))


def score_table(rows: list[dict], config: dict) -> list[str]:
    """Table III shape: strategies as rows, for each budget mean DSC and Jaccard (%) +- std."""
    budgets = config["budgets"]
    lookup = {(r["strategy"], r["timestep"], r["budget"]): r for r in rows}
    header = ["Strategy", *(f"{budget_name(b, rows)} {metric}" for b in budgets for metric in ("DSC", "Jaccard"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for strategy, timestep in _row_keys(rows):
        cells = []
        for budget in budgets:
            r = lookup.get((strategy, timestep, budget))
            cells += [_cell(r[f"{m}_mean"], r[f"{m}_std"]) if r else "-" for m in ("dsc", "jaccard")]
        lines.append(f"| {strategy_name(strategy, timestep, _timesteps(config, strategy))} | " + " | ".join(cells) + " |")
    return lines


def direction_table(rows: list[dict], config: dict) -> list[str]:
    """Mean DSC (%) +- std over seeds of each train -> test direction."""
    budgets = config["budgets"]
    lookup = {(r["strategy"], r["timestep"], r["budget"]): r for r in rows}
    directions = sorted({d for r in rows for d in r["directions"]})
    lines = ["| Strategy | Direction | " + " | ".join(budget_name(b, rows) for b in budgets) + " |", "|" + "---|" * (len(budgets) + 2)]
    for strategy, timestep in _row_keys(rows):
        for direction in directions:
            cells = []
            for budget in budgets:
                d = lookup.get((strategy, timestep, budget), {}).get("directions", {}).get(direction)
                cells.append(_cell(d["dsc_mean"], d["dsc_std"]) if d else "-")
            lines.append(f"| {strategy_name(strategy, timestep, _timesteps(config, strategy))} | {direction} | " + " | ".join(cells) + " |")
    return lines


def organ_budget(config: dict) -> str:
    """The budget of the per-organ table: the curated (organ cover) budget, as the method's Table IV, else the first."""
    return next((b for b in config["budgets"] if is_curated(b)), config["budgets"][0])


def organ_table(rows: list[dict], config: dict) -> list[str]:
    """Table IV shape: per-organ DSC (%) at one budget, mean over directions and seeds."""
    budget = organ_budget(config)
    chosen = [r for r in rows if r["budget"] == budget]
    present = {o for r in chosen for o in r["organ_dsc"]}
    organs = [o.name for o in ORGANS if o.name in present]
    lines = ["| Strategy | " + " | ".join(organs) + " |", "|" + "---|" * (len(organs) + 1)]
    lookup = {(r["strategy"], r["timestep"]): r for r in chosen}
    for strategy, timestep in _row_keys(chosen):
        organ_dsc = lookup[(strategy, timestep)]["organ_dsc"]
        cells = [f"{100 * organ_dsc[o]:.0f}" if organ_dsc.get(o) is not None else "-" for o in organs]
        lines.append(f"| {strategy_name(strategy, timestep, _timesteps(config, strategy))} | " + " | ".join(cells) + " |")
    return lines


def budgets_table(entries: dict[str, dict], budgets: list[str]) -> list[str]:
    """Per training CT: each budget's slices (with the rounding) and iterations."""
    lines = ["| Training CT | Pool | " + " | ".join(budgets) + " |", "|" + "---|" * (len(budgets) + 2)]
    for ct, by_budget in entries.items():
        cells = [f"{e['note']}; {e['iterations']} iterations" for e in (by_budget[b] for b in budgets)]
        lines.append(f"| {ct} | {by_budget[budgets[0]]['pool']} | " + " | ".join(cells) + " |")
    return lines


def _timesteps(config: dict, strategy: str) -> list[int]:
    return config["timesteps"].get(strategy, [0])


def seeds_line(config: dict) -> str:
    """Which seeds ran, per budget where the plan narrowed them, and where the spread rests on fewer than three."""
    seeds, per_budget = config["seeds"], config.get("budget_seeds", {})
    of = {b: per_budget.get(b, seeds) for b in config["budgets"]}

    def label(b: str) -> str:
        return f"{b} slices" if is_curated(b) else b

    def listed(b: str) -> str:
        return f"{label(b)}: seed{'s' if len(of[b]) > 1 else ''} {', '.join(map(str, of[b]))}"

    line = (f"- Seeds: {', '.join(map(str, seeds))} (random budget draws, new layers' initialisation, batch order, augmentation); the organ-cover "
            "budget uses the same slices for every seed.")
    if per_budget:
        line += " Per budget: " + "; ".join(listed(b) for b in of if b in per_budget) + "."
    if few := [b for b, s in of.items() if len(s) < 3]:
        line += (f" Fewer than 3 seeds at {', '.join(map(label, few))}: the spread there is a rough figure (with one seed, "
                 "a cross-patient cell spreads over directions only and a within-CT cell shows none).")
    return line


def missing_line(results: dict) -> list[str]:
    """An interim report (--report-only) says how much of the plan it covers and what is not run yet."""
    if not (missing := results.get("missing")):
        return []
    shown = ", ".join(f"`{key}`" for key in missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
    return [f"- **Interim report**: {len(results['runs'])} of {len(results['runs']) + len(missing)} planned runs finished; "
            f"not run yet: {shown}. Cells average the runs that finished (see the per-direction table)."]


def header(results: dict) -> list[str]:
    config, pretrained = results["config"], results["pretrained"]
    rule = config["rule"]
    rule_text = (f"{rule['max_iterations']} iterations for every budget" if rule["min_iterations"] == rule["max_iterations"] else
                 f"iterations = clamp({rule['epochs']} epochs x ceil(training slices / {config['batch_size']}), {rule['min_iterations']}, "
                 f"{rule['max_iterations']}), no early stop")
    lines = [
        f"# Label efficiency: {', '.join(results['cts'])}",
        "",
        "Command:",
        "",
        "```bash",
        results.get("command", "(not recorded)"),
        "```",
        "",
        f"- Pretrained model: `{pretrained['name']}` (preset {pretrained['preset']}, {pretrained['size']} x {pretrained['size']} px at "
        f"{pretrained['spacing_mm']:g} mm; weights sha256 {pretrained['weights_sha256']}; {pretrained['path']}).",
        "- Labelled CTs: " + "; ".join(f"{name} ({ct['labelled_slices']} labelled slices; organs: {', '.join(ct['organs'])})"
                                       for name, ct in results["cts"].items()) + ".",
        "- Strategies: " + "; ".join(f"{NAMES.get(s, s)}: {DESCRIPTIONS.get(s, '')}, t = {', '.join(map(str, _timesteps(config, s)))}"
                                     for s in config["strategies"]) + ".",
        f"- Fine-tuning, the same for every strategy: {rule_text}; batch {config['batch_size']} (all training slices when fewer); "
        f"Adam, backbone lr {config['lr']:g}, head 10x; "
        + ("augmentation (random affine warp and intensity jitter) drawn fresh for every batch of every strategy: the frozen-feature pool is off, "
           "frozen layers are recomputed without autograd at each step." if config["augment"] else "no augmentation."),
        seeds_line(config),
        *missing_line(results),
        "- Scores: per-organ DSC and Jaccard over all test slices taken together on the test CT's own grid; the mean is over organs present "
        "in the test reference or the prediction (an organ the training CT never shows cannot be predicted and scores 0 where the test CT "
        "has it). Cells: mean ± sample std, in %.",
        "",
    ]
    return lines


def cross_section(results: dict, summary: dict, figures: list[Path]) -> list[str]:
    config = results["config"]
    rows = summary["cross"]
    if not rows:
        reason = "it needs two or more labelled CTs" if len(results["cts"]) < 2 else "not requested (--protocols)"
        return ["## Cross-patient", "", f"Not run: {reason}.", ""]
    directions = sorted({d for r in rows for d in r["directions"]})
    per_cell = max(r["n"] for r in rows)
    return [
        "## Cross-patient (headline): train on one CT, test on another",
        "",
        f"Directions: {', '.join(directions)}; all labelled slices of the test CT are scored. "
        f"Mean ± std over directions and seeds (up to {per_cell} values a cell).",
        "",
        *score_table(rows, config),
        "",
        "Budgets and iterations per training CT:",
        "",
        *budgets_table(results["budgets"]["cross"], config["budgets"]),
        "",
        "Mean DSC (%) per direction, ± std over seeds:",
        "",
        *direction_table(rows, config),
        "",
        f"Per-organ DSC (%) at the {budget_name(organ_budget(config), rows)} budget, cross-patient (Table IV shape), "
        "mean over directions and seeds:",
        "",
        *organ_table(rows, config),
        "",
        *(f"![{f.stem}]({f.name})" for f in figures),
        "",
    ]


def within_section(results: dict, summary: dict, figures: list[Path]) -> list[str]:
    config = results["config"]
    if not summary["within"]:
        return []
    lines = ["## Within-CT block split (second table; optimistic: test slices lie two slices from training slices)", ""]
    splits = {t["train_ct"]: t["split"] for t in results["tasks"] if t["protocol"] == "within"}
    for ct, rows in summary["within"].items():
        lines += [
            f"### {ct}",
            "",
            f"Split: {splits[ct]['description']}. Mean ± std over seeds.",
            "",
            *score_table(rows, config),
            "",
            *budgets_table({ct: results["budgets"]["within"][ct]}, config["budgets"]),
            "",
            *(f"![{f.stem}]({f.name})" for f in figures if f.name == overlay_path(Path(), "within", ct, ct, config["budgets"][0]).name),
            "",
        ]
    return lines


def markdown(results: dict, summary: dict, figures: list[Path] | None = None) -> str:
    figures = figures or []
    cross = [f for f in figures if f.name.startswith("overlays-cross-")]
    within = [f for f in figures if f.name.startswith("overlays-within-")]
    return "\n".join([*header(results), *cross_section(results, summary, cross), *within_section(results, summary, within)])


def write_report(out_dir: Path, results: dict, summary: dict, figures: list[Path] | None = None) -> tuple[Path, Path]:
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    for path, text in ((json_path, json.dumps({**results, "summary": summary}, indent=1)), (md_path, markdown(results, summary, figures))):
        write_text(path, text + "\n")
    return md_path, json_path


def _overlay(ct: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Grey CT slice (model units, [-1, 1]) with organ colours blended in, as RGB uint8."""
    grey = np.repeat(((ct + 1) * 127.5).clip(0, 255)[..., None], 3, axis=-1)
    colour = _COLOURS[labels]
    mask = (labels > 0)[..., None]
    return np.where(mask, 0.45 * grey + 0.55 * colour, grey).astype(np.uint8)


def overlay_figure(ct: sitk.Image, labels: sitk.Image, predictions: dict[str, sitk.Image], test: list[int], slice_axis: int, path: Path) -> Path:
    """One test slice (the one with the most organs): CT, reference and each prediction, side by side."""
    reference = sitk.GetArrayViewFromImage(labels)
    axis = 2 - slice_axis
    best = max(test, key=lambda s: (len(np.unique(np.take(reference, s, axis=axis))), np.count_nonzero(np.take(reference, s, axis=axis))))
    display = to_model_space(ct, PreprocessingSpec.for_size(256))  # canonical view: anterior up, patient right on the left
    k = display.model_slice(best)
    panels = [("CT", np.repeat(((display.slices[k] + 1) * 127.5).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)),
              ("reference", _overlay(display.slices[k], labels_to_model_space(labels, display)[k]))]
    panels += [(name, _overlay(display.slices[k], labels_to_model_space(image, display)[k])) for name, image in predictions.items()]
    size = display.slices.shape[-1]
    canvas = Image.new("RGB", (size * len(panels), size + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels):
        canvas.paste(Image.fromarray(panel), (i * size, 16))
        draw.text((i * size + 4, 2), title, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp)
    return path


def overlay_path(out_dir: Path, protocol: str, train_ct: str, test_ct: str, budget: str) -> Path:
    scope = f"{train_ct}-to-{test_ct}" if protocol == "cross" else train_ct
    return out_dir / f"overlays-{protocol}-{scope}-{budget.replace('%', 'pct')}.png"


def write_overlays(out_dir: Path, results: dict, summary: dict, cts: dict[str, LabelledCT]) -> list[Path]:
    """Per task and test CT: its first-budget, first-seed predictions of every strategy on the test slice with the most organs."""
    config = results["config"]
    budget = config["budgets"][0]
    seed = config.get("budget_seeds", {}).get(budget, config["seeds"])[0]
    figures = []
    for task in results["tasks"]:
        rows = summary["cross"] if task["protocol"] == "cross" else summary["within"].get(task["train_ct"], [])
        for test_ct, test_slices in task["tests"].items():
            predictions = {}
            for strategy, timestep in _row_keys(rows):
                run = Run(task["protocol"], task["train_ct"], budget, seed, strategy, timestep)
                path = prediction_path(out_dir / "runs", run, test_ct)
                record = next((r for r in results["runs"] if Run(**{k: r[k] for k in Run.__dataclass_fields__}) == run), None)
                if path.exists() and record is not None:
                    dsc = record["tests"][test_ct]["mean_dsc"] or 0
                    predictions[f"{strategy_name(strategy, timestep, _timesteps(config, strategy))} {100 * dsc:.0f}%"] = sitk.ReadImage(str(path))
            if predictions:
                ct = cts[test_ct]
                target = overlay_path(out_dir, task["protocol"], task["train_ct"], test_ct, budget)
                figures.append(overlay_figure(ct.ct, ct.labels, predictions, test_slices, ct.slice_axis, target))
    return figures
