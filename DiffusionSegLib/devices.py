"""Choosing the compute device and CPU threads."""

from __future__ import annotations

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


def configure_cpu_threads() -> None:
    """Use the cores this process may run on (containers and job schedulers restrict them)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))


def autocast(device: torch.device) -> torch.autocast:
    """Mixed precision where it pays: fp16 on CUDA (bf16 where supported), none elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
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
