"""The `diffusionseg` command end to end: fine-tune, segment, evaluate, errors, progress, cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from conftest import same_geometry, shared_data

from DiffusionSegLib.cli import main
from DiffusionSegLib.imageio import read_ct, write_labelmap
from DiffusionSegLib.inference import segment_ct
from DiffusionSegLib.models import load_segmentor, load_unet, save_model
from DiffusionSegLib.organs import organ_by_label
from DiffusionSegLib.progress import Progress
from Training.benchmarks.phantom import make_phantom, oblique_direction, write_dicom_series

FAST = ["--preset", "tiny", "--iterations", "3", "--progress", "none"]


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err



def keep_slices(labels: sitk.Image, indices) -> sitk.Image:
    """Labels with only the given axial (array z) slices painted."""
    array = sitk.GetArrayFromImage(labels)
    painted = np.zeros_like(array)
    painted[list(indices)] = array[list(indices)]
    image = sitk.GetImageFromArray(painted)
    image.CopyInformation(labels)
    return image


@pytest.fixture(scope="module")
def fs_model(tmp_path_factory, phantom_files) -> Path:
    out = tmp_path_factory.mktemp("fs") / "fs-model"
    assert main(["finetune", "--image", str(phantom_files["ct"]), "--labels", str(phantom_files["labels"]), "-o", str(out),
                 "--strategy", "fs", *FAST]) == 0
    return out


def test_finetune_fs_writes_a_model_with_provenance(fs_model, phantom_files):
    card = json.loads((fs_model / "model.json").read_text())
    assert card["kind"] == "segmentor" and card["strategy"] == "fs" and card["preset"] == "tiny"
    assert card["provenance"]["iterations"] == 3
    assert card["provenance"]["data"][0]["image"] == f"{phantom_files['ct'].parent.name}/ct.nii.gz"  # no absolute path of this machine
    assert card["provenance"]["base"] is None
    assert len(card["provenance"]["data"][0]["annotated_slices"]) > 4


@pytest.fixture(scope="module")
def liver_model(fs_model, tmp_path_factory) -> Path:
    """fs_model with its head's last layer set to say "liver" everywhere: a model whose right answer is known."""
    segmentor, card = load_segmentor(fs_model)
    final = segmentor.head.layers[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-10.0)
        final.bias[1] = 10.0  # FLARE22 id 1: liver
    return save_model(tmp_path_factory.mktemp("liver") / "liver-everywhere", card, segmentor.state_dict())


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".mha"])
def test_segment_output_matches_input_grid(fs_model, liver_model, phantom_files, tmp_path, capsys, suffix):
    ct = sitk.ReadImage(str(phantom_files["ct"]))
    # The file holds exactly what the engine predicts, on the input grid.
    out = tmp_path / f"result{suffix}"
    code, _, err = run(["segment", phantom_files["ct"], "-o", out, "--model", fs_model, "--progress", "none"], capsys)
    assert code == 0, err
    segmentor, card = load_segmentor(fs_model)
    expected = segment_ct(read_ct(phantom_files["ct"]), segmentor, card.preprocessing, torch.device("cpu"), None, Progress("none"), cleanup=False)
    labelmap = sitk.ReadImage(str(out))
    assert labelmap.GetPixelID() == sitk.sitkUInt8 and same_geometry(labelmap, ct)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labelmap), sitk.GetArrayViewFromImage(expected))
    # A model that sees liver everywhere gives liver across the CT, named as such: a background-only output fails here.
    code, _, err = run(["segment", phantom_files["ct"], "-o", out, "--model", liver_model, "--progress", "none"], capsys)
    assert code == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(labels)) <= {0, 1} and np.mean(labels == 1) > 0.9
    if suffix == ".seg.nrrd":
        assert [s["name"] for s in slicerio.read_segmentation(str(out))["segments"]] == [organ_by_label(1).display_name]


def test_segment_oblique_dicom_series(fs_model, tmp_path, capsys):
    ct, _ = make_phantom(size=(48, 40, 12), spacing=(6.0, 6.0, 10.0), direction=oblique_direction((10, 20, 15)), seed=2)
    folder = tmp_path / "dicom"
    write_dicom_series(ct, folder)
    out = tmp_path / "dicom.nii.gz"
    code, _, err = run(["segment", folder, "-o", out, "--model", fs_model, "--progress", "none"], capsys)
    assert code == 0, err
    assert same_geometry(sitk.ReadImage(str(out)), read_ct(folder))


def test_finetune_ft_dec_from_pretrained_with_seg_nrrd(tiny_pretrained, phantom_files, tmp_path, capsys):
    labels = keep_slices(sitk.ReadImage(str(phantom_files["labels"])), [6, 10, 14, 18])
    painted = tmp_path / "painted.seg.nrrd"
    write_labelmap(labels, painted)
    out = tmp_path / "ftdec"
    code, stdout, err = run(["finetune", "--image", phantom_files["ct"], "--labels", painted, "-o", out, "--base", tiny_pretrained,
                             "--iterations", "4", "--progress", "json", "--timestep", "10"], capsys)
    assert code == 0, err
    card = json.loads((out / "model.json").read_text())
    assert card["strategy"] == "ft-dec" and card["timestep"] == 10
    assert card["provenance"]["data"][0]["annotated_slices"] == [6, 10, 14, 18]
    assert card["provenance"]["base"]["path"] == f"{tiny_pretrained.parent.name}/{tiny_pretrained.name}"
    records = [json.loads(line) for line in stdout.splitlines()]
    steps = [r for r in records if r.get("stage") == "finetune" and r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"total", "loss", "elapsed", "eta"} <= set(r) for r in steps) and steps[-1]["eta"] == 0
    # ft-dec trained the decoder and head and left the pretrained encoder as it was.
    tuned, base = load_segmentor(out)[0].unet.state_dict(), load_unet(tiny_pretrained)[0].state_dict()
    encoder = [k for k in tuned if k.startswith(("input_blocks.", "time_embed.", "middle_block."))]
    decoder = [k for k in tuned if k.startswith("output_blocks.")]
    assert encoder and all(torch.equal(tuned[k], base[k]) for k in encoder)
    assert any(not torch.equal(tuned[k], base[k]) for k in decoder)

    # Keep improving the fine-tuned model: the base can be a segmentation model.
    again = tmp_path / "ftdec-2"
    code, _, err = run(["finetune", "--image", phantom_files["ct"], "--labels", painted, "-o", again, "--base", out,
                        "--iterations", "2", "--progress", "none"], capsys)
    assert code == 0, err
    base_record = json.loads((again / "model.json").read_text())["provenance"]["base"]
    assert base_record["kind"] == "segmentor"
    # The first stage's record travels along, so the card tells the whole recipe (its base, its iterations).
    assert base_record["provenance"]["base"]["name"] == "test-random-tiny" and base_record["provenance"]["iterations"] == 4


def test_evaluate(phantom_files, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code, stdout, _ = run(["evaluate", "--pred", phantom_files["labels"], "--ref", phantom_files["labels"], "--json", out], capsys)
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["mean_dsc"] == 1.0 and "liver" in metrics["organs"] and "mean" in stdout


def test_models_lists_user_models(fs_model, capsys):
    import shutil

    from DiffusionSegLib.models import user_models_dir

    shutil.copytree(fs_model, user_models_dir() / "mine")
    code, stdout, _ = run(["models"], capsys)
    assert code == 0 and "mine" in stdout and "segmentor" in stdout


# --- bad input: one line naming the file, exit status 2, nothing written -------------------------------


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path, phantom_files) -> dict[str, Path]:
    ct = sitk.ReadImage(str(phantom_files["ct"]))
    labels = sitk.ReadImage(str(phantom_files["labels"]))
    too_high = sitk.Cast(labels, sitk.sitkUInt8)
    too_high[5, 5, 5] = 14
    other_grid = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    (tmp_path / "corrupt.nii.gz").write_bytes(os.urandom(300))
    return {
        "ct": phantom_files["ct"],
        "labels": phantom_files["labels"],
        "corrupt": tmp_path / "corrupt.nii.gz",
        "flat": write(sitk.Image([64, 64], sitk.sitkInt16) - 1000, tmp_path / "flat.nrrd"),
        "photo": write(sitk.Cast(sitk.RescaleIntensity(ct, 0, 255), sitk.sitkUInt8), tmp_path / "photo.nrrd"),
        "id14": write(too_high, tmp_path / "id14.nii.gz"),
        "other_grid": write(other_grid, tmp_path / "other_grid.nii.gz"),
        "empty": write(labels * 0, tmp_path / "empty.nii.gz"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "corrupt", "flat", "photo", "id14", "other_grid", "empty", "no_model", "bad_model", "bad_suffix", "pair_count"],
)
def test_bad_input_is_one_clear_line(case, bad_inputs, fs_model, tmp_path, capsys, no_bundled_models):
    b = bad_inputs
    out_model = tmp_path / "new-model"
    finetune = ["finetune", "-o", out_model, "--strategy", "fs", *FAST]
    args, named = {
        "missing": (["segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "o.nii.gz", "--model", fs_model], "nope.nii.gz"),
        "corrupt": (["segment", b["corrupt"], "-o", tmp_path / "o.nii.gz", "--model", fs_model], "corrupt.nii.gz"),
        "flat": (["segment", b["flat"], "-o", tmp_path / "o.nii.gz", "--model", fs_model], "flat.nrrd"),
        "photo": (["segment", b["photo"], "-o", tmp_path / "o.nii.gz", "--model", fs_model], "photo.nrrd"),
        "id14": ([*finetune, "--image", b["ct"], "--labels", b["id14"]], "id14.nii.gz"),
        "other_grid": ([*finetune, "--image", b["ct"], "--labels", b["other_grid"]], "other_grid.nii.gz"),
        "empty": ([*finetune, "--image", b["ct"], "--labels", b["empty"]], "empty.nii.gz"),
        "no_model": (["segment", b["ct"], "-o", tmp_path / "o.nii.gz"], "no segmentation model"),
        "bad_model": (["segment", b["ct"], "-o", tmp_path / "o.nii.gz", "--model", tmp_path], str(tmp_path)),
        "bad_suffix": (["segment", b["ct"], "-o", tmp_path / "o.png", "--model", fs_model], "o.png"),
        "pair_count": ([*finetune, "--image", b["ct"], "--image", b["ct"], "--labels", b["labels"]], "--labels"),
    }[case]
    code, _, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusionseg: error:")
    assert named in lines[0]
    assert not (tmp_path / "o.nii.gz").exists() and not out_model.exists()


def test_corrupt_weights_are_reported(fs_model, phantom_files, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(fs_model, broken)
    (broken / "weights.safetensors").write_bytes(b"\x01" * 64)
    code, _, err = run(["segment", phantom_files["ct"], "-o", tmp_path / "o.nii.gz", "--model", broken], capsys)
    assert code == 2 and "weights.safetensors" in err and not (tmp_path / "o.nii.gz").exists()


# --- cancellation ------------------------------------------------------------------------------------


def test_sigterm_cancels_cleanly_and_keeps_the_earlier_model(fs_model, phantom_files, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(fs_model, out)
    before = (out / "weights.safetensors").read_bytes()
    cmd = [sys.executable, "-m", "DiffusionSegLib", "finetune", "--image", str(phantom_files["ct"]), "--labels",
           str(phantom_files["labels"]), "-o", str(out), "--strategy", "fs", "--preset", "tiny", "--iterations", "100000",
           "--progress", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if json.loads(line).get("step", 0) >= 2 or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 130
    assert "cancelled" in proc.stderr.read()
    assert (out / "weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- real CT -------------------------------------------------------------------------------------------


def test_real_ct_four_slices_then_segment(tiny_pretrained, tmp_path, capsys):
    """abdomen-ct-a: fine-tune on 4 annotated slices, segment the whole CT, exact geometry."""
    ct_path = shared_data("abdomen-ct-a", "ct.nii.gz")
    reference = sitk.ReadImage(str(shared_data("abdomen-ct-a", "labels.nii.gz")))
    annotated = np.flatnonzero(sitk.GetArrayViewFromImage(reference).any(axis=(1, 2)))
    four = annotated[np.linspace(0, len(annotated) - 1, 6).round().astype(int)[1:5]]
    painted = write(keep_slices(reference, four), tmp_path / "four.nii.gz")
    model = tmp_path / "real-model"
    code, _, err = run(["finetune", "--image", ct_path, "--labels", painted, "-o", model, "--base", tiny_pretrained,
                        "--iterations", "3", "--progress", "none"], capsys)
    assert code == 0, err
    assert json.loads((model / "model.json").read_text())["provenance"]["data"][0]["annotated_slices"] == sorted(int(i) for i in four)
    out = tmp_path / "real.seg.nrrd"
    code, _, err = run(["segment", ct_path, "-o", out, "--model", model, "--progress", "none"], capsys)
    assert code == 0, err
    assert same_geometry(sitk.ReadImage(str(out)), sitk.ReadImage(str(ct_path)))


def test_real_dicom_series_segment(fs_model, tmp_path, capsys):
    folder = shared_data("unlabeled", "crlm-ct-1004-dicom")
    out = tmp_path / "dicom.nrrd"
    code, _, err = run(["segment", folder, "-o", out, "--model", fs_model, "--progress", "none"], capsys)
    assert code == 0, err
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == (512, 512, 41)
    assert same_geometry(result, read_ct(folder))


def test_finetune_settings_file(phantom_files, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"iterations": 2, "ce_weight": 1.0, "augment": {"rotate_deg": 3.0}}))
    out = tmp_path / "m"
    code, _, err = run(["finetune", "--image", phantom_files["ct"], "--labels", phantom_files["labels"], "-o", out, "--strategy", "fs",
                        "--preset", "tiny", "--config", settings, "--seed", "7", "--progress", "none"], capsys)
    assert code == 0, err
    config = json.loads((out / "model.json").read_text())["provenance"]["config"]
    assert config["iterations"] == 2 and config["ce_weight"] == 1.0 and config["seed"] == 7
    assert config["augment"]["rotate_deg"] == 3.0 and config["augment"]["enabled"] is True

    settings.write_text(json.dumps({"iterations": 2, "augment": {"flip": True}}))
    code, _, err = run(["finetune", "--image", phantom_files["ct"], "--labels", phantom_files["labels"], "-o", tmp_path / "m2",
                        "--strategy", "fs", "--preset", "tiny", "--config", settings], capsys)
    assert code == 2 and "settings.json" in err and "flip" in err and not (tmp_path / "m2").exists()
