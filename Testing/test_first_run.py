"""A new user's first run: the bundled sample and `demo`, organ statistics, the preview PNG, models saved by name."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from DiffusionSegLib.anatomy_check import anatomy_warnings
from DiffusionSegLib.cli import main
from DiffusionSegLib.demo import SAMPLE_CT, demo_outputs
from DiffusionSegLib.imageio import read_ct, read_labels
from DiffusionSegLib.models import finetune_destination, is_bare_name, portable_path, read_card, resolve_model, user_models_dir
from DiffusionSegLib.organs import ORGANS, organ_by_label
from DiffusionSegLib.preview import PREVIEW_COLOURS, preview_size, render_preview, write_preview
from DiffusionSegLib.segment_statistics import add_trust, organ_statistics
from Training.benchmarks.phantom import make_phantom

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), pixel=sitk.sitkInt16) -> sitk.Image:
    im = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    im.SetSpacing(spacing)
    return im


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> dict:
    ct, labels = make_phantom(size=(64, 56, 16), spacing=(6.0, 6.0, 12.0), seed=5)
    folder = tmp_path_factory.mktemp("small-phantom")
    paths = {"ct_file": folder / "ct.nii.gz", "labels_file": folder / "labels.nii.gz"}
    sitk.WriteImage(ct, str(paths["ct_file"]))
    sitk.WriteImage(labels, str(paths["labels_file"]))
    return {"ct": ct, "labels": labels, **paths}


# --- the sample --------------------------------------------------------------------------------------


def test_the_sample_is_a_real_abdominal_ct_with_its_licence():
    ct = read_ct(SAMPLE_CT)
    assert SAMPLE_CT.stat().st_size < 2_500_000
    assert ct.GetSize() == (122, 101, 66) and ct.GetSpacing() == (3.0, 3.0, 3.0)
    hu = sitk.GetArrayViewFromImage(ct)
    assert hu.min() < -900 and hu.max() > 1000  # air and bone: Hounsfield units, not rescaled
    licence = (SAMPLE_CT.parent / "LICENSE.txt").read_text()
    assert "TotalSegmentator" in licence and "Apache License" in licence and "Version 2.0" in licence
    assert "abdomen-ct-a.nii.gz" in (SAMPLE_CT.parent / "README.md").read_text()
    # Installed with the package, not only present in a checkout.
    assert '"sample/*.nii.gz"' in (ROOT / "pyproject.toml").read_text()


# --- demo --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_demo_runs_offline_and_writes_segmentation_preview_and_statistics(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the demo must not use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "-o", out, "--device", "cpu", "--progress", "none"], capsys)
    assert code == 0, err
    files = demo_outputs(out)
    assert all(path.is_file() for path in files.values()) and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())
    for path in files.values():
        assert str(path) in stdout  # it says where they are

    ct = read_ct(SAMPLE_CT)
    labels = sitk.GetArrayFromImage(read_labels(files["segmentation"], ct))
    stats = json.loads(files["statistics"].read_text())
    assert set(stats["organs"]) == {o.name for o in ORGANS}
    liver = stats["organs"]["liver"]
    assert liver["present"] and liver["voxels"] == int((labels == 1).sum())
    assert liver["volume_ml"] == pytest.approx(liver["voxels"] * 27 / 1000, abs=1e-3)  # 3 mm isotropic voxels
    assert 500 < liver["volume_ml"] < 3000 and 0 < liver["mean_hu"] < 120  # a real liver, soft tissue
    with Image.open(files["preview"]) as png:
        assert png.format == "PNG" and png.size == preview_size()


def test_demo_refuses_a_file_as_its_folder(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    code, _, err = run(["demo", "-o", blocker, "--progress", "none"], capsys)
    assert code == 2 and str(blocker) in err and len(err.strip().splitlines()) == 1


# --- statistics --------------------------------------------------------------------------------------


def test_statistics_of_known_boxes():
    hu = np.full((10, 20, 30), -1000, np.int16)  # [k, j, i]
    labels = np.zeros(hu.shape, np.uint8)
    labels[2:7, 5:15, 10:20] = 1  # liver: 5 x 10 x 10 = 500 voxels on slices 2-6
    hu[2:7, 5:15, 10:15] = 40
    hu[2:7, 5:15, 15:20] = 60  # half at 40, half at 60 HU: mean 50, std 10
    labels[8, 0, 0] = 3  # spleen: one voxel on slice 8
    hu[8, 0, 0] = 100
    spacing = (0.5, 2.0, 4.0)  # 4 mm^3 voxels
    stats = organ_statistics(image(hu, spacing), image(labels, spacing, sitk.sitkUInt8))
    liver, spleen = stats["organs"]["liver"], stats["organs"]["spleen"]
    assert liver == {"label": 1, "present": True, "voxels": 500, "volume_ml": 2.0, "mean_hu": 50.0, "std_hu": 10.0, "slice_range": [2, 6],
                     "cut_off": False}
    assert spleen == {"label": 3, "present": True, "voxels": 1, "volume_ml": 0.004, "mean_hu": 100.0, "std_hu": 0.0, "slice_range": [8, 8],
                      "cut_off": False}
    assert stats["absent"] == [o.name for o in ORGANS if o.label not in (1, 3)]
    assert stats["organs"]["aorta"] == {"label": 5, "present": False, "voxels": 0, "volume_ml": 0.0, "mean_hu": None, "std_hu": None,
                                        "slice_range": None, "cut_off": None}
    labels[0, 3, 3] = 13  # a left kidney voxel on the first slice: the scan may cut it off
    assert organ_statistics(image(hu, spacing), image(labels, spacing, sitk.sitkUInt8))["organs"]["left kidney"]["cut_off"] is True


def test_statistics_of_the_phantom_match_a_hand_computation(small_phantom):
    ct, labels = small_phantom["ct"], small_phantom["labels"]
    stats = organ_statistics(ct, labels)
    hu, lab = sitk.GetArrayFromImage(ct).astype(np.float64), sitk.GetArrayFromImage(labels)
    voxel_ml = 6.0 * 6.0 * 12.0 / 1000
    present = sorted(int(v) for v in np.unique(lab) if v)
    assert len(present) >= 8
    for label in present:
        entry = stats["organs"][organ_by_label(label).name]
        values = hu[lab == label]
        slices = [k for k in range(lab.shape[0]) if (lab[k] == label).any()]
        assert entry["voxels"] == values.size
        assert entry["volume_ml"] == pytest.approx(values.size * voxel_ml, abs=1e-3)
        assert entry["mean_hu"] == pytest.approx(values.sum() / values.size, abs=0.006)
        assert entry["std_hu"] == pytest.approx(math.sqrt(((values - values.mean()) ** 2).mean()), abs=0.006)
        assert entry["slice_range"] == [slices[0], slices[-1]]
    assert stats["absent"] == [o.name for o in ORGANS if o.label not in present]


def test_statistics_refuse_a_labelmap_of_another_size(small_phantom):
    with pytest.raises(ValueError, match="differs"):
        organ_statistics(small_phantom["ct"], small_phantom["labels"][:, :, :8])


# --- preview -----------------------------------------------------------------------------------------


def test_preview_is_a_png_of_the_expected_size_with_organ_colours(small_phantom, tmp_path):
    path = write_preview(small_phantom["ct"], small_phantom["labels"], tmp_path / "sub" / "p.png", title="phantom")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as png:
        assert png.size == preview_size() == (4 * 256 + 190, 256 + 24)
        pixels = np.asarray(png.convert("RGB")).astype(int)
    axial = pixels[24:, :256]
    assert (np.abs(axial[..., 0] - axial[..., 2]) > 20).any()  # organs blended in colour over the grey CT
    legend = pixels[:, 4 * 256:].reshape(-1, 3)
    assert any((legend == PREVIEW_COLOURS[1]).all(axis=1))  # the liver's swatch in the preview's palette (test_preview.py)
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]  # written atomically: no temporary left


def test_preview_slices_and_errors(small_phantom):
    ct, labels = small_phantom["ct"], small_phantom["labels"]
    assert render_preview(ct, labels, slices=[3, 9]).size == preview_size(2)
    with pytest.raises(ValueError, match="outside"):
        render_preview(ct, labels, slices=[99])
    empty = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(labels)
    assert render_preview(ct, empty).size == preview_size()  # nothing found still gives a picture


def test_overlay_tool_draws_the_package_preview(small_phantom, tmp_path):
    out = tmp_path / "overlay.png"
    tool = ROOT / "Testing" / "tools" / "overlay.py"
    assert "matplotlib" not in tool.read_text()
    done = subprocess.run([sys.executable, str(tool), str(small_phantom["ct_file"]), str(small_phantom["labels_file"]), str(out), "--slices", "4", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as png:
        assert png.size == preview_size(2)


def test_segment_writes_statistics_and_preview_for_any_input(small_phantom, tmp_path, capsys):
    seg, stats_path, png = tmp_path / "p.seg.nrrd", tmp_path / "stats.json", tmp_path / "p.png"
    code, _, err = run(["segment", small_phantom["ct_file"], "-o", seg, "--statistics", stats_path, "--preview", png, "--device", "cpu",
                        "--progress", "none"], capsys)
    assert code == 0, err
    ct = read_ct(small_phantom["ct_file"])
    stats = json.loads(stats_path.read_text())
    labels = read_labels(seg, ct)
    card = read_card(resolve_model(None, "segmentor"))
    expected = {"image": str(small_phantom["ct_file"]), "model": card.name, **organ_statistics(ct, labels)}
    assert stats == json.loads(json.dumps(add_trust(expected, card.to_dict(), anatomy_warnings(ct, labels))))
    with Image.open(png) as picture:
        assert picture.size == preview_size()


@pytest.mark.parametrize(("flag", "name", "suffix"), [("--statistics", "stats.txt", ".json"), ("--preview", "p.jpg", ".png")])
def test_segment_refuses_other_file_types(flag, name, suffix, small_phantom, tmp_path, capsys):
    code, _, err = run(["segment", small_phantom["ct_file"], "-o", tmp_path / "p.seg.nrrd", flag, tmp_path / name, "--progress", "none"], capsys)
    assert code == 2 and name in err and suffix in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# --- models saved by name ----------------------------------------------------------------------------


def test_bare_names_and_paths():
    assert is_bare_name("my-model") and not is_bare_name("runs/m") and not is_bare_name("./m") and not is_bare_name("~/m")
    assert finetune_destination("my-model") == user_models_dir() / "my-model"
    assert finetune_destination("runs/m") == Path("runs/m")


def test_finetune_to_a_bare_name_is_listed_and_found_from_anywhere(small_phantom, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    train = ["--image", small_phantom["ct_file"], "--labels", small_phantom["labels_file"], "--strategy", "fs", "--preset", "tiny",
             "--iterations", "2", "--progress", "none"]
    code, _, err = run(["finetune", "-o", "my-model", *train], capsys)
    assert code == 0, err
    assert not (work / "my-model").exists() and (user_models_dir() / "my-model" / "model.json").is_file()
    code, stdout, _ = run(["models"], capsys)
    assert code == 0 and any(line.split()[:3] == ["my-model", "segmentor", "user"] for line in stdout.splitlines())

    monkeypatch.chdir(elsewhere)
    assert resolve_model("my-model", "segmentor") == user_models_dir() / "my-model"
    code, _, err = run(["segment", small_phantom["ct_file"], "-o", "out.nii.gz", "--model", "my-model", "--progress", "none"], capsys)
    assert code == 0, err
    assert (elsewhere / "out.nii.gz").is_file()

    # A path is written where asked, and so is a bare name that is an existing folder here.
    (elsewhere / "here").mkdir()
    assert run(["finetune", "-o", "sub/path-model", *train], capsys)[0] == 0
    assert run(["finetune", "-o", "here", *train], capsys)[0] == 0
    assert (elsewhere / "sub" / "path-model" / "model.json").is_file() and (elsewhere / "here" / "model.json").is_file()
    assert sorted(p.name for p in user_models_dir().iterdir()) == ["my-model"]


def test_train_sample_accepts_a_model_name(tiny_pretrained, tmp_path):
    from Training.cli import main as train_main

    shutil.copytree(tiny_pretrained, user_models_dir() / "tiny-named")
    prefix = tmp_path / "samples"
    assert train_main(["sample", "--model", "tiny-named", "-n", "1", "-o", str(prefix), "--sampler", "ddim", "--steps", "2", "--device", "cpu"]) == 0
    assert prefix.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE


# --- model cards: no absolute path of the training machine --------------------------------------------


def _strings(value: object):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("model", ["ddpm-pretrained", "flare22-segmentor"])
def test_bundled_cards_hold_no_absolute_path(model):
    card = json.loads((ROOT / "DiffusionSegLib" / "weights" / model / "model.json").read_text())
    absolute = [s for s in _strings(card["provenance"]) if s.startswith(("/", "\\")) or (len(s) > 2 and s[1] == ":" and s[2] in "/\\")]
    assert absolute == []


def test_portable_paths(tmp_path):
    from Training.model_cards import portable_provenance

    (tmp_path / "data").mkdir()
    assert portable_path(tmp_path / "data" / "ct.nii.gz") == "data/ct.nii.gz"
    card = {"run": "/home/someone/runs/pretrain128", "data": [{"image": "C:\\Users\\someone\\ct.nii.gz", "note": "kept"}], "n": 3}
    assert portable_provenance(card) == {"run": "runs/pretrain128", "data": [{"image": "someone/ct.nii.gz", "note": "kept"}], "n": 3}


def test_exported_card_names_files_without_this_machines_paths(tmp_path):
    from Training.cli import main as train_main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sitk.WriteImage(make_phantom(size=(48, 48, 6), spacing=(8.0, 8.0, 10.0), seed=2)[0], str(inputs / "abdomen-ct-a.nii.gz"))
    (inputs / "broken.nii.gz").write_bytes(b"not an image")
    slices, run_dir, model = tmp_path / "slices", tmp_path / "run", tmp_path / "exported"
    assert train_main(["prepare", str(inputs), "-o", str(slices), "--size", "64"]) == 0
    assert train_main(["pretrain", "--data", str(slices), "--out", str(run_dir), "--preset", "tiny", "--iterations", "2", "--batch-size", "2",
                       "--workers", "0", "--sample-every", "0", "--checkpoint-every", "2", "--no-progress"]) == 0
    assert train_main(["export", "--run", str(run_dir), "-o", str(model)]) == 0
    provenance = json.loads((model / "model.json").read_text())["provenance"]
    assert provenance["run"] == f"{tmp_path.name}/run" and provenance["data"]["slices_dir"] == f"{tmp_path.name}/slices"
    assert provenance["data"]["sources"] == [{"name": "abdomen-ct-a", "source": "TotalSegmentator test reference files, non-contrast abdomen and pelvis",
                                              "licence": "Apache-2.0"}]
    assert [s["source"] for s in provenance["data"]["skipped"]] == ["inputs/broken.nii.gz"]
    assert not [s for s in _strings(provenance) if str(tmp_path) in s]
