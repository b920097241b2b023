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

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

HEADROOM = 0.8  # use at most this fraction of the free memory: allocator fragmentation, loader workers, the OS
TRANSIENT = 1.3  # backward holds activation gradients beside the saved activations; measured peaks were 1.1-1.25x


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


def saved_activation_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs, each storage counted once.

    The graph is dropped afterwards: nothing stays allocated.
    """
    seen: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(seen.values())


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step adds to what the process already holds: fixed + batch x per_sample."""

    fixed: int  # gradients and optimiser state of the trainable parameters (not yet allocated before the first step)
    per_sample: int  # saved activations of one sample, with the backward pass's transient share

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose step fits in `budget` bytes (0 when not even one sample fits)."""
        if budget <= self.fixed:
            return 0
        return int((budget - self.fixed) // max(self.per_sample, 1))


def measure_step(model: torch.nn.Module, forward_one: Callable[[], torch.Tensor], optimizer_moments: int = 2) -> StepMemory:
    """StepMemory of a training step of `model` from one forward pass at batch 1 (`forward_one` returns the loss).

    `optimizer_moments`: state tensors the optimiser keeps per parameter (Adam: 2).
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed = trainable * (1 + optimizer_moments)  # gradient + moments
    per_sample = math.ceil(saved_activation_bytes(forward_one) * TRANSIENT)
    return StepMemory(fixed, per_sample)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass(frozen=True)
class BatchDecision:
    batch_size: int
    needed: int  # bytes a step at that batch takes
    available: int
    note: str | None  # said to the user when the batch was lowered


def fit_batch(memory: StepMemory, batch_size: int, device: torch.device, *, may_lower: bool, what: str, flag: str = "--batch-size",
              available: int | None = None, processes: int = 1) -> BatchDecision:
    """The batch to train with: `batch_size` if a step fits; else, when `may_lower` (no batch was asked for) and on the CPU, the
    largest that fits, with a note; else InputError naming a batch that fits (or saying that none does).

    `processes`: training processes sharing this device's memory (several ranks on one machine's CPU).
    """
    free = available_memory(device) if available is None else available
    budget = int(free * HEADROOM) // max(processes, 1)
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
