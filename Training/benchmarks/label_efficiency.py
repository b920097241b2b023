"""The label-efficiency benchmark: how much DDPM pretraining helps when only a few slices are labelled.

The method's protocol (its Tables III and IV) at the scale of a few labelled CTs:

- Protocols. `cross` (the headline) trains on one CT's labelled slices and tests on all labelled
  slices of every other CT, in every direction, as the method holds out whole scans. `within` cuts
  one CT's labelled slices into blocks of `block` contiguous slices, holds out every third block
  (the 2nd, 5th, ...) and drops one guard slice either side of each from the training pool; its test
  slices lie two slices from training ones, so its scores are optimistic (a second table).
- Budgets, taken from the training pool: `4` slices chosen greedily to cover the most organs (as the
  method's curated 0.1%), `P%` drawn at random per seed (at least one slice; the rounding is
  reported), `100%` or `all`.
- Strategies: FT-dec; LP, the method's linear classifier (one 1x1 conv) on the frozen decoder
  features, its class biases started at the training labels' log class frequencies; LP-MLP, the
  2-layer head on the same features; FS, the same architecture, head and preprocessing from random
  initialisation. Each strategy has its own list of timesteps.
- Iterations: one rule for every strategy, clamp(epochs x ceil(slices / batch), min, max).
- Augmentation: fresh random augmentation at every iteration for every strategy: the fine-tuning
  loop's pool of cached frozen features (a fixed set of augmented copies) is turned off, so frozen
  layers are recomputed, without autograd, on each new batch.
- Seeds: every run is repeated per seed (the random draw of a budget, the new layers' initialisation,
  batch order and augmentation); scores are mean +- std over seeds (and directions). A budget may run
  its own seeds (one for the costly 100%, which is not a random draw).
- Metrics: per-organ DSC and Jaccard over the test slices taken together, on the test CT's own grid.

Every run is saved as it finishes (runs/*.json) with the settings it ran under, so an interrupted
benchmark resumes, a changed plan redoes only the runs whose settings changed, a plan can be split over
processes writing to one folder, and an interim report covers the runs finished so far.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DiffusionSegLib import strategies
from DiffusionSegLib.atomic import atomic_path, write_text
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.finetune import FinetuneConfig, finetune
from DiffusionSegLib.inference import segment_ct
from DiffusionSegLib.metrics import organ_overlap
from DiffusionSegLib.models import WEIGHTS_FILE, ModelCard, load_unet, portable_path
from DiffusionSegLib.preprocessing import ModelSpaceVolume, PreprocessingSpec, labels_to_model_space, to_model_space
from DiffusionSegLib.recipe import new_segmentor
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.strategies import ALL_STRATEGIES, STRATEGIES
from DiffusionSegLib.training_slices import annotated_input_slices, organs_in

DEFAULT_STRATEGIES = STRATEGIES  # the offered ones; lp-mlp on request
PROTOCOLS = ("cross", "within")
DEFAULT_BUDGETS = ("4", "1%", "10%", "100%")


# --- budgets -----------------------------------------------------------------------------------------


def check_budget(text: str) -> str:
    """A budget as given: N slices (organ cover), P% of the pool (0 < P <= 100, random) or 'all'."""
    if text == "all" or (text.isdigit() and int(text) > 0):
        return text
    if text.endswith("%"):
        try:
            if 0 < float(text[:-1]) <= 100:
                return text
        except ValueError:
            pass
    raise InputError(f"--budgets {text}: use a slice count (4), a percentage of the training pool (10%, at most 100%) or 'all'")


def is_curated(budget: str) -> bool:
    return budget.isdigit()


@dataclass
class BudgetSize:
    slices: int
    note: str  # how the size was arrived at, for the report


def budget_size(budget: str, pool: int) -> BudgetSize:
    """How many slices `budget` takes from a pool of `pool`; percentages round half up, to at least one slice."""
    if budget == "all":
        return BudgetSize(pool, f"all {pool} slices")
    if is_curated(budget):
        used = min(int(budget), pool)
        return BudgetSize(used, f"{used} slices covering the most organs" + (f" (the whole pool of {pool})" if used < int(budget) else ""))
    exact = float(budget[:-1]) / 100 * pool
    used = min(pool, max(1, math.floor(exact + 0.5)))
    if math.isclose(used, exact):
        note = f"{budget} of {pool} = {used} slices"
    elif exact < 1:
        note = f"{budget} of {pool} = {exact:.3g} slices, rounded up to 1 (at least one slice)"
    else:
        note = f"{budget} of {pool} = {exact:.3g} slices, rounded to {used}"
    return BudgetSize(used, note)


@dataclass
class SlicePool:
    """Slices a budget is drawn from, with the organs and labelled pixels of each (for the organ cover)."""

    slices: list[int]
    organs: dict[int, set[int]]
    pixels: dict[int, int]


def slice_pool(reference: np.ndarray, slices: list[int], slice_axis: int) -> SlicePool:
    axis = 2 - slice_axis  # SimpleITK axis i is array axis 2 - i
    planes = {s: np.take(reference, s, axis=axis) for s in slices}
    return SlicePool(list(slices), {s: set(np.unique(p).tolist()) - {0} for s, p in planes.items()},
                     {s: int(np.count_nonzero(p)) for s, p in planes.items()})


def curated_slices(organs_per_slice: dict[int, set[int]], pixels_per_slice: dict[int, int], count: int = 4, min_gap: int = 6) -> list[int]:
    """Greedy organ cover: each pick adds the most organs not yet covered (ties: more organs, more
    labelled pixels), keeping picks `min_gap` slices apart where the pool allows."""
    chosen: list[int] = []
    covered: set[int] = set()
    candidates = sorted(organs_per_slice)
    for gap in (min_gap, 1):
        while len(chosen) < min(count, len(candidates)):
            free = [s for s in candidates if s not in chosen and all(abs(s - c) >= gap for c in chosen)]
            if not free:
                break
            best = max(free, key=lambda s: (len(organs_per_slice[s] - covered), len(organs_per_slice[s]), pixels_per_slice[s], -s))
            chosen.append(best)
            covered |= organs_per_slice[best]
    return sorted(chosen)


def budget_slices(budget: str, seed: int, pool: SlicePool) -> list[int]:
    """The training slices of one budget: the organ cover (the same for every seed) or a random draw per seed."""
    size = budget_size(budget, len(pool.slices)).slices
    if is_curated(budget):
        return curated_slices(pool.organs, pool.pixels, size)
    if size >= len(pool.slices):
        return list(pool.slices)
    rng = np.random.default_rng(seed)
    return sorted(int(s) for s in rng.choice(pool.slices, size=size, replace=False))


# --- the within-CT split ---------------------------------------------------------------------------------


@dataclass
class Split:
    labelled: list[int]  # input slice indices with any label, in order
    test: list[int]
    pool: list[int]
    block: int

    def describe(self) -> str:
        return (
            f"{len(self.labelled)} labelled slices in blocks of {self.block}; every third block held out "
            f"({len(self.test)} test slices), one guard slice either side of each; pool {len(self.pool)} slices"
        )


def split_slices(labelled: list[int], block: int = 8) -> Split:
    """Held-out blocks and the training pool, with guard slices between them."""
    if len(labelled) < 3 * block:
        raise InputError(f"only {len(labelled)} labelled slices: the split needs at least {3 * block} (3 blocks of {block}); lower --block")
    blocks = [labelled[i : i + block] for i in range(0, len(labelled), block)]
    test_positions = {i for b, chunk in enumerate(blocks) if b % 3 == 1 for i in range(b * block, b * block + len(chunk))}
    guard = {p + d for p in test_positions for d in (-1, 1)} - test_positions
    test = [labelled[p] for p in sorted(test_positions)]
    pool = [s for p, s in enumerate(labelled) if p not in test_positions and p not in guard]
    return Split(labelled=list(labelled), test=test, pool=pool, block=block)


# --- settings ----------------------------------------------------------------------------------------


@dataclass
class IterationRule:
    """Iterations per run from the number of training slices, the same for every strategy."""

    epochs: int = 50
    min_iterations: int = 200
    max_iterations: int = 2000

    def iterations(self, slices: int, batch_size: int) -> int:
        return min(self.max_iterations, max(self.min_iterations, self.epochs * math.ceil(slices / batch_size)))

    def describe(self, batch_size: int) -> str:
        if self.min_iterations == self.max_iterations:
            return f"{self.max_iterations} iterations for every budget"
        return (f"iterations = clamp({self.epochs} epochs x ceil(slices / {batch_size}), {self.min_iterations}, {self.max_iterations}), "
                "no early stop")


@dataclass
class BenchmarkConfig:
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    budgets: list[str] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    timesteps: dict[str, list[int]] = field(default_factory=dict)  # per strategy; a strategy not named runs at t = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget_seeds: dict[str, list[int]] = field(default_factory=dict)  # per budget; a budget not named runs every seed
    rule: IterationRule = field(default_factory=IterationRule)
    batch_size: int = 4
    lr: float = 1e-4
    block: int = 8
    augment: bool = True

    def timesteps_of(self, strategy: str) -> list[int]:
        return self.timesteps.get(strategy, [0])

    def seeds_of(self, budget: str) -> list[int]:
        return self.budget_seeds.get(budget, self.seeds)

    def all_seeds(self) -> list[int]:
        return list(dict.fromkeys(s for b in self.budgets for s in self.seeds_of(b)))

    def finetune_config(self, name: str, iterations: int, seed: int) -> FinetuneConfig:
        row = strategies.get(name)
        settings = FinetuneConfig(strategy=row.finetune_as, iterations=iterations, batch_size=self.batch_size, lr=self.lr, seed=seed,
                                  patience=0, cache_copies=0,  # no plateau stop; no fixed pool of augmented copies
                                  prior_bias=row.head_layers == 0)  # a linear head cannot learn the background prior in time
        settings.augment.enabled = self.augment
        return settings


def parse_timesteps(tokens: list[str]) -> dict[str, list[int]]:
    """`ft-dec=0,100 lp=0,100,200`: timesteps per strategy; bare numbers are FT-dec's."""
    chosen: dict[str, list[int]] = {}
    for token in tokens:
        name, _, values = token.rpartition("=")
        name = name or "ft-dec"
        if name not in ALL_STRATEGIES:
            raise InputError(f"--timesteps {token}: unknown strategy {name!r}; use STRATEGY=T,T... with one of {', '.join(ALL_STRATEGIES)}")
        try:
            steps = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            steps = []
        if not steps or min(steps) < 0:
            raise InputError(f"--timesteps {token}: give non-negative integer timesteps, e.g. {name}=0,100")
        chosen.setdefault(name, [])
        chosen[name] += [t for t in steps if t not in chosen[name]]
    return chosen


def parse_budget_seeds(tokens: list[str], budgets: list[str]) -> dict[str, list[int]]:
    """`100%=0 4=0,1`: the seeds of a budget, e.g. one seed for a costly budget that is not a random draw."""
    chosen: dict[str, list[int]] = {}
    for token in tokens:
        budget, sep, values = token.rpartition("=")
        if not sep or budget not in budgets:
            raise InputError(f"--budget-seeds {token}: use BUDGET=S,S... with one of --budgets ({' '.join(budgets)}), e.g. 100%=0")
        try:
            seeds = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            seeds = []
        if not seeds:
            raise InputError(f"--budget-seeds {token}: give integer seeds, e.g. {budget}=0,1")
        chosen[budget] = list(dict.fromkeys(chosen.get(budget, []) + seeds))
    return chosen


# --- data --------------------------------------------------------------------------------------------


@dataclass
class LabelledCT:
    """A labelled CT, with its model-space slices computed once for every run that trains on it."""

    name: str
    ct: sitk.Image
    labels: sitk.Image
    slice_axis: int  # input axis the model slices along
    labelled: list[int]  # input slice indices holding any label
    volume: ModelSpaceVolume
    model_labels: np.ndarray
    source: dict = field(default_factory=dict)

    @property
    def reference(self) -> np.ndarray:
        return sitk.GetArrayViewFromImage(self.labels)

    def training_data(self, slices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-space images (K x 1 x S x S) and labels (K x S x S) of input slices, as `training_slices` gives them."""
        ks = [self.volume.model_slice(i) for i in slices]
        return torch.from_numpy(self.volume.slices[ks]).float()[:, None], torch.from_numpy(self.model_labels[ks]).long()

    def describe(self) -> dict:
        return {**self.source, "labelled_slices": len(self.labelled), "organs": organs_in(self.reference)}


def labelled_ct(name: str, ct: sitk.Image, labels: sitk.Image, spec: PreprocessingSpec, source: dict | None = None) -> LabelledCT:
    volume = to_model_space(ct, spec)
    labelled = annotated_input_slices(labels, volume.slice_axis)
    if not labelled:
        raise InputError(f"{name}: the labels hold no labelled voxel")
    return LabelledCT(name, ct, labels, volume.slice_axis, labelled, volume, labels_to_model_space(labels, volume), source or {})


GENERIC_STEMS = {"ct", "image", "img", "volume", "scan", "labels", "data"}


def ct_names(paths: list[str]) -> list[str]:
    """Short unique names for the CTs: the file name without extensions, or its folder's when that is generic or shared."""
    def stem(path: Path) -> str:
        return re.sub(r"(\.(nii|nrrd|mha|mhd|gz|seg))+$", "", path.name, flags=re.IGNORECASE)

    stems = [stem(Path(p)) for p in paths]
    names = [Path(p).resolve().parent.name if (s.lower() in GENERIC_STEMS or stems.count(s) > 1) and Path(p).is_file() else s
             for p, s in zip(paths, stems, strict=True)]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", n) or "ct" for n in names]
    return [n if names.count(n) == 1 else f"{n}-{i + 1}" for i, n in enumerate(names)]


@dataclass
class Pretrained:
    path: Path
    card: ModelCard
    unet_state: dict[str, torch.Tensor]
    weights_sha256: str

    def describe(self) -> dict:
        spec = self.card.preprocessing
        return {"path": portable_path(self.path), "name": self.card.name, "preset": self.card.preset, "size": spec.size, "spacing_mm": spec.spacing_mm,
                "weights_sha256": self.weights_sha256, "provenance": self.card.provenance}


def load_pretrained(folder: Path) -> Pretrained:
    unet, card = load_unet(folder)
    digest = hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    return Pretrained(Path(folder), card, unet.state_dict(), digest)


# --- the plan ------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One protocol on one training CT: the pool budgets come from, and where the models are tested."""

    protocol: str
    train: LabelledCT
    pool: SlicePool
    tests: list[tuple[LabelledCT, list[int]]]  # (CT, input slices scored)
    split: Split | None = None


def plan_tasks(cts: list[LabelledCT], protocols: list[str], block: int) -> list[Task]:
    """Cross-patient: train on each CT's labelled slices, test on every other CT. Within-CT: the block split of each CT."""
    tasks = []
    if "cross" in protocols and len(cts) >= 2:
        for ct in cts:
            tests = [(other, other.labelled) for other in cts if other is not ct]
            tasks.append(Task("cross", ct, slice_pool(ct.reference, ct.labelled, ct.slice_axis), tests))
    if "within" in protocols:
        for ct in cts:
            split = split_slices(ct.labelled, block)
            tasks.append(Task("within", ct, slice_pool(ct.reference, split.pool, ct.slice_axis), [(ct, split.test)], split))
    return tasks


@dataclass(frozen=True)
class Run:
    protocol: str
    train_ct: str
    budget: str
    seed: int
    strategy: str
    timestep: int

    @property
    def key(self) -> str:
        return f"{self.protocol}-{self.train_ct}-{self.budget.replace('%', 'pct')}-seed{self.seed}-{self.strategy}-t{self.timestep}"


def plan_runs(config: BenchmarkConfig, tasks: list[Task]) -> list[tuple[Run, Task]]:
    """Every (budget, seed, strategy, timestep) on every task; seeds outermost, so a stopped benchmark has whole tables."""
    runs = []
    for protocol in PROTOCOLS:
        for seed in config.all_seeds():
            for budget in (b for b in config.budgets if seed in config.seeds_of(b)):
                for task in (t for t in tasks if t.protocol == protocol):
                    for strategy in config.strategies:
                        runs += [(Run(protocol, task.train.name, budget, seed, strategy, t), task) for t in config.timesteps_of(strategy)]
    return runs


def budget_table(config: BenchmarkConfig, tasks: list[Task]) -> dict:
    """Per protocol and training CT: each budget's pool, slices, how they were rounded and the iterations."""
    table: dict[str, dict] = {}
    for task in tasks:
        pool = len(task.pool.slices)
        entry = {}
        for budget in config.budgets:
            size = budget_size(budget, pool)
            entry[budget] = {"pool": pool, "slices": size.slices, "note": size.note, "iterations": config.rule.iterations(size.slices, config.batch_size)}
        table.setdefault(task.protocol, {})[task.train.name] = entry
    return table


# --- one run -------------------------------------------------------------------------------------------


def build_segmentor(run: Run, pretrained: Pretrained) -> Segmentor:
    """The run's network: pretrained backbone (random for FS) and the strategy's head, seeded by the run."""
    torch.manual_seed(run.seed)
    return new_segmentor(pretrained.card, run.strategy, head_layers=strategies.get(run.strategy).head_layers, timestep=run.timestep,
                         unet_state=pretrained.unet_state)


def evaluate(prediction: np.ndarray, reference: np.ndarray, test: list[int], slice_axis: int) -> dict:
    """Per-organ DSC/Jaccard over the test slices taken together."""
    axis = 2 - slice_axis
    return organ_overlap(np.take(prediction, test, axis=axis), np.take(reference, test, axis=axis))


def run_one(run: Run, task: Task, train_slices: list[int], settings: FinetuneConfig, pretrained: Pretrained,
            device: torch.device) -> tuple[dict, dict[str, np.ndarray]]:
    """Fine-tune one model on `train_slices`, segment each test CT, score its test slices."""
    segmentor = build_segmentor(run, pretrained)
    images, labels = task.train.training_data(train_slices)
    start = time.monotonic()
    result = finetune(segmentor, images, labels, settings, device)
    train_seconds = time.monotonic() - start
    start = time.monotonic()
    tests, predictions = {}, {}
    for ct, slices in task.tests:
        predictions[ct.name] = sitk.GetArrayFromImage(segment_ct(ct.ct, segmentor, pretrained.card.preprocessing, device))
        tests[ct.name] = {"test_slices": len(slices), **evaluate(predictions[ct.name], ct.reference, slices, ct.slice_axis)}
    record = {
        **asdict(run),
        "train_slices": train_slices,
        "organs_in_training": organs_in(labels.numpy()),
        "iterations": result.iterations,
        "final_loss": result.final_loss,
        "train_seconds": round(train_seconds, 1),
        "segment_seconds": round(time.monotonic() - start, 1),
        "tests": tests,
    }
    return record, predictions


def run_settings(config: BenchmarkConfig, run: Run, task: Task, train_slices: list[int], pretrained: Pretrained) -> dict:
    """Everything a finished run must share with the current plan to be reused instead of redone."""
    settings = config.finetune_config(run.strategy, config.rule.iterations(len(train_slices), config.batch_size), run.seed)
    return {
        "pretrained_sha256": pretrained.weights_sha256,
        "finetune": settings.to_dict(),
        "head_layers": strategies.get(run.strategy).head_layers,
        "train_slices": train_slices,
        "tests": {ct.name: slices for ct, slices in task.tests},
    }


def prediction_path(runs_dir: Path, run: Run, test_ct: str) -> Path:
    return runs_dir / f"{run.key}-on-{test_ct}.nii.gz"


def run_benchmark(
    pretrained: Pretrained,
    cts: list[LabelledCT],
    out_dir: Path,
    config: BenchmarkConfig,
    device: torch.device,
    on_run: Callable[[Run, dict, bool], None] | None = None,
    report_only: bool = False,
) -> dict:
    """All runs of the plan (finished ones with the same settings are read back, not redone); the raw results.

    `report_only` trains nothing: the results hold the finished runs and name the missing ones (an interim
    report of a long benchmark, or one split over several processes).
    """
    tasks = plan_tasks(cts, config.protocols, config.block)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    records, missing = [], []
    for run, task in plan_runs(config, tasks):
        train = budget_slices(run.budget, run.seed, task.pool)
        settings = run_settings(config, run, task, train, pretrained)
        path = runs_dir / f"{run.key}.json"
        if path.exists() and (saved := json.loads(path.read_text(encoding="utf-8"))).get("settings") == settings:
            records.append(saved)
            if on_run:
                on_run(run, saved, True)
            continue
        if report_only:
            missing.append(run.key)
            continue
        record, predictions = run_one(run, task, train, FinetuneConfig.from_dict(settings["finetune"]), pretrained, device)
        record["settings"] = settings
        if run.budget == config.budgets[0] and run.seed == config.seeds_of(run.budget)[0]:  # kept for the overlay figures
            for ct, _ in task.tests:
                _write_atomic_image(predictions[ct.name], ct.labels, prediction_path(runs_dir, run, ct.name))
        write_text(path, json.dumps(record, indent=1) + "\n")
        records.append(record)
        if on_run:
            on_run(run, record, False)
    return {
        "pretrained": pretrained.describe(),
        "cts": {ct.name: ct.describe() for ct in cts},
        "tasks": [{"protocol": t.protocol, "train_ct": t.train.name, "pool": t.pool.slices, "tests": {ct.name: s for ct, s in t.tests},
                   "split": None if t.split is None else {**asdict(t.split), "description": t.split.describe()}} for t in tasks],
        "config": asdict(config),
        "budgets": budget_table(config, tasks),
        "runs": records,
        "missing": missing,
    }


def _write_atomic_image(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


# --- summary -----------------------------------------------------------------------------------------


def summarise(results: dict) -> dict:
    """Mean and std over seeds and directions per (strategy, timestep, budget): cross-patient, and within each CT."""
    groups: dict[tuple, list[tuple[dict, str]]] = {}
    for r in results["runs"]:
        scope = "cross" if r["protocol"] == "cross" else r["train_ct"]
        for test in r["tests"]:
            groups.setdefault((r["protocol"], scope, r["strategy"], r["timestep"], r["budget"]), []).append((r, test))
    summary: dict = {"cross": [], "within": {}}
    for (protocol, scope, strategy, timestep, budget), members in groups.items():
        row = {"strategy": strategy, "timestep": timestep, "budget": budget, **_scores(members)}
        if protocol == "cross":
            summary["cross"].append(row)
        else:
            summary["within"].setdefault(scope, []).append(row)
    return summary


def _scores(members: list[tuple[dict, str]]) -> dict:
    """Mean +- std of the mean DSC/Jaccard over (run, test CT) pairs, per organ, and per direction."""
    def stats(pairs: list[tuple[dict, str]]) -> dict:
        dsc = [r["tests"][t]["mean_dsc"] for r, t in pairs if r["tests"][t]["mean_dsc"] is not None]
        jac = [r["tests"][t]["mean_jaccard"] for r, t in pairs if r["tests"][t]["mean_jaccard"] is not None]
        return {"n": len(dsc), "dsc_mean": _mean(dsc), "dsc_std": _std(dsc), "jaccard_mean": _mean(jac), "jaccard_std": _std(jac)}

    directions: dict[str, list[tuple[dict, str]]] = {}
    for r, t in members:
        directions.setdefault(f"{r['train_ct']} -> {t}", []).append((r, t))
    organs = sorted({o for r, t in members for o in r["tests"][t]["organs"]})
    trained = sorted({r["train_ct"] for r, _ in members})
    return {
        **stats(members),
        "seeds": sorted({r["seed"] for r, _ in members}),
        "organ_dsc": {o: _mean([r["tests"][t]["organs"][o]["dsc"] for r, t in members if o in r["tests"][t]["organs"]]) for o in organs},
        "directions": {d: {**stats(pairs), "seeds": [r["seed"] for r, _ in pairs]} for d, pairs in directions.items()},
        "train_slices": {c: sorted({len(r["train_slices"]) for r, _ in members if r["train_ct"] == c}) for c in trained},
        "iterations": {c: sorted({r["iterations"] for r, _ in members if r["train_ct"] == c}) for c in trained},
        "train_seconds": _mean([r["train_seconds"] for r, _ in members]),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
