"""Progress reporting for long commands: a tqdm bar for people, JSON lines for the Slicer module.

JSON mode prints one object per line on stdout, e.g.
``{"stage": "finetune", "step": 40, "total": 300, "loss": 0.41, "elapsed": 12.5, "eta": 81.2}``;
messages are ``{"message": "..."}``. The parser for these lines lives in the Slicer module's logic.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from tqdm import tqdm

from .bridge.progress_parser import WARNING_PREFIX

MODES = ("tqdm", "json", "none")


class Progress:
    """One stage at a time: ``start(stage, total)``, ``advance(...)`` per step, ``finish()``."""

    def __init__(self, mode: str = "tqdm", stream: TextIO | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.stream = stream
        self.stage = ""
        self.total = 0
        self.step = 0
        self._started = 0.0
        self._bar: tqdm | None = None

    def start(self, stage: str, total: int) -> None:
        self.finish()
        self.stage, self.total, self.step = stage, int(total), 0
        self._started = time.monotonic()
        if self.mode == "tqdm":
            self._bar = tqdm(total=total, desc=stage, file=self.stream or sys.stderr, dynamic_ncols=True, leave=False)
        elif self.mode == "json":
            self._emit(loss=None)

    def advance(self, steps: int = 1, loss: float | None = None) -> None:
        self.step += steps
        if self._bar is not None:
            self._bar.update(steps)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.mode == "json":
            self._emit(loss=loss)

    def message(self, text: str) -> None:
        if self.mode == "json":
            self._write({"message": text})
        elif self.mode == "tqdm":
            tqdm.write(text, file=self.stream or sys.stderr)

    def warning(self, text: str) -> None:
        """Something the user should look at: shown in every mode, `--progress none` included (on stderr)."""
        if self.mode == "json":
            self._write({"message": WARNING_PREFIX + text})
        else:
            tqdm.write(WARNING_PREFIX + text, file=self.stream or sys.stderr)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def _emit(self, loss: float | None) -> None:
        elapsed = self.elapsed
        eta = elapsed / self.step * (self.total - self.step) if self.step else None
        record = {"stage": self.stage, "step": self.step, "total": self.total, "loss": loss, "elapsed": round(elapsed, 3)}
        record["eta"] = None if eta is None else round(eta, 3)
        self._write(record)

    def _write(self, record: dict) -> None:
        stream = self.stream or sys.stdout
        stream.write(json.dumps(record) + "\n")
        stream.flush()
