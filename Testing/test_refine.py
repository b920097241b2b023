"""`diffusionseg refine`: one annotate-and-fine-tune round in one process, what the Slicer module's Fine-tune runs.

On a phantom CT annotated the way the module prepares it (all 13 organ segments, two painted): the annotated slices
are annotated for the painted organs only, the result keeps them exactly as painted, the model, report and merged
labels are written; a second round reads its corrections against the labels written back; the organs not painted
are kept from a segmentation model as base; bad input is one line before any work; a failed or cancelled round
(also cancelled as the module cancels it, through the bridge's job object) leaves the earlier outputs as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from slicer_helpers import random_tiny_segmentor

from DiffusionSegLib import refine as refine_module
from DiffusionSegLib.bridge import commands
from DiffusionSegLib.bridge.job import BackgroundJobs
from DiffusionSegLib.bridge.painting import load_written_labels, save_written_labels
from DiffusionSegLib.bridge.progress_parser import Message, ProgressParser, ProgressUpdate
from DiffusionSegLib.bridge.slice_ranking import read_report
from DiffusionSegLib.cli import main
from DiffusionSegLib.errors import Cancelled, InputError
from DiffusionSegLib.finetune import FinetuneConfig
from DiffusionSegLib.imageio import read_ct, read_labels, write_labelmap
from DiffusionSegLib.inference import segment_ct
from DiffusionSegLib.models import load_segmentor
from DiffusionSegLib.organs import ORGANS
from DiffusionSegLib.refine import RefineOutputs, read_annotation, refine
from DiffusionSegLib.seg_nrrd import segment_organs
from Training.benchmarks.phantom import make_phantom

LIVER, SPLEEN, GALLBLADDER = 1, 3, 9
FAST = ["--strategy", "fs", "--preset", "tiny", "--iterations", "2", "--device", "cpu"]
LIBRARY_PARENT = Path(__file__).resolve().parents[1]


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.CopyInformation(reference)
    return image


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A phantom CT, its labels, and an annotation as the Slicer module saves it: 13 organ segments, the liver and the
    spleen painted on three axial slices, the other 11 segments empty."""
    folder = tmp_path_factory.mktemp("refine")
    ct, labels = make_phantom(size=(56, 48, 14), spacing=(7.0, 7.0, 14.0), seed=5)
    truth = sitk.GetArrayFromImage(labels)
    both = [k for k in range(truth.shape[0]) if (truth[k] == LIVER).any() and (truth[k] == SPLEEN).any()]
    painted_slices = both[:: max(1, len(both) // 3)][:3]
    painted = np.zeros_like(truth)
    for k in painted_slices:
        painted[k] = np.where(np.isin(truth[k], [LIVER, SPLEEN]), truth[k], 0)
    paths = {"ct": folder / "ct.nrrd", "annotation": folder / "annotation.seg.nrrd"}
    sitk.WriteImage(ct, str(paths["ct"]))
    write_labelmap(image_like(painted, labels), paths["annotation"], all_organs=True)
    return {**paths, "folder": folder, "truth": truth, "painted": painted, "slices": painted_slices, "reference": labels}


def run_main(args: list) -> tuple[int, list, str]:
    """`diffusionseg` in this process: exit status, the JSON progress events on stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    parser = ProgressParser()
    return code, parser.feed(out.getvalue()) + parser.flush(), err.getvalue()


@pytest.fixture(scope="module")
def first_round(case) -> dict:
    out = case["folder"] / "round-1"
    out.mkdir()
    paths = {"model": out / "model", "result": out / "result.seg.nrrd", "uncertainty": out / "uncertainty.json", "written": out / "written.npz"}
    code, events, err = run_main(["refine", "--image", case["ct"], "--annotation", case["annotation"], "-o", paths["model"],
                                  "--result", paths["result"], "--uncertainty", paths["uncertainty"], "--written-output", paths["written"],
                                  "--name", "Round 1", "--progress", "json", *FAST])
    assert code == 0, err
    return {**paths, "events": events}


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256): what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refine_learns_the_painted_organs_and_keeps_the_annotated_slices(case, first_round):
    events = first_round["events"]
    messages = [e.text for e in events if isinstance(e, Message)]
    assert any(m.endswith("annotated for liver, spleen") for m in messages), messages
    assert {"finetune", "segment", "write"} <= {e.stage for e in events if isinstance(e, ProgressUpdate)}
    assert messages[-1].startswith(f"kept the {len(case['slices'])} annotated slices as painted; wrote ")

    # Partial labels: the 11 empty segments label nothing. (finetune on the same file counts every segment as labelled.)
    assert segment_organs(case["annotation"]) == {o.label for o in ORGANS}
    card = json.loads((first_round["model"] / "model.json").read_text())
    assert card["name"] == "Round 1" and card["strategy"] == "fs"
    data = card["provenance"]["data"][0]
    assert data["labelled_organs"] == ["liver", "spleen"] and data["annotated_slices"] == case["slices"]
    assert len(card["provenance"]["training_slices"]["unlabelled_organs"]) == 11

    # The result: the new model's segmentation, with the annotated slices exactly as painted (background included).
    ct = read_ct(case["ct"])
    result = sitk.GetArrayFromImage(read_labels(first_round["result"], ct))
    assert np.array_equal(result[case["slices"]], case["painted"][case["slices"]])
    segmentor, model_card = load_segmentor(first_round["model"])
    predicted = sitk.GetArrayFromImage(segment_ct(ct, segmentor, model_card.preprocessing, torch.device("cpu"), cleanup=model_card.cleanup))
    others = [k for k in range(result.shape[0]) if k not in case["slices"]]
    assert np.array_equal(result[others], predicted[others])
    assert len(slicerio.read_segmentation(str(first_round["result"]))["segments"]) == len(ORGANS)  # all 13, ready to paint again
    report = read_report(first_round["uncertainty"])
    assert report["num_slices"] == result.shape[0] and report["slice_axis"] == 2
    assert np.array_equal(load_written_labels(first_round["written"], result.shape), result)  # the next round's reference


def test_second_round_reads_corrections_against_the_labels_written_back(case, tmp_path):
    """After a write-back the segmentation holds the model's output everywhere: only the recorded slices and the slices the
    user corrected are annotated, for the organs painted on them and those erased there."""
    truth, slices, reference = case["truth"], case["slices"], case["reference"]
    written = truth.copy()  # a model that found every organ everywhere ...
    written[slices] = case["painted"][slices]  # ... written back around the painted slices
    save_written_labels(written, tmp_path / "written.npz")
    corrected = next(k for k in range(truth.shape[0]) if k not in slices and (truth[k] == GALLBLADDER).any())
    current = written.copy()
    current[corrected][current[corrected] == GALLBLADDER] = 0  # the user erases the gallbladder there
    annotation = tmp_path / "round-2.seg.nrrd"
    write_labelmap(image_like(current, reference), annotation, all_organs=True)

    painted = read_annotation(case["ct"], annotation, recorded=slices, written=tmp_path / "written.npz")
    assert painted.slices == sorted([*slices, corrected])
    on_corrected = {int(v) for v in np.unique(current[corrected]) if v}
    assert painted.labelled == {LIVER, SPLEEN, GALLBLADDER} | on_corrected  # erased: labelled as absent there
    labels = sitk.GetArrayFromImage(painted.labels)
    assert np.array_equal(labels[painted.slices], current[painted.slices]) and not labels[[k for k in range(len(labels)) if k not in painted.slices]].any()

    # Without the written labels every slice with a label is annotated (what the status line shows too).
    assert read_annotation(case["ct"], annotation).slices == [k for k in range(len(current)) if current[k].any()]
    # An explicit organ list may name more organs than painted, never fewer.
    assert read_annotation(case["ct"], case["annotation"], organs={LIVER, SPLEEN, 13}).labelled == {LIVER, SPLEEN, 13}
    with pytest.raises(InputError, match="spleen, which --organs leaves out"):
        read_annotation(case["ct"], case["annotation"], organs={LIVER})


def test_refine_from_a_segmentation_model_keeps_the_organs_it_knew(case, tmp_path):
    base = random_tiny_segmentor(tmp_path / "base", name="Base")
    code, events, err = run_main(["refine", "--image", case["ct"], "--annotation", case["annotation"], "-o", tmp_path / "model",
                                  "--result", tmp_path / "result.nii.gz", "--base", base, "--strategy", "ft-dec", "--iterations", "2",
                                  "--device", "cpu", "--progress", "json"])
    assert code == 0, err
    partial = next(e.text for e in events if isinstance(e, Message) and e.text.startswith("partial labels:"))
    assert "kept as the base model knows them" in partial and "right kidney" in partial and "liver" not in partial.split(";")[0]
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["provenance"]["base"]["kind"] == "segmentor" and card["provenance"]["data"][0]["labelled_organs"] == ["liver", "spleen"]
    assert sitk.ReadImage(str(tmp_path / "result.nii.gz")).GetSize() == read_ct(case["ct"]).GetSize()  # a labelmap result works too


@pytest.mark.parametrize("problem, extra, named", [
    ("no slice", {"annotation": "empty"}, "no annotated slice"),
    ("background only", {"annotation": "empty", "--recorded-slices": "0"}, "hold no organ"),
    ("organ left out", {"--organs": "liver"}, "spleen, which --organs leaves out"),
    ("unknown organ", {"--organs": "liver,tumour"}, "'tumour'"),
    ("bad slice list", {"--recorded-slices": "3,x"}, "--recorded-slices 3,x"),
    ("slice outside", {"--recorded-slices": "99"}, "99 lie outside the CT's 14 axial slices"),
    ("no written file", {"--written": "missing.npz"}, "--written"),
    ("bad result name", {"--result": "result.png"}, "result.png"),
    ("result under a file", {"--result": "file/result.seg.nrrd"}, "is not a folder"),
    ("bad report name", {"--uncertainty": "u.txt"}, "--uncertainty"),
    ("bad written name", {"--written-output": "w.json"}, "--written-output"),
    ("model path is a file", {"-o": "file"}, "is not a DiffusionSeg model folder"),
])
def test_bad_input_is_one_line_before_any_work(case, tmp_path, problem, extra, named):
    empty = tmp_path / "empty.seg.nrrd"
    write_labelmap(image_like(np.zeros_like(case["truth"]), case["reference"]), empty, all_organs=True)
    (tmp_path / "file").write_text("not a model")
    given = {"--image": case["ct"], "--annotation": empty if extra.get("annotation") == "empty" else case["annotation"],
             "-o": tmp_path / "model", "--result": tmp_path / "result.seg.nrrd"}
    given.update({flag: tmp_path / value if flag in ("--written", "--result", "--uncertainty", "--written-output", "-o") else value
                  for flag, value in extra.items() if flag != "annotation"})
    before = sorted(p.name for p in tmp_path.iterdir())
    code, events, err = run_main(["refine", *[part for pair in given.items() for part in pair], *FAST, "--progress", "json"])
    assert code == 2, (problem, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusionseg: error:") and named in lines[0], (problem, lines)
    assert not [e for e in events if isinstance(e, ProgressUpdate)]  # nothing was trained or segmented
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # and nothing written


def test_a_failed_or_cancelled_round_leaves_the_earlier_outputs_as_they_were(case, first_round, tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    shutil.copytree(first_round["model"].parent, earlier)
    outputs = RefineOutputs.checked(earlier / "model", earlier / "result.seg.nrrd", uncertainty=earlier / "uncertainty.json",
                                    written=earlier / "written.npz")
    kept = digests(earlier)

    def cancelled(*args, **kwargs):
        raise Cancelled("stopped by signal 15")  # SIGTERM after training and segmenting, just before the writes

    with monkeypatch.context() as m:
        m.setattr(refine_module, "merge", cancelled)
        with pytest.raises(Cancelled):
            refine(case["ct"], case["annotation"], outputs, config=FinetuneConfig(strategy="fs", iterations=1), preset="tiny", device="cpu")
    assert digests(earlier) == kept and sorted(p.name for p in earlier.iterdir()) == top_level(kept)

    # The result cannot be written (disk full): the model and the report before it are new, the merged labels after it are
    # not, so the labels written back never describe a result that is not there.
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(refine_module, "write_labelmap", disk_full)
        with pytest.raises(InputError, match=r"result.seg.nrrd: cannot be written \(No space left on device\); written before it: .*model, .*uncertainty.json"):
            refine(case["ct"], case["annotation"], outputs, config=FinetuneConfig(strategy="fs", iterations=1), preset="tiny", device="cpu")
    after = digests(earlier)
    assert after["result.seg.nrrd"] == kept["result.seg.nrrd"] and after["written.npz"] == kept["written.npz"]
    assert after["model/weights.safetensors"] != kept["model/weights.safetensors"]
    assert sorted(p.name for p in earlier.iterdir()) == top_level(kept)  # no staging leftovers


def top_level(files: dict[str, str]) -> list[str]:
    """The names directly in the folder `digests` described."""
    return sorted({name.split("/")[0] for name in files})


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals; Windows ends the tree at once")
def test_cancel_through_the_modules_job_writes_nothing(case, first_round, tmp_path):
    """The module's way: `python -m DiffusionSegLib refine` as the bridge's job, cancelled while it fine-tunes."""
    shutil.copytree(first_round["model"].parent, tmp_path / "earlier")
    earlier = tmp_path / "earlier"
    kept = digests(earlier)
    settings = commands.FinetuneSettings(strategy="fs", preset="tiny", iterations=100000)
    args = commands.refine_args(case["ct"], case["annotation"], earlier / "model", earlier / "result.seg.nrrd", settings,
                                written_output=earlier / "written.npz", uncertainty=earlier / "uncertainty.json",
                                organs=["liver", "spleen"], device="cpu")
    env = commands.child_environment({**os.environ, "OMP_NUM_THREADS": "1"}, LIBRARY_PARENT)
    jobs = BackgroundJobs()
    events, ends = [], []
    jobs.start_job([commands.engine_command(sys.executable) + args], ends.append, events.append, env=env)
    deadline = time.monotonic() + 240
    while not any(isinstance(e, ProgressUpdate) and e.stage == "finetune" and e.step >= 1 for e in events):
        assert jobs.poll(), f"the run ended before fine-tuning: {ends}"
        assert time.monotonic() < deadline, "fine-tuning did not start"
        time.sleep(0.05)
    assert jobs.cancel()
    deadline = time.monotonic() + 60
    while jobs.poll():
        assert time.monotonic() < deadline, "the cancelled run did not end"
        time.sleep(0.05)
    assert len(ends) == 1 and ends[0].cancelled, ends
    assert digests(earlier) == kept and sorted(p.name for p in earlier.iterdir()) == top_level(kept)
