"""A child process whose output is read without blocking: the caller polls it from a GUI timer.

Two reader threads move stdout (progress JSON) and stderr (warnings, errors) into a queue; `poll()` hands
out the parsed events and, once the process has ended and its output is drained, the exit status. Nothing
here touches Qt or Slicer, so the same class is tested with plain pytest and driven by a QTimer in Slicer.

Cancel stops the whole process tree, not just the process started: ``PythonSlicer`` is a launcher that runs
the real Python as its own child, so stopping only the launcher would leave the engine running (holding
the pipes, writing its output, outliving Slicer). On POSIX the child starts in a new session, so it and
everything it starts share one process group that is signalled at once; on Windows ``taskkill /T /F``
ends the tree. The console window a child would open on Windows is hidden, as
``slicer.util.launchConsoleProcess`` hides it.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .progress_parser import Event, LogLine, ProgressParser

_STDERR_TAIL_LINES = 40
_WINDOWS = os.name == "nt"
# Windows constants (subprocess defines them only on Windows): no console window for the child.
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def popen_options(windows: bool = _WINDOWS) -> dict:
    """Popen keyword arguments that make the child the root of a tree `cancel` can stop, without a console window."""
    if not windows:
        return {"start_new_session": True}  # its own process group: killpg reaches the launcher's children too
    info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]  # Windows only
    info.dwFlags |= STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    return {"startupinfo": info, "creationflags": CREATE_NO_WINDOW}


def tree_kill_command(pid: int) -> list[str]:
    """Windows: end `pid` and every process it started (/T), at once (/F; a console-less child gets no Ctrl+C)."""
    return ["taskkill", "/PID", str(pid), "/T", "/F"]


@dataclass
class PollResult:
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    returncode: int | None = None


class BackgroundRun:
    """Start `command` now; call `poll()` periodically and `cancel()` to stop it."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.command = [str(c) for c in command]
        self.started = time.monotonic()
        self.cancel_requested = False
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._parser = ProgressParser()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._open_streams = 2
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **popen_options(),
        )
        for name, stream in (("out", self._process.stdout), ("err", self._process.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def _pump(self, name: str, stream) -> None:
        # readline, not read(n): a progress line is handed over as soon as it is complete
        for line in iter(stream.readline, ""):
            self._queue.put((name, line))
        stream.close()
        self._queue.put((name, None))

    def poll(self) -> PollResult:
        """Events since the last poll; `finished` once the process has exited and all output was read."""
        result = PollResult()
        while True:
            try:
                name, text = self._queue.get_nowait()
            except queue.Empty:
                break
            if text is None:
                self._open_streams -= 1
                if name == "out":
                    result.events += self._parser.flush()
                continue
            if name == "out":
                result.events += self._parser.feed(text)
            elif text.strip():
                self._stderr_tail.append(text.rstrip())
                result.events.append(LogLine(text.rstrip()))
        if self._open_streams == 0 and self._process.poll() is not None:
            result.finished = True
            result.returncode = self._process.returncode
        return result

    def cancel(self) -> None:
        """Ask the engine to stop. POSIX: SIGTERM to the whole process group, the engine exits with status 130;
        Windows: the process tree is ended at once.

        Either way nothing is written: the engine writes its outputs atomically at the very end.
        """
        self.cancel_requested = True
        self._signal_tree(signal.SIGTERM)

    def kill(self) -> None:
        """Stop the whole process tree at once (when a cancelled run does not end by itself)."""
        self.cancel_requested = True
        self._signal_tree(getattr(signal, "SIGKILL", signal.SIGTERM))

    def _signal_tree(self, signum: int) -> None:
        if self._open_streams == 0 and self._process.poll() is not None:
            return  # the tree has ended and its output is read: the group id may belong to someone else by now
        if _WINDOWS:
            if self._process.poll() is None:
                # /T finds the children through the launcher, so it must still be alive; the launcher lives as long as its child.
                subprocess.run(tree_kill_command(self._process.pid), capture_output=True, creationflags=CREATE_NO_WINDOW, check=False)
            return
        # Signalled even after the launcher has exited: its children may still run in the group (pgid = its pid).
        try:
            os.killpg(self._process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group has ended already

    def wait(self, timeout: float | None = None) -> PollResult:
        """Block until the run ends (for scripts and tests): all events and the exit status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        merged = PollResult()
        while True:
            step = self.poll()
            merged.events += step.events
            if step.finished:
                merged.finished, merged.returncode = True, step.returncode
                return merged
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.command[:4])} ... still running after {timeout} s")
            time.sleep(0.05)
