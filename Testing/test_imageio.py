"""Reading CTs and labels, writing labelmaps and Slicer segmentations: geometry, metadata, errors, atomic writes.

Synthetic images are built here (small, with identity, flipped and oblique directions); the real CTs under
../shared/data are used when present.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from DiffusionSegLib import imageio, seg_nrrd
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.imageio import read_ct, read_labels, write_labelmap
from DiffusionSegLib.organs import ORGANS, organ_by_label, terminology_entry, terminology_string
from DiffusionSegLib.seg_nrrd import segmentation_dict

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real CT data not available at {path} (../shared/data exists only in the project workspace and CI)")
    return path


def rotation(ax_deg: float, az_deg: float) -> tuple[float, ...]:
    """Rotation about x then z, as a row-major direction matrix."""
    ax, az = math.radians(ax_deg), math.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ rx).ravel())


DIRECTIONS = {
    "identity": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "flipped": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # NIfTI-style, as abdomen-ct-a
    "oblique": rotation(20, 20),
}
ABSENT = 10  # the esophagus is left out of the synthetic labels, as in abdomen-ct-a


def make_case(direction: str = "identity", size=(24, 20, 10), spacing=(1.5, 2.0, 3.0), origin=(-30.5, 12.25, 100.0), seed: int = 0):
    """A small CT (int16 HU, -1000..1000) and its labels (12 organs as boxes) on the same grid."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    hu = np.full((nz, ny, nx), -1000, dtype=np.int16)  # air around the body
    hu[:, 2:-2, 2:-2] = rng.integers(-100, 100, (nz, ny - 4, nx - 4))
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    boxes = [o.label for o in ORGANS if o.label != ABSENT]
    for n, label in enumerate(boxes):
        x, y = 2 + (n % 4) * (nx - 4) // 4, 2 + (n // 4) * (ny - 4) // 3
        labels[1 + n % (nz - 2): nz - 1, y:y + 3, x:x + 3] = label
    hu[labels > 0] = 40 + 10 * labels[labels > 0]
    hu[0, 0, 0], hu[-1, -1, -1] = -1000, 1000
    ct, lab = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(labels)
    for image in (ct, lab):
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(DIRECTIONS[direction])
    return ct, lab


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- labelmap and segmentation roundtrips ---------------------------------------------------------------


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_labelmap_roundtrip(direction, suffix, tmp_path):
    ct, labels = make_case(direction)
    path = write_labelmap(labels, tmp_path / "out" / f"labels{suffix}")  # the missing folder is created
    assert path == tmp_path / "out" / f"labels{suffix}"
    expected_files = ["labels.mhd", "labels.zraw"] if suffix == ".mhd" else [path.name]
    assert files_in(path.parent) == expected_files  # no temporary file or folder left

    back = read_labels(path, ct)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(array(back), array(labels))
    assert_same_geometry(back, ct, atol=0)
    # The file itself carries the geometry (NIfTI stores it in float32, hence the tolerance).
    on_disk = sitk.ReadImage(str(path))
    assert_same_geometry(on_disk, ct, atol=1e-4)
    np.testing.assert_array_equal(array(on_disk), array(labels))
    own_grid = read_labels(path)  # no reference: the file's own grid
    assert_same_geometry(own_grid, ct, atol=1e-4)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_seg_nrrd_segments_and_header(direction, tmp_path):
    ct, labels = make_case(direction)
    path = write_labelmap(labels, tmp_path / "result.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    present = [o for o in ORGANS if o.label != ABSENT]
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == [o.display_name for o in present]  # organs present, in id order
    for segment, organ in zip(segments, present, strict=True):
        assert segment["labelValue"] == organ.label and segment["layer"] == 0
        assert segment["color"] == pytest.approx([c / 255 for c in organ.color], abs=1e-6)
        assert segment["terminology"] == terminology_entry(organ)
    assert segments[-1]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    np.testing.assert_array_equal(segmentation["voxels"], array(labels).transpose(2, 1, 0))

    # The raw NRRD header, as Slicer reads it: LPS space, columns = direction x spacing, voxel 0 at the origin.
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior" and header["dimension"] == 3
    expected_axes = np.asarray(ct.GetDirection()).reshape(3, 3) * np.asarray(ct.GetSpacing())
    np.testing.assert_allclose(header["space directions"], expected_axes.T, atol=1e-12)
    np.testing.assert_allclose(header["space origin"], ct.GetOrigin(), atol=1e-12)
    assert header["Segment0_Tags"] == f"TerminologyEntry:{terminology_string(organ_by_label(1))}|"
    assert header["Segment1_Color"] == "0.72549 0.4 0.32549"  # right kidney (185, 102, 83)
    geometry = [float(v) for v in header["Segmentation_ConversionParameters"].split("|")[1].split(";")[:-1]]
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(segmentation["ijkToLPS"])
    np.testing.assert_allclose(np.reshape(geometry[:16], (4, 4)), ijk_to_ras)
    assert geometry[16:] == [0, 23, 0, 19, 0, 9]


def test_seg_nrrd_all_organs_template(tmp_path):
    _, labels = make_case()
    path = write_labelmap(labels, tmp_path / "template.seg.nrrd", all_organs=True)
    assert [s["name"] for s in slicerio.read_segmentation(str(path))["segments"]] == [o.display_name for o in ORGANS]
    empty = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    assert slicerio.read_segmentation(str(write_labelmap(empty, tmp_path / "empty.seg.nrrd")))["segments"] == []


def slicer_style_segmentation(labels: sitk.Image, names: dict[int, str], terminology: bool = False) -> dict:
    """A segmentation built segment by segment with slicerio, as other tools write them (own label values, layers)."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(labels.GetDirection()).reshape(3, 3) * np.asarray(labels.GetSpacing())
    matrix[:3, 3] = labels.GetOrigin()
    voxels = array(labels).transpose(2, 1, 0)
    segmentation = slicerio.create_segmentation(voxels.shape, matrix)
    for label, name in names.items():
        segment = {"name": name}
        if terminology:
            segment["terminology"] = terminology_entry(organ_by_label(label))
        slicerio.add_segment(segmentation, voxels == label, segment)
    return segmentation


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_seg_nrrd_cropped_with_totalsegmentator_names(direction, tmp_path):
    """Slicer may save a segmentation cropped to the painted extent; other tools name segments their own way."""
    ct, labels = make_case(direction)
    crop = labels[5:20, 4:15, 2:8]  # SimpleITK slicing keeps the physical placement
    names = {2: "kidney_right", 13: "kidney_left", 6: "inferior_vena_cava", 8: "adrenal_gland_left", 1: "liver", 9: "gallbladder"}
    segmentation = slicer_style_segmentation(crop, names)
    assert [s["labelValue"] for s in segmentation["segments"]] == [1, 2, 3, 4, 5, 6]  # not the FLARE22 ids
    path = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)

    back = read_labels(path, ct)
    assert_same_geometry(back, ct, atol=0)
    expected = np.zeros_like(array(labels))
    window = array(labels)[2:8, 4:15, 5:20]
    expected[2:8, 4:15, 5:20] = np.where(np.isin(window, list(names)), window, 0)
    np.testing.assert_array_equal(array(back), expected)


def test_seg_nrrd_overlapping_layers_and_terminology_only(tmp_path):
    ct, labels = make_case()
    liver = array(labels) == 1
    grown = liver | np.roll(liver, 1, axis=2)  # a spleen segment painted over part of the liver
    voxels = lambda mask: mask.transpose(2, 1, 0)  # noqa: E731
    matrix = slicer_style_segmentation(labels, {})["ijkToLPS"]
    segmentation = slicerio.create_segmentation(voxels(liver).shape, matrix)
    slicerio.add_segment(segmentation, voxels(liver), {"name": "Segment_1", "terminology": terminology_entry(organ_by_label(1))})
    slicerio.add_segment(segmentation, voxels(grown), {"name": "Segment_2", "terminology": terminology_entry(organ_by_label(3))})
    assert segmentation["voxels"].ndim == 4  # two layers
    path = tmp_path / "layers.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    with pytest.warns(UserWarning, match="two organs"):
        back = array(read_labels(path, ct))
    assert set(np.unique(back)) == {0, 3} and np.array_equal(back == 3, grown)  # the later segment wins


def test_seg_nrrd_written_by_slicer(tmp_path):
    """A segmentation Slicer itself wrote (slicerio's sample: 2 layers, 8 segments), its segments renamed to organs."""
    sample = Path(slicerio.__file__).parent / "data" / "SegmentationOverlapping.seg.nrrd"
    if not sample.exists():
        pytest.skip(f"slicerio's sample segmentation is not installed at {sample}")
    segmentation = slicerio.read_segmentation(str(sample))
    organs = [1, 3, 4, 5, 6, 9, 11, 2]  # the last one ("overlapping sphere") is on layer 1
    for segment, label in zip(segmentation["segments"], organs, strict=True):
        segment["name"] = organ_by_label(label).display_name.upper()
        del segment["terminology"]  # Slicer's chest codes (rib, lung, ...) would otherwise not match
    slicerio.write_segmentation(str(tmp_path / "renamed.seg.nrrd"), segmentation)
    reference = sitk.ReadImage(str(sample))  # Slicer's header as SimpleITK reads it: the CT grid
    with pytest.warns(UserWarning, match="two organs"):
        back = array(read_labels(tmp_path / "renamed.seg.nrrd", reference))
    expected = np.zeros(segmentation["voxels"].shape[1:], np.uint8)
    for segment, label in zip(segmentation["segments"], organs, strict=True):
        expected[slicerio.segment_mask(segmentation, segment)] = label
    np.testing.assert_array_equal(back, expected.transpose(2, 1, 0))


def test_seg_nrrd_unmatched_segment(tmp_path):
    ct, labels = make_case()
    path = tmp_path / "t.seg.nrrd"
    slicerio.write_segmentation(str(path), slicer_style_segmentation(labels, {1: "Liver", 3: "tumour"}))
    with pytest.raises(InputError, match=r"t.seg.nrrd: segments 'tumour' match none of the 13 FLARE22 organs; rename"):
        read_labels(path, ct)
    # An empty segment adds nothing, whatever its name.
    segmentation = slicer_style_segmentation(labels, {1: "Liver"})
    slicerio.add_segment(segmentation, np.zeros(segmentation["voxels"].shape, bool), {"name": "tumour"})
    slicerio.write_segmentation(str(path), segmentation)
    assert set(np.unique(array(read_labels(path, ct)))) == {0, 1}


def test_seg_nrrd_that_does_not_fit_the_ct(tmp_path):
    ct, labels = make_case()
    # Extends beyond the CT with labelled voxels there: pad the labels by 3 voxels and label the pad.
    big = sitk.ConstantPad(labels, (3, 0, 0), (0, 0, 0), 0)
    big[0, 5, 5] = 1
    slicerio.write_segmentation(str(tmp_path / "outside.seg.nrrd"), slicer_style_segmentation(big, {1: "liver"}))
    with pytest.raises(InputError, match=r"labels .*outside.seg.nrrd are on a different grid.*1 labelled voxels lie outside"):
        read_labels(tmp_path / "outside.seg.nrrd", ct)
    # Extends beyond the CT but empty there: fine.
    big[0, 5, 5] = 0
    slicerio.write_segmentation(str(tmp_path / "padded.seg.nrrd"), slicer_style_segmentation(big, {1: "liver"}))
    assert np.array_equal(array(read_labels(tmp_path / "padded.seg.nrrd", ct)) == 1, array(labels) == 1)
    # Half a voxel off, or another spacing.
    shifted = sitk.Image(labels)
    shifted.SetOrigin(np.add(labels.GetOrigin(), (0.75, 0, 0)).tolist())
    slicerio.write_segmentation(str(tmp_path / "shifted.seg.nrrd"), slicer_style_segmentation(shifted, {1: "liver"}))
    with pytest.raises(InputError, match="shifted.seg.nrrd are on a different grid.*origin"):
        read_labels(tmp_path / "shifted.seg.nrrd", ct)
    coarse = sitk.Image(labels)
    coarse.SetSpacing((3.0, 4.0, 6.0))
    slicerio.write_segmentation(str(tmp_path / "coarse.seg.nrrd"), slicer_style_segmentation(coarse, {1: "liver"}))
    with pytest.raises(InputError, match="coarse.seg.nrrd are on a different grid.*spacing 3 x 4 x 6 vs 1.5 x 2 x 3 mm"):
        read_labels(tmp_path / "coarse.seg.nrrd", ct)


def test_segmentation_saved_as_plain_nrrd_is_read_as_segmentation(tmp_path):
    """Its voxel values are segment label values, not FLARE22 ids: the segment names decide."""
    ct, labels = make_case()
    path = tmp_path / "renamed.nrrd"
    slicerio.write_segmentation(str(path), slicer_style_segmentation(labels, {13: "Left kidney", 12: "Duodenum"}))
    back = array(read_labels(path, ct))
    assert set(np.unique(back)) == {0, 12, 13} and np.array_equal(back == 13, array(labels) == 13)


# --- labelmap files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [14, 255])
def test_label_ids_outside_flare22(bad_value, tmp_path):
    ct, labels = make_case()
    labels[3, 3, 3] = bad_value
    path = write(labels, tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match=rf"bad.nii.gz: label ids {bad_value} are outside 0-13"):
        read_labels(path, ct)


def test_float_labelmap_holding_integers(tmp_path):
    ct, labels = make_case("oblique")
    back = read_labels(write(sitk.Cast(labels, sitk.sitkFloat32), tmp_path / "float.nrrd"), ct)
    assert back.GetPixelID() == sitk.sitkUInt8 and np.array_equal(array(back), array(labels))
    fraction = sitk.Cast(labels, sitk.sitkFloat32) * 0.5
    with pytest.raises(InputError, match="half.nrrd: label values are not whole numbers"):
        read_labels(write(fraction, tmp_path / "half.nrrd"), ct)


def test_labels_on_another_grid(tmp_path):
    ct, labels = make_case()
    ct_path = write(ct, tmp_path / "ct.nrrd")
    ct = read_ct(ct_path)
    other = sitk.Image([24, 20, 7], sitk.sitkUInt8)
    other.CopyInformation(labels[:, :, :7])
    with pytest.raises(InputError, match=r"labels .*other.nrrd are on a different grid than image .*ct.nrrd \(size 24 x 20 x 7 vs 24 x 20 x 10\)"):
        read_labels(write(other, tmp_path / "other.nrrd"), ct)
    flipped = sitk.Image(labels)
    flipped.SetDirection(DIRECTIONS["flipped"])
    with pytest.raises(InputError, match=r"flipped.nii.gz are on a different grid than image CT-42 \(direction"):
        read_labels(write(flipped, tmp_path / "flipped.nii.gz"), ct, image_name="CT-42")
    # Within tolerance (float32 rounding in other tools) is the same grid; the result gets the CT's exact geometry.
    nudged = sitk.Image(labels)
    nudged.SetOrigin(np.add(labels.GetOrigin(), (1e-5, -1e-5, 0)).tolist())
    assert_same_geometry(read_labels(write(nudged, tmp_path / "nudged.mha"), ct), ct, atol=0)


# --- reading CTs ----------------------------------------------------------------------------------------


def test_read_ct_errors_name_the_file(tmp_path):
    ct, labels = make_case()
    (tmp_path / "random.nii.gz").write_bytes(os.urandom(500))
    (tmp_path / "empty-folder").mkdir()
    for name in ("whole.nii", "whole.nii.gz", "whole.mha"):  # cut short, as by an interrupted download
        data = write(ct, tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
    cases = {
        tmp_path / "missing.nii.gz": "no such file or folder",
        tmp_path / "random.nii.gz": "cannot be read as a medical image",
        tmp_path / "cut-whole.nii": "the file is incomplete",  # ITK itself would read it, zero-filled
        tmp_path / "cut-whole.nii.gz": "the file is incomplete",
        tmp_path / "cut-whole.mha": "cannot be read as a medical image",
        tmp_path / "empty-folder": "folder holds no DICOM series",
        write(ct[:, :, 2], tmp_path / "slice.nrrd"): "not a 3D volume",
        write(ct[:, :, 2:3], tmp_path / "thin.nrrd"): "not a 3D volume",
        write(sitk.JoinSeries([ct, ct, ct]), tmp_path / "time.nrrd"): "4D image",
        write(sitk.Cast(sitk.RescaleIntensity(ct, 0, 255), sitk.sitkUInt8), tmp_path / "byte.nrrd"): "8-bit",
        write(labels, tmp_path / "labelmap.nii.gz"): "8-bit picture or a labelmap",
        write(ct + 1200, tmp_path / "no-air.nrrd"): "no air",
        write(sitk.Compose(ct, ct, ct), tmp_path / "rgb.nrrd"): "components per voxel",
    }
    for path, problem in cases.items():
        with pytest.raises(InputError, match=problem) as info:
            read_ct(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_read_ct_keeps_geometry_as_float(direction, tmp_path):
    ct, _ = make_case(direction)
    for suffix in (".nrrd", ".nii.gz", ".mha"):
        back = read_ct(write(ct, tmp_path / f"ct{suffix}"))
        assert back.GetPixelID() == sitk.sitkFloat32
        assert_same_geometry(back, ct, atol=1e-4)
        np.testing.assert_array_equal(array(back), array(ct).astype(np.float32))


def test_read_ct_drops_a_time_axis_of_one(tmp_path):
    ct, _ = make_case()
    back = read_ct(write(sitk.JoinSeries([ct]), tmp_path / "t1.nrrd"))
    assert back.GetDimension() == 3 and back.GetSize() == ct.GetSize()


def write_dicom_series(ct: sitk.Image, folder: Path, series_uid: str, modality: str = "CT") -> list[Path]:
    """One DICOM file per axial slice, with the tags ImageSeriesReader needs for geometry and HU."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(ct, sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        tags = {
            "0008|0060": modality,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        path = folder / f"{series_uid[-3:]}-{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        paths.append(path)
    return paths


def test_read_ct_dicom_series_folder_file_and_several_series(tmp_path):
    ct, _ = make_case("oblique", size=(16, 14, 6))
    files = write_dicom_series(ct, tmp_path / "study", "1.2.826.0.1.3680043.9.7001.100")
    back = read_ct(tmp_path / "study")
    assert_same_geometry(back, ct, atol=1e-4)
    np.testing.assert_array_equal(array(back), array(ct))
    # One file of the series stands for the series.
    assert_same_geometry(read_ct(files[2]), ct, atol=1e-4)
    # Two series in one folder: the one with the most slices, with a warning.
    write_dicom_series(ct[:, :, :3], tmp_path / "study", "1.2.826.0.1.3680043.9.7001.200")
    with pytest.warns(UserWarning, match=r"2 DICOM series found; reading series 1.2.826.0.1.3680043.9.7001.100 \(6 slices\)"):
        assert read_ct(tmp_path / "study").GetSize() == ct.GetSize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_ct(tmp_path / "study", "1.2.826.0.1.3680043.9.7001.200").GetSize()[2] == 3
    write_dicom_series(ct + 1200, tmp_path / "mr", "1.2.826.0.1.3680043.9.7001.300", modality="MR")
    with pytest.raises(InputError, match="mr: is a DICOM MR image, not CT"):
        read_ct(tmp_path / "mr")


# --- writing --------------------------------------------------------------------------------------------


def test_unsupported_output_format(tmp_path):
    _, labels = make_case()
    for name in ("out.png", "out", "out.nii.zip"):
        with pytest.raises(InputError, match="unsupported output format"):
            write_labelmap(labels, tmp_path / name)
    with pytest.raises(InputError, match="is a folder"):
        write_labelmap(labels, tmp_path)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("suffix, writer", [(".nii.gz", "sitk"), (".seg.nrrd", "slicerio")])
def test_failed_write_leaves_existing_output_untouched(suffix, writer, tmp_path, monkeypatch):
    _, labels = make_case()
    target = tmp_path / f"out{suffix}"
    target.write_bytes(b"earlier result")

    def fail_midway(path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    if writer == "sitk":
        monkeypatch.setattr(imageio.sitk, "WriteImage", lambda image, path, *a, **k: fail_midway(path))
    else:
        monkeypatch.setattr(seg_nrrd.slicerio, "write_segmentation", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        write_labelmap(labels, target)
    assert target.read_bytes() == b"earlier result"
    assert files_in(tmp_path) == [target.name]  # no temporary file left
    monkeypatch.undo()
    write_labelmap(labels, target)  # a later write replaces it
    np.testing.assert_array_equal(array(read_labels(target)), array(labels))


def test_written_files_carry_no_source_metadata(tmp_path):
    _, labels = make_case()
    labels.SetMetaData("0010|0010", "Doe^Jane")  # e.g. a patient name from a DICOM source
    for suffix in (".nrrd", ".mha", ".seg.nrrd"):
        assert "Doe^Jane" not in write_labelmap(labels, tmp_path / f"out{suffix}").read_bytes().decode("latin-1")
    assert labels.GetMetaData("0010|0010") == "Doe^Jane"  # the caller's image is unchanged


def test_segmentation_dict_is_what_slicerio_writes(tmp_path):
    _, labels = make_case("flipped")
    segmentation = segmentation_dict(labels)
    assert segmentation["voxels"].shape == labels.GetSize() and segmentation["voxels"].flags.f_contiguous
    assert [s["labelValue"] for s in segmentation["segments"]] == [o.label for o in ORGANS if o.label != ABSENT]


# --- real data ------------------------------------------------------------------------------------------


def test_real_ct_and_labels():
    ct = read_ct(shared("abdomen-ct-a", "ct.nii.gz"))
    raw = sitk.ReadImage(str(shared("abdomen-ct-a", "ct.nii.gz")))
    assert ct.GetSize() == (122, 101, 112) and ct.GetPixelID() == sitk.sitkFloat32
    assert_same_geometry(ct, raw, atol=0)
    np.testing.assert_allclose(ct.GetDirection(), DIRECTIONS["flipped"])
    labels = read_labels(shared("abdomen-ct-a", "labels.nii.gz"), ct)
    counts = np.bincount(array(labels).ravel(), minlength=14)
    assert counts[1] == 41602 and counts[6] == 2131 and counts[10] == 0


def test_real_labels_roundtrip_through_seg_nrrd(tmp_path):
    ct = read_ct(shared("abdomen-ct-a", "ct.nii.gz"))
    labels = read_labels(shared("abdomen-ct-a", "labels.nii.gz"), ct)
    path = write_labelmap(labels, tmp_path / "a.seg.nrrd")
    np.testing.assert_array_equal(array(read_labels(path, ct)), array(labels))
    assert_same_geometry(sitk.ReadImage(str(path)), ct, atol=1e-9)
    names = [s["name"] for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]]
    assert len(names) == 12 and "Esophagus" not in names


def test_real_dicom_series():
    ct = read_ct(shared("unlabeled", "crlm-ct-1004-dicom"))
    assert ct.GetSize() == (512, 512, 41)
    assert ct.GetSpacing()[2] == pytest.approx(5.0) and ct.GetSpacing()[0] == pytest.approx(0.8, abs=0.01)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(ct)
    assert stats.GetMinimum() < -900 and stats.GetMaximum() > 200  # rescaled to HU
