"""One budgeted run of the whole pipeline on one GPU: every stage under its own wall-clock budget.

    python -m Training.gpu_run SHARED_DATA OUT [--total 480] [--prepare-budget S] [--pretrain-budget S] ...
    bash Training/gpu_run.sh SHARED_DATA OUT [flags]

Stages, each a child process in its own process group, in this order:

1. nvidia-smi: the GPU as the run found it (``nvidia-smi`` and ``nvidia-smi -q``), and a once-a-second log
   of utilisation, memory and power for the whole run (skipped without nvidia-smi);
2. prepare: every real CT image under SHARED_DATA (``unlabeled/`` and the images of the labelled CTs, no
   labels) at ``--size`` px, one volume per core;
3. pretrain: ``--preset`` at ``--batch-size``, bf16 autocast, channels-last, for the stage's budget
   (``pretrain --time-limit``: a checkpoint at the end of the step the budget runs out in);
4. export: that checkpoint's EMA weights as a pretrained model folder;
5. throughput: FLOPs of one training image counted with ``torch.utils.flop_counter``, the images/s
   pretrain logged (the first window, warm-up, left out), and MFU against the GPU's dense bf16 peak from
   its data sheet and against a measured bf16 matmul;
6. finetune: an FT-dec segmentor on every labelled CT, the partially labelled ones included
   (``diffusionseg finetune`` reads which organs each labelmap holds), for the stage's budget;
7. figures: the held-out (leave-one-patient-out) figures of ``Training.benchmarks.model_figures --cases segmentor``
   on the fully labelled CTs. A partially labelled CT is not scored there: its unlabelled organs would
   count as false positives.

A stage that overruns its budget is sent SIGTERM (pretrain and prepare then keep what they finished:
a checkpoint, complete shards) and SIGKILL a grace period later; the next stages run from what exists, and
skip (saying why) when what they need is missing. The budgets are capped so that the whole run ends
within ``--total`` seconds. OUT/summary.json, rewritten after every stage, holds each stage's status,
seconds, budget, command and log, and the throughput and held-out figures; logs are OUT/logs/STAGE.log.

The defaults are sized for one H200 (16 cores) in 8 minutes; ``--reduced`` is the CPU smoke form the
test suite runs (tiny preset, 64 px, seconds per stage). A rerun into the same OUT continues: prepare adds
only new volumes, pretrain resumes its run for another budget, the figures skip finished cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from DiffusionSegLib.atomic import write_text
from DiffusionSegLib.errors import EXIT_INPUT_ERROR

STAGES = ("nvidia-smi", "prepare", "pretrain", "export", "throughput", "finetune", "figures")
CT_FILE, LABELS_FILE = "ct.nii.gz", "labels.nii.gz"
# A labelled CT with fewer organs than this is partially labelled (the shared data's ircadb case has 4 of 13):
# fine-tuning handles it, held-out scoring would not.
FULL_LABEL_ORGANS = 10
# Dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets, by a substring of the device name.
# SXM parts; the PCIe/NVL variants are listed first so that they match before the shorter name.
BF16_PEAK_FLOPS = (
    ("H200 NVL", 835e12), ("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835e12), ("H100", 989.4e12),
    ("GH200", 989.4e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362.05e12), ("A10G", 70e12), ("L4", 121e12),
)


@dataclass
class Settings:
    size: int = 256
    preset: str = "b"
    batch_size: int = 32  # U-Net-B at 256 px in bf16 fits comfortably in an H200's 141 GB; the guard names a smaller batch otherwise
    pretrain_iterations: int = 20_000  # sets the learning-rate schedule; the time budget ends the run long before on one GPU
    ema_decay: float = 0.999  # 0.9999 would average over ~10k steps, more than a budgeted run takes
    channels_last: bool = True
    compile: bool = False
    log_every: int = 20
    checkpoint_every: int = 1000
    loader_workers: int = 6
    prepare_workers: int = 0  # 0: every available core
    finetune_iterations: int = 2000  # the time budget usually ends it first
    finetune_batch: int = 16
    finetune_lr: float = 1e-4
    figures_iterations: int = 150
    figures_batch: int = 16
    figure_cts: list[str] = field(default_factory=list)  # empty: the fully labelled CTs
    device: str = "auto"
    total: float = 480.0
    budgets: dict[str, float] = field(default_factory=lambda: {
        "nvidia-smi": 10.0, "prepare": 40.0, "pretrain": 210.0, "export": 20.0, "throughput": 20.0, "finetune": 60.0, "figures": 120.0})
    pretrain_reserve: float = 40.0  # of the pretrain budget: start-up (CUDA, memory check, loader) and the final checkpoint
    finetune_reserve: float = 25.0  # start-up, reading the CTs, saving the model
    grace: float = 15.0  # between SIGTERM at the budget and SIGKILL
    matmul_size: int = 8192


REDUCED = dict(size=64, preset="tiny", batch_size=4, pretrain_iterations=200, log_every=1, checkpoint_every=50, loader_workers=0,
               finetune_iterations=20, finetune_batch=2, figures_iterations=2, figures_batch=2, device="cpu", total=300.0,
               # Start-up on a loaded 2-core machine has taken 5 to 20 s of each budget: the reserves leave room for it.
               budgets={"nvidia-smi": 10.0, "prepare": 60.0, "pretrain": 45.0, "export": 20.0, "throughput": 20.0, "finetune": 45.0,
                        "figures": 60.0},
               pretrain_reserve=30.0, finetune_reserve=30.0, grace=8.0, matmul_size=512)


# ---------------------------------------------------------------------------------------------
# The data folder.


@dataclass
class LabelledCT:
    name: str
    ct: Path
    labels: Path
    organs: int  # distinct organ labels present


def labelled_cts(data: Path) -> list[LabelledCT]:
    """Sub-folders of `data` holding ct.nii.gz and labels.nii.gz, sorted by name."""
    import numpy as np
    import SimpleITK as sitk

    from DiffusionSegLib.organs import ORGANS

    found = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        if (folder / CT_FILE).is_file() and (folder / LABELS_FILE).is_file():
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / LABELS_FILE)))  # a copy: a view would outlive its image
            organs = len(set(np.unique(labels).tolist()) & {o.label for o in ORGANS})
            found.append(LabelledCT(folder.name, folder / CT_FILE, folder / LABELS_FILE, organs))
    return found


def pretraining_images(data: Path, cts: list[LabelledCT]) -> list[Path]:
    """What prepare reads: the unlabelled folder (DICOM series included) and the labelled CTs' images, never a labelmap."""
    unlabeled = data / "unlabeled"
    return ([unlabeled] if unlabeled.is_dir() else []) + [ct.ct for ct in cts]


# ---------------------------------------------------------------------------------------------
# Children under a budget.


@dataclass
class Outcome:
    status: str  # ok, stopped (SIGTERM at the budget, then exited), killed (SIGKILL), failed, skipped
    seconds: float
    returncode: int | None
    log: str


def run_stage(cmd: list[str], log: Path, budget: float, grace: float, env: dict[str, str]) -> Outcome:
    """Run `cmd` to completion or its budget: SIGTERM to the command at `budget - grace` (it saves what it has), SIGKILL to its whole
    process group (loader workers, pools) at `budget`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        soft = max(budget - grace, budget / 2)
        signalled = killed = False
        try:
            proc.wait(timeout=soft)
        except subprocess.TimeoutExpired:
            signalled = True
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=max(budget - (time.monotonic() - start), 1.0))
            except subprocess.TimeoutExpired:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever the command left running (a pool, loader workers)
                os.killpg(proc.pid, signal.SIGKILL)
    status = "killed" if killed else "stopped" if signalled else "ok" if proc.returncode == 0 else "failed"
    return Outcome(status, round(time.monotonic() - start, 1), proc.returncode, str(log))


def log_tail(path: str | Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


# ---------------------------------------------------------------------------------------------
# The run.


class Run:
    def __init__(self, data: Path, out: Path, settings: Settings) -> None:
        self.data, self.out, self.s = data, out, settings
        self.started = time.monotonic()
        self.deadline = self.started + settings.total
        self.summary: dict = {"data": str(data), "out": str(out), "settings": _settings_record(settings), "stages": {}}
        self.env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, self.env.get("PYTHONPATH")]))
        if settings.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # pretrain and the figures take CUDA whenever they see it
        self.monitor: subprocess.Popen | None = None

    # paths
    @property
    def slices(self) -> Path:
        return self.out / f"slices{self.s.size}"

    @property
    def run_dir(self) -> Path:
        return self.out / "pretrain"

    @property
    def pretrained(self) -> Path:
        return self.out / "pretrained"

    @property
    def segmentor(self) -> Path:
        return self.out / "segmentor"

    def save(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.started, 1)
        write_text(self.out / "summary.json", json.dumps(self.summary, indent=1) + "\n")

    def budget(self, stage: str) -> float:
        """The stage's budget, cut to what is left of the total."""
        return max(min(self.s.budgets[stage], self.deadline - time.monotonic()), 0.0)

    def record(self, stage: str, outcome: Outcome | None, cmd: list[str] | None = None, budget: float | None = None, **extra: object) -> None:
        entry: dict = {"status": "skipped", **extra} if outcome is None else {
            "status": outcome.status, "seconds": outcome.seconds, "returncode": outcome.returncode, "log": os.path.relpath(outcome.log, self.out)}
        if budget is not None:
            entry["budget_s"] = round(budget, 1)
        if cmd is not None:
            entry["command"] = shlex.join(cmd)
        if outcome is not None and outcome.status == "failed":
            entry["error"] = log_tail(outcome.log)
        if outcome is not None:
            entry.update(extra)
        self.summary["stages"][stage] = entry
        self.save()
        shown = entry.get("reason") or (entry.get("error") or "").rsplit("\n", 1)[-1]
        print(f"{stage:<11} {entry['status']:<8} {entry.get('seconds', 0):7.1f} s / {entry.get('budget_s', 0):6.1f} s  {shown}", flush=True)

    def stage(self, stage: str, cmd: list[str], grace: float | None = None, **extra: object) -> Outcome | None:
        budget = self.budget(stage)
        if budget < 1.0:
            self.record(stage, None, reason="no time left of --total")
            return None
        outcome = run_stage(cmd, self.out / "logs" / f"{stage}.log", budget, min(self.s.grace if grace is None else grace, budget / 4), self.env)
        self.record(stage, outcome, cmd, budget, **extra)
        return outcome

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # stages
    def nvidia_smi(self) -> None:
        tool = shutil.which("nvidia-smi")
        if tool is None or self.s.device == "cpu":
            self.record("nvidia-smi", None, reason="no nvidia-smi on this machine" if tool is None else "--device cpu")
            return
        start = time.monotonic()
        files = {}
        for name, args in (("nvidia-smi.txt", []), ("nvidia-smi-q.txt", ["-q"])):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=self.budget("nvidia-smi") / 2)
                write_text(self.out / name, done.stdout + done.stderr)
                files[name] = done.returncode
        query = "timestamp,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw,temperature.gpu,clocks.sm"
        log = (self.out / "nvidia-smi-log.csv").open("w")
        self.monitor = subprocess.Popen([tool, f"--query-gpu={query}", "--format=csv", "-l", "1"], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        status = "ok" if files and not any(files.values()) else "failed"
        self.summary["stages"]["nvidia-smi"] = {"status": status, "seconds": round(time.monotonic() - start, 1), "files": sorted(files),
                                                "log": "nvidia-smi-log.csv (every second until the run ends)"}
        self.save()
        print(f"nvidia-smi  {status}", flush=True)

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.monitor.pid, signal.SIGTERM)
            self.monitor.wait()
            tool = shutil.which("nvidia-smi")
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                done = subprocess.run([tool], capture_output=True, text=True, timeout=10)
                write_text(self.out / "nvidia-smi-end.txt", done.stdout + done.stderr)

    def prepare(self, cts: list[LabelledCT]) -> None:
        images = pretraining_images(self.data, cts)
        if not images:
            self.record("prepare", None, reason=f"{self.data}: no unlabeled/ folder and no labelled CT")
            return
        workers = self.s.prepare_workers or _cores()
        self.stage("prepare", self.python("-m", "Training", "prepare", *map(str, images), "-o", str(self.slices), "--size", str(self.s.size),
                                          "--workers", str(workers)))
        with contextlib.suppress(OSError, ValueError, KeyError):
            report = json.loads((self.slices / "index.json").read_text())
            self.summary["stages"]["prepare"].update(volumes=len(report["volumes"]), slices=sum(v["slices"] for v in report["volumes"]),
                                                     inputs_skipped=len(report.get("skipped", [])))
            self.save()

    def pretrain(self) -> None:
        if not (self.slices / "index.json").is_file():
            self.record("pretrain", None, reason="prepare wrote no slice dataset")
            return
        batch = self.s.batch_size
        for _attempt in range(2):  # once more at the batch the memory check names, if the first does not fit
            budget = self.budget("pretrain")
            limit = max(budget - self.s.pretrain_reserve, min(5.0, budget / 2))
            resume = ["--resume"] if (self.run_dir / "checkpoints").is_dir() and any((self.run_dir / "checkpoints").iterdir()) else []
            cmd = self.python("-m", "Training", "pretrain", "--data", str(self.slices), "--out", str(self.run_dir), "--preset", self.s.preset,
                              "--batch-size", str(batch), "--iterations", str(self.s.pretrain_iterations), "--time-limit", f"{limit:.0f}",
                              "--bf16", "--channels-last" if self.s.channels_last else "--no-channels-last",
                              "--compile" if self.s.compile else "--no-compile", "--ema-decay", str(self.s.ema_decay),
                              "--log-every", str(self.s.log_every), "--checkpoint-every", str(self.s.checkpoint_every), "--keep-checkpoints", "1",
                              "--sample-every", "0", "--workers", str(self.s.loader_workers), "--no-progress", *resume)
            outcome = self.stage("pretrain", cmd, time_limit_s=round(limit))
            if outcome is None or outcome.status != "failed":
                break
            fits = re.search(r"--batch-size (\d+) fits", log_tail(outcome.log, 3))
            if not fits or int(fits.group(1)) >= batch:
                break
            batch = int(fits.group(1))
        entry = self.summary["stages"]["pretrain"]
        for line in reversed(log_tail(entry.get("log") and self.out / entry["log"], 3).splitlines()):
            with contextlib.suppress(ValueError):
                entry["result"] = json.loads(line)  # {"step", "stopped_by", "final_loss"}
                break
        with contextlib.suppress(OSError, ValueError, KeyError):
            entry["batch_size"] = json.loads((self.run_dir / "config.json").read_text())["config"]["batch_size"]
        self.save()

    def export(self) -> None:
        if not (self.run_dir / "checkpoints").is_dir():
            self.record("export", None, reason="pretrain saved no checkpoint")
            return
        self.stage("export", self.python("-m", "Training", "export", "--run", str(self.run_dir), "-o", str(self.pretrained),
                                         "--name", "gpu-run-pretrained"))

    def throughput(self) -> None:
        if not (self.run_dir / "metrics.jsonl").is_file():
            self.record("throughput", None, reason="pretrain logged no metrics")
            return
        result = self.out / "logs" / "throughput.json"
        self.stage("throughput", self.python("-m", "Training.gpu_run", "_flops", "--preset", self.s.preset, "--size", str(self.s.size),
                                             "--device", self.s.device, "--matmul-size", str(self.s.matmul_size), "--json", str(result)))
        entry = self.summary["stages"]["throughput"]
        with contextlib.suppress(OSError, ValueError):
            entry.update(throughput(json.loads(result.read_text()), self.run_dir / "metrics.jsonl"))
        self.save()

    def finetune(self, cts: list[LabelledCT]) -> None:
        if not (self.pretrained / "model.json").is_file():
            self.record("finetune", None, reason="no exported pretrained model")
            return
        if not cts:
            self.record("finetune", None, reason=f"{self.data}: no labelled CT")
            return
        budget = self.budget("finetune")
        limit = max(budget - self.s.finetune_reserve, min(5.0, budget / 2))
        fresh = self.out / "fresh-augmentation.json"
        write_text(fresh, json.dumps({"cache_copies": 0}) + "\n")  # the bundled segmentor's recipe: fresh augmentation every iteration
        pairs = [arg for ct in cts for arg in ("--image", str(ct.ct), "--labels", str(ct.labels))]
        cmd = self.python("-m", "DiffusionSegLib", "finetune", "--base", str(self.pretrained), "--strategy", "ft-dec", *pairs,
                          "--iterations", str(self.s.finetune_iterations), "--batch-size", str(self.s.finetune_batch), "--lr", f"{self.s.finetune_lr:g}",
                          "--patience", "0", "--time-limit", f"{limit:.0f}", "--config", str(fresh), "--device", self.s.device,
                          "--name", "gpu-run-segmentor", "-o", str(self.segmentor), "--progress", "none")
        outcome = self.stage("finetune", cmd, time_limit_s=round(limit), cts={ct.name: {"organs": ct.organs} for ct in cts})
        if outcome is not None and (self.segmentor / "model.json").is_file():
            card = json.loads((self.segmentor / "model.json").read_text())
            prov = card.get("provenance", {})
            entry = self.summary["stages"]["finetune"]
            entry.update({k: prov.get(k) for k in ("iterations", "stopped_by", "final_loss", "seconds", "device")})
            if prov.get("seconds"):
                entry["iterations_per_s"] = round(prov["iterations"] / prov["seconds"], 3)
                entry["slices_per_s"] = round(prov["iterations"] * self.s.finetune_batch / prov["seconds"], 2)
            self.save()

    def figures(self, cts: list[LabelledCT]) -> None:
        chosen = [ct for ct in cts if ct.name in self.s.figure_cts] if self.s.figure_cts else [ct for ct in cts if ct.organs >= FULL_LABEL_ORGANS]
        if not (self.pretrained / "model.json").is_file():
            self.record("figures", None, reason="no exported pretrained model")
            return
        if len(chosen) < 2:
            self.record("figures", None, reason=f"held-out figures need two fully labelled CTs; found {[ct.name for ct in chosen]}")
            return
        folder = self.out / "figures"
        cmd = self.python("-m", "Training.benchmarks.model_figures", "--pretrained", str(self.pretrained),
                          *[a for ct in chosen for a in ("--ct", ct.name, str(ct.ct), str(ct.labels))], "-o", str(folder), "--cases", "segmentor",
                          "--segmentor-iterations", str(self.s.figures_iterations), "--segmentor-batch", str(self.s.figures_batch))
        self.stage("figures", cmd, cts=[ct.name for ct in chosen],
                   not_scored=[ct.name for ct in cts if ct not in chosen])
        with contextlib.suppress(OSError, ValueError):
            results = json.loads((folder / "figures.json").read_text())
            self.summary["stages"]["figures"]["held_out"] = {
                key: {"trained_on": r.get("trained_on"), "cross_dsc": r.get("cross_dsc"), "within_dsc": r.get("within_dsc"),
                      "train_seconds": r.get("train_seconds")} for key, r in results.items()}
            self.save()

    def run(self, only: Sequence[str] = STAGES) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        cts = labelled_cts(self.data) if self.data.is_dir() else []
        self.summary["labelled_cts"] = {ct.name: {"organs": ct.organs, "partial": ct.organs < FULL_LABEL_ORGANS} for ct in cts}
        try:
            for name in only:
                {"nvidia-smi": self.nvidia_smi, "prepare": lambda: self.prepare(cts), "pretrain": self.pretrain, "export": self.export,
                 "throughput": self.throughput, "finetune": lambda: self.finetune(cts), "figures": lambda: self.figures(cts)}[name]()
        finally:
            self.stop_monitor()
            self.save()
        return self.summary


def _cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return max(os.cpu_count() or 1, 1)


def _settings_record(s: Settings) -> dict:
    return {k: v for k, v in s.__dict__.items()}


# ---------------------------------------------------------------------------------------------
# Throughput and MFU.


def datasheet_peak(device_name: str) -> float | None:
    for part, peak in BF16_PEAK_FLOPS:
        if part.lower() in device_name.lower():
            return peak
    return None


def measured_images_per_s(metrics: Path) -> tuple[float | None, list[float]]:
    """Images/s over pretrain's log windows after the first (warm-up, cuDNN autotuning, compilation): windows are of equal
    step counts, so the overall rate is their harmonic mean."""
    rates = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            rates.append(float(json.loads(line)["images_per_s"]))
    kept = rates[1:]
    return (len(kept) / sum(1 / r for r in kept) if kept else None), rates


def throughput(flops: dict, metrics: Path) -> dict:
    images_per_s, windows = measured_images_per_s(metrics)
    result = {**flops, "images_per_s": images_per_s, "log_windows": len(windows)}
    if images_per_s is None:
        result["note"] = "fewer than 2 log windows: no steady-state rate"
        return result
    achieved = flops["flops_per_image"] * images_per_s
    result["achieved_flops"] = achieved
    if flops.get("datasheet_peak_flops"):
        result["mfu"] = achieved / flops["datasheet_peak_flops"]
    if flops.get("measured_peak_flops"):
        result["mfu_vs_measured_matmul"] = achieved / flops["measured_peak_flops"]
    return result


def count_flops(preset: str, size: int, device_name: str, matmul_size: int) -> dict:
    """FLOPs of one training image (forward and backward of the diffusion loss, as pretrain runs it) and the device's peaks."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from DiffusionSegLib.devices import configure_cpu, resolve_device
    from DiffusionSegLib.diffusion import GaussianDiffusion
    from DiffusionSegLib.unet import UNetModel, preset_config

    from .pretrain import PretrainConfig

    configure_cpu()
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    defaults = PretrainConfig()
    model = UNetModel(preset_config(preset, size)).to(device)
    diffusion = GaussianDiffusion(defaults.schedule, defaults.num_timesteps)
    x0 = torch.rand(1, 1, size, size, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        diffusion.training_loss(model, x0).backward()
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return {"flops_per_image": counter.get_total_flops(), "device": name, "peak_dtype": str(dtype).replace("torch.", ""),
            "datasheet_peak_flops": datasheet_peak(name) if cuda else None,
            "measured_peak_flops": matmul_flops(device, dtype, matmul_size)}


def matmul_flops(device, dtype, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul, best of repeated runs: the device's practical peak for `dtype`."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best, spent = math.inf, 0.0
    while spent < seconds:
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        elapsed = (time.perf_counter() - start) / 4
        best, spent = min(best, elapsed), spent + 4 * elapsed
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m Training.gpu_run", description=__doc__.splitlines()[0])
    p.add_argument("data", help="the shared data folder: unlabeled/ and labelled sub-folders with ct.nii.gz and labels.nii.gz")
    p.add_argument("out", help="output folder (created; a rerun continues it)")
    p.add_argument("--reduced", action="store_true",
                   help="the CPU smoke form: tiny preset, 64 px, a few seconds per stage, every stage still run (default: off, the GPU run)")
    p.add_argument("--total", type=float, help=f"seconds for the whole run; later budgets are cut to what is left (default: {d.total:g})")
    for stage in STAGES[1:]:
        p.add_argument(f"--{stage}-budget", type=float, metavar="S", help=f"seconds for {stage} (default: {d.budgets[stage]:g})")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="only these stages, in the run's order (default: all)")
    p.add_argument("--size", type=int, help=f"slice size in px (default: {d.size})")
    p.add_argument("--preset", help=f"U-Net preset of pretraining (default: {d.preset})")
    p.add_argument("--batch-size", type=int, help=f"pretraining batch (default: {d.batch_size})")
    p.add_argument("--pretrain-iterations", type=int, help=f"iterations of the learning-rate schedule (default: {d.pretrain_iterations})")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels-last pretraining (default: on)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network; its compilation counts against the budget (default: off)")
    p.add_argument("--loader-workers", type=int, help=f"pretraining data loader processes (default: {d.loader_workers})")
    p.add_argument("--prepare-workers", type=int, help="volumes prepared in parallel (default: every available core)")
    p.add_argument("--finetune-iterations", type=int, help=f"FT-dec iterations, if the budget does not end it first (default: {d.finetune_iterations})")
    p.add_argument("--finetune-batch", type=int, help=f"FT-dec batch (default: {d.finetune_batch})")
    p.add_argument("--figures-iterations", type=int, help=f"FT-dec iterations of each held-out model (default: {d.figures_iterations})")
    p.add_argument("--figure-cts", nargs="+", metavar="NAME",
                   help=f"labelled CTs (folder names) of the held-out figures (default: those with at least {FULL_LABEL_ORGANS} organs labelled)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device of every stage (default: auto; cpu with --reduced)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(**REDUCED) if args.reduced else Settings()
    for name in ("total", "size", "preset", "batch_size", "pretrain_iterations", "channels_last", "compile", "loader_workers", "prepare_workers",
                 "finetune_iterations", "finetune_batch", "figures_iterations", "figure_cts", "device"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    s.budgets = dict(s.budgets)
    for stage in STAGES[1:]:
        value = getattr(args, f"{stage.replace('-', '_')}_budget")
        if value is not None:
            s.budgets[stage] = value
    return s


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_flops"]:
        p = argparse.ArgumentParser()
        for flag, kind in (("--preset", str), ("--size", int), ("--device", str), ("--matmul-size", int), ("--json", str)):
            p.add_argument(flag, type=kind, required=True)
        a = p.parse_args(argv[1:])
        result = count_flops(a.preset, a.size, a.device, a.matmul_size)
        write_text(a.json, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return 0
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    data, out = Path(args.data).expanduser().resolve(), Path(args.out).expanduser().resolve()
    if not data.is_dir():
        print(f"gpu_run: {data} is not a folder", file=sys.stderr)
        return EXIT_INPUT_ERROR
    planned = sum(settings.budgets[s] for s in (args.stages or STAGES) if s in settings.budgets)
    if planned > settings.total:
        print(f"gpu_run: note: the budgets add up to {planned:g} s, more than --total {settings.total:g} s; the last stages get what is left",
              file=sys.stderr)
    only = [s for s in STAGES if s in (args.stages or STAGES)]
    summary = Run(data, out, settings).run(only)
    print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f} s)")
    return 0 if all(e["status"] in ("ok", "stopped", "skipped") for e in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
