"""Memory guard for training: will one step fit, and which batch does, before the first step is taken.

A training step needs what the model already holds (weights, EMA) plus, once it runs: gradients and
Adam's two moments of every trainable parameter, and the activations autograd saves for the backward
pass. The activations grow with the batch and dominate at large slices (a 256 px slice with attention
at 1/4 resolution has 4,096 tokens, so every attention layer saves a 4,096 x 4,096 matrix per head).

They are measured, not guessed. First one forward pass at batch 1 counts every tensor autograd saves for
backward (cheap, and safe: nothing is allocated beyond that pass); that estimate says which batch a real
pass may be tried at. Then, where the process's peak memory can be read and reset (Linux's VmHWM, a GPU's
peak allocation), real forward and backward passes at batch 1 and at the batch asked for (or the largest
the estimate allows) give the step's peak directly, and a line through the two points its peak at any
other batch. The saved tensors alone do not predict it well: on the CPU what glibc's heap holds beyond the
live tensors differs by preset, batch and CPU (docs/memory-guard.md).
The measuring passes leave nothing behind: gradients, buffers (normalisation statistics) and the random
number generators are as they were. The step is compared with the memory free on the device (the
machine's available RAM within any cgroup limit, or the GPU's free memory), keeping a margin.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .unet import PRESETS, UNetConfig

HEADROOM = 0.8  # use at most this fraction of the free memory: other processes grow too, and the prediction is within 15 %
# The estimate from saved tensors, used to decide whether the real passes may run and where a peak cannot be read
# (not Linux, Apple MPS). Peak of a step per byte saved for backward: the saved activations, the gradients backward
# creates beside them, and (on the CPU) what glibc's heap cannot reuse after the first steps.
CPU_TRANSIENT = 1.5
GPU_TRANSIENT = 1.3
ATTENTION_BACKWARD = 2.0  # softmax's backward holds two more tokens x tokens matrices of the layer it is in
MIN_TOKENS = 16  # smaller square tensors are not attention (and too small to matter)
# What each data loader process holds of its own (its Python heap, the batches it prepares): 10-46 MiB measured
# privately per worker at 64-256 px (Training/benchmarks/memory_guard.py); the pages it shares with the main process
# are counted there.
WORKER_BYTES = 48 << 20


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and schedulers set)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def default_workers(wanted: int = 4) -> int:
    """Data loader workers by default: `wanted`, but never more than the cores available (more only compete with the main process)."""
    return max(min(wanted, available_cores()), 0)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_ram() -> int:
    """Bytes of RAM a new allocation can take without swapping: MemAvailable, lowered to the cgroup's limit minus its usage."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    if free is None:  # not Linux: total physical memory is the best simple figure
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            free = 1 << 62  # unknown: do not refuse anything
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")):
            limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
            if limit is not None and usage is not None and limit < 1 << 60:
                free = min(free, max(limit - usage, 0))
    return free


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on `device`; CPU and MPS (unified memory) use RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_ram()


def process_memory(device: torch.device) -> int:
    """Bytes this process holds now: resident memory on the CPU (VmRSS), allocated tensor memory on a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
    import resource  # not Linux: the peak so far, the closest figure there is

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_freed_memory() -> None:
    """Give memory freed by Python and PyTorch back to the OS (glibc keeps up to 1 GB of it, see devices.configure_cpu).

    After the measuring forward pass its activations would otherwise stay resident and be counted twice: once in
    the process's resident memory, once in the step's prediction.
    """
    gc.collect()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or another C library
            pass


def _is_attention_matrix(tensor: torch.Tensor) -> bool:
    """A tokens x tokens matrix (attention scores or weights); no other saved tensor of the U-Net is square in its last two dims."""
    return tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] >= MIN_TOKENS


@dataclass(frozen=True)
class SavedActivations:
    total: int  # bytes autograd keeps for backward, parameters excluded (they are held anyway)
    attention: int  # of which tokens x tokens matrices
    largest_attention: int  # the largest one of those (one layer's)


def saved_activations(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> SavedActivations:
    """What autograd keeps for backward while `forward()` runs, each storage counted once; storages of `exclude` (the
    parameters) are not counted. The graph is dropped afterwards: nothing stays allocated."""
    held = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
    seen: dict[tuple[str, int], tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in held:
            seen[key] = (storage.nbytes(), _is_attention_matrix(tensor))
        # Detached: the tensor itself would be a reference cycle through its own grad_fn wherever a layer saves its
        # output (softmax, exp), which Python's collector cannot see, so the graph and all it saved would never be
        # freed. The alias keeps the storage alive until the graph goes, so no two saved tensors share an address.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    attention = [n for n, square in seen.values() if square]
    return SavedActivations(sum(n for n, _ in seen.values()), sum(attention), max(attention, default=0))


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step adds to what the process already holds: fixed + batch x per_sample.

    `base` is what the process held before the step (resident memory, or GPU memory allocated), `per_worker` what each
    data loader process adds; `total` is the peak the whole run reaches.
    """

    fixed: int  # gradients, optimiser state and the optimiser's temporaries of the trainable parameters
    per_sample: int  # what one more sample adds to the step's peak: its activations, the backward's transients, the allocator's share
    base: int = 0
    per_worker: int = 0
    saved: SavedActivations | None = None  # what the estimate was derived from (for reports)
    measured: bool = False  # fixed and per_sample come from real passes (else from the saved tensors alone)

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample

    def total(self, batch: int, workers: int = 0) -> int:
        return self.base + self.at(batch) + workers * self.per_worker

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose step fits in `budget` bytes (0 when not even one sample fits)."""
        if budget <= self.fixed:
            return 0
        return int((budget - self.fixed) // max(self.per_sample, 1))


def per_sample_bytes(saved: SavedActivations, device: torch.device) -> int:
    """A step's memory for one sample, from what its forward pass saves for backward (see the module's docstring)."""
    if device.type == "cuda":
        return math.ceil(saved.total * GPU_TRANSIENT + saved.largest_attention * ATTENTION_BACKWARD)
    return math.ceil(saved.total * CPU_TRANSIENT + saved.largest_attention * ATTENTION_BACKWARD)


def _read_peak_rss() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    """Set this process's recorded peak resident memory (VmHWM) back to what it holds now (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_readable(device: torch.device) -> bool:
    """Whether the peak memory of a stretch of work can be measured on `device` (a GPU, or a Linux CPU)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _read_peak_rss() is not None and _reset_peak_rss()


def peak_during(device: torch.device, work: Callable[[], object]) -> int:
    """Bytes the process held at its peak while `work()` ran: resident memory, or GPU memory allocated (as
    `process_memory`); `peak_readable` must be true."""
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    _reset_peak_rss()
    work()
    return _read_peak_rss() or process_memory(device)


@contextmanager
def _no_trace(model: torch.nn.Module, device: torch.device):
    """Whatever runs inside leaves the model's gradients and buffers and the random number generators as they were."""
    parameters, buffers = list(model.parameters()), list(model.buffers())
    grads = [p.grad for p in parameters]
    saved_buffers = [b.detach().clone() for b in buffers]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for p, g in zip(parameters, grads):
                    p.grad = g
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)


def measure_step(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor], batch: int, optimizer_moments: int = 2,
                 available: int | None = None) -> StepMemory:
    """StepMemory of a training step of `model` at `batch` (and, by a line through it, at other batches); `loss_at(n)`
    returns the loss of a batch of n samples.

    `optimizer_moments`: state tensors the optimiser keeps per parameter (Adam: 2). `available`: bytes free for the
    step (default: what `available_memory` says); real passes run only at a batch the estimate says fits in it.
    """
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    release_freed_memory()
    base = process_memory(device)
    trainable = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    # Adam's moments + the foreach update's temporaries (one tensor the size of the parameters); never part of a pass
    optimizer = trainable * (optimizer_moments + (1 if optimizer_moments else 0))
    per_worker = 0 if device.type == "cuda" else WORKER_BYTES
    budget = int((available_memory(device) if available is None else available) * HEADROOM)

    def free_failed_pass() -> None:
        release_freed_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def out_of_memory() -> StepMemory:
        """Not even one sample's pass ran: a step needs more than the budget (what fit_batch then refuses)."""
        free_failed_pass()
        return StepMemory(optimizer + trainable, max(budget, 1), base, per_worker, None, measured=True)

    try:
        with _no_trace(model, device):
            saved = saved_activations(lambda: loss_at(1), exclude=[*parameters, *model.buffers()])
    except torch.OutOfMemoryError:
        return out_of_memory()
    release_freed_memory()
    estimate = StepMemory(optimizer + trainable, per_sample_bytes(saved, device), base, per_worker, saved)  # + the gradients
    largest = min(batch, estimate.largest_batch(budget))
    if largest < 1 or not peak_readable(device):
        return estimate

    def peak(n: int, times: int) -> int:
        """The highest peak of `times` passes at batch n, above `base`."""
        return max(peak_during(device, lambda: loss_at(n).backward()) for _ in range(times)) - base

    # Peaks are taken against `base`: what a pass initialises once (kernels, the autograd engine) stays, and is counted
    # in every one. A first pass runs in a heap no step has used yet and peaks lower than later ones (by a fifth for
    # tiny at 256 px on the CPU), so it only warms up; of the passes after it, the highest counts. A pass that runs
    # out of memory (the estimate was too low: a GPU shared with other jobs) is tried again at half the batch.
    with _no_trace(model, device):
        while True:
            try:
                peak_during(device, lambda: loss_at(1).backward())
                one = peak(1, 2 if largest == 1 else 1)
                at_largest = peak(largest, 2) if largest > 1 else one
                break
            except torch.OutOfMemoryError:
                if largest == 1:
                    return out_of_memory()
                free_failed_pass()
                largest //= 2
    release_freed_memory()
    # The line through the two measured points; one point only: the estimate's slope through it.
    per_sample = max((at_largest - one) // (largest - 1), 1) if largest > 1 else estimate.per_sample
    fixed = optimizer + max(at_largest - largest * per_sample, 0)
    return StepMemory(fixed, per_sample, base, per_worker, saved, measured=True)


def preset_size_note(preset: str, native: UNetConfig, size: int, per_sample: int) -> str | None:
    """What to tell the user when `preset` (built as `native`) trains on slices of another size; None when the sizes match."""
    if size == native.image_size:
        return None
    ds = min(native.attention_downsample)
    tokens, built = (size // ds) ** 2, (native.image_size // ds) ** 2
    others = sorted((name for name, c in PRESETS.items() if c.image_size == size), key=lambda name: PRESETS[name].model_channels)
    instead = f", or choose --preset {others[0]} (built for {size} px)" if others else ""
    if size < native.image_size:
        return (f"note: preset {preset} is built for {native.image_size} px slices but the data are {size} px; it trains at {size} px "
                f"(attention over {tokens:,} tokens instead of {built:,})")
    return (f"note: preset {preset} is built for {native.image_size} px slices but the data are {size} px: its attention runs over "
            f"{tokens // built}x the tokens ({tokens:,} instead of {built:,}) and its memory grows with their square, so a training step "
            f"needs about {_gib(per_sample)} per slice; prepare with --size {native.image_size} for {preset}{instead}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass(frozen=True)
class BatchDecision:
    batch_size: int
    needed: int  # bytes a step at that batch takes
    available: int
    note: str | None  # said to the user when the batch was lowered


def fit_batch(memory: StepMemory, batch_size: int, device: torch.device, *, may_lower: bool, what: str, flag: str = "--batch-size",
              available: int | None = None, processes: int = 1, workers: int = 0) -> BatchDecision:
    """The batch to train with: `batch_size` if a step fits; else, when `may_lower` (no batch was asked for) and on the CPU, the
    largest that fits, with a note; else InputError naming a batch that fits (or saying that none does).

    `processes`: training processes sharing this device's memory (several ranks on one machine's CPU); `workers`: data
    loader processes of each.
    """
    free = available_memory(device) if available is None else available
    budget = int(free * HEADROOM) // max(processes, 1) - workers * memory.per_worker
    needed = memory.at(batch_size)
    if needed <= budget:
        return BatchDecision(batch_size, needed, free, None)
    fits = min(memory.largest_batch(budget), batch_size)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if fits < 1:
        raise InputError(f"{what}: one training step needs about {_gib(memory.at(1))} even at {flag} 1, but only {_gib(free)} of {where} "
                         "are free; choose a smaller --preset or slice size, or a machine with more memory")
    if may_lower and device.type == "cpu":  # a GPU's memory is shared with other jobs: its user chooses
        note = (f"note: {what}: a step at batch {batch_size} needs about {_gib(needed)} but {_gib(free)} of {where} are free; "
                f"training with batch {fits} instead (set {flag} to choose)")
        return BatchDecision(fits, memory.at(fits), free, note)
    raise InputError(f"{what}: a step at {flag} {batch_size} needs about {_gib(needed)} but only {_gib(free)} of {where} are free; "
                     f"{flag} {fits} fits")


def out_of_memory_message(what: str, step: int, batch_size: int, kept: str) -> str:
    """One line for a GPU that ran out of memory mid-run."""
    return (f"{what}: the GPU ran out of memory at step {step} (batch {batch_size}; other processes may be using it); {kept}; "
            f"retry with a smaller --batch-size")
