"""Memory guard for training: will one step fit, and which batch does, before the first step is taken.

A training step needs what the model already holds (weights, EMA) plus, once it runs: gradients and
Adam's two moments of every trainable parameter, and the activations autograd saves for the backward
pass. The activations grow with the batch and dominate at large slices (a 256 px slice with attention
at 1/4 resolution has 4,096 tokens, so every attention layer saves a 4,096 x 4,096 matrix per head).
They are measured, not guessed: one forward pass at batch 1 on the real model and device, with every
tensor saved for backward counted once. That is compared with the memory free on the device (the
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
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .unet import PRESETS, UNetConfig

HEADROOM = 0.8  # use at most this fraction of the free memory: other processes grow too, and the prediction is within 15 %
# Peak of a step per byte saved for backward: the saved activations, the gradients backward creates beside them, and
# (on the CPU) what glibc's heap cannot reuse after the first steps. Fitted to Training/benchmarks/memory_guard.py.
CPU_TRANSIENT = 1.5
GPU_TRANSIENT = 1.3  # not yet measured on a GPU (docs/memory-guard.md)
ATTENTION_BACKWARD = 2.0  # softmax's backward holds two more tokens x tokens matrices of the layer it is in
# On the CPU a step also holds, whatever the batch, about ten times one sample's largest attention layer beyond the
# above: the peak minus the prediction was the same at batch 1 and 2 (1.2 GiB for tiny at 256 px, whose largest layer
# is 0.125 GiB; 0.08 GiB at 128 px, layer 0.008 GiB) in Training/benchmarks/memory_guard.py; docs/memory-guard.md.
CPU_ATTENTION_FIXED = 10.0
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
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    attention = [n for n, square in seen.values() if square]
    return SavedActivations(sum(n for n, _ in seen.values()), sum(attention), max(attention, default=0))


def saved_activation_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs, each storage counted once."""
    return saved_activations(forward).total


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step adds to what the process already holds: fixed + batch x per_sample.

    `base` is what the process held before the step (resident memory, or GPU memory allocated), `per_worker` what each
    data loader process adds; `total` is the peak the whole run reaches.
    """

    fixed: int  # gradients, optimiser state and the optimiser's temporaries of the trainable parameters
    per_sample: int  # one sample's saved activations with the backward pass's transients and the allocator's share
    base: int = 0
    per_worker: int = 0
    saved: SavedActivations | None = None  # what per_sample was derived from (for reports)

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


def measure_step(model: torch.nn.Module, forward_one: Callable[[], torch.Tensor], optimizer_moments: int = 2) -> StepMemory:
    """StepMemory of a training step of `model` from one forward pass at batch 1 (`forward_one` returns the loss).

    `optimizer_moments`: state tensors the optimiser keeps per parameter (Adam: 2).
    """
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    release_freed_memory()
    base = process_memory(device)
    trainable = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    # gradient + moments + the foreach update's temporaries (Adam: one tensor the size of the parameters)
    fixed = trainable * (1 + optimizer_moments + (1 if optimizer_moments else 0))
    saved = saved_activations(forward_one, exclude=[*parameters, *model.buffers()])
    release_freed_memory()
    if device.type != "cuda":
        fixed += math.ceil(saved.largest_attention * CPU_ATTENTION_FIXED)
    per_worker = 0 if device.type == "cuda" else WORKER_BYTES
    return StepMemory(fixed, per_sample_bytes(saved, device), base, per_worker, saved)


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
