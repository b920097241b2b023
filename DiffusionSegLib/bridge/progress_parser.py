"""Reading the engine's ``--progress json`` output as it arrives (the counterpart of progress.py).

Output comes in arbitrary chunks from a pipe: a line may be split across chunks, and other lines (warnings,
library output) are mixed in. The parser buffers partial lines and turns every complete line into an event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Stages whose steps are seconds of a time budget rather than items done, and the words shown for them.
TIMED_STAGES = {"adapt": "adapting to this CT"}


@dataclass(frozen=True)
class ProgressUpdate:
    stage: str
    step: int
    total: int
    loss: float | None = None
    elapsed: float | None = None
    eta: float | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0

    @property
    def label(self) -> str:
        """The stage in words where its name alone would puzzle (``adapt``), else the name."""
        return TIMED_STAGES.get(self.stage, self.stage)

    def describe(self) -> str:
        """E.g. ``finetune 40/300, loss 0.4123, 1:21 left`` or ``adapting to this CT, 0:12 of 1:00, loss 0.0312``."""
        timed = self.stage in TIMED_STAGES
        text = f"{self.label}, {format_duration(self.step)} of {format_duration(self.total)}" if timed else f"{self.stage} {self.step}/{self.total}"
        if self.loss is not None:
            text += f", loss {self.loss:.4f}"
        if self.eta is not None and self.step < self.total and not timed:  # a timed stage's "of" already says it
            text += f", {format_duration(self.eta)} left"
        return text


# A message that starts with this is a warning about the scan or the result (the engine's Progress.warning).
WARNING_PREFIX = "warning: "


@dataclass(frozen=True)
class Message:
    text: str

    @property
    def warning(self) -> str | None:
        """The warning's text without the prefix, or None for an ordinary message."""
        return self.text[len(WARNING_PREFIX):] if self.text.startswith(WARNING_PREFIX) else None


@dataclass(frozen=True)
class LogLine:
    """A line that is not a progress record (a warning, an error, library output)."""

    text: str


Event = ProgressUpdate | Message | LogLine


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_line(line: str) -> Event | None:
    """The event of one complete line; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except ValueError:
            return LogLine(text)
        if isinstance(record, dict):
            if isinstance(record.get("stage"), str) and _number(record.get("step")) is not None and _number(record.get("total")) is not None:
                return ProgressUpdate(
                    stage=record["stage"],
                    step=int(record["step"]),
                    total=int(record["total"]),
                    loss=_number(record.get("loss")),
                    elapsed=_number(record.get("elapsed")),
                    eta=_number(record.get("eta")),
                )
            if isinstance(record.get("message"), str):
                return Message(record["message"])
    return LogLine(text)


class ProgressParser:
    """Feed it chunks of output; it returns the events of the lines completed so far."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, chunk: str) -> list[Event]:
        self._pending += chunk.replace("\r\n", "\n").replace("\r", "\n")
        *lines, self._pending = self._pending.split("\n")
        return [event for event in map(parse_line, lines) if event is not None]

    def flush(self) -> list[Event]:
        """Events of a last line that ended without a newline (call once the process has ended)."""
        rest, self._pending = self._pending, ""
        event = parse_line(rest)
        return [] if event is None else [event]
