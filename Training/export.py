"""`export`: a training run's EMA weights as an engine model folder (``kind: pretrained``).

Which checkpoint: the latest by default, a given step, or the best, i.e. the one with the lowest FID
in the run's fid.json (written by `evaluate-generation --run`), as the method picks its model.
"""

from __future__ import annotations

import json
from pathlib import Path

from DiffusionSegLib import __version__
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.models import ModelCard, is_bare_name, now_iso, portable_path, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.unet import UNetConfig

from .checkpoint import PREFIX, complete_checkpoints, load_checkpoint
from .generation_metrics import FID_FILE, best_fid_step
from .model_cards import data_sources


def kept_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The run's complete checkpoints by step."""
    return {int(p.name[len(PREFIX):]): p for p in complete_checkpoints(Path(run_dir) / "checkpoints")}


def select_checkpoint(run_dir: str | Path, which: str | int | None = None) -> Path:
    """A complete checkpoint of the run: the latest (None or 'latest'), a step, or 'best' (lowest FID in fid.json)."""
    run_dir = Path(run_dir)
    kept = kept_checkpoints(run_dir)
    if not kept:
        raise InputError(f"{run_dir}: no complete checkpoint; train with 'diffusionseg-train pretrain --out {run_dir}' first")
    if which is None or which == "latest":
        return kept[max(kept)]
    if which == "best":
        step = best_fid_step(run_dir)
    elif str(which).isdigit():
        step = int(which)
    else:
        raise InputError(f"--checkpoint {which}: give a step number, 'latest' or 'best'")
    if step not in kept:
        why = f" (the best FID in {FID_FILE})" if which == "best" else ""
        raise InputError(f"{run_dir}: no checkpoint of step {step}{why}; kept steps: {', '.join(map(str, sorted(kept)))}")
    return kept[step]


def _fid_of(run_dir: Path, step: int) -> dict | None:
    path = run_dir / FID_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("checkpoints", {}).get(str(step))


def export(run_dir: str | Path, out: str | Path, *, name: str | None = None, half: bool = False, checkpoint: str | int | None = None) -> Path:
    """Write the EMA weights of one checkpoint (see `select_checkpoint`) as a pretrained model folder."""
    run_dir = Path(run_dir)
    chosen = select_checkpoint(run_dir, checkpoint)
    saved = load_checkpoint(chosen, restore_random_state=False)
    state = saved.state
    data_dir = Path(state["data"])
    report = {}
    if (data_dir / "report.json").is_file():
        report = json.loads((data_dir / "report.json").read_text())
    skipped = [{"source": portable_path(s["source"]), "reason": s["reason"].replace(s["source"], portable_path(s["source"]))}
               for s in report.get("skipped", [])]
    data = {"slices_dir": portable_path(data_dir), "volumes": report.get("volumes"), "slices": report.get("slices"), "skipped": skipped}
    config = dict(state["config"])
    if config.get("init") and not is_bare_name(config["init"]):
        config["init"] = portable_path(config["init"])  # --init given as a folder: its name, not this machine's path
    if (data_dir / "index.json").is_file():  # the volumes it was prepared from, by name and licence: the card holds no path of this machine
        data["sources"] = data_sources([v["source"] for v in json.loads((data_dir / "index.json").read_text())["volumes"]])
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
            "run": portable_path(run_dir),
            "checkpoint": chosen.name,
            "selected_by": {None: "latest", "latest": "latest", "best": "lowest FID"}.get(checkpoint, "step"),
            "generation_metrics": _fid_of(run_dir, saved.step),
            "iterations": saved.step,
            "final_loss": state.get("final_loss"),
            "training_seconds": state.get("history", {}).get("seconds"),
            "hardware": state.get("hardware"),
            "data": data,
            "config": config,
        },
    )
    return save_model(out, card, saved.ema, half=half)
