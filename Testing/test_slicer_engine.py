"""The Slicer module's engine side without Slicer: command lines, progress parsing, dependencies, painted
slices and write-back, uncertainty ranking."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest

from DiffusionSegLib import commands, dependencies
from DiffusionSegLib.devices import DEVICES
from DiffusionSegLib.organs import ORGANS, terminology_string
from DiffusionSegLib.preprocessing import Grid, ModelSpaceVolume
from DiffusionSegLib.progress import Progress
from DiffusionSegLib.progress_parser import LogLine, Message, ProgressParser, ProgressUpdate, format_duration, parse_line
from DiffusionSegLib.segmentor import STRATEGIES
from DiffusionSegLib.uncertainty import body_mask, rank_slices, slice_entropy, uncertainty_report
from DiffusionSegLib.writeback import (
    annotated_slices,
    annotation_summary,
    axial_axis,
    edited_slices,
    keep_only,
    lps_direction_from_ras,
    merge_keeping_painted,
    organ_labels,
    painted_slices,
    segment_organ_ids,
)

ROOT = Path(__file__).resolve().parents[1]

# --- commands ---------------------------------------------------------------------------------------------


def test_command_constants_match_the_engine():
    assert set(commands.STRATEGIES) == set(STRATEGIES)
    assert set(commands.DEVICES) == set(DEVICES)


def test_segment_args():
    args = commands.segment_args("ct.nrrd", "out.seg.nrrd", model="my-model", device="cpu", batch_size=4, uncertainty="u.json")
    assert args == ["segment", "ct.nrrd", "-o", "out.seg.nrrd", "--device", "cpu", "--progress", "json",
                    "--model", "my-model", "--batch-size", "4", "--uncertainty", "u.json"]
    assert "--model" not in commands.segment_args("ct.nrrd", "o.seg.nrrd")
    with pytest.raises(ValueError, match="device 'gpu'"):
        commands.segment_args("ct.nrrd", "o.seg.nrrd", device="gpu")


def test_finetune_args():
    settings = commands.FinetuneSettings(strategy="lp", iterations=50, time_limit_s=90.0, timestep=10, base="base-model", seed=1)
    args = commands.finetune_args(["ct.nrrd"], ["painted.seg.nrrd"], "models/new", settings, name="New model", device="cuda")
    assert args[:5] == ["finetune", "--image", "ct.nrrd", "--labels", "painted.seg.nrrd"]
    pairs = dict(zip(args[5::2], args[6::2], strict=True))
    assert pairs == {"-o": "models/new", "--strategy": "lp", "--device": "cuda", "--progress": "json", "--base": "base-model",
                     "--iterations": "50", "--time-limit": "90", "--timestep": "10", "--seed": "1", "--name": "New model"}
    defaults = commands.finetune_args(["a"], ["b"], "o", commands.FinetuneSettings())
    assert "ft-dec" in defaults and "--iterations" not in defaults and "--base" not in defaults
    with pytest.raises(ValueError, match="one labels file per image"):
        commands.finetune_args(["a", "b"], ["c"], "o", commands.FinetuneSettings())


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "full"}, "strategy 'full'"),
    ({"iterations": 0}, "iterations"),
    ({"time_limit_s": -1.0}, "time limit"),
    ({"timestep": -2}, "timestep"),
])
def test_finetune_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        commands.FinetuneSettings(**kwargs)


def test_child_environment_puts_the_engine_first(tmp_path):
    env = commands.child_environment({"PYTHONPATH": os.pathsep.join(["/x", str(tmp_path)]), "HOME": "/h"}, tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/x"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/h"


def test_model_folder_name_is_safe_and_unique():
    when = dt.datetime(2026, 3, 4, 5, 6)
    assert commands.model_folder_name("CT: Abdomen/1", [], when) == "ct-abdomen-1-20260304-0506"
    taken = ["ct-20260304-0506", "ct-20260304-0506-2"]
    assert commands.model_folder_name("CT", taken, when) == "ct-20260304-0506-3"
    assert commands.model_folder_name("???", [], when).startswith("model-")


def test_describe_exit():
    assert commands.describe_exit(0) == "finished"
    assert "cancelled" in commands.describe_exit(130)
    assert commands.describe_exit(2, "warning\ndiffusionseg: error: ct.nrrd: no air\n").endswith("ct.nrrd: no air")
    assert "exit status 1" in commands.describe_exit(1, "Traceback ...\nRuntimeError: boom")
    assert commands.is_out_of_memory("diffusionseg: error: the GPU ran out of memory; retry")
    assert not commands.is_out_of_memory("diffusionseg: error: bad file")


# --- progress parsing -------------------------------------------------------------------------------------


def test_parser_reads_what_progress_writes(capsys):
    progress = Progress("json")
    progress.start("finetune", 3)
    progress.advance(loss=0.5)
    progress.message("hello")
    out = capsys.readouterr().out
    events = ProgressParser().feed(out)
    assert events[0] == ProgressUpdate("finetune", 0, 3, None, events[0].elapsed, None)
    assert events[1].step == 1 and events[1].loss == 0.5 and events[1].eta is not None
    assert events[2] == Message("hello")


def test_parser_handles_split_lines_and_log_lines():
    parser = ProgressParser()
    assert parser.feed('{"stage": "segment", "st') == []
    assert parser.feed('ep": 2, "total": 8, "loss": null, "elapsed": 1.0, "eta": 3.0}\nUserWarning: x\r\n') == [
        ProgressUpdate("segment", 2, 8, None, 1.0, 3.0), LogLine("UserWarning: x")]
    assert parser.feed("\n\n{not json}\n") == [LogLine("{not json}")]
    assert parser.feed('{"message": "done"}') == []
    assert parser.flush() == [Message("done")]
    assert parser.flush() == []


def test_parse_line_edge_cases():
    assert parse_line("   ") is None
    assert parse_line('{"stage": "x"}') == LogLine('{"stage": "x"}')  # no step/total: not progress
    assert parse_line("[1, 2]") == LogLine("[1, 2]")
    update = parse_line('{"stage": "finetune", "step": 40, "total": 300, "loss": 0.41234, "elapsed": 12.5, "eta": 81.2}')
    assert update.fraction == pytest.approx(40 / 300)
    assert update.describe() == "finetune 40/300, loss 0.4123, 1:21 left"
    assert ProgressUpdate("write", 0, 0).fraction == 0.0
    assert format_duration(3723) == "1:02:03" and format_duration(7.4) == "0:07"


# --- dependencies -----------------------------------------------------------------------------------------


def test_requirements_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    minimums = dict(entry.replace(" ", "").split(">=") for entry in declared)
    ours = dict(dependencies.REQUIREMENTS)
    assert set(ours) | {"torch", "numpy", "SimpleITK"} == set(minimums)  # requests: Slicer's, not the engine's
    assert all(minimums[name] == ours[name] for name in ours)
    assert minimums["torch"] == dependencies.TORCH_MINIMUM


def test_missing_requirements_and_constraints():
    versions = {"safetensors": "0.4.5", "slicerio": "1.0", "tqdm": "4.66.1", "platformdirs": "4.2", "scikit-image": "0.24.0rc1",
                "numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": "2.1.0"}
    missing = dependencies.missing_requirements(version_of=versions.get)
    assert [m.name for m in missing] == ["slicerio", "pyyaml"]
    assert missing[0].describe() == "slicerio>=1.1 (installed: 1.0)" and missing[1].describe() == "pyyaml>=6"
    assert dependencies.torch_missing(versions.get).installed == "2.1.0"
    assert dependencies.torch_missing({"torch": "2.13.0+cpu"}.get) is None
    assert dependencies.constraints(versions.get) == "numpy==1.26.4\nSimpleITK==2.4.0\n"  # requests not installed: not pinned
    assert dependencies.at_least("10.0", "9.9") and not dependencies.at_least("0.3.9", "0.4")


# --- painted slices and write-back ------------------------------------------------------------------------


def test_axial_axis_and_ras_conversion():
    assert axial_axis((1, 0, 0, 0, 1, 0, 0, 0, 1)) == 2
    # a sagittally acquired volume: index axis 0 runs superior
    assert axial_axis((0, 1, 0, 0, 0, 1, 1, 0, 0)) == 0
    ras = np.diag([-1.0, -1.0, 1.0])  # Slicer's IJK-to-RAS of an LPS-identity image
    assert lps_direction_from_ras(ras) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture
def painted() -> np.ndarray:
    labels = np.zeros((6, 4, 5), dtype=np.uint8)  # k, j, i
    labels[1, 1, 1] = 1
    labels[4, 2:4, 0] = 3
    return labels


def test_painted_and_edited_slices(painted):
    assert painted_slices(painted, 2) == [1, 4]
    assert painted_slices(painted, 0) == [0, 1]  # along i
    written = painted.copy()
    written[2] = 5  # the model's prediction on slice 2
    current = written.copy()
    current[3, 0, 0] = 9  # the user corrects slice 3
    assert edited_slices(current, written, 2) == [3]
    assert annotated_slices(current, 2, written, recorded=[1, 4]) == [1, 3, 4]
    assert annotated_slices(painted, 2) == [1, 4]
    with pytest.raises(ValueError, match="differ in shape"):
        edited_slices(current, written[:3], 2)


def test_keep_only_and_merge_keep_painted_slices_exactly(painted):
    prediction = np.full_like(painted, 7)
    merged = merge_keeping_painted(prediction, painted, [1, 4], 2)
    assert np.array_equal(merged[[1, 4]], painted[[1, 4]])  # background of painted slices kept too
    assert (merged[[0, 2, 3, 5]] == 7).all()
    kept = keep_only(prediction, [2], 2)
    assert (kept[2] == 7).all() and kept.sum() == 7 * 20
    merged_i = merge_keeping_painted(prediction, painted, [1], 0)
    assert np.array_equal(merged_i[:, :, 1], painted[:, :, 1]) and (merged_i[:, :, 0] == 7).all()


def test_segment_names_map_to_organ_labels():
    segments = [("Liver", None), ("my tumour", None), ("Segment_3", terminology_string(ORGANS[2])), ("lt kidney", None)]
    ids = segment_organ_ids(segments)
    assert ids == [1, None, 3, 13]
    values = np.array([[[0, 1, 2, 3, 4]]], dtype=np.uint8)
    labels, unmatched = organ_labels(values, ids)
    assert labels.tolist() == [[[0, 1, 0, 3, 13]]] and unmatched == [1]
    summary = annotation_summary(labels, [0], 2)
    assert summary == {"slices": [0], "organs": ["liver", "spleen", "left kidney"], "slice_axis": 2}


# --- uncertainty ------------------------------------------------------------------------------------------


def _volume(slices: np.ndarray, flipped: bool) -> ModelSpaceVolume:
    grid = Grid((4, 4, len(slices)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return ModelSpaceVolume(slices, grid, grid, slice_axis=2, slice_flipped=flipped, clip_hu=(-1000.0, 1000.0))


def test_entropy_is_zero_when_certain_and_one_when_uniform():
    probabilities = np.zeros((2, 14, 4, 4), dtype=np.uint8)
    probabilities[0, 3] = 255  # certain
    probabilities[1] = 18  # uniform (rounded as uint8)
    entropy, fraction = slice_entropy(probabilities, np.ones((2, 4, 4), dtype=bool))
    assert entropy[0] == pytest.approx(0.0, abs=1e-6) and entropy[1] == pytest.approx(1.0, abs=1e-6)
    assert fraction.tolist() == [1.0, 1.0]


def test_report_uses_body_pixels_and_input_indices():
    ct = np.full((3, 4, 4), -1.0, dtype=np.float32)  # air everywhere ...
    ct[:, :2] = 0.5  # ... except a body in the top half of every slice
    probabilities = np.zeros((3, 14, 4, 4), dtype=np.uint8)
    probabilities[:, 0] = 255
    probabilities[2, :, :2] = 18  # model slice 2 is unsure inside the body
    probabilities[1, :, 2:] = 18  # model slice 1 is unsure in the air only: does not count
    volume = _volume(ct, flipped=True)
    assert body_mask(volume).sum() == 3 * 8
    report = uncertainty_report(probabilities, volume)
    by_index = {s["index"]: s for s in report["slices"]}
    assert by_index[0]["uncertainty"] == pytest.approx(1.0, abs=1e-4)  # input 0 is model slice 2 (flipped grid)
    assert by_index[1]["uncertainty"] == pytest.approx(0.0, abs=1e-4)
    assert by_index[0]["body_fraction"] == 0.5 and report["slice_axis"] == 2 and report["num_slices"] == 3
    json.dumps(report)  # serialisable as is


def test_rank_slices_skips_annotated_and_empty_slices():
    report = {"slices": [
        {"index": 0, "uncertainty": 0.9, "body_fraction": 0.0},  # no body
        {"index": 1, "uncertainty": 0.5, "body_fraction": 0.4},
        {"index": 2, "uncertainty": 0.8, "body_fraction": 0.4},
        {"index": 3, "uncertainty": 0.5, "body_fraction": 0.3},
        {"index": 4, "uncertainty": 0.95, "body_fraction": 0.5},
    ]}
    assert rank_slices(report, annotated=[4]) == [2, 1, 3]
    assert rank_slices(report, annotated=[1, 2, 3, 4]) == []
