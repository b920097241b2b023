"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder ``step-00001234/`` holding ``model``, ``ema`` and ``optimizer`` safetensors
and ``state.json``. It is written through `DiffusionSegLib.atomic.atomic_folder` (a temporary name,
flushed to disk, renamed when complete), so a kill -9 in the middle of a save leaves only a stray
temporary folder (ignored and cleaned up later) and the last good checkpoint intact. The newest K are
kept. A checkpoint damaged later (truncated by a copy) is skipped on resume, with a warning.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from DiffusionSegLib.atomic import atomic_folder, remove_leftovers
from DiffusionSegLib.errors import InputError

PREFIX = "step-"


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    state: dict  # config, scheduler, RNG, metrics: JSON


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as named tensors + JSON (param_groups and any non-tensor per-parameter values)."""
    tensors, scalars = {}, {}
    for param_id, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], *np_state[2:]], "python": [py_state[0], list(py_state[1]), py_state[2]]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not complete)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint, keep: int = 3) -> Path:
    """Write `checkpoint` as FOLDER/step-NNNNNNNN atomically and keep the newest `keep`; a full disk is a WriteError, nothing half-written."""
    folder = Path(folder)
    final = folder / f"{PREFIX}{checkpoint.step:08d}"
    opt_tensors, opt_meta = _flatten_optimizer(checkpoint.optimizer)
    rng_tensors, rng_meta = rng_state()
    state = {**checkpoint.state, "step": checkpoint.step, "optimizer": opt_meta, "rng": rng_meta}
    # The same step saved twice (e.g. preempted right after a periodic save) replaces the earlier copy.
    with atomic_folder(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint.model.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint.ema.items()}, str(tmp / "ema.safetensors"))
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")  # written last: marks completeness
    for old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(folder, PREFIX)  # left by a killed save
    return final


class DamagedCheckpoint(InputError):
    """A checkpoint folder that cannot be read back (cut short by a full disk, a copy, or a crash of the file system)."""


def load_checkpoint(path: str | Path, restore_random_state: bool = True) -> Checkpoint:
    """Read a checkpoint folder; DamagedCheckpoint (one line naming the file) if any part is truncated or corrupt."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        optimizer = _unflatten_optimizer({k: v for k, v in load_file(str(path / "optimizer.safetensors")).items() if k != "_empty"},
                                         state.pop("optimizer"))
        rng_meta = state.pop("rng")
        rng = load_file(str(path / "rng.safetensors"))
        model, ema = load_file(str(path / "model.safetensors")), load_file(str(path / "ema.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise DamagedCheckpoint(f"{path}: checkpoint is damaged or incomplete ({str(e)[:200]})") from e
    if restore_random_state:
        restore_rng(rng, rng_meta)
    return Checkpoint(step=int(state["step"]), model=model, ema=ema, optimizer=optimizer, state=state)


def load_latest_checkpoint(folder: str | Path, warn: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint that reads back whole; a damaged newer one is skipped, said aloud through `warn`, and left in place."""
    for path in reversed(complete_checkpoints(Path(folder))):
        try:
            return load_checkpoint(path)
        except DamagedCheckpoint as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = complete_checkpoints(Path(folder))
    return found[-1] if found else None
