"""Speed and memory benchmarks: segment, fine-tune, pretrain. Prints a table and writes JSON.

    python -m Training.benchmarks.speed_memory [segment] [finetune] [pretrain] [--quick] [--presets small b]
        [--device auto|cpu|cuda] [--json OUT.json] [--base MODEL] [--memory-slices N] [--segment-slices N]

No section named: all three. --quick is the reduced form the test suite runs (tiny preset at 64 px,
small phantoms, a few iterations; under 2 minutes on 2 cores). Without it, expect 20-25 minutes on 2
CPU cores for presets small and b (longer with a base model at 256 px for the time-to-Dice run).

Every measured case runs in a child process of its own (this script's hidden `_case` command, result as
JSON on stdout), so its peak RAM (`os.wait4`) is its own and no case warms caches for the next. Weights
are random, as speed does not depend on them, except in the time-to-Dice run, which fine-tunes a real
base model (--base, default the installed "ddpm-pretrained") on the real CT when ../shared/data has it.
Where a baseline is measured in the same run the figure is also given as a ratio, since absolute times
on shared machines are noisy. Nothing is asserted about speed: the issue's targets are printed beside
the measured figures; the command fails only when a case crashes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # also run as a file: python Training/benchmarks/NAME.py
from DiffusionSegLib import strategies  # noqa: E402
from DiffusionSegLib.devices import autocast, configure_cpu, resolve_device  # noqa: E402
from DiffusionSegLib.diffusion import GaussianDiffusion  # noqa: E402
from DiffusionSegLib.errors import InputError  # noqa: E402
from DiffusionSegLib.finetune import FinetuneConfig, PlateauStop, cache_pool_size, finetune, frozen_bytes_per_slice  # noqa: E402
from DiffusionSegLib.imageio import read_ct, read_labels, write_labelmap  # noqa: E402
from DiffusionSegLib.inference import default_batch_size, predict_probabilities  # noqa: E402
from DiffusionSegLib.metrics import organ_overlap  # noqa: E402
from DiffusionSegLib.models import DEFAULT_PRETRAINED, read_card, resolve_model  # noqa: E402
from DiffusionSegLib.preprocessing import PreprocessingSpec, to_model_space  # noqa: E402
from DiffusionSegLib.probability_resampling import probabilities_to_image_space  # noqa: E402
from DiffusionSegLib.recipe import build_segmentor, new_segmentor, random_base  # noqa: E402
from DiffusionSegLib.segmentor import Segmentor  # noqa: E402
from DiffusionSegLib.strategies import STRATEGIES  # noqa: E402
from DiffusionSegLib.training_slices import training_slices  # noqa: E402
from DiffusionSegLib.unet import PRESETS, UNetModel, preset_config  # noqa: E402
from Training.benchmarks.phantom import make_phantom  # noqa: E402
from Training.prepare import prepare  # noqa: E402
from Training.pretrain import PretrainConfig, pretrain  # noqa: E402
from Training.shards import SliceDataset  # noqa: E402

# Same place as Testing/conftest.py's SHARED_DATA (not importable here: it is pytest's).
REAL_CT = ROOT.parent / "shared" / "data" / "abdomen-ct-a"
RESULT_MARK = "@@benchmark-result "
SECTIONS = ("segment", "finetune", "pretrain")
FLAGS = ("bf16", "channels_last", "compile", "grad_checkpoint", "fused_adam")
CPU_ONLY_NA = {"bf16": "n/a on CPU (pretrain autocasts to bf16 on CUDA only)", "fused_adam": "n/a on CPU (pretrain fuses Adam on CUDA only)"}
GB = 1024.0  # MB


# ---------------------------------------------------------------------------------------------
# What to measure: sizes and iteration counts per mode and device.


@dataclass
class Plan:
    quick: bool
    device: str  # "cpu" or "cuda"
    presets: list[str]
    finetune_preset: str
    base: str | None
    memory_slices: int | None  # None: no memory case
    segment_slices: int | None  # None: per preset and device (see slices_for)
    eval_every: int
    work: Path = field(default_factory=Path)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def size_of(self, preset: str) -> int:
        return preset_config(preset).image_size

    def slices_for(self, preset: str) -> int:
        """200 slices as in the issue; on the CPU U-Net-B takes 5-10 s a slice, so a few and an estimate."""
        if self.segment_slices:
            return self.segment_slices
        if self.quick:
            return 16
        return 8 if self.cpu and preset not in ("tiny", "small") else 200

    def baseline_slices(self, preset: str) -> int:
        if self.quick:
            return 8
        if self.cpu:
            return 8 if preset in ("tiny", "small") else 2
        return 32

    def finetune_iterations(self) -> int:
        return 2 if self.quick else 4  # timed, after one warm-up iteration

    def convergence(self) -> dict:
        """The full schedule (FinetuneConfig's default iterations) and every held-out slice, except in --quick."""
        if self.quick:
            return {"iterations": 20, "eval_every": 5, "max_eval_slices": 12}
        return {"iterations": None, "eval_every": self.eval_every, "max_eval_slices": None}

    def pretrain_settings(self, preset: str) -> dict:
        """Batch, log window and windows measured: the first window (warm-up, compile) is dropped."""
        if self.quick:
            return {"batch_size": 2, "log_every": 1, "windows": 2, "workers": 1}
        if self.cpu:
            heavy = preset not in ("tiny", "small")
            return {"batch_size": 2 if heavy else 4, "log_every": 1 if heavy else 2, "windows": 1 if heavy else 2, "workers": 1}
        return {"batch_size": 16, "log_every": 10, "windows": 3, "workers": 4}

    def sweep(self, preset: str) -> bool:
        """The flag sweep; on the CPU not for U-Net-L (U-Net-B is already ~20 s a training image there)."""
        return not (self.cpu and preset == "l")

    def timeout(self) -> float:
        return 300.0 if self.quick else 3600.0


# ---------------------------------------------------------------------------------------------
# Children: each case in its own process; peak RAM from the kernel's accounting of that process tree.


@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str
    peak_ram_mb: float | None
    wall_s: float
    timed_out: bool


def _maxrss_mb(maxrss: int) -> float:
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def run_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Child:
    """Run `cmd` to completion; its own process group, so a timeout also ends what it started (torchrun)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            if hasattr(os, "wait4"):  # rusage of this child alone (and what it waited for)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                peak = _maxrss_mb(usage.ru_maxrss)
            else:
                proc.wait()
                peak = None
        finally:
            timer.cancel()
        out.seek(0)
        err.seek(0)
        return Child(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), peak,
                     time.monotonic() - start, expired.is_set())


def run_case(kind: str, params: dict, plan: Plan) -> dict:
    """One measured case in a child process; {"error": ...} instead of raising, so the run goes on."""
    child = run_child([sys.executable, str(Path(__file__).resolve()), "_case", kind, json.dumps(params)], plan.timeout())
    for line in reversed(child.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
            if child.peak_ram_mb is not None:
                result["peak_ram_mb"] = child.peak_ram_mb
            result["wall_s"] = child.wall_s
            return result
    why = "timed out" if child.timed_out else f"exit code {child.returncode}"
    tail = "\n".join(child.stderr.strip().splitlines()[-15:])
    print(f"  case {kind} {params.get('label', '')}: {why}\n{tail}", file=sys.stderr)
    return {"error": f"{why}: {tail.splitlines()[-1] if tail else 'no output'}"}


def case_main(kind: str, params: dict) -> None:
    """Child side: run one case, print its result as the last stdout line."""
    configure_cpu()
    torch.manual_seed(0)
    result = CASES[kind](params)
    with contextlib.suppress(ImportError):
        import resource

        result["self_peak_ram_mb"] = _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Helpers shared by cases.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(into: dict, key: str, device: torch.device) -> Iterator[None]:
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    into[key] = time.perf_counter() - start


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def choose_slices(labels: torch.Tensor, positions: list[int], count: int = 4, min_gap: int = 6) -> list[int]:
    """Indices of `count` slices with the most organs, at least `min_gap` input slices apart (relaxed if
    the volume is too short): what a user would annotate, spread out rather than four neighbours."""
    organs = [len(torch.unique(s[s > 0])) for s in labels]
    area = [int((s > 0).sum()) for s in labels]
    order = sorted(range(len(organs)), key=lambda i: (-organs[i], -area[i], i))
    for gap in (min_gap, 1):
        chosen: list[int] = []
        for i in order:
            if all(abs(positions[i] - positions[j]) >= gap for j in chosen):
                chosen.append(i)
            if len(chosen) == count:
                return sorted(chosen)
    return sorted(order[:count])


def random_segmentor(preset: str, size: int) -> Segmentor:
    return new_segmentor(random_base(preset, size))


# ---------------------------------------------------------------------------------------------
# Cases (child side). Each takes a JSON-able dict and returns one.


def case_phantom(p: dict) -> dict:
    """Write a phantom CT (and labelmap) as NIfTI; not measured, but kept out of the measured children."""
    ct, labels = make_phantom(size=tuple(p["size"]), spacing=tuple(p["spacing"]), seed=p.get("seed", 0))
    sitk.WriteImage(ct, p["ct"])
    if p.get("labels"):
        sitk.WriteImage(labels, p["labels"])
    return {}


def case_segment(p: dict) -> dict:
    """End to end with the engine's functions, each stage timed; then the network's layout baseline."""
    device = torch.device(p["device"])
    segmentor = random_segmentor(p["preset"], p["size"])
    spec = PreprocessingSpec.for_size(p["size"])
    batch = p.get("batch_size") or default_batch_size(device)
    stages: dict[str, float] = {}
    _reset_gpu_peak(device)
    with timed(stages, "read", device):
        ct = read_ct(p["ct"])
    with timed(stages, "preprocess", device):
        volume = to_model_space(ct, spec)
    with timed(stages, "network", device):
        probabilities = predict_probabilities(segmentor, volume.slices, device, batch)
    with timed(stages, "postprocess", device):
        labelmap = probabilities_to_image_space(probabilities, volume)
    with timed(stages, "write", device):
        write_labelmap(labelmap, p["out"])
    result = {
        "preset": p["preset"], "size": p["size"], "input_size": list(ct.GetSize()), "slices": volume.num_slices, "batch_size": batch,
        "stages_s": stages, "total_s": sum(stages.values()), "network_slices_per_s": volume.num_slices / stages["network"], "peak_gpu_mb": _gpu_peak_mb(device),
    }
    del probabilities, labelmap, ct
    if p.get("baseline_slices"):
        result["baseline"] = layout_baseline(segmentor, volume.slices[: p["baseline_slices"]], device, batch)
    return result


def layout_baseline(segmentor: Segmentor, slices: np.ndarray, device: torch.device, batch_size: int) -> dict:
    """Network alone on a few slices: NCHW (channels_last=False) and, on CUDA, an eager fp32 loop, against
    the default path. The baselines are warmed up on one batch first (a layout change rebuilds kernels);
    the default path is warm from segmenting the volume."""
    runs: dict[str, Callable[[np.ndarray], object]] = {
        "nchw": lambda s: predict_probabilities(segmentor, s, device, batch_size, channels_last=False),
        "default": lambda s: predict_probabilities(segmentor, s, device, batch_size),
    }
    if device.type == "cuda":  # predict_probabilities autocasts on CUDA: fp32 needs its own loop
        runs = {"eager_fp32": lambda s: eager_fp32(segmentor, s, device, batch_size), **runs}
    seconds: dict[str, float] = {}
    for name, run in runs.items():
        if name != "default":
            run(slices[:batch_size])
        with timed(seconds, name, device):
            run(slices)
    result = {"slices": len(slices), "seconds": seconds, "speedup_vs_nchw": seconds["nchw"] / seconds["default"]}
    if "eager_fp32" in seconds:
        result["speedup_vs_eager_fp32"] = seconds["eager_fp32"] / seconds["default"]
    return result


def eager_fp32(segmentor: Segmentor, slices: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    segmentor.eval().to(device, memory_format=torch.contiguous_format)
    out = []
    with torch.no_grad():
        for start in range(0, len(slices), batch_size):
            x = torch.from_numpy(slices[start : start + batch_size]).to(device)[:, None]
            out.append(segmentor(x).softmax(1).mul(255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def _four_phantom_slices(p: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ct = read_ct(p["ct"])
    slices = training_slices([(ct, read_labels(p["labels"], ct))], PreprocessingSpec.for_size(size))
    pick = choose_slices(slices.labels, [index for _, index in slices.sources])
    return slices.images[pick], slices.labels[pick]


def _time_iterations(segmentor: Segmentor, images: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig, device: torch.device) -> tuple[float, float]:
    """(mean seconds per iteration after the first, seconds from the call to the end of the first iteration)."""
    stamps: list[float] = []

    def on_step(iteration: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    finetune(segmentor, images, labels, config, device, on_step)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), stamps[0] - start


def case_finetune(p: dict) -> dict:
    """Seconds per iteration of one strategy on 4 slices; for frozen-encoder strategies also without the
    frozen-part cache (recomputed every iteration: the baseline), run first so both runs start warm.

    The cache build is read off the cached run: time to the end of its first iteration less one iteration
    (the rest of the set-up takes milliseconds), rather than building the cache a second time outside."""
    device = torch.device(p["device"])
    images, labels = _four_phantom_slices(p, p["size"])
    segmentor = random_segmentor(p["preset"], p["size"])
    # The cached run: a pool of 16 augmented copies per slice (the pool is off by default; this measures what it buys).
    config = FinetuneConfig(strategy=p["strategy"], iterations=p["iterations"] + 1, patience=0, cache_copies=16)
    _reset_gpu_peak(device)
    result: dict = {"strategy": p["strategy"], "preset": p["preset"], "size": p["size"], "slices": int(images.shape[0]),
                    "schedule_iterations": FinetuneConfig().iterations}
    if strategies.get(p["strategy"]).frozen:  # the frozen part's outputs can be cached
        no_cache = FinetuneConfig(strategy=p["strategy"], iterations=p["iterations"] + 1, patience=0, cache_copies=0)
        result["no_cache_seconds_per_iteration"], _ = _time_iterations(segmentor, images, labels, no_cache, device)
    result["seconds_per_iteration"], first = _time_iterations(segmentor, images, labels, config, device)
    if strategies.get(p["strategy"]).frozen:
        pool = cache_pool_size(config, images.shape[0], frozen_bytes_per_slice(segmentor, images.shape[-1]))
        result["cache"] = {"pool": pool, "seconds": max(first - result["seconds_per_iteration"], 0.0)} if pool else {"pool": 0}
        result["cache_speedup"] = result["no_cache_seconds_per_iteration"] / result["seconds_per_iteration"]
    result["peak_gpu_mb"] = _gpu_peak_mb(device)
    return result


def mean_dice(segmentor: Segmentor, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """Mean organ Dice of the argmax on model-space slices; leaves the modules' train/eval modes as found."""
    modes = [(m, m.training) for m in segmentor.modules()]
    segmentor.eval()
    predictions = []
    with torch.no_grad(), autocast(device):
        for start in range(0, len(images), batch_size):
            predictions.append(segmentor(images[start : start + batch_size].to(device)).argmax(1).to(torch.uint8).cpu())
    for module, mode in modes:
        module.train(mode)
    overlap = organ_overlap(torch.cat(predictions).numpy(), labels.numpy().astype(np.uint8))
    return float(overlap["mean_dsc"] or 0.0)


def case_convergence(p: dict) -> dict:
    """FT-dec from a base model on 4 real slices for the full schedule, Dice on the other labelled slices
    every `eval_every` iterations (evaluation off the training clock)."""
    device = torch.device(p["device"])
    start = build_segmentor(p["base"], "ft-dec")
    card, segmentor = start.card, start.segmentor
    ct = read_ct(p["ct"])
    slices = training_slices([(ct, read_labels(p["labels"], ct))], card.preprocessing)
    train = choose_slices(slices.labels, [index for _, index in slices.sources])
    held_out = [i for i in range(len(slices.sources)) if i not in train]
    if p["max_eval_slices"] and len(held_out) > p["max_eval_slices"]:  # evenly spaced, in --quick
        held_out = [held_out[i] for i in np.linspace(0, len(held_out) - 1, p["max_eval_slices"]).round().astype(int)]
    images, labels = slices.images[held_out], slices.labels[held_out]

    config = FinetuneConfig(strategy="ft-dec", patience=0)
    if p["iterations"]:
        config.iterations = p["iterations"]
    default = FinetuneConfig()
    plateau = PlateauStop(default.patience, default.min_improvement, default.min_iterations)
    losses: list[float] = []
    curve: list[dict] = []
    clock = {"start": 0.0, "evaluating": 0.0, "plateau_at": None}

    def on_step(iteration: int, loss: float) -> None:
        _sync(device)
        train_s = time.perf_counter() - clock["start"] - clock["evaluating"]
        losses.append(loss)
        at_plateau = clock["plateau_at"] is None and plateau.update(losses)
        if at_plateau:
            clock["plateau_at"] = iteration
        if iteration % p["eval_every"] == 0 or iteration == config.iterations or at_plateau:
            start = time.perf_counter()
            curve.append({"iteration": iteration, "train_s": train_s, "dice": mean_dice(segmentor, images, labels, device)})
            clock["evaluating"] += time.perf_counter() - start

    clock["start"] = time.perf_counter()
    finetune(segmentor, slices.images[train], slices.labels[train], config, device, on_step)
    return summarise_convergence(curve, clock["plateau_at"], {
        "base": str(p["base"]), "preset": card.preset, "size": card.preprocessing.size, "train_slices": [slices.sources[i][1] for i in train],
        "held_out_slices": len(held_out), "iterations": config.iterations, "eval_every": p["eval_every"],
        "plateau_settings": {"patience": default.patience, "min_improvement": default.min_improvement, "min_iterations": default.min_iterations},
    })


def summarise_convergence(curve: list[dict], plateau_at: int | None, info: dict) -> dict:
    full = curve[-1]
    goal = 0.95 * full["dice"]
    reached = next(point for point in curve if point["dice"] >= goal)  # the last point always qualifies
    at_plateau = next((point for point in curve if point["iteration"] == plateau_at), None)
    return {
        **info, "full_dice": full["dice"], "full_train_s": full["train_s"], "dice_95": goal,
        "iteration_95": reached["iteration"], "train_s_95": reached["train_s"],
        "plateau_iteration": plateau_at, "plateau_dice": at_plateau and at_plateau["dice"], "plateau_train_s": at_plateau and at_plateau["train_s"],
        "curve": curve,
    }


def case_prepare(p: dict) -> dict:
    """Phantom CTs through Training.prepare into a slice dataset at the preset's size."""
    sources = Path(p["out"]).with_name(Path(p["out"]).name + "-ct")
    sources.mkdir(parents=True, exist_ok=True)
    for seed in range(p["volumes"]):
        ct, _ = make_phantom(size=tuple(p["size"]), spacing=tuple(p["spacing"]), seed=seed)
        sitk.WriteImage(ct, str(sources / f"phantom-{seed}.nii.gz"))
    index = prepare([str(sources)], p["out"], PreprocessingSpec.for_size(p["image_size"]), workers=1, show_progress=False)
    return {"slices": index.num_slices}


def measured_images_per_s(run_dir: Path) -> tuple[float, list[float]]:
    """Images/s over the metrics windows after the first (warm-up, compilation); windows are of equal
    length, so the overall rate is their harmonic mean. metrics' images_per_s counts every process."""
    rates = [json.loads(line)["images_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = rates[1:]
    if not measured:
        raise RuntimeError(f"{run_dir}: fewer than 2 metrics windows")
    return len(measured) / sum(1 / r for r in measured), rates


def pretrain_config(p: dict, flags: dict[str, bool]) -> PretrainConfig:
    iterations = p["log_every"] * (1 + p["windows"])
    return PretrainConfig(preset=p["preset"], iterations=iterations, batch_size=p["batch_size"], log_every=p["log_every"], workers=p["workers"],
                          sample_every=0, checkpoint_every=iterations, keep_checkpoints=1, **flags)


def case_pretrain(p: dict) -> dict:
    """The real training loop with one set of flags; images/s from its metrics.jsonl."""
    run_dir = Path(p["run_dir"])
    config = pretrain_config(p, p["flags"])
    pretrain(p["data"], run_dir, config, show_progress=False)
    images_per_s, windows = measured_images_per_s(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # random weights; ~2 GB a checkpoint for U-Net-B
    return {"flags": p["flags"], "images_per_s": images_per_s, "windows_images_per_s": windows, "iterations": config.iterations,
            "batch_size": config.batch_size}


def case_flops(p: dict) -> dict:
    """FLOPs of one training image (forward + backward of the diffusion loss) and the measured matmul peak."""
    device = torch.device(p["device"])
    defaults = PretrainConfig()
    model = UNetModel(preset_config(p["preset"], p["size"])).to(device)
    diffusion = GaussianDiffusion(defaults.schedule, defaults.num_timesteps)
    x0 = torch.rand(1, 1, p["size"], p["size"], device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        diffusion.training_loss(model, x0).backward()
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"flops_per_image": counter.get_total_flops() / x0.shape[0], **matmul_peak(device, peak_dtype, p["matmul_size"], p["matmul_seconds"])}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> dict:
    """FLOP/s of a large square matmul, the device's practical peak for that dtype (best of repeated runs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, spent = math.inf, 0.0
    a @ b  # warm-up
    while spent < seconds:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        elapsed = (time.perf_counter() - start) / 4
        best, spent = min(best, elapsed), spent + 4 * elapsed
    return {"peak_flops": 2 * n**3 / best, "peak_dtype": str(dtype).replace("torch.", ""), "matmul_size": n}


def case_loader(p: dict) -> dict:
    """The pretraining DataLoader alone (same dataset, sampler, batch and workers), first batch excluded."""
    dataset = SliceDataset(p["data"])
    sampler = DistributedSampler(dataset, 1, 0, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=p["batch_size"], sampler=sampler, num_workers=p["workers"], drop_last=True,
                        pin_memory=p["device"] == "cuda", persistent_workers=p["workers"] > 0)
    images, start, epoch = -1, 0.0, 0
    while images < 0 or time.perf_counter() - start < p["seconds"]:
        sampler.set_epoch(epoch)
        for batch in loader:
            if images < 0:  # worker start-up
                images, start = 0, time.perf_counter()
                continue
            images += batch.shape[0]
            if time.perf_counter() - start >= p["seconds"]:
                break
        epoch += 1
    return {"images_per_s": images / (time.perf_counter() - start), "images": images, "workers": p["workers"]}


CASES: dict[str, Callable[[dict], dict]] = {
    "phantom": case_phantom, "segment": case_segment, "finetune": case_finetune, "convergence": case_convergence,
    "prepare": case_prepare, "pretrain": case_pretrain, "flops": case_flops, "loader": case_loader,
}


# ---------------------------------------------------------------------------------------------
# Sections (parent side).


def write_phantom(plan: Plan, name: str, size: tuple[int, int, int], spacing: tuple[float, float, float], labels: bool = False) -> dict:
    paths = {"ct": str(plan.work / f"{name}.nii.gz"), "labels": str(plan.work / f"{name}-labels.nii.gz") if labels else None}
    if not Path(paths["ct"]).exists():
        result = run_case("phantom", {"label": name, "size": size, "spacing": spacing, **paths}, plan)
        if "error" in result:
            raise RuntimeError(f"phantom {name}: {result['error']}")
    return paths


def segment_phantom(plan: Plan, slices: int) -> dict:
    """A 512 x 512 CT at 0.8 mm (128 x 128 at 3.2 mm in --quick): the 409.6 mm field of view of the models."""
    xy, pixel = (128, 3.2) if plan.quick else (512, 0.8)
    return write_phantom(plan, f"ct-{xy}x{slices}", (xy, xy, slices), (pixel, pixel, max(0.5, 200.0 / slices)))


def bench_segment(plan: Plan) -> dict:
    cases = {}
    for preset in plan.presets:
        size, slices = plan.size_of(preset), plan.slices_for(preset)
        print(f"segment: {preset} at {size} px, {slices} slices", flush=True)
        ct = segment_phantom(plan, slices)["ct"]
        cases[preset] = run_case("segment", {"label": preset, "preset": preset, "size": size, "device": plan.device, "ct": ct,
                                             "out": str(plan.work / f"seg-{preset}.seg.nrrd"), "batch_size": None,
                                             "baseline_slices": plan.baseline_slices(preset)}, plan)
    why = "skipped in --quick (pass --memory-slices N to run it)" if plan.quick else "skipped (--memory-slices 0)"
    memory: dict = {"skipped": why}
    if plan.memory_slices:
        print(f"segment: memory case, small, 512 x 512 x {plan.memory_slices}", flush=True)
        xy, pixel = 512, 0.8
        ct = write_phantom(plan, f"ct-{xy}x{plan.memory_slices}", (xy, xy, plan.memory_slices), (pixel, pixel, max(0.5, 200.0 / plan.memory_slices)))["ct"]
        memory = run_case("segment", {"label": "memory", "preset": "small", "size": plan.size_of("small"), "device": plan.device, "ct": ct,
                                      "out": str(plan.work / "seg-memory.seg.nrrd"), "batch_size": None, "baseline_slices": 0}, plan)
    return {"cases": cases, "memory": memory}


def bench_finetune(plan: Plan) -> dict:
    preset = plan.finetune_preset
    size = plan.size_of(preset)
    shape, spacing = ((96, 96, 24), (4.3, 4.3, 8.0)) if plan.quick else ((160, 160, 40), (2.56, 2.56, 5.0))
    files = write_phantom(plan, f"ft-{shape[0]}x{shape[2]}", shape, spacing, labels=True)
    cases = {}
    for strategy in STRATEGIES:
        print(f"finetune: {strategy}, {preset} at {size} px", flush=True)
        cases[strategy] = run_case("finetune", {"label": strategy, "preset": preset, "size": size, "strategy": strategy, "device": plan.device,
                                                "iterations": plan.finetune_iterations(), **files}, plan)
    return {"cases": cases, "convergence": bench_convergence(plan)}


def resolve_base(name: str | None) -> tuple[Path | None, str]:
    try:
        path = resolve_model(name or DEFAULT_PRETRAINED, "pretrained")
        kind = read_card(path).kind
    except (InputError, OSError, ValueError) as e:
        return None, f"no base model: {str(e).splitlines()[0]} (pass --base MODEL_DIR)"
    if kind != "pretrained":
        return None, f"{path} is a {kind} model, not a DDPM-pretrained base"
    return path, ""


def bench_convergence(plan: Plan) -> dict:
    ct, labels = REAL_CT / "ct.nii.gz", REAL_CT / "labels.nii.gz"
    if not (ct.exists() and labels.exists()):
        return {"skipped": f"real CT not available at {REAL_CT}"}
    base, why = resolve_base(plan.base)
    if base is None:
        return {"skipped": why}
    print(f"finetune: time to 95% of the full schedule's Dice, base {base}", flush=True)
    return run_case("convergence", {"label": "convergence", "base": str(base), "ct": str(ct), "labels": str(labels), "device": plan.device,
                                    **plan.convergence()}, plan)


def bench_pretrain(plan: Plan) -> dict:
    cases = {}
    datasets: dict[int, str] = {}
    for preset in plan.presets:
        size = plan.size_of(preset)
        if size not in datasets:
            datasets[size] = str(plan.work / f"slices-{size}")
            shape, spacing = ((96, 96, 16), (4.3, 4.3, 12.0)) if plan.quick else ((128, 128, 32), (3.2, 3.2, 6.0))
            made = run_case("prepare", {"label": f"slices {size}", "out": datasets[size], "image_size": size, "volumes": 2, "size": shape,
                                        "spacing": spacing}, plan)
            if "error" in made:
                raise RuntimeError(f"preparing the slice dataset: {made['error']}")
        cases[preset] = pretrain_preset(plan, preset, size, datasets[size])
    return {"cases": cases}


def flag_configs(plan: Plan, preset: str) -> dict[str, dict | str]:
    """baseline (all off), each flag alone, and the defaults: flags to run, a string saying why a config is
    not run, or {"same_as": name} where this device ignores the flags that differ (one run serves both)."""
    off = dict.fromkeys(FLAGS, False)
    defaults = {flag: getattr(PretrainConfig(), flag) for flag in FLAGS}
    configs: dict[str, dict | str] = {"baseline": off}
    for flag in FLAGS:
        if plan.cpu and flag in CPU_ONLY_NA:
            configs[flag] = CPU_ONLY_NA[flag]
        elif not plan.sweep(preset):
            configs[flag] = "not run for this preset on the CPU (too slow)"
        elif plan.quick and plan.cpu and flag == "compile":
            configs[flag] = "skipped in --quick (inductor compiles for minutes on the CPU)"
        else:
            configs[flag] = {**off, flag: True}
    configs["defaults"] = defaults
    if plan.cpu and not any(defaults[flag] for flag in FLAGS if flag not in CPU_ONLY_NA):
        if plan.sweep(preset):
            configs["defaults"] = {"same_as": "baseline"}
        else:
            configs = {"defaults": off, **{k: v for k, v in configs.items() if k not in ("baseline", "defaults")}}
    return configs


def pretrain_preset(plan: Plan, preset: str, size: int, data: str) -> dict:
    settings = plan.pretrain_settings(preset)
    common = {"preset": preset, "size": size, "device": plan.device, "data": data, **settings}
    print(f"pretrain: {preset} at {size} px, batch {settings['batch_size']}", flush=True)
    flops = run_case("flops", {"label": f"flops {preset}", **common, "matmul_size": 1024 if plan.quick else (8192 if not plan.cpu else 2048),
                                "matmul_seconds": 0.5 if plan.quick else 3.0}, plan)
    configs: dict[str, dict] = {}
    for name, flags in flag_configs(plan, preset).items():
        if isinstance(flags, str):
            configs[name] = {"skipped": flags}
        elif "same_as" in flags:
            configs[name] = {**configs[flags["same_as"]], "same_as": flags["same_as"]}
        else:
            print(f"pretrain: {preset} {name}", flush=True)
            run_dir = plan.work / f"run-{preset}-{name}"
            configs[name] = run_case("pretrain", {"label": f"{preset} {name}", **common, "flags": flags, "run_dir": str(run_dir)}, plan)
            add_mfu(configs[name], flops)
    result = {"settings": settings, "flops": flops, "configs": configs}
    result["torchrun"] = torchrun_case(plan, preset, common, flops)
    result["loader"] = run_case("loader", {"label": f"loader {preset}", **common, "seconds": 0.5 if plan.quick else 3.0}, plan)
    return result


def add_mfu(result: dict, flops: dict) -> None:
    if "images_per_s" in result and "flops_per_image" in flops:
        result["achieved_flops"] = flops["flops_per_image"] * result["images_per_s"]
        result["mfu"] = result["achieved_flops"] / flops["peak_flops"]


def torchrun_case(plan: Plan, preset: str, common: dict, flops: dict) -> dict:
    """`torchrun --nproc_per_node=2 -m Training pretrain` with the defaults; images/s as the log reports them
    (all processes: pretrain multiplies by the world size), per-process batch as single-process."""
    if plan.device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, found {torch.cuda.device_count()}"}
    if not plan.sweep(preset):
        return {"skipped": "not run for this preset on the CPU (too slow)"}
    print(f"pretrain: {preset} torchrun, 2 processes", flush=True)
    config = pretrain_config(common, {})
    run_dir = plan.work / f"run-{preset}-torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "Training", "pretrain", "--data", common["data"],
           "--out", str(run_dir), "--preset", preset, "--iterations", str(config.iterations), "--batch-size", str(config.batch_size),
           "--log-every", str(config.log_every), "--workers", str(config.workers), "--sample-every", "0",
           "--checkpoint-every", str(config.checkpoint_every), "--keep-checkpoints", "1", "--no-progress"]
    child = run_child(cmd, plan.timeout(), env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-15:]
        print("  torchrun failed:\n" + "\n".join(tail), file=sys.stderr)
        return {"error": f"{'timed out' if child.timed_out else f'exit code {child.returncode}'}: {tail[-1] if tail else ''}"}
    images_per_s, windows = measured_images_per_s(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result = {"processes": 2, "images_per_s": images_per_s, "windows_images_per_s": windows, "per_process_batch": config.batch_size,
              "peak_ram_mb_per_process": child.peak_ram_mb, "wall_s": child.wall_s, "threads_per_process": os.environ.get("OMP_NUM_THREADS", "1 (torchrun)")}
    add_mfu(result, flops)
    return result


# ---------------------------------------------------------------------------------------------
# Report: the table and the machine.


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    configure_cpu()  # the threads each case will use
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": cpu, "cpu_cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__, "device_name": "cpu"}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


@dataclass
class Row:
    section: str
    case: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    note: str = ""


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "%":
        return f"{100 * value:.1f} %"
    if unit == "x":
        return f"{value:.2f}x"
    digits = 3 if abs(value) < 1 else 1 if abs(value) < 1000 else 0
    return f"{value:.{digits}f} {unit}".strip()


def _verdict(ok: bool | None, target: str) -> str:
    return target if ok is None else f"{target} ({'met' if ok else 'NOT met'})"


def segment_rows(plan: Plan, section: dict) -> list[Row]:
    rows = []
    for preset, r in section["cases"].items():
        case = f"{preset} {r.get('size', '')}px x{r.get('slices', '?')}"
        if "error" in r:
            rows.append(Row("segment", case, "error", None, "", note=r["error"]))
            continue
        for stage, seconds in r["stages_s"].items():
            rows.append(Row("segment", case, stage, seconds, "s"))
        target = segment_target(plan, preset, r["slices"], r["total_s"])
        rows.append(Row("segment", case, "total", r["total_s"], "s", target=target))
        if r["slices"] != 200 and not plan.quick:
            estimate = r["total_s"] * 200 / r["slices"]  # every stage grows with the slices
            rows.append(Row("segment", case, "total, est. for 200 slices", estimate, "s", target=segment_target(plan, preset, 200, estimate)))
        rows.append(Row("segment", case, "network rate, whole volume", r["network_slices_per_s"], "slices/s"))
        b = r.get("baseline")
        if b:  # the same slices, warm, through each path
            rate = b["slices"] / b["seconds"]["default"]
            rows.append(Row("segment", case, f"network rate, {b['slices']} slices warm", rate, "slices/s",
                            baseline=b["slices"] / b["seconds"]["nchw"], ratio=b["speedup_vs_nchw"], note="baseline: channels_last=False"))
            if "speedup_vs_eager_fp32" in b:
                rows.append(Row("segment", case, f"network rate, {b['slices']} slices warm", rate, "slices/s",
                                baseline=b["slices"] / b["seconds"]["eager_fp32"], ratio=b["speedup_vs_eager_fp32"], note="baseline: eager fp32 NCHW"))
        rows.append(Row("segment", case, "peak RAM", r.get("peak_ram_mb"), "MB"))
        if r.get("peak_gpu_mb") is not None:
            rows.append(Row("segment", case, "peak GPU memory", r["peak_gpu_mb"], "MB"))
    memory = section["memory"]
    if "skipped" in memory or "error" in memory:
        rows.append(Row("segment", "memory", "peak RAM", None, "", note=memory.get("skipped") or memory.get("error")))
    else:
        case = f"small 512x512x{memory['slices']}"
        ok = memory["peak_ram_mb"] < 4 * GB if memory["slices"] >= 600 else None
        rows.append(Row("segment", case, "peak RAM", memory["peak_ram_mb"], "MB", target=_verdict(ok, "< 4096 MB at 600 slices")))
        rows.append(Row("segment", case, "total", memory["total_s"], "s"))
    return rows


def segment_target(plan: Plan, preset: str, slices: int, seconds: float | None = None) -> str:
    target = {("cpu", "small"): 120.0, ("cuda", "b"): 2.0}.get((plan.device, preset))
    if target is None:
        return ""
    ok = None if slices != 200 or seconds is None else seconds < target
    return _verdict(ok, f"< {target:g} s for 200 slices")


def finetune_rows(plan: Plan, section: dict) -> list[Row]:
    rows = []
    goal = 600.0 if plan.cpu else 60.0
    goal_text = f"< {goal:g} s" + (" (2 cores)" if plan.cpu else "")
    for strategy, r in section["cases"].items():
        case = f"{strategy} {r.get('preset', '')} {r.get('size', '')}px"
        if "error" in r:
            rows.append(Row("finetune", case, "error", None, "", note=r["error"]))
            continue
        rows.append(Row("finetune", case, "s/iteration (4 slices)", r["seconds_per_iteration"], "s", baseline=r.get("no_cache_seconds_per_iteration"),
                        ratio=r.get("cache_speedup"), note="baseline: cache_copies=0" if "cache_speedup" in r else ""))
        cache = r.get("cache", {})
        if cache.get("pool"):
            rows.append(Row("finetune", case, f"cache build ({cache['pool']} entries)", cache["seconds"], "s"))
        schedule = r["seconds_per_iteration"] * r["schedule_iterations"] + cache.get("seconds", 0.0)
        target = goal_text if strategy == "ft-dec" and not plan.quick and r.get("preset") == ("small" if plan.cpu else "b") else ""
        rows.append(Row("finetune", case, f"{r['schedule_iterations']} iterations, est.", schedule, "s", target=target))
    c = section["convergence"]
    if "skipped" in c or "error" in c:
        rows.append(Row("finetune", "time to 95% Dice", "", None, "", note=c.get("skipped") or c.get("error")))
        return rows
    case = f"ft-dec {c['preset']} {c['size']}px real CT"
    schedule = f"{c['iterations']} it." + (", reduced in --quick" if plan.quick else "")
    target = (lambda seconds: "") if plan.quick else (lambda seconds: _verdict(seconds < goal, goal_text))
    rows.append(Row("finetune", case, f"Dice after {schedule}", c["full_dice"], "", note=f"{c['held_out_slices']} held-out slices"))
    rows.append(Row("finetune", case, f"training s for {schedule}", c["full_train_s"], "s"))
    rows.append(Row("finetune", case, f"to 95% of that Dice (it. {c['iteration_95']})", c["train_s_95"], "s", target=target(c["train_s_95"])))
    if c["plateau_iteration"] is None:
        rows.append(Row("finetune", case, "plateau stop", None, "", note="the default plateau stop would not have stopped"))
    else:
        rows.append(Row("finetune", case, f"plateau stop (it. {c['plateau_iteration']}, Dice {c['plateau_dice']:.3f})", c["plateau_train_s"], "s",
                        target=target(c["plateau_train_s"])))
    return rows


def pretrain_rows(plan: Plan, section: dict) -> list[Row]:
    rows = []
    mfu_target = "" if plan.cpu else ">= 35 % (bf16)"
    for preset, r in section["cases"].items():
        case = f"{preset} batch {r['settings']['batch_size']}"
        configs = r["configs"]
        base = configs.get("baseline", {}).get("images_per_s")
        for name, c in configs.items():
            if "images_per_s" not in c:
                rows.append(Row("pretrain", case, name, None, "", note=c.get("skipped") or c.get("error", "")))
                continue
            if "same_as" in c:
                rows.append(Row("pretrain", case, f"{name} images/s", c["images_per_s"], "img/s",
                                note=f"the {c['same_as']} run: the flags that differ do not apply on the CPU"))
                continue
            compared = bool(base) and name != "baseline"
            rows.append(Row("pretrain", case, f"{name} images/s", c["images_per_s"], "img/s", baseline=base if compared else None,
                            ratio=c["images_per_s"] / base if compared else None))
            if "mfu" in c:
                ok = None if plan.cpu or name != "defaults" else c["mfu"] >= 0.35
                rows.append(Row("pretrain", case, f"{name} MFU", c["mfu"], "%", target=_verdict(ok, mfu_target) if mfu_target else ""))
        f = r["flops"]
        if "flops_per_image" in f:
            rows.append(Row("pretrain", case, "GFLOP / training image", f["flops_per_image"] / 1e9, ""))
            rows.append(Row("pretrain", case, f"matmul peak ({f['peak_dtype']})", f["peak_flops"] / 1e9, "GFLOP/s"))
        single = configs.get("defaults", {}).get("images_per_s")
        t = r["torchrun"]
        if "images_per_s" in t:
            rows.append(Row("pretrain", case, "torchrun x2 images/s (total)", t["images_per_s"], "img/s", baseline=single,
                            ratio=single and t["images_per_s"] / single, note="baseline: 1 process, defaults"))
        else:
            rows.append(Row("pretrain", case, "torchrun x2", None, "", note=t.get("skipped") or t.get("error", "")))
        loader = r["loader"]
        if "images_per_s" in loader:
            rows.append(Row("pretrain", case, f"loader alone ({loader['workers']} workers)", loader["images_per_s"], "img/s", baseline=single,
                            ratio=single and loader["images_per_s"] / single, note="ratio > 1: loading keeps up"))
        else:
            rows.append(Row("pretrain", case, "loader alone", None, "", note=loader.get("error", "")))
    return rows


def print_table(rows: list[Row]) -> None:
    header = ("section", "case", "figure", "measured", "baseline", "ratio", "target / note")
    cells = [(r.section, r.case, r.figure, _fmt(r.value, r.unit), _fmt(r.baseline, r.unit), _fmt(r.ratio, "x"),
              "; ".join(filter(None, (r.target, r.note)))) for r in rows]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header) - 1)]
    for line in [header, *cells]:
        padded = (str(c).rjust(w) if i in (3, 4, 5) else str(c).ljust(w) for i, (c, w) in enumerate(zip(line[:-1], widths, strict=True)))
        print(("  ".join(padded) + "  " + line[-1]).rstrip())


def _has_error(value: object) -> bool:
    if isinstance(value, dict):
        return "error" in value or any(_has_error(v) for v in value.values())
    return False


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=__doc__.split("\n\n")[1].strip())
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="the reduced form (tiny preset, 64 px, small phantoms): under 2 minutes")
    parser.add_argument("--presets", nargs="+", help="presets for segment and pretrain (default small b; tiny with --quick)")
    parser.add_argument("--finetune-preset", help="preset of the fine-tuning speed cases (default small on the CPU, b on CUDA, tiny with --quick)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--base", help="base model (folder or name) for the time-to-Dice run (default: ddpm-pretrained if installed)")
    parser.add_argument("--memory-slices", type=int, help="slices of the 512 x 512 memory case (default 600; 0 skips it; not run in --quick unless given)")
    parser.add_argument("--segment-slices", type=int, help="slices of the segment phantoms (default 200; 8 for U-Net-B on the CPU, with an estimate for 200)")
    parser.add_argument("--eval-every", type=int, default=10, help="iterations between Dice evaluations of the time-to-Dice run")
    parser.add_argument("--work", help="keep the phantoms, datasets and runs in this folder (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    try:
        device = resolve_device(args.device).type
    except InputError as e:
        raise SystemExit(f"benchmark: {e}") from e
    if device not in ("cpu", "cuda"):
        device = "cpu"  # MPS: not a target of these benchmarks
    presets = args.presets or (["tiny"] if args.quick else ["small", "b"])
    finetune_preset = args.finetune_preset or ("tiny" if args.quick else "small" if device == "cpu" else "b")
    for name in [*presets, finetune_preset]:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    # 0 skips the memory case; not given: 600 slices, or none in --quick.
    memory = args.memory_slices if args.memory_slices is not None else (None if args.quick else 600)
    return Plan(args.quick, device, presets, finetune_preset, args.base, memory, args.segment_slices, args.eval_every)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_case"]:
        case_main(argv[1], json.loads(argv[2]))
        return 0
    args = parse_args(argv)
    plan = make_plan(args)
    sections = args.sections or list(SECTIONS)
    started = time.monotonic()
    results: dict = {"machine": machine(plan.device), "device": plan.device, "quick": plan.quick, "presets": plan.presets, "sections": sections}
    with tempfile.TemporaryDirectory(prefix="diffusionseg-bench-") as tmp:
        plan.work = Path(args.work) if args.work else Path(tmp)
        plan.work.mkdir(parents=True, exist_ok=True)
        runners = {"segment": bench_segment, "finetune": bench_finetune, "pretrain": bench_pretrain}
        for name in sections:
            results[name] = runners[name](plan)
    results["seconds"] = time.monotonic() - started
    rows = []
    for name, make_rows in (("segment", segment_rows), ("finetune", finetune_rows), ("pretrain", pretrain_rows)):
        if name in results:
            rows += make_rows(plan, results[name])
    m = results["machine"]
    print(f"\nDiffusionSeg benchmark{' (quick)' if plan.quick else ''}: {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, "
          f"device {m['device_name']}; {results['seconds']:.0f} s")
    print_table(rows)
    results["rows"] = [r.__dict__ for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 1 if _has_error({k: results.get(k) for k in SECTIONS}) else 0


if __name__ == "__main__":
    sys.exit(main())
