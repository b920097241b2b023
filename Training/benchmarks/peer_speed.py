"""A peer in the speed benchmark: a 3D nnU-Net of the shape TotalSegmentator's fast (3 mm) model uses, beside `diffusionseg segment`.

    python -m Training.benchmarks.peer_speed [--slices 200] [--device auto|cpu|cuda] [--json OUT.json] [--work DIR] [--model MODEL]
        [--classes 118] [--patch 128] [--quick]

Both run on the same 512 x 512 x N CT (a phantom at 0.8 x 0.8 x 384/N mm, so that at 3 mm it is 137 x 137 x 128 voxels, the
grid of the issue's reference) in the same run, each in a child process of its own, so that wall time, CPU time (user + system,
from the kernel's accounting of that child) and peak RAM are its own; on CUDA the peak GPU memory PyTorch allocated is added.

The peer is written here in plain PyTorch, no extra package: the shape of nnU-Net's default 6-stage 3D ``PlainConvUNet``
(features 32-64-128-256-320-320, two 3x3x3 conv - InstanceNorm - LeakyReLU per stage, the first of each stage after the first
strided by 2, transposed-convolution upsampling, two convs per decoder stage, a 1x1x1 output conv; no deep supervision at
inference) with ``--classes`` outputs (118: the 117 structures of TotalSegmentator's total task and background), with random
weights: speed does not depend on the weights. Its pipeline is TotalSegmentator's fast path: resample the CT to 3 mm, normalise,
sliding-window inference with 128^3 patches at step 0.5, Gaussian importance weighting and no mirroring (4 windows on the
137 x 137 x 128 grid), logits accumulated over the whole volume in float32, argmax, labels resampled back with nearest neighbour
and written. `diffusionseg segment` is the real command with the installed default model (or ``--model``).

--quick is a smoke form that only checks the script runs: a 128 x 128 x 32 CT at 2.25 x 2.25 x 6 mm (96 x 96 x 64 at 3 mm:
4 windows too), 64^3 patches, 8 classes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # also run as a file: python Training/benchmarks/NAME.py
RESULT_MARK = "@@peer-result "
FEATURES = (32, 64, 128, 256, 320, 320)


# ---------------------------------------------------------------------------------------------
# The peer network and its sliding-window inference (imported lazily: the parent process stays light).


def plain_conv_unet(classes: int, in_channels: int = 1, features: tuple[int, ...] = FEATURES):
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.InstanceNorm3d(cout, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))

    class PlainConvUNet3D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList()
            cin = in_channels
            for i, f in enumerate(features):
                self.encoder.append(nn.Sequential(block(cin, f, 1 if i == 0 else 2), block(f, f, 1)))
                cin = f
            self.up = nn.ModuleList()
            self.decoder = nn.ModuleList()
            for i in range(len(features) - 1, 0, -1):
                self.up.append(nn.ConvTranspose3d(features[i], features[i - 1], 2, 2))
                self.decoder.append(nn.Sequential(block(2 * features[i - 1], features[i - 1], 1), block(features[i - 1], features[i - 1], 1)))
            self.head = nn.Conv3d(features[0], classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for stage in self.encoder:
                x = stage(x)
                skips.append(x)
            x = skips.pop()
            for up, dec in zip(self.up, self.decoder, strict=True):
                x = dec(torch.cat([up(x), skips.pop()], 1))
            return self.head(x)

    return PlainConvUNet3D()


def window_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """nnU-Net's window placement along one axis: as few windows as overlap `step` allows, spread evenly from edge to edge."""
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * step)) + 1
    stride = (size - patch) / (count - 1)
    return [round(stride * i) for i in range(count)]


def gaussian_weights(patch: int, device):
    """A Gaussian importance map (sigma = patch / 8, peak 1, no zeros), as nnU-Net weights overlapping windows."""
    import torch

    centre = (patch - 1) / 2
    g = torch.exp(-((torch.arange(patch, dtype=torch.float32) - centre) ** 2) / (2 * (patch / 8) ** 2))
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    w = w / w.max()
    return w.clamp_min(w[w > 0].min()).to(device)


def sliding_window_argmax(network, volume, classes: int, patch: int, device):
    """Labels of `volume` (z, y, x float32 tensor) from overlapping patches; returns (labels, windows)."""
    import torch

    padded = [max(s, patch) for s in volume.shape]
    image = torch.zeros(padded, dtype=torch.float32)
    image[: volume.shape[0], : volume.shape[1], : volume.shape[2]] = volume
    logits = torch.zeros((classes, *padded), dtype=torch.float32, device=device)
    counts = torch.zeros(padded, dtype=torch.float32, device=device)
    weights = gaussian_weights(patch, device)
    windows = 0
    with torch.inference_mode():
        for z in window_starts(padded[0], patch):
            for y in window_starts(padded[1], patch):
                for x in window_starts(padded[2], patch):
                    region = (slice(z, z + patch), slice(y, y + patch), slice(x, x + patch))
                    out = network(image[region][None, None].to(device))[0]
                    logits[(slice(None), *region)] += out * weights
                    counts[region] += weights
                    windows += 1
        labels = (logits / counts).argmax(0).to(torch.uint8).cpu()
    return labels[: volume.shape[0], : volume.shape[1], : volume.shape[2]], windows


def case_peer(p: dict) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from DiffusionSegLib.devices import configure_cpu

    configure_cpu()
    torch.manual_seed(0)
    device = torch.device(p["device"])
    stages: dict[str, float] = {}

    def mark(name: str, start: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        stages[name] = now - start
        return now

    t = time.perf_counter()
    ct = sitk.ReadImage(p["ct"])
    t = mark("read", t)
    spacing = (3.0, 3.0, 3.0)
    size = [round(n * s / 3.0) for n, s in zip(ct.GetSize(), ct.GetSpacing(), strict=True)]
    low = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(), -1024.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(low)
    lo, hi = np.percentile(array, [0.5, 99.5])  # nnU-Net's CT normalisation, with the dataset's statistics taken from this CT
    array = np.clip(array, lo, hi)
    volume = torch.from_numpy((array - array.mean()) / max(float(array.std()), 1e-8))
    t = mark("resample_normalise", t)
    network = plain_conv_unet(p["classes"]).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = mark("build", t)
    labels, windows = sliding_window_argmax(network, volume, p["classes"], p["patch"], device)
    t = mark("network", t)
    seg = sitk.GetImageFromArray(labels.numpy())
    seg.CopyInformation(low)
    back = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(back, p["out"], useCompression=True)
    mark("resample_back_write", t)
    return {"grid_3mm": list(volume.shape), "windows": windows, "stages_s": stages, "parameters": sum(q.numel() for q in network.parameters()),
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def case_segment(p: dict) -> dict:
    import torch

    from DiffusionSegLib.cli import main

    args = ["segment", p["ct"], "-o", p["out"], "--progress", "none", "--device", p["device"], *(["--model", p["model"]] if p.get("model") else [])]
    if p["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    code = main(args)
    if code:
        raise SystemExit(code)
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if p["device"] == "cuda" else None}


# ---------------------------------------------------------------------------------------------
# Parent side.


def run_child(kind: str, params: dict, timeout: float) -> dict:
    """One case in its own process: wall, CPU (user + system) and peak RAM from os.wait4, the case's own figures from its stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_case", kind, json.dumps(params)], stdout=out, stderr=err, cwd=ROOT)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    measured = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_ram_mb": usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)}
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK) :]), **measured}
    tail = stderr.strip().splitlines()[-10:]
    print(f"  {kind}: exit {os.waitstatus_to_exitcode(status)}\n" + "\n".join(tail), file=sys.stderr)
    return {"error": tail[-1] if tail else f"exit {os.waitstatus_to_exitcode(status)}", **measured}


def machine(device: str) -> dict:
    import torch

    from DiffusionSegLib.devices import configure_cpu

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    configure_cpu()
    info = {"cpu_model": cpu, "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


def write_ct(path: Path, slices: int, xy: int, quick: bool) -> None:
    import SimpleITK as sitk

    from Training.benchmarks.phantom import make_phantom

    # The full form covers 409.6 x 409.6 x 384 mm: 137 x 137 x 128 at 3 mm. The quick one 288 x 288 x 192 mm: 96 x 96 x 64.
    pixel, z = (2.25, 6.0) if quick else (409.6 / xy, 384.0 / slices)
    ct, _ = make_phantom(size=(xy, xy, slices), spacing=(pixel, pixel, z), seed=0)
    sitk.WriteImage(ct, str(path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_case"]:
        result = {"peer": case_peer, "segment": case_segment}[argv[1]](json.loads(argv[2]))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, help="slices of the 512 x 512 CT (default 200; 32 with --quick)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--classes", type=int, help="output classes of the peer (default 118; 8 with --quick)")
    parser.add_argument("--patch", type=int, help="patch edge of the peer (default 128; 64 with --quick; a multiple of 64)")
    parser.add_argument("--model", help="segmentation model of `diffusionseg segment` (default: the installed default)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--work", help="keep the CT and the outputs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke form: 128 x 128 x 32 CT, 96 x 96 x 64 at 3 mm (4 windows too), 64^3 patches, 8 classes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case (default 3600)")
    args = parser.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    slices, classes, patch = args.slices or (32 if args.quick else 200), args.classes or (8 if args.quick else 118), args.patch or (64 if args.quick else 128)
    if patch % 64:
        parser.error("--patch must be a multiple of 64: the network downsamples five times and instance-normalises what is left")
    xy = 128 if args.quick else 512
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(device), "ct": [xy, xy, slices], "classes": classes, "patch": patch,
                     "command": " ".join(["python", "Training/benchmarks/peer_speed.py", *argv])}
    with tempfile.TemporaryDirectory(prefix="diffusionseg-peer-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ct = work / f"ct-{xy}x{slices}.nii.gz"
        if not ct.exists():
            print(f"writing the {xy} x {xy} x {slices} phantom CT", flush=True)
            write_ct(ct, slices, xy, args.quick)
        print("diffusionseg segment ...", flush=True)
        results["diffusionseg"] = run_child("segment", {"ct": str(ct), "out": str(work / "diffusionseg.nii.gz"), "device": device, "model": args.model},
                                            args.timeout)
        print("nnU-Net-shaped peer ...", flush=True)
        results["peer"] = run_child("peer", {"ct": str(ct), "out": str(work / "peer.nii.gz"), "device": device, "classes": classes, "patch": patch},
                                    args.timeout)
    ours, peer = results["diffusionseg"], results["peer"]
    results["ratio_peer_over_diffusionseg"] = {k: peer[k] / ours[k] for k in ("wall_s", "cpu_s", "peak_ram_mb") if ours.get(k)}
    print(f"\n{xy} x {xy} x {slices} CT on {results['machine']['cpu_model']}, {results['machine']['threads']} threads, {device}")
    print(f"{'':<22}{'wall s':>9}{'CPU s':>9}{'peak RAM MB':>13}{'peak GPU MB':>13}")
    for name, r in (("diffusionseg segment", ours), ("nnU-Net-shaped peer", peer)):
        gpu = r.get("peak_gpu_mb")
        print(f"{name:<22}{r['wall_s']:9.1f}{r['cpu_s']:9.1f}{r['peak_ram_mb']:13.0f}{'' if gpu is None else f'{gpu:.0f}':>13}"
              f"  {r.get('error', '')}")
    ratio = results["ratio_peer_over_diffusionseg"]
    print(f"{'peer / diffusionseg':<22}{ratio.get('wall_s', 0):8.2f}x{ratio.get('cpu_s', 0):8.2f}x{ratio.get('peak_ram_mb', 0):12.2f}x")
    if "stages_s" in peer:
        print(f"peer: grid {peer['grid_3mm']} (z, y, x), {peer['windows']} windows, {peer['parameters'] / 1e6:.1f} M parameters, "
              + ", ".join(f"{k} {v:.1f} s" for k, v in peer["stages_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 1 if "error" in ours or "error" in peer else 0


if __name__ == "__main__":
    sys.exit(main())
