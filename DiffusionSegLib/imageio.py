"""Reading CTs and labels, writing labelmaps and Slicer segmentations; every input problem is an InputError.

Images are SimpleITK images in LPS world coordinates (SimpleITK converts NIfTI's RAS on read and write).
DICOM series selection lives in `dicom.py`, NIfTI header checks in `nifti_header.py`, `.seg.nrrd`
segments and layers in `seg_nrrd.py`, grid comparison and crop placement in `grid_placement.py`, and
the atomic write every output goes through in `atomic.py`.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .dicom import check_modality, dicom_info, quiet_itk, series_files
from .errors import InputError
from .grid_placement import different_grid, grid_differences, onto_reference, size_text
from .label_values import integer_labels
from .nifti_header import nifti_truncation
from .organs import FLARE22, LabelSet
from .seg_nrrd import is_slicer_segmentation, segmentation_to_labelmap, write_segmentation

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
OUTPUT_SUFFIXES = (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES)

AIR_HU = -500.0  # any body CT holds air (outside the patient, lungs, bowel) well below this
SOURCE_KEY = "DiffusionSeg.source"  # metadata key read_ct stores the input path under, for messages


def _suffix(path: Path) -> str:
    """The format suffix, compound where it matters (.seg.nrrd, .nii.gz)."""
    name = path.name.lower()
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def check_writable(path: str | Path, flag: str = "output", *, creates_folders: bool = True) -> Path:
    """`path` can be created (its folder, or the nearest existing one above, takes a new file), or InputError before any work.

    Tried with a real temporary file there: permission bits do not tell about read-only mounts, ACLs or a full
    quota. `creates_folders` (default): the writer makes missing folders (``atomic`` does), so the nearest existing
    one must take them; False: the folder itself must exist.
    """
    path = Path(path).expanduser()
    folder = path.parent
    while creates_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is not a folder; choose another path")
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write into {folder} ({e.strerror or e}); choose a folder you can write to") from e
    return path


def check_output_path(path: str | Path) -> Path:
    """The output path if its format is supported; checked before any work so nothing is wasted."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give an output file name such as {path / 'segmentation.seg.nrrd'}")
    if _suffix(path) not in OUTPUT_SUFFIXES:
        raise InputError(
            f"{path}: unsupported output format '{path.suffix or path.name}'; name the output .seg.nrrd (Slicer segmentation) "
            f"or give a labelmap file name ending in {', '.join(LABELMAP_SUFFIXES)}"
        )
    return check_writable(path)


# --- reading CTs ----------------------------------------------------------------------------------------


def _read_failed(path: Path, error: Exception) -> InputError:
    text = str(error)
    # The useful part of ITK's message is its "ITK ERROR: Class(0x...): ..." or "sitk::ERROR: ..." line.
    found = re.findall(r"(?:ITK ERROR: \w+\(0x[0-9a-fA-F]+\): |sitk::ERROR: )(.*)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = (found[-1] if found else lines[-1] if lines else type(error).__name__).strip()
    reason = re.sub(rf"""\s*(for )?["']?{re.escape(str(path))}["']?( for reading)?""", "", reason).rstrip(" .:")[:200]
    return InputError(
        f"{path}: cannot be read as a medical image ({reason}); check that the file is complete and is NIfTI, NRRD, MHA/MHD or DICOM"
    )


def _read_image(path: Path, series_uid: str | None = None) -> sitk.Image:
    """Any supported image: a file, a DICOM series folder, or one file of a DICOM series (reads the series)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path (and that the drive is mounted)")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes), e.g. an interrupted download, copy or export; copy or export it again")
    try:
        if path.is_dir():
            files = series_files(path, series_uid)
            info = dicom_info(Path(files[0]))
            if info:
                check_modality(path, info[1])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        info = dicom_info(path)
        if info is not None:
            check_modality(path, info[1])
            with quiet_itk():
                siblings = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), info[0])
            # One slice of a classic DICOM series: read the whole series it belongs to, as Slicer would.
            if len(siblings) > 1 and any(Path(f).resolve() == path.resolve() for f in siblings):
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(siblings)
                return reader.Execute()
        problem = nifti_truncation(path)
        if problem:
            raise InputError(f"{path}: the file is incomplete ({problem}), e.g. an interrupted download or copy; copy or export it again")
        return sitk.ReadImage(str(path))
    except (RuntimeError, OSError) as e:  # ITK reports every read problem as RuntimeError; OSError: permissions
        raise _read_failed(path, e) from e


def _as_volume(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """`image` as a single-component 3D image with at least 2 voxels along every axis."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour or vector image); {what} has one value per voxel"
        )
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # some converters add a time axis of length 1
        image = image[:, :, :, 0]
    if image.GetDimension() == 4:
        raise InputError(f"{path}: is a 4D image (size {size_text(image)}), e.g. a time series; pass a single 3D volume")
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise InputError(f"{path}: is not a 3D volume (size {size_text(image)}); pass the whole 3D series, not a single slice")
    return image


def read_ct(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """A CT in Hounsfield units as a float32 3D image with the file's geometry.

    `path` is a NIfTI/NRRD/MHA/MHD/DICOM file or a folder holding a DICOM series. In a folder with several
    series, `series_uid` picks one; by default the one with the most slices is read (with a warning).
    """
    path = Path(path).expanduser()
    image = _as_volume(_read_image(path, series_uid), path, "a CT")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and np.isnan(sitk.GetArrayViewFromImage(image)).any():
        raise InputError(f"{path}: contains NaN (not-a-number) voxels; re-export the CT from its source (DICOM)")
    stats = sitk.MinimumMaximumImageFilter()  # one pass, no copy: cheap even for 512 x 512 x 600
    stats.Execute(image)
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if low >= 0 and high <= 255:
        raise InputError(
            f"{path}: intensities lie in {low:g}..{high:g} (an 8-bit picture or a labelmap), not a CT in Hounsfield units; "
            "pass the original CT (DICOM, or NIfTI/NRRD in HU)"
        )
    if low > AIR_HU:
        raise InputError(
            f"{path}: no air in the image (lowest value {low:g}, but air is about -1000 HU); it is not a CT in Hounsfield units, "
            "or its rescale slope/intercept was lost in conversion; pass the original CT (DICOM, or NIfTI/NRRD in HU)"
        )
    ct = sitk.Cast(image, sitk.sitkFloat32)
    ct.SetMetaData(SOURCE_KEY, str(path))
    return ct


# --- reading labels -------------------------------------------------------------------------------------


def read_labels(path: str | Path, reference: sitk.Image | None = None, *, image_name: str | Path | None = None,
                label_set: LabelSet = FLARE22) -> sitk.Image:
    """A uint8 labelmap of `label_set`'s ids (the model's; FLARE22's by default) from a labelmap file or a Slicer .seg.nrrd,
    on exactly `reference`'s grid.

    Labelmap files must hold the set's ids (0-13 for FLARE22) on the reference grid. A .seg.nrrd's segments are mapped
    to the set's organs by terminology or name (`LabelSet.match`) and it may be cropped to the painted extent. Without a reference the
    labels keep their own grid (when comparing two labelmaps). `image_name` names the reference in messages;
    by default the path read_ct read it from.
    """
    path = Path(path).expanduser()
    is_segmentation = _suffix(path) == SEGMENTATION_SUFFIX or is_slicer_segmentation(path)
    if is_segmentation and path.is_file():
        labels = segmentation_to_labelmap(path, label_set)
    else:
        image = _as_volume(_read_image(path), path, "a labelmap")
        labels = sitk.GetImageFromArray(integer_labels(sitk.GetArrayViewFromImage(image), path, label_set))
        labels.CopyInformation(image)
    if reference is None:
        return labels
    if image_name is None and SOURCE_KEY in reference.GetMetaDataKeys():
        image_name = reference.GetMetaData(SOURCE_KEY)
    image_name = None if image_name is None else str(image_name)
    if grid_differences(labels, reference):
        if not is_segmentation:
            raise different_grid(path, labels, reference, image_name)
        labels = onto_reference(labels, reference, path, image_name)
    labels.CopyInformation(reference)  # equal within tolerance: make it exact
    return labels


# --- writing --------------------------------------------------------------------------------------------


def write_labelmap(labelmap: sitk.Image, path: str | Path, *, all_organs: bool = False, label_set: LabelSet = FLARE22) -> Path:
    """Write a labelmap of `label_set`'s ids (FLARE22's 0-13 by default) atomically, keeping its geometry; returns the path written.

    `.seg.nrrd`: a Slicer segmentation, one segment per organ present, named, coloured and terminology-coded as the set
    says (every organ of the set with `all_organs`). `.nii.gz`, `.nii`, `.nrrd`, `.mha`, `.mhd`: a compressed uint8 labelmap.
    """
    path = check_output_path(path)
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        components = labelmap.GetNumberOfComponentsPerPixel()
        raise ValueError(f"write_labelmap needs a scalar 3D labelmap, got {labelmap.GetDimension()}D with {components} components")
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(labelmap)
    if stats.GetMinimum() < 0 or stats.GetMaximum() > len(label_set):
        raise ValueError(f"labelmap values {stats.GetMinimum():g}..{stats.GetMaximum():g} are not {label_set.id_phrase()} 0-{len(label_set)}")
    labelmap = sitk.Cast(labelmap, sitk.sitkUInt8)
    for key in labelmap.GetMetaDataKeys():  # e.g. DICOM patient tags or NIfTI fields of a source image: not ours to copy
        labelmap.EraseMetaData(key)
    with atomic_path(path) as tmp:
        if _suffix(path) == SEGMENTATION_SUFFIX:
            write_segmentation(labelmap, tmp, all_organs, label_set)
        else:
            sitk.WriteImage(labelmap, str(tmp), useCompression=True)
            # ITK's NIfTI writer does not notice a full disk: it leaves a truncated file without an error. Check before it takes the name.
            if problem := nifti_truncation(tmp):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (the written file came out incomplete: {problem})")
    return path
