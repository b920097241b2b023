"""The label-efficiency benchmark: split, budgets, runs, report (reduced: one budget, few iterations, tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from phantom import FLIPPED_DIRECTION, make_phantom

from DiffusionSegLib.errors import InputError
from Training.cli import main as train
from Training.label_efficiency import BenchmarkConfig, Run, curated_slices, only_slices, plan_runs, split_slices


def test_split_holds_out_every_third_block_with_guards():
    labelled = list(range(10, 40))  # 30 labelled slices, blocks of 5
    split = split_slices(labelled, block=5)
    assert split.test == [*range(15, 20), *range(30, 35)]
    assert not set(split.pool) & set(split.test)
    assert all(min(abs(p - t) for t in split.test) >= 2 for p in split.pool)  # a guard slice between them
    assert split.pool == [10, 11, 12, 13, 21, 22, 23, 24, 25, 26, 27, 28, 36, 37, 38, 39]
    with pytest.raises(InputError, match="at least 15"):
        split_slices(list(range(12)), block=5)


def test_curated_slices_cover_organs_and_keep_apart():
    organs = {0: {1}, 1: {1, 2, 3}, 2: {1, 2, 3}, 10: {4}, 11: {4, 5}, 20: {6}, 30: {1}}
    pixels = dict.fromkeys(organs, 10)
    chosen = curated_slices(organs, pixels, count=4, min_gap=6)
    assert chosen == [1, 11, 20, 30] or chosen[:3] == [1, 11, 20]
    assert len(chosen) == 4 and all(abs(a - b) >= 6 for a in chosen for b in chosen if a != b)
    assert set().union(*(organs[s] for s in chosen)) == {1, 2, 3, 4, 5, 6}
    tight = curated_slices({0: {1}, 1: {2}, 2: {3}}, {0: 1, 1: 1, 2: 1}, count=3, min_gap=6)
    assert tight == [0, 1, 2]  # the gap gives way when the pool is too small


def test_only_slices_erases_the_rest_on_any_slice_axis():
    array = np.ones((6, 5, 4), dtype=np.uint8)
    image = sitk.GetImageFromArray(array)
    kept = sitk.GetArrayFromImage(only_slices(image, [1, 3], slice_axis=2))
    assert kept[[1, 3]].all() and not kept[[0, 2, 4, 5]].any()
    kept = sitk.GetArrayFromImage(only_slices(image, [0], slice_axis=0))
    assert kept[:, :, 0].all() and not kept[:, :, 1:].any()


def test_plan_uses_seeds_only_for_random_budgets():
    runs = plan_runs(BenchmarkConfig(budgets=["4", "10%"], strategies=["ft-dec", "fs"], timesteps=[0, 100], seeds=[0, 1]))
    assert Run("4", 0, "ft-dec", 100) in runs and Run("4", 1, "ft-dec", 0) not in runs
    assert Run("10%", 1, "fs", 0) in runs and Run("10%", 1, "fs", 100) not in runs
    assert len(runs) == 3 + 2 * 3


def test_benchmark_command_reduced(tiny_pretrained, tmp_path, capsys):
    ct, labels = make_phantom(size=(64, 64, 40), spacing=(6.0, 6.0, 5.0), seed=4, direction=FLIPPED_DIRECTION)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    out = tmp_path / "report"
    args = ["benchmark", "--pretrained", str(tiny_pretrained), "--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
            "-o", str(out), "--budgets", "2", "--strategies", "ft-dec", "fs", "--iterations", "3", "--block", "4", "--device", "cpu"]
    assert train(args) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [r["strategy"] for r in report["runs"]] == ["ft-dec", "fs"]
    for run in report["runs"]:
        assert len(run["train_slices"]) == 2 and not set(run["train_slices"]) & set(report["split"]["test"])
        assert run["iterations"] == 3 and 0 <= run["mean_dsc"] <= 1
    assert "| FT-dec (DSC) |" in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "overlays-2.png").stat().st_size > 0
    # A second call reuses the finished runs instead of training again.
    capsys.readouterr()
    assert train(args) == 0
    assert "(reused)" in capsys.readouterr().out
    # Other settings: the runs are redone, not mixed in.
    assert train([*args, "--iterations", "2"]) == 0
    assert "(reused)" not in capsys.readouterr().out
    assert {r["iterations"] for r in json.loads((out / "report.json").read_text(encoding="utf-8"))["runs"]} == {2}


def test_benchmark_rejects_bad_budgets_and_a_segmentor(tiny_pretrained, tmp_path, capsys):
    args = ["benchmark", "--pretrained", str(tiny_pretrained), "--image", "x", "--labels", "y", "-o", str(tmp_path), "--budgets", "ten"]
    assert train(args) == 2
    assert "--budgets ten" in capsys.readouterr().err
