"""DICOM series: finding the series in a folder, choosing one, and refusing modalities that are not CT."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import SimpleITK as sitk

from .errors import InputError

# DICOM modalities that are certainly not a CT volume (a CT-less PET/MR study, a SEG or RT object).
NOT_CT_MODALITIES = {"MR", "PT", "NM", "US", "MG", "CR", "DX", "XA", "RF", "SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO"}


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK prints warnings on stderr (e.g. for every non-DICOM file while searching for series)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """DICOM series in `folder` (searched recursively): series instance UID -> its files in slice order."""
    folder = Path(folder)
    series: dict[str, list[str]] = {}
    with quiet_itk():
        for root in [folder, *(p for p in sorted(folder.rglob("*")) if p.is_dir())]:
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(root)) or ():
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(root), uid)
                if len(files) > len(series.get(uid, ())):
                    series[uid] = list(files)
    return series


def series_files(folder: Path, series_uid: str | None) -> list[str]:
    """The files of one series in `folder`: the requested one, or the one with the most slices."""
    series = dicom_series(folder)
    if not series:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:5]
        hint = f" (it holds: {', '.join(found)}{', ...' if len(found) == 5 else ''})" if found else " (it is empty)"
        raise InputError(f"{folder}: folder holds no DICOM series{hint}; pass a folder of DICOM slices or an image file (NIfTI, NRRD, MHA)")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{folder}: no DICOM series {series_uid} here (found {', '.join(series)}); pass one of these series UIDs")
        return series[series_uid]
    uid, files = max(series.items(), key=lambda item: len(item[1]))
    if len(series) > 1:
        others = ", ".join(f"{len(f)}" for u, f in series.items() if u != uid)
        warnings.warn(
            f"{folder}: {len(series)} DICOM series found; reading series {uid} ({len(files)} slices), the one with the most slices "
            f"(others have {others}); put each series in its own folder to choose",
            stacklevel=4,
        )
    return files


def dicom_info(path: Path) -> tuple[str, str] | None:
    """(series instance UID, modality) of a DICOM file, None for other formats; reads the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with quiet_itk():
        reader.ReadImageInformation()
    if not reader.HasMetaDataKey("0020|000e"):
        return None
    modality = reader.GetMetaData("0008|0060").strip().upper() if reader.HasMetaDataKey("0008|0060") else ""
    return reader.GetMetaData("0020|000e").strip(), modality


def check_modality(path: Path, modality: str) -> None:
    if modality in NOT_CT_MODALITIES:
        raise InputError(f"{path}: is a DICOM {modality} image, not CT; pass the CT series of the study")
