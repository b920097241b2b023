"""The label-efficiency report: a Markdown table in the shape of the method's Table III, JSON, overlays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from DiffusionSegLib.organs import ORGANS
from DiffusionSegLib.preprocessing import PreprocessingSpec, labels_to_model_space, to_model_space

NAMES = {"ft-dec": "FT-dec", "lp": "LP", "fs": "FS (from scratch)"}
_COLOURS = np.zeros((256, 3), dtype=np.float32)
for _organ in ORGANS:
    _COLOURS[_organ.label] = _organ.color


def strategy_name(strategy: str, timestep: int, timesteps: list[int]) -> str:
    name = NAMES.get(strategy, strategy)
    return f"{name}, t={timestep}" if strategy == "ft-dec" and len(timesteps) > 1 else name


def budget_name(budget: str, rows: list[dict]) -> str:
    sizes = sorted({n for r in rows if r["budget"] == budget for n in r["train_slices"]})
    if budget == "all":
        return f"all ({sizes[0]} slices)"
    if budget.endswith("%"):
        seeds = max(len(r["seeds"]) for r in rows if r["budget"] == budget)
        return f"{budget} ({sizes[0]} slices, {seeds} seeds)"
    return f"{budget} slices (organ cover)"


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if std else f"{100 * mean:.1f}"


def markdown(results: dict, summary: dict) -> str:
    """Mean DSC (and Jaccard) in %, strategies as rows and label budgets as columns, then per organ."""
    config = results["config"]
    rows = summary["table"]
    budgets = config["budgets"]
    row_keys = [(r["strategy"], r["timestep"]) for r in rows]
    row_keys = sorted(set(row_keys), key=lambda k: (["ft-dec", "lp", "fs"].index(k[0]) if k[0] in NAMES else 9, k[1]))
    lookup = {(r["strategy"], r["timestep"], r["budget"]): r for r in rows}
    header = ["Strategy", *(budget_name(b, rows) for b in budgets)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for metric in ("dsc", "jaccard"):
        label = "DSC" if metric == "dsc" else "Jaccard"
        for strategy, timestep in row_keys:
            cells = [_cell(lookup[(strategy, timestep, b)][f"{metric}_mean"], lookup[(strategy, timestep, b)][f"{metric}_std"])
                     if (strategy, timestep, b) in lookup else "-" for b in budgets]
            lines.append(f"| {strategy_name(strategy, timestep, config['timesteps'])} ({label}) | " + " | ".join(cells) + " |")
    organs = [o.name for o in ORGANS if o.name in set(results["organs_in_test"])]
    first = budgets[0]
    organ_lines = ["| Strategy | " + " | ".join(organs) + " |", "|" + "---|" * (len(organs) + 1)]
    for strategy, timestep in row_keys:
        r = lookup.get((strategy, timestep, first))
        if r:
            cells = [f"{100 * r['organ_dsc'][o]:.0f}" if r["organ_dsc"].get(o) is not None else "-" for o in organs]
            organ_lines.append(f"| {strategy_name(strategy, timestep, config['timesteps'])} | " + " | ".join(cells) + " |")
    split = results["split"]
    return "\n".join([
        "# Label efficiency on abdomen-ct-a",
        "",
        f"Pretrained model: `{results['pretrained']['name']}` (preset {results['pretrained']['preset']}).",
        f"Split: {split['description']}. Test slices: {split['test'][0]}-{split['test'][-1]} in blocks; "
        f"organs in the test slices: {', '.join(results['organs_in_test'])}.",
        f"Fine-tuning: {config['iterations']} iterations, batch {config['batch_size']}, backbone lr {config['lr']:g} (head 10x), "
        f"augmentation {'on' if config['augment'] else 'off'}, the same for every strategy.",
        "",
        "Mean over organs present in the test slices, in %, mean ± std over seeds where the budget is drawn at random.",
        "",
        *lines,
        "",
        f"Per-organ DSC (%) at the {budget_name(first, rows)} budget:",
        "",
        *organ_lines,
        "",
    ])


def write_report(out_dir: Path, results: dict, summary: dict) -> tuple[Path, Path]:
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    for path, text in ((json_path, json.dumps({**results, **summary}, indent=1)), (md_path, markdown(results, summary))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return md_path, json_path


def _overlay(ct: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Grey CT slice (model units, [-1, 1]) with organ colours blended in, as RGB uint8."""
    grey = np.repeat(((ct + 1) * 127.5).clip(0, 255)[..., None], 3, axis=-1)
    colour = _COLOURS[labels]
    mask = (labels > 0)[..., None]
    return np.where(mask, 0.45 * grey + 0.55 * colour, grey).astype(np.uint8)


def overlay_figure(ct: sitk.Image, labels: sitk.Image, predictions: dict[str, sitk.Image], test: list[int], slice_axis: int, path: Path) -> Path:
    """One held-out slice (the one with the most organs): CT, reference and each prediction, side by side."""
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path
