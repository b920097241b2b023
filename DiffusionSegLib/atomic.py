"""Atomic writes: every file and folder DiffusionSeg writes appears complete or not at all.

A write goes to a temporary name in the destination's own folder (same file system, so `os.replace`
is atomic), is flushed to disk, and only then takes the final name. The temporary file or folder is
removed on any failure, Ctrl-C included, and an existing destination is left untouched. A full disk,
a read-only or forbidden folder become `WriteError`, one line naming the file.

Standard library only: the Slicer module imports this without torch or SimpleITK.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

# errno -> what the user can do about it
_REMEDIES = {
    errno.ENOSPC: "the disk is full; free some space or choose another output folder",
    errno.EFBIG: "the file is larger than this file system or the process limit allows; choose another output folder",
    errno.EROFS: "the folder is on a read-only file system; choose another output folder",
    errno.EACCES: "permission denied; choose an output folder you can write to",
    errno.EPERM: "permission denied; choose an output folder you can write to",
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _REMEDIES[errno.EDQUOT] = "the disk quota is exceeded; free some space or choose another output folder"
TEMP_MARK = ".tmp-"  # every temporary name holds this, so leftovers of a killed process are recognisable


class WriteError(InputError):
    """Writing an output failed for a reason the user can fix (disk full, read-only, permissions); nothing was written."""


def write_error(path: str | Path, error: BaseException, code: int | None = None) -> WriteError:
    """A one-line error naming `path` and what to do, for a failure (usually an OSError) while writing it."""
    code = code or getattr(error, "errno", None) or 0
    reason = os.strerror(code) if code in _REMEDIES else (getattr(error, "strerror", None) or str(error).splitlines()[0][:200])
    remedy = _REMEDIES.get(code, "choose another output folder")
    return WriteError(f"{path}: cannot be written ({reason}); {remedy}; nothing was written")


def disk_errno(error: BaseException, folder: Path | None = None) -> int | None:
    """The errno of a disk problem behind `error` (full, too large, read-only, forbidden), or None.

    Writers report these differently: Python as OSError, safetensors (Rust) as "... (os error 28)" in its
    message, ITK with the C library's text or only "failed to write"; numpy's short write has no errno.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _REMEDIES:
            return seen.errno
        text = str(seen)
        found = re.search(r"os error (\d+)", text)
        if found and int(found.group(1)) in _REMEDIES:
            return int(found.group(1))
        for code in _REMEDIES:
            if os.strerror(code) in text:
                return code
        if re.search(r"\d+ requested and \d+ written", text):  # numpy.save / tofile
            return errno.ENOSPC
        seen = seen.__cause__ or seen.__context__
    if folder is not None and isinstance(error, (OSError, RuntimeError)):  # what writers raise (ITK: RuntimeError)
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:  # the writer failed vaguely, and the disk is (almost) full
                return errno.ENOSPC
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; not every platform can open a folder (Windows), which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot create the output folder {path.parent} ({e.strerror or e}); choose another output path") from e


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write instead of `path`; it replaces `path` only if the block succeeds.

    The temporary file sits in a hidden staging folder beside `path` and has `path`'s own name, so
    writers that pick the format from the extension work, and companion files a writer adds (a .mhd's
    .zraw) move along, the named file last. A missing output folder is created.
    """
    path = Path(path).expanduser()
    with _staging(path) as staging:
        tmp = staging / path.name
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{path}: nothing was written")
        for written in staging.iterdir():
            _fsync_file(written)
        for companion in staging.iterdir():
            if companion != tmp:
                os.replace(companion, path.parent / companion.name)
        os.replace(tmp, path)
        _fsync_folder(path.parent)


def write_bytes(path: str | Path, content: bytes) -> Path:
    """Write `content` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    return Path(path).expanduser()


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A temporary folder to fill instead of `folder`; it takes `folder`'s place only if the block succeeds.

    An existing `folder` is kept until the new one is complete and in place (then removed), so a
    reader sees the old folder or the new one, never a mix. Every file is flushed to disk first.
    """
    folder = Path(folder).expanduser()
    with _staging(folder) as staging:
        yield staging
        for written in staging.rglob("*"):
            if written.is_file():
                _fsync_file(written)
        _replace_folder(staging, folder)
        _fsync_folder(folder.parent)


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A hidden folder beside `target`, always removed afterwards; disk errors inside become a WriteError naming `target`."""
    _make_parent(target)
    staging = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        staging.mkdir()
    except OSError as e:
        raise write_error(target, e) from e
    try:
        yield staging
    except Exception as e:
        if not isinstance(e, WriteError) and (code := disk_errno(e, target.parent)):
            raise write_error(target, e, code) from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(new: Path, final: Path) -> None:
    """Move `new` to `final`; an existing `final` is kept until the new one is in place."""
    old: Path | None = final.with_name(f".{final.name}.old{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(final, old)
    except FileNotFoundError:  # nothing there yet (or another process moved it away this instant)
        old = None
    try:
        os.replace(new, final)
    except BaseException as e:
        if old is not None:
            try:
                os.replace(old, final)
            except OSError:  # another process put its folder there meanwhile: keep that one
                shutil.rmtree(old, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise WriteError(f"{final}: another process wrote this folder at the same moment; its complete copy was kept and this one "
                             "was discarded; write to another name or run again") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(folder: str | Path, prefix: str = "") -> list[Path]:
    """Remove temporary files and folders a killed process left in `folder` (names starting '.' + prefix
    and holding the temporary mark); returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for stray in folder.glob(f".{prefix}*{TEMP_MARK}*"):
            remove(stray)
            removed.append(stray)
    return removed


def remove(path: str | Path) -> None:
    """Delete a file or a folder tree, whichever `path` is; nothing there is fine."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
