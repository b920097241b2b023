"""The module's background processes, driven by one `poll()`: an engine job and the device probe.

A job is a sequence of engine runs (command lines) started one after another, each in its own child
process (`runner.BackgroundRun`); the next starts only once the previous has succeeded, and the job ends
after the last run, at the first failure, or at a cancel. Only one job runs at a time: the panel has one
Cancel button and the engine writes its outputs at the end of each run. The device probe (which
accelerators torch sees) is a short run of its own that may overlap a job. One `poll()` hands both their
output, so the Slicer module needs one timer; nothing here touches Qt, and the tests call `poll()` in a loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import commands
from .progress_parser import Event, LogLine
from .runner import BackgroundRun

CANCEL_GRACE_S = 15.0  # a cancelled run that has not ended by then is killed


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: the status of its last run (EXIT_CANCELLED after a cancel) and that run's stderr tail."""

    returncode: int
    stderr_tail: str
    seconds: float
    runs: int  # the runs started, the last one included

    @property
    def ok(self) -> bool:
        return self.returncode == commands.EXIT_OK

    @property
    def cancelled(self) -> bool:
        return self.returncode == commands.EXIT_CANCELLED

    @property
    def out_of_memory(self) -> bool:
        return commands.is_out_of_memory(self.stderr_tail)

    def describe(self) -> str:
        """How it ended, for the user (`commands.describe_exit`): "finished", "cancelled; nothing was written", ..."""
        return commands.describe_exit(self.returncode, self.stderr_tail)


@dataclass
class _Job:
    commands: list[list[str]]
    env: Mapping[str, str] | None
    on_done: Callable[[JobEnd], None]
    on_event: Callable[[Event], None] | None
    started: float
    run: BackgroundRun | None = None
    number: int = 0  # index of the run in `commands`
    cancel_requested_at: float | None = None


@dataclass
class _Probe:
    run: BackgroundRun
    on_done: Callable[[dict[str, bool] | None, str], None]
    devices: dict[str, bool] | None = None


class BackgroundJobs:
    """One engine job at a time and the device probe, polled together.

    `start_run(command, env=...)` starts one child process (`BackgroundRun`; the tests pass a stand-in).
    Callbacks run inside `poll()`; the job is over before its `on_done` runs, so `on_done` may start the next
    job (e.g. a retry on the CPU after the GPU ran out of memory).
    """

    def __init__(self, cancel_grace_s: float = CANCEL_GRACE_S, start_run: Callable[..., BackgroundRun] = BackgroundRun,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cancel_grace_s = cancel_grace_s
        self._start_run = start_run
        self._clock = clock
        self._job: _Job | None = None
        self._probe: _Probe | None = None

    @property
    def busy(self) -> bool:
        """Whether a job runs (the probe does not count: it blocks nothing)."""
        return self._job is not None

    @property
    def active(self) -> bool:
        """Whether anything is left to poll."""
        return self._job is not None or self._probe is not None

    @property
    def probing(self) -> bool:
        return self._probe is not None

    def start_job(self, command_lines: Sequence[Sequence[str]], on_done: Callable[[JobEnd], None],
                  on_event: Callable[[Event], None] | None = None, env: Mapping[str, str] | None = None) -> None:
        """Start the first of `command_lines` now; `on_event` gets each run's output events, `on_done` the end once."""
        if self._job is not None:
            raise RuntimeError("DiffusionSeg is already running; wait for it or cancel it first.")
        lines = [[str(part) for part in line] for line in command_lines]
        if not lines or not all(lines):
            raise ValueError("a job needs at least one command line, and no empty one")
        job = _Job(lines, None if env is None else dict(env), on_done, on_event, self._clock())
        job.run = self._start_run(lines[0], env=job.env)
        self._job = job

    def start_probe(self, command: Sequence[str], on_done: Callable[[dict[str, bool] | None, str], None],
                    env: Mapping[str, str] | None = None) -> bool:
        """Run the device probe (`commands.device_probe_args`); `on_done(devices or None, stderr tail)` once it has
        ended. False, and nothing started, while a probe runs already."""
        if self._probe is not None:
            return False
        self._probe = _Probe(self._start_run([str(part) for part in command], env=None if env is None else dict(env)), on_done)
        return True

    def cancel(self) -> bool:
        """Ask the running job to stop (no later run starts); it is killed if it has not ended after the grace time.
        False when no job runs."""
        job = self._job
        if job is None:
            return False
        if job.cancel_requested_at is None:
            job.cancel_requested_at = self._clock()
            job.run.cancel()
        return True

    def poll(self) -> bool:
        """Hand out what the probe and the job printed since the last poll, end or advance them; whether anything is
        still running afterwards."""
        self._poll_probe()
        self._poll_job()
        return self.active

    def _poll_probe(self) -> None:
        probe = self._probe
        if probe is None:
            return
        result = probe.run.poll()
        for event in result.events:
            found = commands.parse_device_probe(event.text) if isinstance(event, LogLine) else None
            if found is not None:
                probe.devices = found
        if result.finished:
            self._probe = None
            probe.on_done(probe.devices, probe.run.stderr_tail)

    def _poll_job(self) -> None:
        job = self._job
        if job is None:
            return
        run = job.run
        result = run.poll()
        if job.on_event is not None:
            for event in result.events:
                job.on_event(event)
        if not result.finished:
            if job.cancel_requested_at is not None and self._clock() - job.cancel_requested_at > self.cancel_grace_s:
                run.kill()  # repeated at each poll until the tree has ended: harmless, and covers a late child
            return
        # A run that ended after a cancel counts as cancelled even if it got to finish: the user asked for nothing.
        code = commands.EXIT_CANCELLED if run.cancel_requested or job.cancel_requested_at is not None else result.returncode
        if code == commands.EXIT_OK and job.number + 1 < len(job.commands):
            job.number += 1
            job.run = self._start_run(job.commands[job.number], env=job.env)
            return
        self._job = None
        job.on_done(JobEnd(code, run.stderr_tail, self._clock() - job.started, job.number + 1))
