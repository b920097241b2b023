"""`export`: a training run's EMA weights as an engine model folder (``kind: pretrained``)."""

from __future__ import annotations

import json
from pathlib import Path

from DiffusionSegLib import __version__
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.models import ModelCard, now_iso, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.unet import UNetConfig

from .checkpoint import latest_checkpoint, load_checkpoint


def export(run_dir: str | Path, out: str | Path, *, name: str | None = None, half: bool = False) -> Path:
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise InputError(f"{run_dir}: no complete checkpoint to export; train with 'diffusionseg-train pretrain --out {run_dir}' first")
    saved = load_checkpoint(latest, restore_random_state=False)
    state = saved.state
    data_dir = Path(state["data"])
    report = {}
    if (data_dir / "report.json").is_file():
        report = json.loads((data_dir / "report.json").read_text())
    card = ModelCard(
        kind="pretrained",
        unet=UNetConfig.from_dict(state["unet"]),
        preprocessing=PreprocessingSpec.from_dict(state["preprocessing"]),
        schedule=state["schedule"],
        preset=state["config"]["preset"],
        name=name or Path(out).name,
        provenance={
            "created": now_iso(),
            "diffusionseg_version": __version__,
            "weights": "EMA",
            "run": str(run_dir.resolve()),
            "checkpoint": latest.name,
            "iterations": saved.step,
            "final_loss": state.get("final_loss"),
            "training_seconds": state.get("history", {}).get("seconds"),
            "hardware": state.get("hardware"),
            "data": {"slices_dir": str(data_dir), "volumes": report.get("volumes"), "slices": report.get("slices"),
                     "skipped": report.get("skipped", [])},
            "config": state["config"],
        },
    )
    return save_model(out, card, saved.ema, half=half)
