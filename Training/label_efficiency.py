"""The label-efficiency benchmark: how much DDPM pretraining helps when only a few slices are labelled.

The method's protocol at the scale of one labelled CT:

- Split: the labelled axial slices are cut into blocks of `block` contiguous slices; every third
  block (the 2nd, 5th, 8th, ...) is held out for testing, and one guard slice either side of each
  held-out block is dropped from the training pool, so no training slice touches a test slice.
- Budgets: `4` slices chosen greedily to cover as many organs as possible (as the method's curated
  0.1%), `10%` of the pool drawn at random (one draw per seed), and `all` of the pool.
- Strategies: FT-dec and LP from the pretrained backbone, FS (the same architecture from random
  initialisation); the same iterations, batch and augmentation for all; FT-dec optionally at
  several diffusion timesteps.
- Metrics: per-organ DSC and Jaccard over the held-out slices, on the CT's own grid.

Every run is saved as it finishes (runs/*.json), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DiffusionSegLib.annotations import annotated_input_slices, organs_in, training_slices
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.finetune import FinetuneConfig, finetune
from DiffusionSegLib.inference import segment_ct
from DiffusionSegLib.metrics import organ_overlap
from DiffusionSegLib.models import ModelCard, load_unet
from DiffusionSegLib.preprocessing import Grid, model_grid
from DiffusionSegLib.segmentor import DEFAULT_HEAD_WIDTH, Segmentor

STRATEGY_ORDER = ("ft-dec", "lp", "fs")


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


@dataclass
class BenchmarkConfig:
    budgets: list[str] = field(default_factory=lambda: ["4", "10%", "all"])
    strategies: list[str] = field(default_factory=lambda: list(STRATEGY_ORDER))
    timesteps: list[int] = field(default_factory=lambda: [0])  # for ft-dec; other strategies use the first
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # random budgets use all, fixed budgets the first
    iterations: int = 300
    batch_size: int = 4
    lr: float = 1e-4
    block: int = 8
    augment: bool = True


@dataclass
class Run:
    budget: str
    seed: int
    strategy: str
    timestep: int

    @property
    def key(self) -> str:
        return f"{self.budget.replace('%', 'pct')}-seed{self.seed}-{self.strategy}-t{self.timestep}"


def plan_runs(config: BenchmarkConfig) -> list[Run]:
    runs = []
    for budget in config.budgets:
        seeds = config.seeds if budget.endswith("%") else config.seeds[:1]
        for seed in seeds:
            for strategy in config.strategies:
                timesteps = config.timesteps if strategy == "ft-dec" else config.timesteps[:1]
                runs.extend(Run(budget, seed, strategy, t) for t in timesteps)
    return runs


def budget_slices(budget: str, seed: int, split: Split, labels: np.ndarray, slice_axis: int) -> list[int]:
    """The training slices of one budget: '4' (curated; any integer works), '10%' (random), 'all'."""
    if budget == "all":
        return list(split.pool)
    if budget.endswith("%"):
        n = max(1, round(float(budget[:-1]) / 100 * len(split.pool)))
        rng = np.random.default_rng(seed)
        return sorted(int(s) for s in rng.choice(split.pool, size=min(n, len(split.pool)), replace=False))
    count = int(budget)
    organs = {s: set(np.unique(np.take(labels, s, axis=2 - slice_axis)).tolist()) - {0} for s in split.pool}
    pixels = {s: int(np.count_nonzero(np.take(labels, s, axis=2 - slice_axis))) for s in split.pool}
    return curated_slices(organs, pixels, count)


def only_slices(labels: sitk.Image, keep: list[int], slice_axis: int) -> sitk.Image:
    """A copy of `labels` with every slice but `keep` erased, as if only those had been painted."""
    array = sitk.GetArrayFromImage(labels)
    along = np.moveaxis(array, 2 - slice_axis, 0)  # a view: erasing it erases `array`
    erase = np.ones(along.shape[0], dtype=bool)
    erase[keep] = False
    along[erase] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out


def evaluate(prediction: np.ndarray, reference: np.ndarray, test: list[int], slice_axis: int) -> dict:
    """Per-organ DSC/Jaccard over the held-out slices taken together."""
    axis = 2 - slice_axis
    return organ_overlap(np.take(prediction, test, axis=axis), np.take(reference, test, axis=axis))


def run_one(
    run: Run,
    config: BenchmarkConfig,
    ct: sitk.Image,
    labels: sitk.Image,
    train_slices: list[int],
    split: Split,
    slice_axis: int,
    pretrained: tuple[dict[str, torch.Tensor], ModelCard],
    device: torch.device,
) -> tuple[dict, np.ndarray]:
    """Fine-tune one model on `train_slices`, segment the whole CT, score the held-out slices."""
    unet_state, card = pretrained
    torch.manual_seed(run.seed)
    segmentor = Segmentor(card.unet, DEFAULT_HEAD_WIDTH.get(card.preset or "", 64), timestep=run.timestep)
    if run.strategy != "fs":
        segmentor.load_pretrained(unet_state)
    data = training_slices([(ct, only_slices(labels, train_slices, slice_axis))], card.preprocessing)
    settings = FinetuneConfig(strategy=run.strategy, iterations=config.iterations, batch_size=config.batch_size, lr=config.lr, seed=run.seed, patience=0)
    settings.augment.enabled = config.augment
    start = time.monotonic()
    result = finetune(segmentor, data.images, data.labels, settings, device)
    train_seconds = time.monotonic() - start
    start = time.monotonic()
    prediction = sitk.GetArrayFromImage(segment_ct(ct, segmentor, card.preprocessing, device))
    segment_seconds = time.monotonic() - start
    scores = evaluate(prediction, sitk.GetArrayViewFromImage(labels), split.test, slice_axis)
    record = {
        **asdict(run),
        "settings": run_settings(config),
        "train_slices": train_slices,
        "organs_in_training": data.summary()["organs"],
        "iterations": result.iterations,
        "final_loss": result.final_loss,
        "train_seconds": round(train_seconds, 1),
        "segment_seconds": round(segment_seconds, 1),
        **scores,
    }
    return record, prediction


def run_settings(config: BenchmarkConfig) -> dict:
    """What a finished run must share with the current plan to be reused instead of redone."""
    return {"iterations": config.iterations, "batch_size": config.batch_size, "lr": config.lr, "block": config.block, "augment": config.augment}


@dataclass
class BenchmarkData:
    ct: sitk.Image
    labels: sitk.Image
    split: Split
    slice_axis: int


def load_benchmark_data(ct: sitk.Image, labels: sitk.Image, card: ModelCard, block: int) -> BenchmarkData:
    _, slice_axis, _ = model_grid(Grid.of(ct), card.preprocessing)  # the axis the model slices along
    labelled = annotated_input_slices(labels, slice_axis)
    return BenchmarkData(ct, labels, split_slices(labelled, block), slice_axis)


def run_benchmark(
    pretrained_dir: Path,
    ct: sitk.Image,
    labels: sitk.Image,
    out_dir: Path,
    config: BenchmarkConfig,
    device: torch.device,
    on_run: Callable[[Run, dict, bool], None] | None = None,
) -> dict:
    """All runs of the plan (finished ones are read back, not redone); returns the raw results."""
    unet, card = load_unet(pretrained_dir)
    if card.kind != "pretrained":
        raise InputError(f"{pretrained_dir}: is a {card.kind} model; the benchmark starts from a pretrained (kind 'pretrained') model")
    pretrained = (unet.state_dict(), card)
    data = load_benchmark_data(ct, labels, card, config.block)
    reference = sitk.GetArrayViewFromImage(labels)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for run in plan_runs(config):
        path = runs_dir / f"{run.key}.json"
        if path.exists() and json.loads(path.read_text()).get("settings") == run_settings(config):
            record = json.loads(path.read_text())
            records.append(record)
            if on_run:
                on_run(run, record, True)
            continue
        train = budget_slices(run.budget, run.seed, data.split, reference, data.slice_axis)
        record, prediction = run_one(run, config, ct, labels, train, data.split, data.slice_axis, pretrained, device)
        if run.budget == config.budgets[0]:  # kept for the overlay figure
            _write_atomic_image(prediction, labels, runs_dir / f"{run.key}.nii.gz")
        _write_atomic_text(path, json.dumps(record, indent=1))
        records.append(record)
        if on_run:
            on_run(run, record, False)
    return {
        "pretrained": {"path": str(pretrained_dir), "name": card.name, "preset": card.preset, "provenance": card.provenance},
        "split": {**asdict(data.split), "description": data.split.describe()},
        "organs_in_test": organs_in(np.take(reference, data.split.test, axis=2 - data.slice_axis)),
        "config": asdict(config),
        "runs": records,
    }


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_atomic_image(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)


def summarise(results: dict) -> dict:
    """Mean and std over seeds of the mean DSC/Jaccard per (strategy, timestep, budget), and per organ."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["strategy"], r["timestep"], r["budget"]), []).append(r)
    table = []
    for (strategy, timestep, budget), records in groups.items():
        dsc = [r["mean_dsc"] for r in records if r["mean_dsc"] is not None]
        jac = [r["mean_jaccard"] for r in records if r["mean_jaccard"] is not None]
        organs = sorted({o for r in records for o in r["organs"]})
        table.append({
            "strategy": strategy, "timestep": timestep, "budget": budget, "seeds": [r["seed"] for r in records],
            "train_slices": [len(r["train_slices"]) for r in records],
            "dsc_mean": _mean(dsc), "dsc_std": _std(dsc), "jaccard_mean": _mean(jac), "jaccard_std": _std(jac),
            "organ_dsc": {o: _mean([r["organs"][o]["dsc"] for r in records if o in r["organs"]]) for o in organs},
            "train_seconds": _mean([r["train_seconds"] for r in records]),
        })
    return {"table": table}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _std(values: list[float]) -> float | None:
    return float(np.std(values)) if len(values) > 1 else (0.0 if values else None)

