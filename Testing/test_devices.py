"""CPU set-up: threads and an allocator that keeps freed activation memory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Page faults taken by later rounds (after 3 to settle) of allocating, touching and freeing 64 MB blocks,
# the pattern of a forward pass: each round should reuse the memory freed by the one before.
PROBE = """
import json, resource, sys
import torch
if sys.argv[1] == "configured":
    from DiffusionSegLib.devices import configure_cpu
    configure_cpu()
def rounds(n):
    for _ in range(n):
        a = torch.ones(16 * 2**20); b = a * 2; del a, b
rounds(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "threads": torch.get_num_threads()}))
"""


def probe(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(os.getcwd()), os.environ.get("PYTHONPATH")]))}
    env.pop("DIFFUSIONSEG_NO_MALLOPT", None)
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc-only")
def test_freed_memory_is_reused_not_page_faulted_again():
    default, configured = probe("default"), probe("configured")
    # 20 rounds x 2 blocks x 64 MB of 4 KB pages is ~655k faults when every block is a fresh mapping.
    assert default["faults"] > 300_000
    assert configured["faults"] < default["faults"] / 3


def test_threads_follow_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert probe("configured")["threads"] == cores
