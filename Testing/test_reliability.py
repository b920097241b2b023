"""Faults a long run meets, each survived: kills, damaged checkpoints, full or read-only disks, races, NaN, memory.

The README's "Reliability" table lists each fault with the test here (or elsewhere) that proves it.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_label_efficiency import write_phantoms

from DiffusionSegLib import atomic
from DiffusionSegLib.cli import main as diffusionseg
from DiffusionSegLib.diffusion import GaussianDiffusion
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.memory import StepMemory, default_workers, fit_batch, measure_step, saved_activations
from DiffusionSegLib.models import ModelCard, load_segmentor, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import UNetModel, preset_config
from Training import prepare, shards
from Training.benchmarks import label_efficiency
from Training.benchmarks.phantom import make_phantom
from Training.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint
from Training.cli import main as train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--batch-size", "4", "--workers", "0", "--sample-every", "0", "--no-progress"]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if atomic.TEMP_MARK in p.name or p.name.endswith((".tmp", ".partial")))


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    for seed in (1, 2):
        sitk.WriteImage(make_phantom(size=(64, 64, 12), spacing=(6.0, 6.0, 10.0), seed=seed)[0], str(folder / f"ct{seed}.nii.gz"))
    out = tmp_path_factory.mktemp("slices") / "slices"
    assert train(["prepare", str(folder), "-o", str(out), "--size", "64"]) == 0
    return out


@pytest.fixture(scope="module")
def segmentor_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = preset_config("tiny")
    segmentor = Segmentor(config, 32)
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(64), head={"width": 32, "layers": segmentor.head.num_layers},
                     strategy="fs", timestep=0, preset="tiny")
    return save_model(tmp_path_factory.mktemp("model") / "seg", card, segmentor.state_dict())


def signal_self_on_call(module: object, name: str, monkeypatch: pytest.MonkeyPatch, call: int = 1, signum: int = signal.SIGTERM,
                        half: bool = True) -> list[int]:
    """Make `module.name` deliver `signum` to this process on its `call`-th call; with `half`, after writing half a file to the
    path it was given (a writer stopped mid-write: give it only writers that are handed a temporary path)."""
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            target = next((a for a in args if isinstance(a, (str, Path))), None)
            if half and target is not None:
                Path(target).write_bytes(b"half")
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler raises here
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# --- pretraining: kill -9, damaged checkpoints, NaN, out of memory -----------------------------------------


def test_kill_9_then_resume_continues_the_step_count_and_the_loss_curve(slices, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "Training", "pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", "100000",
           "--checkpoint-every", "3", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(complete_checkpoints(run / "checkpoints")) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written stays as it was
        proc.wait(timeout=30)
    finally:
        proc.kill()
    kept = complete_checkpoints(run / "checkpoints")
    for checkpoint in kept:  # never a corrupt checkpoint that looks complete
        load_checkpoint(checkpoint, restore_random_state=False)
    resumed_from = load_checkpoint(kept[-1], restore_random_state=False).step
    target = resumed_from + 4
    assert train(["pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", str(target), "--log-every", "1",
                  "--checkpoint-every", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, target + 1))  # each step logged once: the curve continues where the checkpoint left it
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"), restore_random_state=False).step == target
    assert leftovers(run) == []


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(slices, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(["pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", "4", "--checkpoint-every", "2"]) == 0
    damaged = run / "checkpoints" / "step-00000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short, as by a full disk during a copy
    capsys.readouterr()
    assert train(["pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", "5", "--checkpoint-every", "2", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {damaged.parent}: checkpoint is damaged or incomplete" in err and "falling back to the previous checkpoint" in err
    assert "Traceback" not in err
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"), restore_random_state=False).step == 5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # resumed at step 2: the record of step 4 is dropped, not repeated
    # Every checkpoint damaged: one line, exit 2.
    for checkpoint in complete_checkpoints(run / "checkpoints"):
        (checkpoint / "state.json").write_text("{")
    assert train(["pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", "9", "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("diffusionseg-train: error:") and "no checkpoint reads back whole" in lines[-1]


@pytest.mark.parametrize("fault", ["nan", "out-of-memory"])
def test_nan_loss_or_gpu_out_of_memory_stops_and_keeps_the_last_good_checkpoint(fault, slices, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    original, calls = GaussianDiffusion.training_loss, [0]

    def failing(self, model, x0, *args, **kwargs):
        calls[0] += bool((x0 != 0).any())  # training steps; the memory guard measures on blank slices
        loss = original(self, model, x0, *args, **kwargs)
        if calls[0] == 5 and (x0 != 0).any():  # the 5th training step
            if fault == "out-of-memory":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return loss * float("nan")
        return loss

    monkeypatch.setattr(GaussianDiffusion, "training_loss", failing)
    assert train(["pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", "10", "--checkpoint-every", "2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    kept = run / "checkpoints" / "step-00000004"
    assert line.startswith("diffusionseg-train: error:") and f"the last checkpoint {kept} is kept" in line
    assert ("the loss became nan at step 5" in line) if fault == "nan" else ("the GPU ran out of memory at step 5 (batch 4" in line)
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]
    saved = load_checkpoint(kept, restore_random_state=False)
    assert all(torch.isfinite(v).all() for v in saved.model.values())


def test_nan_loss_in_finetune_is_one_line_and_writes_nothing(phantom_files, tmp_path, capsys, monkeypatch):
    from DiffusionSegLib import finetune

    original = finetune.segmentation_loss
    monkeypatch.setattr(finetune, "segmentation_loss", lambda *args: original(*args) * float("nan"))
    out = tmp_path / "m"
    assert diffusionseg(["finetune", "--image", str(phantom_files["ct"]), "--labels", str(phantom_files["labels"]), "-o", str(out),
                         "--strategy", "fs", "--preset", "tiny", "--iterations", "3", "--progress", "none"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["diffusionseg: error: finetune: the loss became nan at iteration 1 (fine-tuning diverged); nothing was written; lower --lr"]
    assert not out.exists()


# --- memory guard --------------------------------------------------------------------------------------------


# Peak resident memory of a fresh process. Not getrusage's ru_maxrss: a child keeps its parent's (pytest's) peak across fork and exec.
PEAK = textwrap.dedent("""
    import re
    def peak():
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
""")
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from Linux's /proc")


@needs_proc
def test_step_memory_is_measured_and_predicts_a_real_step():
    model = UNetModel(preset_config("tiny", 64))
    diffusion = GaussianDiffusion("cosine", 1000)
    small = measure_step(model, lambda n: diffusion.training_loss(model, torch.zeros(n, 1, 64, 64)), 4)
    large = UNetModel(preset_config("tiny", 128))
    big = measure_step(large, lambda n: diffusion.training_loss(large, torch.zeros(n, 1, 128, 128)), 4)
    assert small.measured and big.measured
    params = sum(p.numel() * 4 for p in model.parameters())
    assert small.fixed >= 3 * params  # Adam's two moments and the update's temporary are never part of a pass
    assert 2.5 < big.per_sample / small.per_sample < 8  # 4x the pixels; attention grows faster
    # In a fresh process (its own peak): the guard's prediction at batch 8 against a real step at batch 8, the
    # optimiser's first step included. The measuring passes run before `before`, so they cannot raise the step's peak.
    script = PEAK + textwrap.dedent("""
        import torch
        from DiffusionSegLib.devices import configure_cpu
        from DiffusionSegLib.diffusion import GaussianDiffusion
        from DiffusionSegLib.memory import _reset_peak_rss, measure_step, process_memory
        from DiffusionSegLib.unet import UNetModel, preset_config
        configure_cpu()
        torch.set_num_threads(1)
        model, diffusion = UNetModel(preset_config("tiny", 64)), GaussianDiffusion("cosine", 1000)
        memory = measure_step(model, lambda n: diffusion.training_loss(model, torch.zeros(n, 1, 64, 64)), 8)
        optimizer = torch.optim.Adam(model.parameters())
        _reset_peak_rss()
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            diffusion.training_loss(model, torch.randn(8, 1, 64, 64)).backward()
            optimizer.step()
        print(memory.total(8), peak())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    predicted, measured = map(int, done.stdout.split())
    assert 0.8 * measured < predicted < 1.25 * measured, (predicted / 2**20, measured / 2**20)


def test_the_estimate_pass_frees_all_it_saved():
    """A layer that saves its own output (exp, softmax) must not keep it alive through the measuring hook."""
    x = torch.randn(64, 64, requires_grad=True)
    kept = []

    def forward():
        y = torch.exp(x * 2)  # exp saves its result for backward
        kept.append(weakref.ref(y))
        return y.sum()

    saved = saved_activations(forward)
    gc.collect()
    assert saved.total >= 64 * 64 * 4
    assert kept[0]() is None


def test_measuring_leaves_the_model_and_random_numbers_as_they_were():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4))  # running statistics: buffers
    model.train()
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(1, 1, 32, 32)
    rng = torch.get_rng_state()
    memory = measure_step(model, lambda n: torch.nn.functional.dropout(model(x.repeat(n, 1, 1, 1)), 0.5).square().mean(), 2)
    assert memory.per_sample > 0 and memory.at(2) > memory.at(1)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


def test_a_measuring_pass_that_runs_out_of_memory_is_tried_at_half_the_batch():
    model = torch.nn.Conv2d(1, 8, 3, padding=1)
    x = torch.randn(1, 1, 64, 64)
    limit = [8]

    def loss_at(n: int) -> torch.Tensor:
        if n > limit[0]:
            raise torch.OutOfMemoryError(f"a batch of {n} does not fit")
        return model(x.repeat(n, 1, 1, 1)).square().mean()

    free = 64 << 30
    assert measure_step(model, loss_at, 8, available=free).measured  # fits: measured at 8
    limit[0] = 3  # 8 and 4 run out of memory, 2 does not: the line is measured through 1 and 2
    halved = measure_step(model, loss_at, 8, available=free)
    assert halved.measured and halved.per_sample >= 1 and all(p.grad is None for p in model.parameters())
    limit[0] = 0  # not even one sample: nothing fits, whatever the estimate said
    none = measure_step(model, loss_at, 8, available=free)
    assert none.largest_batch(int(free * 0.8)) == 0


def test_a_batch_that_does_not_fit_is_lowered_on_the_cpu_or_refused_naming_one_that_fits():
    memory = StepMemory(fixed=100 << 20, per_sample=200 << 20)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    free = 2 << 30  # 2 GiB: 80 % is 1638 MiB, so (1638 - 100) / 200 = 7 samples fit
    assert fit_batch(memory, 4, cpu, may_lower=False, what="x", available=free).batch_size == 4
    lowered = fit_batch(memory, 16, cpu, may_lower=True, what="pretrain run", available=free)
    assert lowered.batch_size == 7 and "training with batch 7 instead" in lowered.note and "pretrain run" in lowered.note
    with pytest.raises(InputError, match=r"a step at --batch-size 16 needs about 3\.2 GiB but only 2\.0 GiB of GPU memory are free; --batch-size 7 fits"):
        fit_batch(memory, 16, gpu, may_lower=True, what="x", available=free)
    with pytest.raises(InputError, match="even at --batch-size 1"):
        fit_batch(StepMemory(fixed=2 << 30, per_sample=1), 1, cpu, may_lower=True, what="x", available=free)
    assert fit_batch(memory, 16, cpu, may_lower=True, what="x", available=free, processes=2).batch_size == 3  # ranks share the RAM


def test_pretrain_lowers_the_default_batch_and_refuses_a_given_one(slices, tmp_path, capsys, monkeypatch):
    from DiffusionSegLib import memory

    # The measurement has its own tests; here what pretrain does with it. Batch 2 fits, 3 does not.
    step = StepMemory(fixed=100 << 20, per_sample=200 << 20)
    monkeypatch.setattr("Training.pretrain.measure_step", lambda *args, **kwargs: step)
    monkeypatch.setattr(memory, "available_ram", lambda: int((step.at(2) + 1000) / memory.HEADROOM))
    common = ["pretrain", "--data", str(slices), "--preset", "tiny", "--workers", "0", "--sample-every", "0", "--no-progress", "--iterations", "1"]
    assert train([*common, "--out", str(tmp_path / "a")]) == 0
    assert "training with batch 2 instead (set --batch-size to choose)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert recorded["batch_size"] == 2 and recorded["bf16"] is False and recorded["fused_adam"] is False  # what ran on the CPU
    assert train([*common, "--out", str(tmp_path / "b"), "--batch-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 16 needs about" in err[0] and err[0].endswith("--batch-size 2 fits")
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_loader_workers_default_to_the_available_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers() == 4


def test_finetune_refuses_a_batch_that_does_not_fit(phantom_files, tmp_path, capsys, monkeypatch):
    from DiffusionSegLib import memory

    monkeypatch.setattr(memory, "available_ram", lambda: 64 << 20)  # 64 MiB: not even one slice of a step fits
    code = diffusionseg(["finetune", "--image", str(phantom_files["ct"]), "--labels", str(phantom_files["labels"]), "-o", str(tmp_path / "m"),
                         "--strategy", "fs", "--preset", "tiny", "--iterations", "2", "--batch-size", "4", "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "finetune: one training step needs about" in err[0] and "even at --batch-size 1" in err[0]
    assert not (tmp_path / "m").exists()


# --- SIGTERM / Ctrl-C: earlier outputs intact, no temporary files --------------------------------------------------


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, even when the test run was started in the background (which leaves SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_while_segment_writes(signum, ctrl_c_raises, segmentor_model, phantom_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "result.nii.gz"
    out.write_bytes(b"earlier result")
    signal_self_on_call(sitk, "WriteImage", monkeypatch, signum=signum)
    assert diffusionseg(["segment", str(phantom_files["ct"]), "-o", str(out), "--model", str(segmentor_model), "--progress", "none"]) == 130
    assert "cancelled" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz"]


def test_sigterm_while_finetune_saves_keeps_the_earlier_model(segmentor_model, phantom_files, tmp_path, capsys, monkeypatch):
    import shutil

    from DiffusionSegLib import models

    out = tmp_path / "model"
    shutil.copytree(segmentor_model, out)
    before = (out / "weights.safetensors").read_bytes()
    signal_self_on_call(models, "save_file", monkeypatch)
    assert diffusionseg(["finetune", "--image", str(phantom_files["ct"]), "--labels", str(phantom_files["labels"]), "-o", str(out),
                         "--strategy", "fs", "--preset", "tiny", "--iterations", "2", "--progress", "none"]) == 130
    assert (out / "weights.safetensors").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sigterm_during_prepare_keeps_complete_shards_and_resumes(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (1, 2, 3):
        sitk.WriteImage(make_phantom(size=(48, 48, 6), spacing=(8.0, 8.0, 10.0), seed=seed)[0], str(inputs / f"ct{seed}.nii.gz"))
    out = tmp_path / "slices"
    signal_self_on_call(prepare, "write_index", monkeypatch, call=2, half=False)  # after the second volume
    assert train(["prepare", str(inputs), "-o", str(out), "--size", "32"]) == 130
    assert "prepare stopped after" in capsys.readouterr().err
    assert leftovers(out) == []
    index = shards.read_index(out)  # the index from before the stop: complete shards only
    assert 1 <= len(index.volumes) <= 2
    for volume in index.volumes:
        assert np.load(out / volume["shard"]).shape[0] == volume["slices"]
    monkeypatch.undo()
    assert train(["prepare", str(inputs), "-o", str(out), "--size", "32"]) == 0
    assert len(shards.read_index(out).volumes) == 3 and leftovers(out) == []


@pytest.mark.slow
def test_sigterm_during_benchmark_keeps_finished_runs(tiny_pretrained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    args = ["benchmark", "--pretrained", str(tiny_pretrained), *write_phantoms(tmp_path), "-o", str(out), "--seeds", "0", "--block", "4",
            "--device", "cpu", "--protocols", "cross", "--budgets", "2", "--strategies", "lp", "--iterations", "1"]
    signal_self_on_call(label_efficiency, "write_text", monkeypatch, call=2, half=False)  # while the second run's record is written
    assert train(args) == 130
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["iterations"] == 1 and leftovers(out) == []
    monkeypatch.undo()
    capsys.readouterr()
    assert train(args) == 0
    assert capsys.readouterr().out.count("(reused)") == 1 and leftovers(out) == []


# --- full disk, read-only folder, two writers ---------------------------------------------------------------


def run_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """A command whose writes fail past `limit` bytes per file with EFBIG, as a full disk fails them (SIGXFSZ ignored)."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, preexec_fn=limit_writes, env=env, cwd=ROOT)


@pytest.mark.parametrize("suffix", [".nii.gz", ".seg.nrrd"])
def test_disk_full_while_writing_a_labelmap(suffix, segmentor_model, phantom_files, tmp_path):
    out = tmp_path / "out" / f"result{suffix}"
    segment = ["DiffusionSegLib", "segment", str(phantom_files["ct"]), "-o", str(out), "--model", str(segmentor_model), "--progress", "none"]
    assert diffusionseg(segment[1:]) == 0
    size = out.stat().st_size
    out.unlink()
    done = run_with_file_size_limit(segment, size // 2)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"diffusionseg: error: {out}: cannot be written (")
    assert "nothing was written" in lines[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_while_saving_weights(phantom_files, tmp_path):
    out = tmp_path / "models" / "new"
    done = run_with_file_size_limit(["DiffusionSegLib", "finetune", "--image", str(phantom_files["ct"]), "--labels", str(phantom_files["labels"]),
                                     "-o", str(out), "--strategy", "fs", "--preset", "tiny", "--iterations", "1", "--progress", "none"], 200_000)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"diffusionseg: error: {out}: cannot be written (File too large)") and "Traceback" not in done.stderr
    assert list((tmp_path / "models").iterdir()) == []


def test_disk_full_while_saving_a_checkpoint(slices, tmp_path):
    run = tmp_path / "run"
    done = run_with_file_size_limit(["Training", "pretrain", "--data", str(slices), "--out", str(run), *FAST, "--iterations", "2",
                                     "--checkpoint-every", "1"], 200_000)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"diffusionseg-train: error: {run / 'checkpoints' / 'step-00000001'}: cannot be written (File too large)")
    assert complete_checkpoints(run / "checkpoints") == [] and leftovers(run) == []


def test_read_only_output_folder(segmentor_model, phantom_files, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mounted"
    folder.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # what a read-only mount answers (root ignores permission bits, so it is simulated)
        if self.parent == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = folder / "result.seg.nrrd"
    assert diffusionseg(["segment", str(phantom_files["ct"]), "-o", str(out), "--model", str(segmentor_model), "--progress", "none"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"diffusionseg: error: {out}: cannot be written (Read-only file system); the folder is on a read-only file system; "
                     "choose another output folder; nothing was written"]
    assert list(folder.iterdir()) == []


def test_two_writers_of_the_same_model_name(tmp_path):
    """Each save is whole; the folder always holds one complete model; a writer that loses the race is told so."""
    config = preset_config("tiny")
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(64), head={"width": 8, "layers": 2}, strategy="fs",
                     timestep=0, preset="tiny")
    states = {}
    for writer in (1, 2):
        torch.manual_seed(writer)
        states[writer] = Segmentor(config, 8).state_dict()
    folder = tmp_path / "same-name"
    failures: list[Exception] = []

    def write(writer: int) -> None:
        for _ in range(6):
            try:
                save_model(folder, card, states[writer])
            except atomic.WriteError as e:
                failures.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("another process wrote this folder at the same moment" in str(e) for e in failures)
    loaded = load_segmentor(folder)[0].state_dict()
    assert any(all(torch.equal(loaded[k], v) for k, v in states[w].items()) for w in (1, 2))  # one writer's model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same-name"]


# --- a very long CT -------------------------------------------------------------------------------------------


@needs_proc
def test_a_2000_slice_ct_is_segmented_in_bounded_memory(tmp_path):
    """2,000 tiny slices: memory grows with the uint8 class maps, never with float copies of them (the network is replaced by a
    cheap stand-in: the pipeline around it is what is measured)."""
    torch.manual_seed(0)
    config = preset_config("tiny", 32)
    segmentor = Segmentor(config, 8)
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(32), head={"width": 8, "layers": segmentor.head.num_layers},
                     strategy="fs", timestep=0, preset="tiny")
    save_model(tmp_path / "m32", card, segmentor.state_dict())
    ct = np.random.default_rng(0).normal(0, 300, (2000, 32, 32)).astype(np.int16)
    ct[:, :4] = -1000
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((12.8, 12.8, 1.0))
    sitk.WriteImage(image, str(tmp_path / "long.nii.gz"))
    script = PEAK + textwrap.dedent(f"""
        import torch
        from DiffusionSegLib.cli import main
        from DiffusionSegLib.segmentor import Segmentor
        Segmentor.forward = lambda self, x: x.expand(-1, self.num_classes, -1, -1) * torch.arange(self.num_classes, dtype=x.dtype).view(1, -1, 1, 1)
        before = peak()
        code = main(["segment", {str(tmp_path / "long.nii.gz")!r}, "-o", {str(tmp_path / "long.seg.nrrd")!r}, "--model", {str(tmp_path / "m32")!r},
                     "--progress", "none", "--batch-size", "8"])
        print(code, peak() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, growth = map(int, done.stdout.split())
    assert code == 0, done.stderr[-2000:]
    class_maps = 2000 * 14 * 32 * 32  # uint8 probabilities, the largest array by design: 29 MB
    assert growth < 4 * class_maps, f"{growth / 2**20:.0f} MiB"  # one float32 copy of them alone would be 4x
    assert sitk.ReadImage(str(tmp_path / "long.seg.nrrd")).GetSize() == (32, 32, 2000)
