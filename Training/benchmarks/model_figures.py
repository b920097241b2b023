"""Held-out figures of a pretrained model as a user meets it: the `diffusionseg` commands with their defaults.

    python -m Training.benchmarks.model_figures --pretrained MODEL --ct NAME CT LABELS --ct NAME CT LABELS -o OUT
        [--cases four-slice adapt segmentor] [--adapt 120] [--segmentor-iterations 300] [--segmentor-continue 500]

For every labelled CT X (two or more):

- four-slice: the 4 labelled axial slices of X that cover the most organs are "painted" (every other
  slice erased), then ``diffusionseg finetune`` with default settings trains FT-dec from the pretrained
  model, and FS (``--strategy fs --base``: the same architecture and pixels, random initialisation).
  Each model segments every CT; scored within-CT on X's other labelled slices, cross-patient on the
  other CTs' labelled volumes.
- adapt: the same FT-dec run after ``--adapt SECONDS`` of DDPM training on X's own slices.
- segmentor: FT-dec on all labelled slices of X with the bundled segmentor's settings (fresh
  augmentation every iteration), scored on the
  other CTs (leave-one-patient-out: the figure the default model, trained on all CTs, is judged by),
  with and without ``--cleanup``. ``--segmentor-continue N`` then continues that model for N more
  iterations (``finetune --base`` the first model), as the bundled segmentor was trained, and scores it too.
- leave-out: for every CT X, the segmentor recipe (FT-dec on all labelled slices, fresh augmentation) trained on
  every other CT together, partial labels included (``--organs NAME LIST``; default: the organs with any voxel),
  scored on X alone with and without ``--cleanup`` (``--segmentor-continue`` adds the longer recipe). Then
  four painted slices of X are fine-tuned with the command's defaults from that model, the figure that decides
  where ``finetune`` starts by default, beside the same slices from the pretrained model (four-slice's FT-dec).

Every case runs the real commands in child processes and is written to OUT/figures.json as it ends,
so a stopped run resumes; models and segmentations are kept under OUT/, and a model folder already
there (a run stopped after training) is scored rather than trained again; in leave-out, a continued model already
there stands for its whole recipe (its first stage is neither trained nor scored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.atomic import atomic_path, write_text
from DiffusionSegLib.imageio import read_ct, read_labels
from DiffusionSegLib.models import read_card, resolve_model
from DiffusionSegLib.preprocessing import Grid, model_grid
from DiffusionSegLib.strategies import STRATEGIES
from DiffusionSegLib.training_slices import annotated_input_slices

from .label_efficiency import curated_slices, evaluate, slice_pool

CASES = ("four-slice", "adapt", "segmentor", "leave-out")


def slice_axis_of(ct: sitk.Image, spec) -> int:
    return model_grid(Grid.of(ct), spec)[1]


def organ_cover(labels: sitk.Image, axis: int, count: int = 4) -> list[int]:
    """The `count` labelled slices covering the most organs (the benchmark's curated budget)."""
    pool = slice_pool(sitk.GetArrayViewFromImage(labels), annotated_input_slices(labels, axis), axis)
    return curated_slices(pool.organs, pool.pixels, count)


def only_slices(labels: sitk.Image, keep: list[int], axis: int) -> sitk.Image:
    """A copy of `labels` with every slice but `keep` erased, as if only those had been painted."""
    array = sitk.GetArrayFromImage(labels)
    along = np.moveaxis(array, 2 - axis, 0)  # a view: erasing it erases `array`
    erase = np.ones(along.shape[0], dtype=bool)
    erase[keep] = False
    along[erase] = 0
    painted = sitk.GetImageFromArray(array)
    painted.CopyInformation(labels)
    return painted


def run_command(args: list[str], log: Path) -> float:
    """Run `diffusionseg ARGS` in a child process; returns its wall time. Output goes to `log`."""
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "DiffusionSegLib", *args, "--progress", "none"], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"diffusionseg {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.monotonic() - start


def score(prediction: Path, labels: sitk.Image, axis: int, exclude: list[int]) -> dict:
    """Per-organ DSC/Jaccard over the labelled slices of `labels` except `exclude`."""
    pred = sitk.GetArrayFromImage(read_labels(str(prediction), labels))
    ref = sitk.GetArrayViewFromImage(labels)
    keep = [s for s in annotated_input_slices(labels, axis) if s not in set(exclude)]
    return evaluate(pred, ref, keep, axis)


class Figures:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "figures.json"
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, key: str) -> bool:
        return key in self.results

    def save(self, key: str, record: dict) -> None:
        self.results[key] = record
        write_text(self.path, json.dumps(self.results, indent=1) + "\n")
        summary = {k: v for k, v in record.items() if k.endswith("dsc") or k in ("train_seconds",)}
        print(key, json.dumps(summary), flush=True)


def evaluate_model(model: Path, name: str, cts: dict, axes: dict, exclude: dict, out: Path, extra: list[str] | None = None) -> dict:
    """Segment every CT with `model` and score it; `exclude[ct]` are that CT's training slices."""
    record: dict = {}
    for ct_name, (ct_path, labels) in cts.items():
        seg = out / f"{name}-on-{ct_name}.nii.gz"
        seconds = run_command(["segment", ct_path, "-o", str(seg), "--model", str(model), *(extra or [])], out / f"{name}-on-{ct_name}.log")
        metrics = score(seg, labels, axes[ct_name], exclude.get(ct_name, []))
        record[ct_name] = {"segment_seconds": round(seconds, 1), **metrics}
    return record


def summarise(record: dict, trained_on: str) -> dict:
    within = record.get(trained_on, {}).get("mean_dsc")
    cross = [v["mean_dsc"] for k, v in record.items() if k != trained_on and isinstance(v, dict) and v.get("mean_dsc") is not None]
    return {"within_dsc": within, "cross_dsc": float(np.mean(cross)) if cross else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="pretrained model name or folder")
    parser.add_argument("--ct", nargs=3, action="append", required=True, metavar=("NAME", "CT", "LABELS"), help="a labelled CT (repeat)")
    parser.add_argument("-o", "--output", required=True, help="output folder (figures.json, models, logs)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which figures (default all)")
    parser.add_argument("--adapt", type=float, default=120.0, help="seconds of DDPM adaptation in the adapt case (default 120)")
    parser.add_argument("--segmentor-iterations", type=int, default=300, help="FT-dec iterations for the all-slices models (default 300)")
    parser.add_argument("--segmentor-batch", type=int, default=8, help="batch for the all-slices models (default 8)")
    parser.add_argument("--segmentor-lr", type=float, default=1e-4,
                        help="backbone learning rate of the all-slices models, the bundled segmentor's recipe (default 1e-4)")
    parser.add_argument("--segmentor-continue", type=int, default=0,
                        help="then continue each all-slices model for this many iterations and score it too (default 0: no)")
    parser.add_argument("--finetune-config", help="JSON settings passed as --config to the four-slice and adapt fine-tunes "
                        "(default: none, the command's defaults)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["ft-dec", "fs"],
                        help="strategies of the four-slice case (default: ft-dec fs)")
    parser.add_argument("--train-on", nargs="+", help="only the models trained on these CTs (default: every CT)")
    parser.add_argument("--organs", nargs=2, action="append", default=[], metavar=("NAME", "LIST"),
                        help="the organs CT NAME's labels label ('all' or names), passed to finetune --organs "
                             "(default: finetune's, the organs with any voxel)")
    parser.add_argument("--quick", action="store_true", help="2 iterations everywhere: a smoke run of the pipeline, not a figure")
    args = parser.parse_args(argv)
    if len(args.ct) < 2:
        parser.error("give at least two --ct (cross-patient figures need another patient)")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = resolve_model(args.pretrained, "pretrained")
    spec = read_card(pretrained).preprocessing
    cts, axes = {}, {}
    for name, ct_path, labels_path in args.ct:
        ct = read_ct(ct_path)
        cts[name] = (ct_path, read_labels(labels_path, ct))
        axes[name] = slice_axis_of(ct, spec)
    organs = dict(args.organs)
    if unknown := set(organs) - set(cts):
        parser.error(f"--organs names {sorted(unknown)}, which no --ct has")
    figures = Figures(out)

    def train_and_score(key: str, ct_name: str, labels_file: Path, train_slices: list[int], options: list[str]) -> None:
        if figures.done(key):
            return
        model = out / key
        quick = ["--iterations", "2"] if args.quick else []
        if (model / "model.json").is_file():  # trained before the run stopped: score it, its card says how long it took
            seconds = read_card(model).provenance.get("seconds") or 0.0
        else:
            seconds = run_command(["finetune", "--image", cts[ct_name][0], "--labels", str(labels_file), "-o", str(model), *options, *quick],
                                  out / f"{key}.log")
        record = evaluate_model(model, key, cts, axes, {ct_name: train_slices}, out)
        card = read_card(model)
        record.update(summarise(record, ct_name), trained_on=ct_name, train_slices=train_slices, train_seconds=round(seconds, 1),
                      options=options, iterations=card.provenance.get("iterations"), stopped_by=card.provenance.get("stopped_by"))
        figures.save(key, record)

    trained_on = args.train_on or list(cts)
    for name, (_, labels) in cts.items():
        if name not in trained_on:
            continue
        painted_slices = organ_cover(labels, axes[name])
        painted = out / f"{name}-4-slices.nii.gz"
        if not painted.exists():  # atomic: a file cut short by a kill would otherwise be reused next time
            with atomic_path(painted) as tmp:
                sitk.WriteImage(only_slices(labels, painted_slices, axes[name]), str(tmp), useCompression=True)
        base = ["--base", str(pretrained), *(["--config", args.finetune_config] if args.finetune_config else [])]
        if "four-slice" in args.cases:
            for strategy in args.strategies:
                train_and_score(f"{name}-4-{strategy}", name, painted, painted_slices, [*base, "--strategy", strategy])
        if "adapt" in args.cases:
            train_and_score(f"{name}-4-ft-dec-adapt{args.adapt:g}", name, painted, painted_slices, [*base, "--adapt", f"{args.adapt:g}"])

    if "segmentor" in args.cases:
        for name, (_, labels) in cts.items():
            if name not in trained_on:
                continue
            key = f"{name}-all-ft-dec"
            fresh = out / "fresh-augmentation.json"  # no fixed pool: 180 slices would get no augmented copies under the cache cap
            write_text(fresh, json.dumps({"cache_copies": 0}) + "\n")
            options = ["--base", str(pretrained), "--iterations", str(args.segmentor_iterations), "--batch-size", str(args.segmentor_batch),
                       "--lr", f"{args.segmentor_lr:g}", "--patience", "0", "--config", str(fresh)]
            labels_path = next(p for n, _, p in args.ct if n == name)
            options += ["--organs", organs[name]] if name in organs else []
            train_and_score(key, name, Path(labels_path), annotated_input_slices(labels, axes[name]), options)
            keys = [key]
            if args.segmentor_continue:
                more = ["--base", str(out / key), *options[2:]]  # options start with --base PRETRAINED
                more[more.index("--iterations") + 1] = str(args.segmentor_continue)
                keys.append(f"{key}+{args.segmentor_continue}")
                train_and_score(keys[-1], name, Path(labels_path), annotated_input_slices(labels, axes[name]), more)
            for trained in keys:
                cleaned = f"{trained}-cleanup"
                if not figures.done(cleaned):
                    record = evaluate_model(out / trained, cleaned, cts, axes, {}, out, ["--cleanup"])
                    record.update(summarise(record, name), trained_on=name)
                    figures.save(cleaned, record)
    if "leave-out" in args.cases:
        for name in trained_on:
            leave_out(name, cts, axes, args, organs, pretrained, out, figures)
    return 0


def leave_out(held_out: str, cts: dict, axes: dict, args: argparse.Namespace, organs: dict, pretrained: Path, out: Path,
              figures: Figures) -> None:
    """The segmentor recipe on every CT but `held_out`, scored on it; then four of its slices from that model."""
    training = [(n, ct, labels) for n, ct, labels in args.ct if n != held_out]
    data = [flag for n, ct, labels in training
            for flag in ("--image", ct, "--labels", labels, "--organs", organs.get(n, ",".join(str(o) for o in _present(cts[n][1]))))]
    fresh = out / "fresh-augmentation.json"
    write_text(fresh, json.dumps({"cache_copies": 0}) + "\n")
    quick = ["--iterations", "2"] if args.quick else []
    recipe = ["--iterations", str(args.segmentor_iterations), "--batch-size", str(args.segmentor_batch),
              "--lr", f"{args.segmentor_lr:g}", "--patience", "0", "--config", str(fresh)]
    stages = [(f"without-{held_out}", ["--base", str(pretrained), *recipe])]
    if args.segmentor_continue:
        more = list(recipe)
        more[more.index("--iterations") + 1] = str(args.segmentor_continue)
        stages.append((f"without-{held_out}+{args.segmentor_continue}", ["--base", str(out / stages[0][0]), *more]))
    held = {held_out: cts[held_out]}
    for index, (key, options) in enumerate(stages):
        model = out / key
        if not (model / "model.json").is_file():
            if any((out / later / "model.json").is_file() for later, _ in stages[index + 1:]):
                continue  # a later stage is already there (trained elsewhere from this one): score that, do not retrain this
            run_command(["finetune", *data, "-o", str(model), *options, *quick], out / f"{key}.log")
        card = read_card(model)
        for extra, suffix in ((["--cleanup"], "-cleanup"), (["--no-cleanup"], "-no-cleanup")):
            if figures.done(key + suffix):
                continue
            record = evaluate_model(model, key + suffix, held, axes, {}, out, extra)
            record.update(held_out=held_out, trained_on=[n for n, _, _ in training], options=options,
                          train_seconds=round(card.provenance.get("seconds") or 0.0, 1), iterations=card.provenance.get("iterations"),
                          held_out_dsc=record[held_out]["mean_dsc"])
            figures.save(key + suffix, record)
    # Four painted slices of the held-out patient, refined from the model that never saw it.
    painted_slices = organ_cover(cts[held_out][1], axes[held_out])
    painted = out / f"{held_out}-4-slices.nii.gz"
    if not painted.exists():
        with atomic_path(painted) as tmp:
            sitk.WriteImage(only_slices(cts[held_out][1], painted_slices, axes[held_out]), str(tmp), useCompression=True)
    config = ["--config", args.finetune_config] if args.finetune_config else []
    for base_key in [stages[-1][0]]:
        key = f"{held_out}-4-ft-dec-from-{base_key}"
        if figures.done(key):
            continue
        model = out / key
        seconds = (read_card(model).provenance.get("seconds") or 0.0) if (model / "model.json").is_file() else run_command(
            ["finetune", "--image", cts[held_out][0], "--labels", str(painted), "-o", str(model), "--base", str(out / base_key),
             *config, *quick], out / f"{key}.log")
        record = evaluate_model(model, key, held, axes, {held_out: painted_slices}, out)
        record.update(held_out=held_out, base=base_key, train_slices=painted_slices, train_seconds=round(seconds, 1),
                      within_dsc=record[held_out]["mean_dsc"])
        figures.save(key, record)


def _present(labels: sitk.Image) -> list[int]:
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v]


if __name__ == "__main__":
    sys.exit(main())
