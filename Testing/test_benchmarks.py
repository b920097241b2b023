"""The benchmark command in its reduced form (--quick): it runs every section and produces every figure.

No timing is asserted (a slow or shared machine must not fail CI); the figures must exist, be finite and
positive, and the JSON must describe the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

# The quick benchmark runs in a child with its own 600 s limit (fixture set-up counts towards the test's): leave it room to report.
pytestmark = pytest.mark.timeout(900)

BENCHMARK = Path(__file__).resolve().parents[1] / "Training" / "benchmarks" / "speed_memory.py"


def _get(tree: dict, path: str) -> object:
    for key in path.split("/"):
        assert isinstance(tree, dict) and key in tree, f"{path}: no {key!r} in {sorted(tree) if isinstance(tree, dict) else tree!r}"
        tree = tree[key]
    return tree


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, tiny_pretrained: Path) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("benchmark")
    out = folder / "benchmark.json"
    cmd = [sys.executable, str(BENCHMARK), "segment", "finetune", "pretrain", "--quick", "--device", "cpu", "--base", str(tiny_pretrained),
           "--json", str(out), "--work", str(folder / "work")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.mark.slow
def test_machine_and_table(quick_run: tuple[dict, str]) -> None:
    results, stdout = quick_run
    machine = results["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["cpu_model"] and machine["device_name"] == "cpu" and machine["threads"] >= 1
    assert results["quick"] is True and results["sections"] == ["segment", "finetune", "pretrain"]
    assert "target / note" in stdout and "network rate" in stdout and "images/s" in stdout
    assert results["rows"] and all(row["value"] is None or math.isfinite(row["value"]) for row in results["rows"])


@pytest.mark.slow
def test_segment_figures(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    case = _get(results, "segment/cases/tiny")
    stages = case["stages_s"]
    assert sorted(stages) == ["network", "postprocess", "preprocess", "read", "write"]
    for path in ("total_s", "network_slices_per_s", "peak_ram_mb", "baseline/speedup_vs_nchw", "baseline/seconds/nchw", "baseline/seconds/default",
                 *(f"stages_s/{stage}" for stage in stages)):
        assert _positive(_get(case, path)), path
    assert case["total_s"] == pytest.approx(sum(stages.values()))
    assert case["slices"] == 16 and case["input_size"] == [128, 128, 16]
    assert "--quick" in results["segment"]["memory"]["skipped"]


@pytest.mark.slow
def test_finetune_figures(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    cases = _get(results, "finetune/cases")
    assert sorted(cases) == ["fs", "ft-dec", "lp"]
    for strategy, case in cases.items():
        assert case["slices"] == 4
        assert _positive(case["seconds_per_iteration"]), strategy
    for strategy in ("ft-dec", "lp"):  # the frozen-encoder strategies: cached against recomputed
        for path in ("no_cache_seconds_per_iteration", "cache_speedup", "cache/pool", "cache/seconds"):
            assert _positive(_get(cases[strategy], path)), f"{strategy} {path}"
    assert "cache" not in cases["fs"]

    convergence = results["finetune"]["convergence"]
    if not (SHARED_DATA / "abdomen-ct-a" / "labels.nii.gz").exists():
        assert "real CT not available" in convergence["skipped"]
        return
    assert [point["iteration"] for point in convergence["curve"]] == [5, 10, 15, 20]
    assert 0 <= convergence["full_dice"] <= 1 and convergence["dice_95"] == pytest.approx(0.95 * convergence["full_dice"])
    assert convergence["iteration_95"] in (5, 10, 15, 20) and _positive(convergence["train_s_95"])
    assert convergence["train_s_95"] <= convergence["full_train_s"]
    assert convergence["plateau_iteration"] is None  # 20 iterations are below the plateau stop's minimum
    assert len(convergence["train_slices"]) == 4 and min(abs(a - b) for a in convergence["train_slices"] for b in convergence["train_slices"] if a != b) >= 6


@pytest.mark.slow
def test_pretrain_figures(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    case = _get(results, "pretrain/cases/tiny")
    for path in ("flops/flops_per_image", "flops/peak_flops", "torchrun/images_per_s", "loader/images_per_s"):
        assert _positive(_get(case, path)), path
    configs = case["configs"]
    for name in ("baseline", "channels_last", "grad_checkpoint", "defaults"):
        assert _positive(configs[name]["images_per_s"]) and _positive(configs[name]["mfu"]), name
    for name in ("bf16", "fused_adam"):
        assert "n/a on CPU" in configs[name]["skipped"]
    assert "--quick" in configs["compile"]["skipped"]
    assert configs["defaults"]["same_as"] == "baseline"  # on the CPU the default flags change nothing
    assert case["torchrun"]["processes"] == 2
