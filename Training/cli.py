"""`diffusionseg-train` / `python -m Training`: prepare, pretrain, sample, export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from DiffusionSegLib.devices import configure_cpu_threads, resolve_device
from DiffusionSegLib.diffusion import SCHEDULES, GaussianDiffusion
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.models import load_unet
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel

from .checkpoint import latest_checkpoint, load_checkpoint
from .export import export
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


def cmd_export(args: argparse.Namespace) -> int:
    folder = export(args.run, args.output, name=args.name, half=args.half)
    print(f"wrote {folder}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "sample": cmd_sample, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cpu_threads()
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"diffusionseg-train: error: {e}", file=sys.stderr)
        return 2
