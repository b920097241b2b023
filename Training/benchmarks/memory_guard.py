"""Memory guard (DiffusionSegLib.memory): the peak it predicts next to the peak a real run reaches, side by side.

    python -m Training.benchmarks.memory_guard [--quick] [--only NAME ...] [--data-dir DIR] [--work DIR] [--json OUT.json]

Each configuration runs the real command (`diffusionseg-train pretrain` or `diffusionseg finetune`, a few iterations) in a
fresh child process. The prediction is the guard's own: what the run held when it measured (`base`) + the step at the
batch it chose + the data loader processes (+ the frozen-part cache that finetune reserves). The measured peak is the
child's peak resident memory (VmHWM) plus each loader process's peak private memory (its shared pages are the parent's,
already counted), polled every 20 ms. Slice datasets are prepared from ../shared/data/unlabeled at 64, 128 and 256 px.

Linux only (/proc). Needs ../shared/data. The full grid takes about 10-15 minutes on 2 cores and stays below ~10 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
GIB = 2**30

# Runs inside the child: records the guard's figures, polls the loader processes, runs the command, prints one JSON line.
CHILD = r"""
import json, os, re, sys, threading, time
spec = json.loads(sys.argv[1])
from DiffusionSegLib import finetune as finetune_module, memory
from Training import pretrain as pretrain_module

record = {}
if spec.get("free_cap"):  # keeps a default run (batch chosen by the guard) within what this shared machine can spare
    real = memory.available_ram
    memory.available_ram = lambda: min(real(), spec["free_cap"])

def recording(fit_batch):
    def wrapped(step, batch_size, device, **kw):
        decision = fit_batch(step, batch_size, device, **kw)
        record.update(base=step.base, fixed=step.fixed, per_sample=step.per_sample, per_worker=step.per_worker, batch=decision.batch_size,
                      workers=kw.get("workers", 0), saved=step.saved.total, attention=step.saved.attention,
                      largest_attention=step.saved.largest_attention, measured_step=step.measured, predicted=step.total(decision.batch_size, kw.get("workers", 0)))
        return decision
    return wrapped

pretrain_module.fit_batch = recording(pretrain_module.fit_batch)
finetune_module.fit_batch = recording(finetune_module.fit_batch)
pool_size, frozen_bytes = finetune_module.cache_pool_size, finetune_module.frozen_bytes_per_slice
def cache_pool_size(config, slices, per_slice):
    pool = pool_size(config, slices, per_slice)
    record["cache"] = pool * per_slice
    return pool
finetune_module.cache_pool_size = cache_pool_size

def kb(text, key):
    match = re.search(key + r":\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0

# Only the data loader's worker processes are counted, known by being started through multiprocessing: any other child
# (`uname -p` behind platform.processor(), say) is a fork whose copy-on-write pages read as private until it execs.
import multiprocessing.process
loader_pids = set()
start = multiprocessing.process.BaseProcess.start
def starting(process):
    start(process)
    loader_pids.add(process.pid)
multiprocessing.process.BaseProcess.start = starting

workers, done = {}, threading.Event()
def poll():
    while not done.is_set():
        for pid in list(loader_pids):
            try:
                text = open(f"/proc/{pid}/smaps_rollup").read()
            except OSError:
                continue
            workers[pid] = max(workers.get(pid, 0), kb(text, "Private_Clean") + kb(text, "Private_Dirty"))
        done.wait(0.02)
threading.Thread(target=poll, daemon=True).start()

started = time.monotonic()
if spec["command"] == "pretrain":
    from Training.cli import main
else:
    from DiffusionSegLib.cli import main
code = main(spec["argv"])
done.set()
record.update(code=code, seconds=time.monotonic() - started, main_peak=kb(open("/proc/self/status").read(), "VmHWM"),
              worker_peaks=sorted(workers.values(), reverse=True))
print("RESULT " + json.dumps(record), flush=True)
"""


def grid(data: dict[int, Path], work: Path) -> list[dict]:
    """name, command and argv of each configuration."""
    ct = DATA / "abdomen-ct-a"
    pretrain_common = ["--sample-every", "0", "--no-progress", "--iterations", "4"]
    configurations = []

    def pretrain(preset: str, size: int, batch: int | None, workers: int | None, free_cap: int | None = None) -> None:
        name = f"pretrain {preset} {size}px b{batch or 'default'} w{'default' if workers is None else workers}"
        argv = ["pretrain", "--data", str(data[size]), "--out", str(work / name.replace(" ", "-")), "--preset", preset, *pretrain_common]
        argv += ["--batch-size", str(batch)] if batch else []
        argv += ["--workers", str(workers)] if workers is not None else []
        configurations.append({"name": name, "command": "pretrain", "argv": argv, "free_cap": free_cap, "out": argv[argv.index("--out") + 1]})

    def finetune(strategy: str, preset: str | None, batch: int) -> None:
        name = f"finetune {strategy} {preset or 'bundled'} b{batch}"
        argv = ["finetune", "--image", str(ct / "ct.nii.gz"), "--labels", str(ct / "labels.nii.gz"), "-o", str(work / name.replace(" ", "-")),
                "--strategy", strategy, "--iterations", "4", "--batch-size", str(batch), "--progress", "none", "--device", "cpu"]
        argv += ["--preset", preset] if preset else []
        configurations.append({"name": name, "command": "finetune", "argv": argv, "out": argv[argv.index("-o") + 1]})

    pretrain("tiny", 64, 1, 0)
    pretrain("tiny", 64, 8, 0)
    pretrain("tiny", 64, 8, 2)
    pretrain("tiny", 128, 4, 0)
    pretrain("tiny", 256, 1, 0)
    pretrain("tiny", 256, 2, 1)
    pretrain("tiny", 256, 3, 0)
    pretrain("small", 64, 8, 0)
    pretrain("small", 128, 4, 0)
    pretrain("small", 256, 1, 0)
    pretrain("small", 256, 2, 2)
    pretrain("small", 256, 4, 0)
    # The command (tiny on prepare's default 256 px, batch and workers by default), with the free RAM capped.
    pretrain("tiny", 256, None, None, free_cap=8 * GIB)
    finetune("fs", "tiny", 4)
    finetune("fs", None, 2)
    finetune("ft-dec", None, 2)
    return configurations


def prepare(work: Path, sizes: tuple[int, ...]) -> dict[int, Path]:
    folders = {}
    for size in sizes:
        folders[size] = work / f"slices-{size}"
        if not (folders[size] / "index.json").is_file():
            subprocess.run([sys.executable, "-m", "Training", "prepare", str(DATA / "unlabeled"), "-o", str(folders[size]), "--size", str(size)],
                           cwd=ROOT, check=True, capture_output=True)
    return folders


def run(configuration: dict) -> dict:
    shutil.rmtree(configuration["out"], ignore_errors=True)  # a run folder left by an earlier benchmark would be resumed or refused
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(configuration)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    result = json.loads(lines[-1][len("RESULT "):])
    if result.get("code") or "batch" not in result:
        return {"error": f"exit {result.get('code')}: {done.stderr.strip()[-400:]}"}
    result["measured"] = result["main_peak"] + sum(result["worker_peaks"])
    result["predicted"] = result.get("predicted", 0) + result.get("cache", 0)
    result["notes"] = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    return result


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| configuration | batch | workers | saved/slice GiB | predicted GiB | measured GiB | error | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | | | | | | {r['error']} | |")
            continue
        error = (r["predicted"] - r["measured"]) / r["measured"]
        lines.append(f"| {name} | {r['batch']} | {r['workers']} | {r['saved'] / GIB:.3f} | {r['predicted'] / GIB:.2f} | {r['measured'] / GIB:.2f} "
                     f"| {error:+.0%} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px configurations only (about a minute)")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="configurations whose name contains any of these")
    parser.add_argument("--work", type=Path, help="folder for slice datasets and runs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").is_file():
        print("memory_guard: peak memory is read from Linux's /proc; not available here", file=sys.stderr)
        return 2
    if not (DATA / "unlabeled").is_dir():
        print(f"memory_guard: {DATA} is missing (the shared CT data)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare(work, (64, 128, 256))
        configurations = grid(data, work)
        if args.quick:
            configurations = [c for c in configurations if " 64px" in c["name"] or "tiny b" in c["name"]]
        if args.only:
            configurations = [c for c in configurations if any(text in c["name"] for text in args.only)]
        print(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
        rows = []
        for configuration in configurations:
            result = run(configuration)
            rows.append((configuration["name"], result))
            for note in result.get("notes", []):
                print(f"  {configuration['name']}: {note}", flush=True)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        print()
        print(table(rows))
        if args.json:
            args.json.write_text(json.dumps([{"name": name, **r} for name, r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
