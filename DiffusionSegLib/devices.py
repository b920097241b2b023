"""Choosing the compute device and CPU threads."""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit unavailable device is an error."""
    if name not in DEVICES:
        raise InputError(f"--device {name}: unknown device; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available to this PyTorch build; use --device cpu")
    if name == "mps" and not mps_available():
        raise InputError("--device mps: Apple MPS is not available here; use --device cpu")
    return torch.device(name)


def configure_cpu() -> None:
    """Threads for the cores this process may use, and an allocator that keeps freed memory (glibc)."""
    _keep_freed_memory()
    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))


def _keep_freed_memory() -> None:
    """Stop glibc from handing freed activation memory back to the kernel after every layer.

    By default glibc serves blocks over a few MB with fresh mmaps and trims the heap, so every layer's
    output is page-faulted in again and much of a forward pass's CPU time goes to the kernel. Serving
    everything from the heap (no mmap) and trimming only above 1 GB free lets the next batch reuse the
    memory, at the price of a higher peak RAM (kept memory is not returned). Figures in
    docs/engine-notes.md. No-op off glibc or with DIFFUSIONSEG_NO_MALLOPT set.
    """
    if platform.system() != "Linux" or os.environ.get("DIFFUSIONSEG_NO_MALLOPT"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another C library
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)


def autocast(device: torch.device, fp16: bool = True) -> torch.autocast:
    """Mixed precision where it pays: bf16 on CUDA where supported, else fp16 (or none when not `fp16`); none elsewhere.

    Pass ``fp16=False`` where the loss may not be scaled: a small fp16 gradient underflows to zero.
    """
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16, enabled=bf16 or fp16)
    return torch.autocast(device.type, enabled=False)


def describe_hardware(device: torch.device, processes: int = 1) -> dict:
    """What a model card records about where it was trained: device name, CPU, threads, processes."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"device": device.type, "name": name, "cpu": cpu, "cpu_threads": torch.get_num_threads(), "processes": processes}
