"""Reading CTs and labels, writing labelmaps and Slicer segmentations; every input problem is an InputError.

Images are SimpleITK images in LPS world coordinates (NIfTI's RAS is converted by SimpleITK on read).
`.seg.nrrd` files go through slicerio so segment names, colours and terminology survive.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio
from slicerio.segmentation import terminology_entry_from_string

from .errors import InputError
from .organs import NUM_CLASSES, ORGANS, match_organ, terminology_string

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
OUTPUT_SUFFIXES = (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES)

AIR_HU = -500.0  # a CT of a body always holds some air (outside the patient, lungs, bowel) below this
GEOMETRY_TOLERANCE = 1e-4  # relative to the voxel spacing


def _suffix(path: Path) -> str:
    """The format suffix, compound where it matters (.seg.nrrd, .nii.gz)."""
    name = path.name.lower()
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def check_output_path(path: str | Path) -> Path:
    """The output path if its format is supported; checked before any work so nothing is wasted."""
    path = Path(path).expanduser()
    if _suffix(path) not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: unsupported output format; use .seg.nrrd (Slicer segmentation) or a labelmap: {', '.join(LABELMAP_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give an output file name such as {path / 'segmentation.seg.nrrd'}")
    return path


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) that replaces `path` only if the block succeeds."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --- reading --------------------------------------------------------------------------------------------


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """DICOM series in `folder` (searched recursively): series instance UID -> its files in slice order."""
    series: dict[str, list[str]] = {}
    # ITK warns on stderr for every folder without DICOM files; that is expected while searching.
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        for root in [folder, *(p for p in sorted(folder.rglob("*")) if p.is_dir())]:
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(root)) or ():
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(root), uid)
                if len(files) > len(series.get(uid, ())):
                    series[uid] = list(files)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return series


def _series_files(folder: Path, series_uid: str | None) -> list[str]:
    """The files of one series: the requested one, or the largest."""
    series = dicom_series(folder)
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series; pass a DICOM series folder or an image file (NIfTI, NRRD, MHA)")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{folder}: no DICOM series {series_uid} (found {', '.join(series)})")
        return series[series_uid]
    uid, files = max(series.items(), key=lambda item: len(item[1]))
    if len(series) > 1:
        warnings.warn(f"{folder}: {len(series)} DICOM series found; using {uid} ({len(files)} slices), the largest", stacklevel=3)
    return files


def _read_image(path: Path, series_uid: str | None = None) -> sitk.Image:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_series_files(path, series_uid))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise InputError(f"{path}: cannot be read as a medical image ({reason}); check that the file is complete and is NIfTI, NRRD, MHA or DICOM") from e


def _check_volume(image: sitk.Image, path: Path) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); a CT has one")
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) < 2:
        raise InputError(f"{path}: is not a 3D volume (size {' x '.join(map(str, size))}); pass the whole CT series, not a single slice")


def read_ct(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """A CT in Hounsfield units as a float32 3D image, from a file or a DICOM series folder.

    In a folder with several series, `series_uid` picks one; by default the largest is read.
    """
    path = Path(path).expanduser()
    image = _read_image(path, series_uid)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # some converters add a time axis of 1
        image = image[:, :, :, 0]
    _check_volume(image, path)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if low >= 0 and high <= 255:
        raise InputError(f"{path}: intensities lie in {low:g}..{high:g}, an 8-bit image or labelmap, not a CT in Hounsfield units")
    if low > AIR_HU:
        raise InputError(
            f"{path}: no air in the image (lowest value {low:g}, a CT has air at about -1000 HU); "
            "it is not a CT in Hounsfield units, or its rescale intercept was lost in conversion"
        )
    return sitk.Cast(image, sitk.sitkFloat32)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    tol = GEOMETRY_TOLERANCE * min(b.GetSpacing())
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-3))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=GEOMETRY_TOLERANCE)
    )


def _describe(image: sitk.Image) -> str:
    size = "x".join(map(str, image.GetSize()))
    spacing = "x".join(f"{s:g}" for s in image.GetSpacing())
    origin = ", ".join(f"{o:.1f}" for o in image.GetOrigin())
    return f"size {size}, spacing {spacing} mm, origin ({origin})"


def _check_label_values(array: np.ndarray, path: Path) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: label values are not whole numbers; pass a labelmap of FLARE22 ids 0-13")
    values = np.unique(array)
    bad = values[(values < 0) | (values >= NUM_CLASSES)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:8].astype(float))
        raise InputError(f"{path}: label ids {shown} are outside 0-13; FLARE22 ids are 1 liver ... 13 left kidney (see README)")
    return array.astype(np.uint8)


def _segmentation_to_labelmap(path: Path) -> sitk.Image:
    """A .seg.nrrd as a FLARE22 labelmap on its own (possibly cropped) grid."""
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as e:  # slicerio/pynrrd raise a variety of errors for broken files
        raise InputError(f"{path}: cannot be read as a Slicer segmentation ({e}); save it again from Slicer as .seg.nrrd") from e
    voxels = np.asarray(segmentation["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[None]
    labels = np.zeros(layers.shape[1:], dtype=np.uint8)
    unmatched = []
    for segment in segmentation.get("segments", []):
        organ = match_organ(segment.get("name"), segment.get("terminology"))
        if organ is None:
            unmatched.append(segment.get("name") or segment.get("id") or "?")
            continue
        labels[layers[segment.get("layer", 0)] == segment.get("labelValue", 1)] = organ.label
    if unmatched:
        raise InputError(
            f"{path}: segments {', '.join(repr(n) for n in unmatched)} match no FLARE22 organ; rename them "
            f"(e.g. 'Liver', 'Right kidney') or delete them in Slicer's Segment Editor"
        )
    # slicerio keeps voxels in i, j, k (x, y, z) order; SimpleITK arrays are z, y, x.
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


def _onto_reference(labels: sitk.Image, reference: sitk.Image, path: Path) -> sitk.Image:
    """Labels cropped to the painted extent (as Slicer saves them) placed back on the reference grid."""
    same_axes = np.allclose(labels.GetSpacing(), reference.GetSpacing(), rtol=GEOMETRY_TOLERANCE) and np.allclose(
        labels.GetDirection(), reference.GetDirection(), atol=GEOMETRY_TOLERANCE
    )
    if same_axes:
        start = np.array(reference.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
        end = start + np.array(labels.GetSize()) - 1
        aligned = np.allclose(start, np.round(start), atol=1e-3)
        inside = np.all(np.round(start) >= 0) and np.all(np.round(end) <= np.array(reference.GetSize()) - 1)
        if aligned and inside:
            return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    raise InputError(
        f"{path}: labels are on a different grid than the image ({_describe(labels)} vs {_describe(reference)}); "
        "paint the labels on this CT (or resample them onto it) and save again"
    )


def read_labels(path: str | Path, reference: sitk.Image | None = None) -> sitk.Image:
    """A uint8 FLARE22 labelmap from a labelmap file or a .seg.nrrd, on exactly `reference`'s grid.

    Without a reference the labels keep their own grid (used when comparing two labelmaps).
    """
    path = Path(path).expanduser()
    if _suffix(path) == SEGMENTATION_SUFFIX:
        labels = _segmentation_to_labelmap(path) if path.exists() else _read_image(path)
    else:
        image = _read_image(path)
        _check_volume(image, path)
        labels = sitk.GetImageFromArray(_check_label_values(sitk.GetArrayViewFromImage(image), path))
        labels.CopyInformation(image)
    if reference is None:
        return labels
    if not _same_grid(labels, reference):
        labels = _onto_reference(labels, reference, path)
    labels.CopyInformation(reference)  # within tolerance: make it exact
    return labels


# --- writing --------------------------------------------------------------------------------------------


def segmentation_dict(labelmap: sitk.Image) -> dict:
    """slicerio's segmentation structure for a FLARE22 labelmap: all 13 organs as segments on one layer.

    Every organ gets a segment, present or not, so a segmentation written here is also the ready-to-paint
    template the user annotates, with the names and terminology fine-tuning matches on.
    """
    direction = np.asarray(labelmap.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.asarray(labelmap.GetSpacing())
    ijk_to_lps[:3, 3] = labelmap.GetOrigin()
    voxels = sitk.GetArrayFromImage(labelmap).astype(np.uint8).transpose(2, 1, 0)
    segments = [
        {
            "id": f"Segment_{organ.label}",
            "name": organ.display_name,
            "color": list(organ.color_float),
            "labelValue": organ.label,
            "layer": 0,
            "terminology": terminology_entry_from_string(terminology_string(organ)),
        }
        for organ in ORGANS
    ]
    return {"voxels": voxels, "ijkToLPS": ijk_to_lps, "segments": segments, "containedRepresentationNames": ["Binary labelmap"]}


def write_labelmap(labelmap: sitk.Image, path: str | Path) -> Path:
    """Write a FLARE22 labelmap as a Slicer segmentation (.seg.nrrd) or a labelmap file, atomically."""
    path = check_output_path(path)
    labelmap = sitk.Cast(labelmap, sitk.sitkUInt8)
    with atomic_write_path(path) as tmp:
        if _suffix(path) == SEGMENTATION_SUFFIX:
            slicerio.write_segmentation(str(tmp), segmentation_dict(labelmap))
        else:
            sitk.WriteImage(labelmap, str(tmp), useCompression=True)
    return path
