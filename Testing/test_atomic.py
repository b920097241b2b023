"""The one atomic-write helper: complete or nothing, no temporary file left, clear errors for full or read-only disks."""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from DiffusionSegLib import atomic
from DiffusionSegLib.atomic import WriteError, atomic_folder, atomic_path, remove_leftovers, write_text
from DiffusionSegLib.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "metrics.json"
    with atomic_path(target) as tmp:
        assert tmp.name == "metrics.json" and tmp.parent.parent == tmp_path
        tmp.write_text("{}")
        assert not target.exists()
    assert target.read_text() == "{}" and files_in(tmp_path) == ["metrics.json"]
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise ValueError("stop")
    assert target.read_text() == "{}" and files_in(tmp_path) == ["metrics.json"]


def test_ctrl_c_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "labels.nii.gz"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert files_in(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "model") as staging:
        (staging / "weights.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert files_in(tmp_path) == []


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"), atomic_path(tmp_path / "x.json"):
        pass
    assert files_in(tmp_path) == []


def test_companion_files_move_along(tmp_path):
    with atomic_path(tmp_path / "a.mhd") as tmp:
        tmp.write_text("header")
        (tmp.parent / "a.zraw").write_bytes(b"voxels")
    assert files_in(tmp_path) == ["a.mhd", "a.zraw"]


def test_atomic_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(OSError), atomic_folder(folder) as staging:
        (staging / "weights").write_text("v2, half")
        raise OSError("the writer failed")
    assert (folder / "weights").read_text() == "v1" and files_in(tmp_path) == ["model"]
    with atomic_folder(folder) as staging:
        (staging / "weights").write_text("v2")
    assert (folder / "weights").read_text() == "v2" and files_in(tmp_path) == ["model"]


def test_read_only_file_system_is_one_clear_line(tmp_path, monkeypatch):
    """EROFS as a read-only mount gives it (root ignores permission bits, so the mount is simulated)."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path / "mounted":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    (tmp_path / "mounted").mkdir()
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(WriteError) as raised:
        write_text(tmp_path / "mounted" / "labels.json", "{}")
    assert str(raised.value).startswith(f"{tmp_path / 'mounted' / 'labels.json'}: cannot be written (Read-only file system); ")
    with pytest.raises(WriteError, match="read-only file system; choose another output folder"), atomic_folder(tmp_path / "mounted" / "model"):
        pass
    assert files_in(tmp_path / "mounted") == []


def test_read_only_folder_is_one_clear_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into folders without write permission; the read-only file system case covers it")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError) as raised:
            write_text(folder / "report.json", "{}")
        message = str(raised.value)
        assert str(folder / "report.json") in message and "permission denied" in message and "\n" not in message
        assert isinstance(raised.value, InputError)  # the command lines turn it into exit status 2
        with pytest.raises(WriteError, match="permission denied"), atomic_folder(folder / "model") as staging:
            (staging / "x").write_text("x")
    finally:
        folder.chmod(0o755)
    assert files_in(folder) == []


def test_disk_full_is_one_clear_line_and_leaves_nothing(tmp_path):
    """A write larger than RLIMIT_FSIZE fails with EFBIG like a full disk (SIGXFSZ ignored); run in a child so the limit stays there."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from DiffusionSegLib.atomic import WriteError, write_bytes
        target = Path({str(tmp_path / "big.bin")!r})
        write_bytes(target, b"small")  # fits
        try:
            write_bytes(target, b"x" * 100_000)
        except WriteError as e:
            print(e)
            sys.exit(2)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert str(tmp_path / "big.bin") in done.stdout and "nothing was written" in done.stdout and "Traceback" not in done.stdout
    assert files_in(tmp_path) == ["big.bin"] and (tmp_path / "big.bin").read_bytes() == b"small"


def test_leftovers_of_a_killed_writer_are_recognised(tmp_path):
    (tmp_path / f".step-00000010{atomic.TEMP_MARK}123-abcd").mkdir()
    (tmp_path / f".other{atomic.TEMP_MARK}9").write_text("x")
    (tmp_path / "step-00000005").mkdir()
    assert [p.name for p in remove_leftovers(tmp_path, "step-")] == [f".step-00000010{atomic.TEMP_MARK}123-abcd"]
    assert files_in(tmp_path) == [f".other{atomic.TEMP_MARK}9", "step-00000005"]


def test_atomic_module_needs_only_the_standard_library():
    """The Slicer module imports it: no torch, numpy or SimpleITK at import time."""
    tree = ast.parse((ROOT / "DiffusionSegLib" / "atomic.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_no_hand_written_temporary_files_left_in_the_code():
    """Every write goes through DiffusionSegLib.atomic: no other module renames temporary files into place."""
    offenders = set()
    for folder in ("DiffusionSegLib", "Training"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "atomic.py" and "os.replace(" in path.read_text(encoding="utf-8"):
                offenders.add(path.relative_to(ROOT).as_posix())
    assert not offenders, offenders
