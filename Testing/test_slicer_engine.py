"""The Slicer module's engine side without Slicer (DiffusionSegLib.bridge and its engine counterparts): the bridge
imports without torch, SimpleITK or slicerio; command lines, process-tree cancel, the job of a click and the device
probe under one poll, progress parsing,
dependencies and restarts, painted slices and write-back, written-labels housekeeping, uncertainty ranking,
model cards without torch, organ volumes, the sample for Sample Data."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from slicer_helpers import LAUNCHER, random_tiny_segmentor

from DiffusionSegLib import atomic, models, orientation, strategies
from DiffusionSegLib.bridge import commands, dependencies, model_cards, organ_volumes, sample_data
from DiffusionSegLib.bridge.job import BackgroundJobs
from DiffusionSegLib.bridge.painting import (
    annotated_organs,
    annotated_slices,
    annotation_summary,
    axial_axis,
    describe_organ_plan,
    edited_slices,
    keep_only,
    load_written_labels,
    lps_direction_from_ras,
    merge_keeping_painted,
    new_written_path,
    organ_labels,
    painted_slices,
    prune_written_labels,
    save_written_labels,
    segment_organ_ids,
)
from DiffusionSegLib.bridge.progress_parser import LogLine, Message, ProgressParser, ProgressUpdate, format_duration, parse_line
from DiffusionSegLib.bridge.runner import BackgroundRun, popen_options, tree_kill_command
from DiffusionSegLib.bridge.slice_ranking import check_report, rank_slices, read_report
from DiffusionSegLib.devices import DEVICES
from DiffusionSegLib.organs import ORGANS, terminology_string
from DiffusionSegLib.preprocessing import Grid, ModelSpaceVolume, canonical_axes
from DiffusionSegLib.progress import Progress
from DiffusionSegLib.slice_uncertainty import body_mask, slice_entropy, uncertainty_report, write_report

ROOT = Path(__file__).resolve().parents[1]

# --- commands ---------------------------------------------------------------------------------------------


def test_command_constants_match_the_engine():
    assert set(commands.DEVICES) == set(DEVICES)  # devices imports torch, so the bridge keeps a copy


def test_finetune_settings_follow_the_strategy_table(monkeypatch):
    """Settings accept the table's offered strategies, and what needs a pretrained backbone comes from its rows."""
    assert commands.FinetuneSettings().strategy == strategies.DEFAULT_STRATEGY
    for name in strategies.STRATEGIES:
        pretrained = strategies.get(name).pretrained
        assert (commands.FinetuneSettings(strategy=name, base="flare22-segmentor").starting_segmentor() is not None) == pretrained
        if pretrained:
            commands.FinetuneSettings(strategy=name, adapt_s=5.0)
        else:
            with pytest.raises(ValueError, match=f"{name} trains from random weights"):
                commands.FinetuneSettings(strategy=name, adapt_s=5.0)
    with pytest.raises(ValueError, match="choose one of ft-dec, lp, fs"):
        commands.FinetuneSettings(strategy="lp-mlp")  # a benchmark variant, not offered
    # a row added to the table is offered at once
    extra = strategies.Strategy("ft-all", "FT-all", "all trained", "FT-all", "everything trained", pretrained=True, trains=strategies.PARTS, head_layers=2)
    monkeypatch.setattr(strategies, "TABLE", (*strategies.TABLE, extra))
    monkeypatch.setattr(commands, "STRATEGIES", (*strategies.STRATEGIES, "ft-all"))
    assert commands.FinetuneSettings(strategy="ft-all", base="flare22-segmentor", adapt_s=1.0).starting_segmentor() == "flare22-segmentor"


def test_segment_args():
    args = commands.segment_args("ct.nrrd", "out.seg.nrrd", model="my-model", device="cpu", batch_size=4, uncertainty="u.json")
    assert args == ["segment", "ct.nrrd", "-o", "out.seg.nrrd", "--device", "cpu", "--progress", "json",
                    "--model", "my-model", "--batch-size", "4", "--uncertainty", "u.json"]
    assert "--model" not in commands.segment_args("ct.nrrd", "o.seg.nrrd")
    with pytest.raises(ValueError, match="device 'gpu'"):
        commands.segment_args("ct.nrrd", "o.seg.nrrd", device="gpu")


def test_refine_args():
    settings = commands.FinetuneSettings(strategy="fs", preset="tiny", iterations=3)
    args = commands.refine_args("ct.nrrd", "annotation.seg.nrrd", "models/new", "result.seg.nrrd", settings, recorded=[11, 3, 3],
                                written="old.npz", written_output="new.npz", organs=["liver", "right kidney"], uncertainty="u.json",
                                name="Mine", device="cpu")
    assert args[0] == "refine"
    pairs = dict(zip(args[1::2], args[2::2], strict=True))
    assert pairs == {"--image": "ct.nrrd", "--annotation": "annotation.seg.nrrd", "-o": "models/new", "--result": "result.seg.nrrd",
                     "--strategy": "fs", "--device": "cpu", "--progress": "json", "--recorded-slices": "3,11", "--organs": "liver,right kidney",
                     "--written": "old.npz", "--written-output": "new.npz", "--uncertainty": "u.json", "--preset": "tiny", "--iterations": "3",
                     "--name": "Mine"}
    plain = commands.refine_args("ct.nrrd", "a.seg.nrrd", "m", "r.seg.nrrd", commands.FinetuneSettings())
    assert not {"--recorded-slices", "--organs", "--written", "--written-output", "--uncertainty", "--iterations"} & set(plain)
    with pytest.raises(ValueError, match="at least one organ"):
        commands.refine_args("ct.nrrd", "a.seg.nrrd", "m", "r.seg.nrrd", commands.FinetuneSettings(), organs=[])


def test_refine_flags_are_the_engines():
    """Every flag the module passes to refine exists there, and the organ names it passes parse back to the organs."""
    from DiffusionSegLib.cli import build_parser
    from DiffusionSegLib.organs import parse_organs

    settings = commands.FinetuneSettings(strategy="ft-dec", iterations=5, time_limit_s=60.0, timestep=3, base="b", seed=2, adapt_s=10.0)
    args = commands.refine_args("ct.nrrd", "a.seg.nrrd", "m", "r.seg.nrrd", settings, recorded=[1], written="w.npz", written_output="o.npz",
                                organs=[o.name for o in ORGANS], uncertainty="u.json", name="n", device="cpu")
    parsed = build_parser().parse_args(args)
    assert parsed.command == "refine" and parsed.time_limit == 60.0 and parsed.adapt == 10.0 and parsed.timestep == 3
    assert parse_organs(parsed.organs) == {o.label for o in ORGANS}


def test_starting_segmentor_follows_the_engines_rule(tmp_path):
    """Unpainted organs are kept only when fine-tuning continues a segmentation model (not fs, not the pretrained base)."""
    folder = random_tiny_segmentor(tmp_path / "mine", name="Mine")
    assert model_cards.segmentor_name(folder) == "Mine"
    assert commands.FinetuneSettings(base=str(folder)).starting_segmentor() == "Mine"
    assert commands.FinetuneSettings(base="flare22-segmentor").starting_segmentor() == "flare22-segmentor"  # a name, as --base takes it
    assert commands.FinetuneSettings(strategy="fs", base=str(folder)).starting_segmentor() is None
    assert commands.FinetuneSettings().starting_segmentor() is None  # the pretrained base
    assert model_cards.segmentor_name(tmp_path / "nothing") is None and model_cards.segmentor_name("ddpm-pretrained") is None


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
                "scipy": "1.11.4", "numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": "2.1.0"}
    missing = dependencies.missing_requirements(version_of=versions.get)
    assert [m.name for m in missing] == ["slicerio", "Pillow"]
    assert missing[0].describe() == "slicerio>=1.1 (installed: 1.0)" and missing[1].describe() == "Pillow>=9"
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


def test_annotated_organs_are_painted_or_erased_on_annotated_slices(painted):
    # before any write-back: what is painted anywhere (every voxel lies on an annotated slice)
    assert annotated_organs(painted, [1, 4], 2) == {1, 3}
    assert annotated_organs(painted, [], 2) == set()
    # after one: the model's output elsewhere does not count; an organ erased on an annotated slice does
    written = painted.copy()
    written[2] = 5  # the model's aorta on slice 2, not annotated
    written[3, 0, 0] = 9  # its gallbladder on slice 3 ...
    current = written.copy()
    current[3, 0, 0] = 0  # ... which the user erases: slice 3 is annotated, and for the gallbladder
    slices = annotated_slices(current, 2, written, recorded=[1, 4])
    assert slices == [1, 3, 4]
    assert annotated_organs(current, slices, 2, written) == {1, 3, 9}
    assert annotation_summary(current, slices, 2, written)["organs"] == ["liver", "spleen", "gallbladder"]


def test_organ_plan_names_what_is_learned_and_what_is_kept():
    kept = describe_organ_plan(["liver", "spleen"], "flare22-segmentor")
    assert kept.startswith("Learned from your slices: Liver, Spleen. Kept from the starting model (flare22-segmentor): Right kidney, ")
    assert kept.endswith("Duodenum, Left kidney.") and kept.count(", ") == 1 + 10
    lost = describe_organ_plan(["liver"], None)
    assert "Not learned" in lost and "Spleen" in lost and "start from a segmentation model" in lost
    assert describe_organ_plan([o.name for o in ORGANS], None) == "Learned from your slices: " + ", ".join(o.display_name for o in ORGANS) + "."
    assert describe_organ_plan([], "m").startswith("No organ painted yet")


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


# --- the bridge: what Slicer loads before anything is installed ---------------------------------------------

BLOCKED = ("torch", "SimpleITK", "slicerio", "safetensors", "skimage", "platformdirs", "yaml", "tqdm")


def test_bridge_imports_with_only_the_standard_library_and_numpy():
    """Every bridge module imports, and lists the bundled model, with the engine's other packages made unimportable."""
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, json, pkgutil, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked for this test: " + name)

        sys.meta_path.insert(0, Block())
        import DiffusionSegLib.bridge as bridge
        names = [m.name for m in pkgutil.iter_modules(bridge.__path__)]
        for name in names:
            importlib.import_module("DiffusionSegLib.bridge." + name)
        from DiffusionSegLib.bridge import model_cards
        tops = {{m.split(".")[0] for m in sys.modules}}
        third_party = sorted(t for t in tops - set(sys.stdlib_module_names) - {{"numpy", "DiffusionSegLib"}} if not t.startswith("_"))
        print(json.dumps({{"modules": names, "third_party": third_party, "models": [m.name for m in model_cards.list_models("segmentor")],
                          "engine": sorted(m for m in sys.modules if m.startswith("DiffusionSegLib.") and not m.startswith("DiffusionSegLib.bridge"))}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"commands", "runner", "progress_parser", "dependencies", "painting", "slice_ranking", "model_cards", "organ_volumes", "sample_data"} <= set(found["modules"])
    assert found["third_party"] == []
    # the stdlib-only atomic writer (and its error class) and label table, nothing heavier
    # the engine's stdlib/numpy-only homes (atomic writer, exit statuses, label sets, trust, slice axis, strategy table)
    assert set(found["engine"]) <= {"DiffusionSegLib.atomic", "DiffusionSegLib.errors", "DiffusionSegLib.organ_trust", "DiffusionSegLib.organs",
                                    "DiffusionSegLib.orientation", "DiffusionSegLib.strategies"}
    assert {"DiffusionSegLib.strategies", "DiffusionSegLib.orientation", "DiffusionSegLib.organs"} <= set(found["engine"])
    assert "flare22-segmentor" in found["models"]  # listed without torch: Segment is clickable on a fresh install


def test_old_helper_modules_are_gone():
    """One home for the Slicer side: the moved helpers exist only in the bridge."""
    for name in ("commands", "runner", "progress_parser", "dependencies"):
        assert not (ROOT / "DiffusionSegLib" / f"{name}.py").exists()
        assert (ROOT / "DiffusionSegLib" / "bridge" / f"{name}.py").is_file()


# --- process-tree cancel ---------------------------------------------------------------------------------------

GRANDCHILD = """
import json, os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
print(json.dumps({"stage": "work", "step": 0, "total": 100}), flush=True)
time.sleep(60)
Path(sys.argv[2]).write_text("finished")
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc").is_dir():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T (command checked below)")
def test_cancel_stops_the_launcher_and_the_engine_it_started(tmp_path):
    """PythonSlicer is a launcher that runs the real Python as its child: cancel must stop both, and nothing is written."""
    launcher, engine = tmp_path / "launcher.py", tmp_path / "engine.py"
    launcher.write_text(LAUNCHER)
    engine.write_text(GRANDCHILD)
    pid_file, output = tmp_path / "engine.pid", tmp_path / "output.txt"
    run = BackgroundRun([sys.executable, str(launcher), sys.executable, str(engine), str(pid_file), str(output)])
    engine_pid = None
    try:
        deadline = time.monotonic() + 60
        while not any(isinstance(e, ProgressUpdate) for e in run.poll().events):
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.05)
        engine_pid = int(pid_file.read_text())
        assert engine_pid != run.pid and _alive(engine_pid)
        run.cancel()
        result = run.wait(20)  # the engine holds the pipes: this ends only when the engine has ended too
        assert result.finished and run.cancel_requested
        assert "cancelled" in commands.describe_exit(result.returncode)
        deadline = time.monotonic() + 10
        while (_alive(run.pid) or _alive(engine_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(run.pid) and not _alive(engine_pid)
        assert not output.exists()
    finally:
        if engine_pid is not None and _alive(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


def test_child_is_the_root_of_its_own_process_tree(monkeypatch):
    assert popen_options(windows=False) == {"start_new_session": True}
    assert tree_kill_command(4321) == ["taskkill", "/PID", "4321", "/T", "/F"]

    class StartupInfo:  # subprocess.STARTUPINFO exists only on Windows
        dwFlags, wShowWindow = 0, 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = popen_options(windows=True)  # no console window flashes up, as slicer.util.launchConsoleProcess does it
    assert options["creationflags"] == 0x08000000 and options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0


def test_windows_cancel_ends_the_tree_with_taskkill(monkeypatch):
    from DiffusionSegLib.bridge import runner

    run = BackgroundRun([sys.executable, "-c", "import time; time.sleep(30)"])
    called = []
    monkeypatch.setattr(runner, "_WINDOWS", True)
    monkeypatch.setattr(runner.subprocess, "run", lambda command, **kwargs: called.append((command, kwargs)))
    try:
        run.cancel()
        assert called and called[0][0] == tree_kill_command(run.pid) and called[0][1]["creationflags"] == runner.CREATE_NO_WINDOW
    finally:
        monkeypatch.setattr(runner, "_WINDOWS", False)
        run.kill()
        run.wait(20)


def test_device_probe_reports_what_torch_sees():
    import torch

    run = BackgroundRun([sys.executable, *commands.device_probe_args()])
    result = run.wait(120)
    assert result.returncode == 0, run.stderr_tail
    found = [commands.parse_device_probe(e.text) for e in result.events if isinstance(e, LogLine)]
    devices = next(f for f in found if f is not None)
    assert devices == {"cuda": torch.cuda.is_available(), "mps": bool(torch.backends.mps.is_available())}
    assert commands.parse_device_probe('{"stage": "x"}') is None and commands.parse_device_probe("oops") is None


# --- the job of a click and the device probe, under one poll ---------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _poll_until_idle(jobs: BackgroundJobs, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while jobs.poll():
        assert time.monotonic() < deadline, "the background work did not end"
        time.sleep(0.02)


def test_job_runs_its_commands_in_turn_and_stops_at_the_first_failure(tmp_path):
    marker = tmp_path / "third-ran"
    progress = _python('import json; print(json.dumps({"stage": "train", "step": 1, "total": 1}))')
    failing = _python('import sys; print("diffusionseg: error: ct.nrrd: no air", file=sys.stderr); sys.exit(2)')
    third = _python(f"open({str(marker)!r}, 'w').write('ran')")
    jobs = BackgroundJobs()
    events, ends = [], []
    jobs.start_job([progress, failing, third], ends.append, events.append)
    assert jobs.busy and jobs.active
    with pytest.raises(RuntimeError, match="already running"):
        jobs.start_job([progress], ends.append)
    _poll_until_idle(jobs)
    assert len(ends) == 1 and not jobs.busy
    end = ends[0]
    assert end.returncode == 2 and end.runs == 2 and not end.ok and not end.cancelled
    assert end.describe() == "stopped on a problem with the input: ct.nrrd: no air"
    assert [e for e in events if isinstance(e, ProgressUpdate)] == [ProgressUpdate("train", 1, 1)]
    assert LogLine("diffusionseg: error: ct.nrrd: no air") in events
    assert not marker.exists()  # nothing after the failure ran

    jobs.start_job([progress, third], ends.append)
    _poll_until_idle(jobs)
    assert ends[1].ok and ends[1].runs == 2 and marker.read_text() == "ran"
    with pytest.raises(ValueError, match="at least one command"):
        jobs.start_job([], ends.append)


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals; Windows ends the tree at once (taskkill /F)")
def test_cancel_ends_the_job_and_kills_a_run_that_ignores_it(tmp_path):
    marker = tmp_path / "next-ran"
    stubborn = _python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """)
    jobs = BackgroundJobs(cancel_grace_s=0.3)
    events, ends = [], []
    jobs.start_job([stubborn, _python(f"open({str(marker)!r}, 'w').write('ran')")], ends.append, events.append)
    deadline = time.monotonic() + 60
    while LogLine("ready") not in events:
        assert time.monotonic() < deadline, "the run did not start"
        jobs.poll()
        time.sleep(0.02)
    assert jobs.cancel() and jobs.cancel()  # asking twice changes nothing
    _poll_until_idle(jobs, 30)  # SIGTERM is ignored: the grace time runs out and the tree is killed
    assert len(ends) == 1 and ends[0].cancelled and ends[0].runs == 1
    assert ends[0].describe() == "cancelled; nothing was written"
    assert not marker.exists() and not jobs.cancel()


def test_probe_and_job_share_one_poll_and_a_job_may_start_from_its_end():
    probe_line = json.dumps({"device_probe": 1, "cuda": False, "mps": True})
    probe = _python(f"print('a warning first'); print({probe_line!r})")
    jobs = BackgroundJobs()
    found = []
    assert jobs.start_probe(probe, lambda devices, tail: found.append(devices))
    assert not jobs.start_probe(probe, lambda devices, tail: found.append(devices))  # one probe at a time
    assert jobs.active and jobs.probing and not jobs.busy  # the probe blocks no button
    ends = []

    def retry_on_the_cpu(end) -> None:  # what the panel does after "CUDA out of memory"
        ends.append(end)
        if end.out_of_memory:
            jobs.start_job([_python("pass")], retry_on_the_cpu)

    jobs.start_job([_python('import sys; sys.exit("torch.OutOfMemoryError: CUDA out of memory")')], retry_on_the_cpu)
    _poll_until_idle(jobs)
    assert found == [{"cuda": False, "mps": True}]
    assert [(e.returncode, e.out_of_memory) for e in ends] == [(1, True), (0, False)]
    assert jobs.start_probe(_python("print('no torch here')"), lambda devices, tail: found.append(devices))
    _poll_until_idle(jobs)
    assert found[-1] is None and not jobs.active


# --- dependencies: restart after upgrading what is already imported ---------------------------------------------


def test_loaded_upgrades_ask_for_a_restart():
    missing = [dependencies.Missing("scikit-image", "0.21", "0.19"), dependencies.Missing("scipy", "1.8", None),
               dependencies.Missing("Pillow", "9", "8.4"), dependencies.Missing("slicerio", "1.1", "1.0")]
    upgraded = dependencies.loaded_upgrades(missing, {"skimage", "scipy", "PIL", "numpy"})
    assert [m.name for m in upgraded] == ["scikit-image", "Pillow"]  # scipy is new (nothing old loaded); slicerio not imported
    assert dependencies.import_name("Pillow") == "PIL" and dependencies.import_name("slicerio") == "slicerio"


# --- model cards without torch ---------------------------------------------------------------------------------


def test_model_cards_list_what_the_engine_lists():
    user = models.user_models_dir()  # conftest points DIFFUSIONSEG_HOME at a temporary folder
    assert model_cards.user_models_dir() == user
    random_tiny_segmentor(user / "mine", name="Mine")
    (user / "broken").mkdir()
    (user / "broken" / "model.json").write_text("{not json")
    (user / "empty").mkdir()
    engine = [(i.name, i.path, i.kind, i.source) for i in models.list_models("segmentor")]
    bridge = [(e.name, e.path, e.kind, e.source) for e in model_cards.list_models("segmentor")]
    assert bridge == engine
    assert ("mine", user / "mine", "segmentor", "user") in bridge
    assert [e.name for e in model_cards.list_models()] == [i.name for i in models.list_models()]
    assert model_cards.is_user_model(user / "mine") and not model_cards.is_user_model(user / "broken")
    assert not model_cards.is_user_model(model_cards.BUNDLED_DIR / "flare22-segmentor") and not model_cards.is_user_model("")


def test_user_models_dir_without_platformdirs(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFUSIONSEG_HOME", raising=False)
    for xdg in (None, str(tmp_path / "xdg")):
        if xdg is None:
            monkeypatch.delenv("XDG_DATA_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_DATA_HOME", xdg)
        expected = models.user_models_dir()
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "platformdirs", None)  # what a fresh Slicer has: importing it fails
            assert model_cards.user_models_dir() == expected


# --- the axial axis is the model's -----------------------------------------------------------------------------


def test_axial_axis_is_the_engines():
    """One home: the bridge counts painted slices along the axis the engine's preprocessing slices along."""
    assert axial_axis is orientation.axial_axis
    rng = np.random.default_rng(3)
    directions = [np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(300)]
    for permutation in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]):
        for signs in ([1, 1, 1], [-1, 1, -1], [1, -1, -1]):
            directions.append(np.eye(3)[permutation] * signs)
    half = np.sqrt(0.5)
    directions.append(np.array([[half, half, 0], [-half, half, 0], [0, 0, 1.0]]))  # a 45-degree tie in-plane
    for d in directions:
        flat = tuple(float(v) for v in d.ravel())
        assert axial_axis(flat) == canonical_axes(flat)[0][2], flat


# --- the labels last written back ------------------------------------------------------------------------------


def test_written_labels_round_trip(tmp_path):
    labels = (np.arange(60).reshape(3, 4, 5) % 14).astype(np.uint8)
    path = new_written_path(tmp_path / "written-labels")
    assert path.suffix == ".npz" and new_written_path(tmp_path) != new_written_path(tmp_path)
    save_written_labels(labels, path)
    assert np.array_equal(load_written_labels(path, labels.shape), labels)
    assert load_written_labels(path, (3, 4, 6)) is None  # written for another CT grid
    assert load_written_labels(tmp_path / "missing.npz") is None and load_written_labels(None) is None
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    assert load_written_labels(tmp_path / "bad.npz") is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left


def test_prune_written_labels_keeps_what_is_used_or_recent(tmp_path):
    folder = tmp_path / "written-labels"
    recent, old, in_use = folder / "recent.npz", folder / "old.npz", folder / "in-use.npz"
    for path in (recent, old, in_use):
        save_written_labels(np.zeros((2, 2, 2), np.uint8), path)
    legacy, partial, other = folder / "legacy.nrrd", folder / f".x.npz{atomic.TEMP_MARK}1234-abcd", folder / "notes.txt"
    for path in (legacy, partial, other):
        path.write_bytes(b"x")
    (folder / f".y.npz{atomic.TEMP_MARK}99-ef").mkdir()  # a writer being killed right now: too recent to remove
    now = time.time()
    for path, days in ((old, 100), (in_use, 100), (legacy, 100), (other, 100), (partial, 2)):
        os.utime(path, (now - days * 86400, now - days * 86400))
    deleted = prune_written_labels(folder, keep=[in_use], now=now)
    assert set(deleted) == {old, partial}
    assert {p.name for p in folder.iterdir()} == {"recent.npz", "in-use.npz", "legacy.nrrd", "notes.txt", f".y.npz{atomic.TEMP_MARK}99-ef"}
    assert prune_written_labels(tmp_path / "none") == []


# --- organ volumes from Segment Statistics ---------------------------------------------------------------------


def test_organ_volumes_from_segment_statistics():
    stats = {
        "SegmentIDs": ["s1", "s2", "s3", "s4"],
        ("s1", organ_volumes.VOXELS_KEY): 56000, ("s1", organ_volumes.VOLUME_KEY): 1520.34, ("s1", organ_volumes.MEAN_KEY): 61.6,
        ("s1", organ_volumes.STDEV_KEY): 18.2,
        ("s2", organ_volumes.VOXELS_KEY): 0, ("s2", organ_volumes.VOLUME_KEY): 0.0,  # empty spleen: absent
        ("s3", organ_volumes.VOXELS_KEY): 10, ("s3", organ_volumes.VOLUME_KEY): 0.3,  # a tumour: not an organ
        ("s4", organ_volumes.VOXELS_KEY): 900, ("s4", organ_volumes.VOLUME_KEY): 24.0,  # no scalar volume plugin result
    }
    names = {"s1": ("Liver", None), "s2": ("Spleen", None), "s3": ("my tumour", None), "s4": ("Segment_13", terminology_string(ORGANS[12]))}
    rows, absent = organ_volumes.organ_volumes(stats, names)
    assert rows == [organ_volumes.OrganVolume("Liver", 1520.34, 61.6, 18.2), organ_volumes.OrganVolume("Left kidney", 24.0, None, None)]
    assert "Spleen" in absent and "Liver" not in absent and len(absent) == 11
    text = organ_volumes.describe_volumes(rows, absent)
    assert text.splitlines()[:2] == ["Liver: 1520.3 mL, 62 ± 18 HU", "Left kidney: 24.0 mL"]
    assert text.splitlines()[2].startswith("Not found: Right kidney, Spleen")


# --- the sample for Sample Data --------------------------------------------------------------------------------

# Parameters of SampleData.SampleDataLogic.registerCustomSampleDataSource in Slicer 5.10-5.12.
SAMPLE_DATA_PARAMETERS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader", "thumbnailFileName",
                          "loadFileTypes", "loadFiles", "loadFileProperties", "checksums", "loadFileType"}


def test_sample_is_registered_from_the_package(tmp_path):
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from DiffusionSegLib.imageio import read_ct

    source = sample_data.sample_data_source(thumbnail=tmp_path / "icon.png")
    assert source is not None, f"the sample CT is missing: {sample_data.sample_path()}"
    assert set(source) <= SAMPLE_DATA_PARAMETERS
    path = Path(url2pathname(urlparse(source["uris"]).path))
    assert path == sample_data.sample_path().resolve() == (ROOT / "DiffusionSegLib" / "sample" / "abdomen-ct-a.nii.gz").resolve()
    assert source["checksums"] == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["fileNames"] == path.name and source["loadFileTypes"] == "VolumeFile" and source["thumbnailFileName"] == str(tmp_path / "icon.png")
    assert (path.parent / "LICENSE.txt").is_file()
    ct = read_ct(path)
    assert min(ct.GetSize()) >= 32 and path.stat().st_size < 5_000_000  # a real, small CT


# --- uncertainty report: written by the engine, read by the bridge ---------------------------------------------


def test_uncertainty_report_round_trip(tmp_path):
    report = {"version": 1, "metric": "m", "slice_axis": 2, "num_slices": 1, "slices": [{"index": 0, "uncertainty": 0.5, "body_fraction": 0.5}]}
    path = write_report(report, tmp_path / "u.json")
    assert read_report(path) == report and check_report(report) is report
    with pytest.raises(ValueError, match="not a DiffusionSeg uncertainty report"):
        check_report({"version": 99, "slices": []}, "node")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        read_report(tmp_path / "bad.json")

