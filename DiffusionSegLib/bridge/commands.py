"""Command lines for running ``diffusionseg`` as a background process (the 3D Slicer module's way to work).

The module runs the engine in a child process with Slicer's own Python (``PythonSlicer -m DiffusionSegLib``),
so a crash, an out-of-memory error or a cancel never takes Slicer down and the UI stays responsive. This
module only builds argument lists, environments and names; it imports neither torch nor Slicer.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# The engine's exit statuses and offered strategies (torch-free modules), re-exported for the module and job.py.
from .. import strategies
from ..errors import EXIT_CANCELLED as EXIT_CANCELLED
from ..errors import EXIT_INPUT_ERROR as EXIT_INPUT_ERROR
from ..errors import EXIT_OK as EXIT_OK
from ..organs import FLARE22, LabelSet, read_label_set
from ..strategies import DEFAULT_STRATEGY as DEFAULT_STRATEGY
from ..strategies import STRATEGIES as STRATEGIES
from . import model_cards

# Kept in step with devices.DEVICES (a test checks it); not imported, as devices imports torch.
DEVICES = ("auto", "cuda", "cpu", "mps")

# A process killed by a signal reports -signum in Python (e.g. -15 after SIGTERM before the handler ran).
_SIGNAL_EXITS = (-15, -9, -2, 143, 137)

OUT_OF_MEMORY_MARKERS = ("ran out of memory", "CUDA out of memory", "OutOfMemoryError")


def engine_command(python: str | Path) -> list[str]:
    """The start of every command line: the engine run as a module by `python`."""
    return [str(python), "-m", "DiffusionSegLib"]


def child_environment(base: Mapping[str, str], library_parent: str | Path) -> dict[str, str]:
    """`base` with the folder holding DiffusionSegLib first on PYTHONPATH and unbuffered output.

    Slicer adds extension folders to sys.path at start-up only, so a child Python would not find the
    engine without this; unbuffered output makes progress lines arrive as they are printed.
    """
    env = dict(base)
    parts = [str(library_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(library_parent)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")


def segment_args(
    image: str | Path,
    output: str | Path,
    *,
    model: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    uncertainty: str | Path | None = None,
) -> list[str]:
    """Arguments after `engine_command` for ``diffusionseg segment`` with JSON progress."""
    _check_device(device)
    args = ["segment", str(image), "-o", str(output), "--device", device, "--progress", "json"]
    if model is not None:
        args += ["--model", str(model)]
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        args += ["--batch-size", str(batch_size)]
    if uncertainty is not None:
        args += ["--uncertainty", str(uncertainty)]
    return args


@dataclass(frozen=True)
class FinetuneSettings:
    """What the user chose for fine-tuning; None leaves the engine's default."""

    strategy: str = DEFAULT_STRATEGY
    iterations: int | None = None
    time_limit_s: float | None = None
    timestep: int | None = None
    base: str | Path | None = None  # model name or folder; None: the bundled pretrained model (or scratch for fs)
    preset: str | None = None  # architecture for fs without a base
    seed: int | None = None
    # Seconds of DDPM training on the CT's own slices before fine-tuning (0: off); the engine applies it
    # to ft-dec and lp from a pretrained base and says so when it skips it.
    adapt_s: float | None = None
    # The organs the new model labels: a label-set file or a model whose set to take (``--label-set``); None: the base's.
    label_set: str | Path | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time limit must be positive, got {self.time_limit_s} s")
        if self.timestep is not None and self.timestep < 0:
            raise ValueError(f"timestep must be 0 or more, got {self.timestep}")
        if self.adapt_s is not None and not (math.isfinite(self.adapt_s) and self.adapt_s >= 0):
            raise ValueError(f"adaptation time must be 0 or more seconds, got {self.adapt_s}")
        if self.adapt_s and not strategies.get(self.strategy).pretrained:
            raise ValueError(f"adaptation needs a pretrained backbone; {self.strategy} trains from random weights")

    def starting_segmentor(self) -> str | None:
        """The name of the segmentation model fine-tuning starts from: it keeps the organs the annotation does not label.

        None when it starts from the pretrained base or from scratch (fs keeps only a base's architecture), where
        nothing teaches those organs: the engine's rule (a segmentor base, not fs).
        """
        if not strategies.get(self.strategy).pretrained or self.base is None:
            return None
        return model_cards.segmentor_name(self.base)

    def new_label_set(self) -> LabelSet:
        """The organs the new model labels, as the engine decides them: `label_set`, else the base's (FLARE22's for the
        bundled models, the base when none is given). The annotation is prepared and counted with this set."""
        source = self.label_set if self.label_set is not None else self.base
        if source is None:
            return FLARE22
        if Path(source).is_file():
            return read_label_set(source)
        return model_cards.label_set(source)


def finetune_args(
    images: Iterable[str | Path],
    labels: Iterable[str | Path],
    output: str | Path,
    settings: FinetuneSettings,
    *,
    name: str | None = None,
    device: str = "auto",
) -> list[str]:
    """Arguments after `engine_command` for ``diffusionseg finetune`` with JSON progress."""
    _check_device(device)
    images, labels = [str(p) for p in images], [str(p) for p in labels]
    if not images or len(images) != len(labels):
        raise ValueError(f"need one labels file per image, got {len(images)} images and {len(labels)} labels")
    args = ["finetune"]
    for image, label in zip(images, labels, strict=True):
        args += ["--image", image, "--labels", label]
    args += ["-o", str(output), "--strategy", settings.strategy, "--device", device, "--progress", "json"]
    return args + _settings_flags(settings, name)


def _settings_flags(settings: FinetuneSettings, name: str | None) -> list[str]:
    """The fine-tuning flags `finetune` and `refine` share, for the settings that are not the engine's default."""
    optional = {
        "--base": settings.base,
        "--preset": settings.preset,
        "--iterations": settings.iterations,
        "--time-limit": settings.time_limit_s,
        "--timestep": settings.timestep,
        "--seed": settings.seed,
        "--adapt": settings.adapt_s,
        "--label-set": settings.label_set,
        "--name": name,
    }
    flags = []
    for flag, value in optional.items():
        if value is not None:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def refine_args(
    image: str | Path,
    annotation: str | Path,
    output: str | Path,
    result: str | Path,
    settings: FinetuneSettings,
    *,
    recorded: Iterable[int] = (),
    written: str | Path | None = None,
    written_output: str | Path | None = None,
    organs: Iterable[str] | None = None,
    uncertainty: str | Path | None = None,
    name: str | None = None,
    device: str = "auto",
) -> list[str]:
    """Arguments after `engine_command` for ``diffusionseg refine`` with JSON progress: one Fine-tune click as one run.

    `organs`: the organs the annotation labels (names or ids in the new model's label set); None lets the engine take the painted ones.
    """
    _check_device(device)
    args = ["refine", "--image", str(image), "--annotation", str(annotation), "-o", str(output), "--result", str(result),
            "--strategy", settings.strategy, "--device", device, "--progress", "json"]
    slices = sorted({int(i) for i in recorded})
    if slices:
        args += ["--recorded-slices", ",".join(map(str, slices))]
    organs = None if organs is None else [str(o) for o in organs]
    if organs is not None:
        if not organs:
            raise ValueError("organs: name at least one organ the annotation labels, or pass None to let the engine find them")
        args += ["--organs", ",".join(organs)]
    for flag, path in (("--written", written), ("--written-output", written_output), ("--uncertainty", uncertainty)):
        if path is not None:
            args += [flag, str(path)]
    return args + _settings_flags(settings, name)


def model_folder_name(label: str, existing: Iterable[str], when: _dt.datetime | None = None) -> str:
    """A new, file-system-safe model folder name from `label` (e.g. the CT's name) and the date.

    Unique among `existing` names (a counter is appended), so a fine-tuned model never replaces another.
    """
    when = when or _dt.datetime.now()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-._").lower()[:40] or "model"
    base = f"{stem}-{when:%Y%m%d-%H%M}"
    taken = set(existing)
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name


def describe_exit(code: int, stderr_tail: str = "") -> str:
    """One sentence for the user about how a run ended."""
    if code == EXIT_OK:
        return "finished"
    if code == EXIT_CANCELLED or code in _SIGNAL_EXITS:
        return "cancelled; nothing was written"
    last = next((line.strip() for line in reversed(stderr_tail.splitlines()) if line.strip()), "")
    if code == EXIT_INPUT_ERROR:
        return f"stopped on a problem with the input: {last.removeprefix('diffusionseg: error: ')}" if last else "stopped on a problem with the input"
    return f"failed (exit status {code}){': ' + last if last else ''}"


def is_out_of_memory(text: str) -> bool:
    """Whether engine output reports that the GPU ran out of memory (the module then offers a CPU retry)."""
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


# Which accelerators torch sees, asked in a child process: importing torch in Slicer's GUI thread takes
# seconds, and a broken torch install would stop the panel from loading.
DEVICE_PROBE = (
    "import json, torch; mps = getattr(torch.backends, 'mps', None); "
    "print(json.dumps({'device_probe': 1, 'cuda': torch.cuda.is_available(), 'mps': bool(mps and mps.is_available())}))"
)


def device_probe_args() -> list[str]:
    """Arguments after the Python executable that print one JSON line: ``{"device_probe": 1, "cuda": bool, "mps": bool}``."""
    return ["-c", DEVICE_PROBE]


def parse_device_probe(text: str) -> dict[str, bool] | None:
    """{"cuda": ..., "mps": ...} from the probe's output line; None for any other line."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("device_probe") != 1:
        return None
    return {"cuda": record.get("cuda") is True, "mps": record.get("mps") is True}
