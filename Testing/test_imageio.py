"""Reading CTs and labels, writing labelmaps and Slicer segmentations: geometry, metadata, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import same_geometry, shared_data
from phantom import FLIPPED_DIRECTION, make_phantom, oblique_direction

from DiffusionSegLib.errors import InputError
from DiffusionSegLib.imageio import read_ct, read_labels, segmentation_dict, write_labelmap
from DiffusionSegLib.organs import ORGANS

DIRECTIONS = {"identity": None, "flipped": FLIPPED_DIRECTION, "oblique": oblique_direction((20, 0, 25))}



@pytest.fixture(params=list(DIRECTIONS))
def phantom(request):
    return make_phantom(size=(40, 36, 12), spacing=(6.0, 5.0, 10.0), direction=DIRECTIONS[request.param], seed=5)


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".nrrd", ".mha"])
def test_labelmap_roundtrip(phantom, suffix, tmp_path):
    ct, labels = phantom
    path = write_labelmap(labels, tmp_path / f"labels{suffix}")
    back = read_labels(path, ct)
    assert same_geometry(back, ct) and back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_seg_nrrd_has_slicer_metadata_and_geometry(phantom, tmp_path):
    ct, labels = phantom
    path = write_labelmap(labels, tmp_path / "result.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == [o.display_name for o in ORGANS]
    liver = segments[0]
    assert liver["labelValue"] == 1 and liver["layer"] == 0
    assert np.allclose(liver["color"], np.array(ORGANS[0].color) / 255, atol=1e-3)
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert segments[12]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    # The NRRD header places voxels where the CT is (what Slicer uses to load it).
    header_image = sitk.ReadImage(str(path))
    assert same_geometry(header_image, ct)


def test_seg_nrrd_cropped_extent_and_other_names(tmp_path):
    """Slicer saves segmentations cropped to the painted extent, with any segment names."""
    ct, labels = make_phantom(size=(40, 36, 12), spacing=(6.0, 5.0, 10.0), seed=5)
    crop = labels[5:30, 4:20, 2:9]  # keeps the physical placement
    seg = segmentation_dict(crop)
    seg["segments"] = [dict(s, name=name, terminology=None) for s, name in zip(seg["segments"], [
        "liver", "kidney_right", "spleen", "pancreas", "aorta", "inferior_vena_cava", "adrenal_gland_right", "adrenal_gland_left",
        "gallbladder", "esophagus", "stomach", "duodenum", "kidney_left"], strict=True)]
    for s in seg["segments"]:
        del s["terminology"]
    path = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    back = read_labels(path, ct)
    assert same_geometry(back, ct)
    expected = np.zeros_like(sitk.GetArrayViewFromImage(labels))
    expected[2:9, 4:20, 5:30] = sitk.GetArrayViewFromImage(labels)[2:9, 4:20, 5:30]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), expected)


def test_seg_nrrd_with_unknown_segment(tmp_path):
    ct, labels = make_phantom(size=(20, 20, 6), spacing=(10.0, 10.0, 20.0), seed=5)
    seg = segmentation_dict(labels)
    seg["segments"][3] = dict(seg["segments"][3], name="tumour")
    del seg["segments"][3]["terminology"]
    slicerio.write_segmentation(str(tmp_path / "t.seg.nrrd"), seg)
    with pytest.raises(InputError, match="'tumour'.*match no FLARE22 organ"):
        read_labels(tmp_path / "t.seg.nrrd", ct)


@pytest.mark.parametrize("bad_value", [14, 255])
def test_label_ids_outside_flare22(bad_value, tmp_path):
    ct, labels = make_phantom(size=(20, 20, 6), spacing=(10.0, 10.0, 20.0), seed=5)
    labels[3, 3, 3] = bad_value
    sitk.WriteImage(labels, str(tmp_path / "bad.nii.gz"))
    with pytest.raises(InputError, match=rf"bad.nii.gz: label ids {bad_value} are outside 0-13"):
        read_labels(tmp_path / "bad.nii.gz", ct)


def test_labels_on_another_grid(tmp_path):
    ct, labels = make_phantom(size=(20, 20, 6), spacing=(10.0, 10.0, 20.0), seed=5)
    other = sitk.Image([20, 20, 7], sitk.sitkUInt8)
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    with pytest.raises(InputError, match="other.nrrd: labels are on a different grid"):
        read_labels(tmp_path / "other.nrrd", ct)


def write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def test_read_ct_errors_name_the_file(tmp_path):
    ct, _ = make_phantom(size=(20, 20, 6), spacing=(10.0, 10.0, 20.0), seed=5)
    (tmp_path / "random.nii.gz").write_bytes(os.urandom(500))
    (tmp_path / "empty-folder").mkdir()
    cases = {
        str(tmp_path / "missing.nii.gz"): "no such file",
        str(tmp_path / "random.nii.gz"): "cannot be read",
        str(tmp_path / "empty-folder"): "no DICOM series",
        write(ct[:, :, 2], tmp_path / "slice.nrrd"): "not a 3D volume",
        write(ct[:, :, 2:3], tmp_path / "thin.nrrd"): "not a 3D volume",
        write(sitk.Cast(sitk.RescaleIntensity(ct, 0, 255), sitk.sitkUInt8), tmp_path / "byte.nrrd"): "8-bit",
        write(ct + 1200, tmp_path / "no-air.nrrd"): "no air",
        write(sitk.Compose(ct, ct, ct), tmp_path / "rgb.nrrd"): "components",
    }
    for path, problem in cases.items():
        with pytest.raises(InputError, match=problem) as info:
            read_ct(path)
        assert os.path.basename(path) in str(info.value)


def test_read_ct_keeps_geometry_as_float(phantom, tmp_path):
    ct, _ = phantom
    back = read_ct(write(ct, tmp_path / "ct.nrrd"))
    assert back.GetPixelID() == sitk.sitkFloat32 and same_geometry(back, ct)


def test_unsupported_output_and_atomic_failure(tmp_path, monkeypatch):
    _, labels = make_phantom(size=(20, 20, 6), spacing=(10.0, 10.0, 20.0), seed=5)
    with pytest.raises(InputError, match="unsupported output format"):
        write_labelmap(labels, tmp_path / "out.png")
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"earlier result")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", fail)
    with pytest.raises(RuntimeError):
        write_labelmap(labels, target)
    assert target.read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_real_ct_and_labels():
    ct = read_ct(shared_data("abdomen-ct-a", "ct.nii.gz"))
    assert ct.GetSize() == (122, 101, 112) and np.allclose(ct.GetDirection(), FLIPPED_DIRECTION)
    labels = read_labels(shared_data("abdomen-ct-a", "labels.nii.gz"), ct)
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=14)
    assert counts[1] == 41602 and counts[10] == 0


def test_real_labels_roundtrip_through_seg_nrrd(tmp_path):
    ct = read_ct(shared_data("abdomen-ct-a", "ct.nii.gz"))
    labels = read_labels(shared_data("abdomen-ct-a", "labels.nii.gz"), ct)
    back = read_labels(write_labelmap(labels, tmp_path / "a.seg.nrrd"), ct)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))
    assert same_geometry(sitk.ReadImage(str(tmp_path / "a.seg.nrrd")), ct)


def test_real_dicom_series():
    ct = read_ct(shared_data("unlabeled", "crlm-ct-1004-dicom"))
    assert ct.GetSize() == (512, 512, 41) and ct.GetSpacing()[2] == pytest.approx(5.0)
