"""The file-level round trip the Slicer module relies on, with the real command run as a background process:
segment -> .seg.nrrd (+ uncertainty) read back with slicerio; painted slices saved the way Slicer saves them
-> accepted by finetune; annotated slices kept through write-back; cancel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import same_geometry
from slicer_helpers import LAUNCHER, keep_array_slices, random_tiny_segmentor

from DiffusionSegLib.bridge import commands
from DiffusionSegLib.bridge.painting import axial_axis, load_written_labels, painted_slices
from DiffusionSegLib.bridge.progress_parser import Message, ProgressUpdate
from DiffusionSegLib.bridge.runner import BackgroundRun
from DiffusionSegLib.bridge.slice_ranking import rank_slices, read_report
from DiffusionSegLib.cli import main
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.imageio import read_ct, read_labels, write_labelmap
from DiffusionSegLib.organs import ORGANS, match_organ, organ_by_label, terminology_entry
from DiffusionSegLib.writeback import prepare_annotation, write_back
from Training.benchmarks.phantom import FLIPPED_DIRECTION, make_phantom

LIBRARY_PARENT = Path(__file__).resolve().parents[1]
PAINTED = [3, 6, 9]  # array z slices the "user" paints


def run_engine(args: list[str], timeout: float = 240) -> tuple[int, list]:
    """The engine as the Slicer module starts it: `python -m DiffusionSegLib` in a child process."""
    import os

    env = commands.child_environment({**os.environ, "OMP_NUM_THREADS": "1"}, LIBRARY_PARENT)
    result = BackgroundRun(commands.engine_command(sys.executable) + args, env=env).wait(timeout)
    return result.returncode, result.events


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A phantom CT on a flipped (NIfTI-like) grid, its labels, and a random tiny segmentation model."""
    folder = tmp_path_factory.mktemp("roundtrip")
    ct, labels = make_phantom(size=(56, 48, 14), spacing=(7.0, 7.0, 14.0), direction=FLIPPED_DIRECTION, seed=5)
    paths = {"ct": folder / "ct.nrrd", "labels": folder / "labels.nii.gz", "model": random_tiny_segmentor(folder / "model")}
    sitk.WriteImage(ct, str(paths["ct"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    return paths


def slicer_style_segmentation(labels: sitk.Image, path: Path, layers: int = 1) -> list[str]:
    """Write `labels` the way Slicer's segmentation storage node does: label values in segment order (not FLARE22
    ids), segments named by the user or identified only by terminology, cropped to the painted extent, with
    the reference extent offset; with layers=2 the last segment sits on a second layer (overlapping segments)."""
    array = sitk.GetArrayFromImage(labels)  # k, j, i
    present = [int(v) for v in np.unique(array) if v]
    names = []
    segments, volumes = [], []
    for number, label in enumerate(present):
        organ = organ_by_label(label)
        # odd segments by a user-typed name only, even ones by terminology under Slicer's default name
        name = f"Segment_{number + 1}" if number % 2 == 0 else organ.name.upper()
        layer = 1 if layers == 2 and number == len(present) - 1 else 0
        segment = {"id": f"Segment_{number + 1}", "name": name, "color": [0.5, 0.5, 0.5], "labelValue": number + 1, "layer": layer}
        if number % 2 == 0:
            segment["terminology"] = terminology_entry(organ)
        segments.append(segment)
        names.append(name)
    layered = np.zeros((layers, *array.shape), dtype=np.uint8)
    for segment, label in zip(segments, present, strict=True):
        layered[segment["layer"]][array == label] = segment["labelValue"]
    nonzero = np.argwhere(layered.any(axis=0))
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1  # k, j, i
    cropped = layered[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].transpose(0, 3, 2, 1)  # -> layer, i, j, k
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(labels.GetDirection()).reshape(3, 3) * np.asarray(labels.GetSpacing())
    offset = lo[::-1]  # i, j, k
    ijk_to_lps[:3, 3] = np.asarray(labels.GetOrigin()) + ijk_to_lps[:3, :3] @ offset
    for segment in segments:
        segment["extent"] = [0, int(hi[2] - lo[2] - 1), 0, int(hi[1] - lo[1] - 1), 0, int(hi[0] - lo[0] - 1)]
    volumes = cropped if layers > 1 else cropped[0]
    slicerio.write_segmentation(str(path), {
        "voxels": volumes, "ijkToLPS": ijk_to_lps, "segments": segments, "referenceImageExtentOffset": [int(v) for v in offset],
        "containedRepresentationNames": ["Binary labelmap", "Closed surface"], "masterRepresentation": "Binary labelmap",
    })
    return names


def test_segment_writes_a_slicer_segmentation_and_uncertainty(case, tmp_path):
    out, report_path = tmp_path / "result.seg.nrrd", tmp_path / "uncertainty.json"
    code, events = run_engine(commands.segment_args(case["ct"], out, model=case["model"], device="cpu", uncertainty=report_path))
    assert code == 0, events
    stages = [e.stage for e in events if isinstance(e, ProgressUpdate)]
    assert {"preprocess", "segment", "postprocess", "write"} <= set(stages)
    assert any(isinstance(e, Message) and "wrote" in e.text for e in events)

    segmentation = slicerio.read_segmentation(str(out))
    ct = read_ct(case["ct"])
    voxels = np.asarray(segmentation["voxels"])
    assert voxels.shape == ct.GetSize()  # i, j, k: not cropped, on the CT grid
    expected = np.eye(4)
    expected[:3, :3] = np.asarray(ct.GetDirection()).reshape(3, 3) * ct.GetSpacing()
    expected[:3, 3] = ct.GetOrigin()
    assert np.allclose(segmentation["ijkToLPS"], expected)
    assert segmentation["segments"], "the random model predicts some organ somewhere"
    for segment in segmentation["segments"]:
        organ = organ_by_label(segment["labelValue"])
        assert segment["name"] == organ.display_name
        assert np.allclose(segment["color"], organ.color_float, atol=1e-5)
        assert match_organ(None, segment["terminology"]) == organ  # terminology alone identifies the organ
        assert segment["terminology"]["type"][1] == organ.type.value  # (scheme, value, meaning)
        assert segment["terminology"].get("typeModifier", [None, None])[1] == (organ.modifier.value if organ.modifier else None)
    assert same_geometry(read_labels(out, ct), ct)

    report = read_report(report_path)
    assert report["slice_axis"] == axial_axis(ct.GetDirection()) == 2
    assert [s["index"] for s in report["slices"]] == list(range(ct.GetSize()[2]))
    assert all(0.0 <= s["uncertainty"] <= 1.0 for s in report["slices"])
    ranked = rank_slices(report, annotated=PAINTED)
    assert ranked and not set(ranked) & set(PAINTED)


def test_segment_rejects_a_bad_uncertainty_name(case, tmp_path, capsys):
    code = main(["segment", str(case["ct"]), "-o", str(tmp_path / "o.seg.nrrd"), "--model", str(case["model"]),
                 "--uncertainty", str(tmp_path / "u.txt"), "--progress", "none"])
    assert code == 2 and "name the uncertainty report .json" in capsys.readouterr().err


@pytest.mark.parametrize("layers", [1, 2])
def test_finetune_accepts_slices_painted_in_slicer(case, tmp_path, layers):
    labels = keep_array_slices(sitk.ReadImage(str(case["labels"])), PAINTED)
    painted = tmp_path / "Segmentation.seg.nrrd"
    slicer_style_segmentation(labels, painted, layers)
    assert np.asarray(slicerio.read_segmentation(str(painted))["voxels"]).shape != sitk.ReadImage(str(case["ct"])).GetSize()  # cropped

    out = tmp_path / "model"
    settings = commands.FinetuneSettings(strategy="fs", preset="tiny", iterations=2)
    code, events = run_engine(commands.finetune_args([case["ct"]], [painted], out, settings, name="From Slicer", device="cpu"))
    assert code == 0, events
    losses = [e.loss for e in events if isinstance(e, ProgressUpdate) and e.stage == "finetune" and e.step > 0]
    assert len(losses) == 2 and all(np.isfinite(losses))
    card = json.loads((out / "model.json").read_text())
    assert card["name"] == "From Slicer"
    assert card["provenance"]["data"][0]["annotated_slices"] == PAINTED  # identity of axis 2 with array z
    reread = sitk.GetArrayFromImage(read_labels(painted, read_ct(case["ct"])))
    assert np.array_equal(reread, sitk.GetArrayFromImage(labels))  # the same organs on the same voxels


def test_prepare_annotation_and_write_back_keep_painted_slices(case, tmp_path):
    ct = read_ct(case["ct"])
    truth = sitk.ReadImage(str(case["labels"]))
    annotation = tmp_path / "annotation.seg.nrrd"
    slicer_style_segmentation(keep_array_slices(truth, PAINTED), annotation)

    painted = tmp_path / "painted.seg.nrrd"
    summary = prepare_annotation(case["ct"], annotation, painted)
    assert summary["slices"] == PAINTED and "liver" in summary["organs"]

    prediction = tmp_path / "prediction.seg.nrrd"
    code, events = run_engine(commands.segment_args(case["ct"], prediction, model=case["model"], device="cpu"))
    assert code == 0, events
    merged, written = tmp_path / "merged.seg.nrrd", tmp_path / "written.npz"
    write_back(case["ct"], prediction, painted, merged, summary["slices"], written)

    merged_labels = sitk.GetArrayFromImage(read_labels(merged, ct))
    predicted = sitk.GetArrayFromImage(read_labels(prediction, ct))
    assert np.array_equal(merged_labels[PAINTED], sitk.GetArrayFromImage(truth)[PAINTED])  # painted slices untouched
    others = [k for k in range(merged_labels.shape[0]) if k not in PAINTED]
    assert np.array_equal(merged_labels[others], predicted[others])
    assert len(slicerio.read_segmentation(str(merged))["segments"]) == len(ORGANS)  # all 13, ready to paint
    assert np.array_equal(load_written_labels(written, merged_labels.shape), merged_labels)

    # The user corrects slice 1 of the written-back result: slices 1 and the painted ones are annotated now.
    corrected = merged_labels.copy()
    corrected[1] = 0
    corrected[1, 10:20, 10:20] = 3
    image = sitk.GetImageFromArray(corrected)
    image.CopyInformation(ct)
    edited = tmp_path / "edited.seg.nrrd"
    write_labelmap(image, edited)
    again = tmp_path / "painted-2.seg.nrrd"
    summary = prepare_annotation(case["ct"], edited, again, recorded=PAINTED, written_path=written)
    assert summary["slices"] == sorted([1, *PAINTED])
    assert painted_slices(sitk.GetArrayFromImage(read_labels(again, ct)), 2) == sorted([1, *PAINTED])

    with pytest.raises(InputError, match="no annotated slice"):
        prepare_annotation(case["ct"], merged, tmp_path / "none.seg.nrrd", written_path=written)  # nothing changed since


@pytest.mark.parametrize("through_launcher", [False, True], ids=["python", "launcher"])
def test_cancel_stops_the_engine_and_writes_nothing(case, tmp_path, through_launcher):
    """Cancel during fine-tuning: the engine exits as cancelled and writes no model folder, also when it runs as the
    child of a launcher (as under PythonSlicer), where the engine is a grandchild of the run."""
    import os
    import time

    out = tmp_path / "cancelled"
    settings = commands.FinetuneSettings(strategy="fs", preset="tiny", iterations=100000)
    args = commands.finetune_args([case["ct"]], [case["labels"]], out, settings, device="cpu")
    env = commands.child_environment({**os.environ, "OMP_NUM_THREADS": "1"}, LIBRARY_PARENT)
    prefix = []
    if through_launcher:
        (tmp_path / "launcher.py").write_text(LAUNCHER)
        prefix = [sys.executable, str(tmp_path / "launcher.py")]
    run = BackgroundRun(prefix + commands.engine_command(sys.executable) + args, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        step = run.poll()
        assert not step.finished, step
        if any(isinstance(e, ProgressUpdate) and e.stage == "finetune" and e.step >= 1 for e in step.events):
            break
        time.sleep(0.05)
    run.cancel()
    result = run.wait(60)  # ends only once the engine has ended: it holds the output pipes
    assert run.cancel_requested
    if not through_launcher:  # the launcher itself is ended by the signal; the engine's status is its own
        assert result.returncode == commands.EXIT_CANCELLED
    assert "cancelled" in commands.describe_exit(result.returncode, run.stderr_tail)
    assert not out.exists()
