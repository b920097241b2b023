"""Reading CTs and labels, writing labelmaps and Slicer segmentations; every input problem is an InputError.

Images are SimpleITK images in LPS world coordinates (SimpleITK converts NIfTI's RAS on read and write).
`.seg.nrrd` files go through slicerio so segment names, colours and terminology survive. slicerio keeps
voxels in (i, j, k) order with a 4 x 4 `ijkToLPS` matrix (columns: direction x spacing, then origin);
SimpleITK arrays are (k, j, i), hence the transposes below.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import secrets
import shutil
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from .errors import InputError
from .organs import NUM_CLASSES, ORGANS, match_organ, organ_by_label, terminology_entry

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
OUTPUT_SUFFIXES = (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES)

AIR_HU = -500.0  # any body CT holds air (outside the patient, lungs, bowel) well below this
GEOMETRY_TOLERANCE = 1e-4  # relative to the voxel spacing; direction cosines absolutely
SOURCE_KEY = "DiffusionSeg.source"  # metadata key read_ct stores the input path under, for messages
SEG_COMPRESSION = 6  # zlib's default level; 9 took ~20 % longer for ~15 % smaller files on a 512 x 512 x 336 labelmap

# DICOM modalities that are certainly not a CT volume (a CT-less PET/MR study, a SEG or RT object).
_NOT_CT_MODALITIES = {"MR", "PT", "NM", "US", "MG", "CR", "DX", "XA", "RF", "SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO"}


def _suffix(path: Path) -> str:
    """The format suffix, compound where it matters (.seg.nrrd, .nii.gz)."""
    name = path.name.lower()
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _size(image: sitk.Image) -> str:
    return " x ".join(map(str, image.GetSize()))


# --- atomic writes --------------------------------------------------------------------------------------


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
    return path


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write instead of `path`; it replaces `path` only if the block succeeds.

    The temporary file has `path`'s own name inside a hidden folder beside it (same file system, so
    `os.replace` is atomic, and the format is chosen from the same extension). Companion files a writer
    adds (a .mhd's .zraw) move along, the named file last. On failure the folder is removed and an
    existing `path` is untouched. A missing output folder is created.
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path}: cannot create the output folder {path.parent} ({e.strerror or e}); choose another output path") from e
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
    except OSError as e:
        raise InputError(f"{path}: cannot write in {path.parent} ({e.strerror or e}); choose an output folder you can write to") from e
    try:
        tmp = staging / path.name
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{path}: nothing was written")
        for companion in staging.iterdir():
            if companion != tmp:
                os.replace(companion, path.parent / companion.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


atomic_path = atomic_write_path  # shorter alias


# --- reading CTs ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
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
    with _quiet_itk():
        for root in [folder, *(p for p in sorted(folder.rglob("*")) if p.is_dir())]:
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(root)) or ():
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(root), uid)
                if len(files) > len(series.get(uid, ())):
                    series[uid] = list(files)
    return series


def _series_files(folder: Path, series_uid: str | None) -> list[str]:
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


def _nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file is incomplete, or None. ITK reads a truncated NIfTI silently, filling the rest with zeros."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    compressed = name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError):
        return None  # not even a header: ITK reports it
    expected = None
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348 and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix, offset = struct.unpack(endian + "h", header[72:74])[0], struct.unpack(endian + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540 and header[4:7] == b"n+2":
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix, offset = struct.unpack(endian + "h", header[14:16])[0], struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if 1 <= dims[0] <= 7 and bitpix > 0:
            expected = int(offset) + int(np.prod([max(int(d), 1) for d in dims[1:dims[0] + 1]], dtype=np.float64)) * bitpix // 8
        break
    if expected is None:
        return None
    if not compressed:
        size = path.stat().st_size
        return None if size >= expected else f"it holds {size} bytes but its header describes {expected}"
    with open(path, "rb") as f:  # gzip's trailer holds the uncompressed size (mod 2^32): a cheap check first
        f.seek(-4, os.SEEK_END)
        if struct.unpack("<I", f.read(4))[0] == expected % (1 << 32):
            return None
    try:
        with gzip.open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)  # several gzip members (bgzip) or damage: decompress to be sure
    except (OSError, EOFError) as e:
        return f"its compressed data is damaged or cut short: {e}"
    return None if size >= expected else f"it holds {size} bytes of image data but its header describes {expected}"


def _dicom_info(path: Path) -> tuple[str, str] | None:
    """(series instance UID, modality) of a DICOM file, None for other formats; reads the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _quiet_itk():
        reader.ReadImageInformation()
    if not reader.HasMetaDataKey("0020|000e"):
        return None
    modality = reader.GetMetaData("0008|0060").strip().upper() if reader.HasMetaDataKey("0008|0060") else ""
    return reader.GetMetaData("0020|000e").strip(), modality


def _check_modality(path: Path, modality: str) -> None:
    if modality in _NOT_CT_MODALITIES:
        raise InputError(f"{path}: is a DICOM {modality} image, not CT; pass the CT series of the study")


def _read_image(path: Path, series_uid: str | None = None) -> sitk.Image:
    """Any supported image: a file, a DICOM series folder, or one file of a DICOM series (reads the series)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path (and that the drive is mounted)")
    try:
        if path.is_dir():
            files = _series_files(path, series_uid)
            info = _dicom_info(Path(files[0]))
            if info:
                _check_modality(path, info[1])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        info = _dicom_info(path)
        if info is not None:
            _check_modality(path, info[1])
            with _quiet_itk():
                siblings = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), info[0])
            # One slice of a classic DICOM series: read the whole series it belongs to, as Slicer would.
            if len(siblings) > 1 and any(Path(f).resolve() == path.resolve() for f in siblings):
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(siblings)
                return reader.Execute()
        problem = _nifti_truncation(path)
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
        raise InputError(f"{path}: is a 4D image (size {_size(image)}), e.g. a time series; pass a single 3D volume")
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise InputError(f"{path}: is not a 3D volume (size {_size(image)}); pass the whole 3D series, not a single slice")
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


def _grid_differences(a: sitk.Image, b: sitk.Image) -> list[str]:
    """How grid `a` differs from grid `b`, in words; empty when they agree within tolerance."""
    differences = []
    if a.GetSize() != b.GetSize():
        differences.append(f"size {_size(a)} vs {_size(b)}")
    tol = GEOMETRY_TOLERANCE * min(b.GetSpacing())
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=GEOMETRY_TOLERANCE, atol=0):
        differences.append(f"spacing {' x '.join(f'{s:g}' for s in a.GetSpacing())} vs {' x '.join(f'{s:g}' for s in b.GetSpacing())} mm")
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=max(tol, 1e-3)):
        differences.append(f"origin ({', '.join(f'{o:.2f}' for o in a.GetOrigin())}) vs ({', '.join(f'{o:.2f}' for o in b.GetOrigin())}) mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=GEOMETRY_TOLERANCE):
        differences.append(f"direction ({', '.join(f'{d:.3g}' for d in a.GetDirection())}) vs ({', '.join(f'{d:.3g}' for d in b.GetDirection())})")
    return differences


def _different_grid(path: Path, labels: sitk.Image, reference: sitk.Image, image_name: str | None, detail: str = "") -> InputError:
    differences = "; ".join(_grid_differences(labels, reference)) or "the labels do not fit on the image's voxel grid"
    return InputError(
        f"labels {path} are on a different grid than image {image_name or 'the CT'} ({differences}){detail}; "
        "check that the labels belong to this CT, or paint them on this CT in Slicer and save again"
    )


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """`array` as uint8 FLARE22 ids; InputError naming any value outside 0-13."""
    if array.size == 0:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: label values are not whole numbers; pass a labelmap of FLARE22 ids 0-13 (or a Slicer .seg.nrrd)")
    low, high = array.min(), array.max()
    if low < 0 or high >= NUM_CLASSES:
        bad = np.unique(array[(array < 0) | (array >= NUM_CLASSES)])  # only the few bad voxels are sorted
        shown = ", ".join(f"{v:g}" for v in bad[:10].astype(float)) + (", ..." if bad.size > 10 else "")
        raise InputError(
            f"{path}: label ids {shown} are outside 0-13; the labels must use FLARE22 ids (1 liver, 2 right kidney, 3 spleen, 4 pancreas, "
            "5 aorta, 6 inferior vena cava, 7 right adrenal gland, 8 left adrenal gland, 9 gallbladder, 10 esophagus, 11 stomach, "
            "12 duodenum, 13 left kidney); relabel them, or save them from Slicer as a .seg.nrrd with named segments"
        )
    return array.astype(np.uint8, copy=False)


def _value_counts(array: np.ndarray) -> dict[int, int]:
    """Voxel count of every value of an integer array, without sorting or an int64 copy of a whole volume."""
    flat = array.ravel(order="K")  # a view for C- or Fortran-ordered arrays
    if flat.size == 0:
        return {}
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= 1 << 16:
        values, counts = np.unique(flat, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist(), strict=True))
    counts = np.zeros(high + 1, dtype=np.int64)
    for start in range(0, flat.size, 1 << 22):  # bincount converts to int64: keep that copy small
        counts += np.bincount(flat[start:start + (1 << 22)], minlength=high + 1)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}


def _relabel(layer: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """uint8 array with `mapping[v]` where `layer` is v and 0 elsewhere (one lookup-table pass when values are small)."""
    if max(mapping) < 1 << 16 and min(mapping) >= 0 and 0 <= int(layer.min()) and int(layer.max()) < 1 << 16:
        table = np.zeros(int(layer.max()) + 1, dtype=np.uint8)
        for value, label in mapping.items():
            if value < table.size:
                table[value] = label
        return table[layer]
    mapped = np.zeros(layer.shape, dtype=np.uint8)
    for value, label in mapping.items():
        mapped[layer == value] = label
    return mapped


def _segmentation_to_labelmap(path: Path) -> sitk.Image:
    """A .seg.nrrd as a FLARE22 labelmap on its own (possibly cropped) grid."""
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as e:  # slicerio/pynrrd raise many kinds of errors for broken or foreign files
        raise InputError(f"{path}: cannot be read as a Slicer segmentation ({str(e)[:200]}); save it again from Slicer as .seg.nrrd") from e
    voxels = np.asarray(segmentation["voxels"])
    if not np.issubdtype(voxels.dtype, np.integer) or voxels.ndim not in (3, 4):
        raise InputError(f"{path}: is not a labelmap segmentation ({voxels.ndim}D {voxels.dtype} voxels); save it again from Slicer as .seg.nrrd")
    # Work on (k, j, i) C-ordered layers: SimpleITK's order, and a view of pynrrd's Fortran-ordered (i, j, k) array.
    # (Mixing the two orders in boolean indexing is ~100x slower on a 512 x 512 x 600 volume.)
    layers = [np.ascontiguousarray(layer.transpose(2, 1, 0)) for layer in (voxels if voxels.ndim == 4 else voxels[None])]
    segments = segmentation.get("segments") or []

    if not segments:
        # A plain labelmap saved under a .seg.nrrd name: its values are taken as FLARE22 ids.
        labels = _integer_labels(np.maximum.reduce(layers), path)
    else:
        counts = [_value_counts(layer) for layer in layers]
        # Slicer before 4.11 wrote one binary layer per segment, without Layer/LabelValue fields.
        one_per_layer = len(segments) == len(layers) > 1 and not any("layer" in s or "labelValue" in s for s in segments)
        organ_of: list[dict[int, int]] = [{} for _ in layers]  # per layer: label value -> FLARE22 id
        unmatched = []
        for number, segment in enumerate(segments):
            layer = number if one_per_layer else int(segment.get("layer", 0))
            value = int(segment.get("labelValue", 1))
            if not 0 <= layer < len(layers):
                raise InputError(f"{path}: segment {segment.get('name')!r} is on layer {layer}, but the file has {len(layers)}; save it again from Slicer")
            if not counts[layer].get(value):
                continue  # an empty segment adds nothing, whatever it is called (e.g. a "tumour" yet to be painted)
            organ = match_organ(segment.get("name"), segment.get("terminology"))
            if organ is None:
                unmatched.append(str(segment.get("name") or segment.get("id") or f"layer {layer} value {value}"))
            else:
                organ_of[layer][value] = organ.label
        if unmatched:
            raise InputError(
                f"{path}: segments {', '.join(repr(n) for n in unmatched)} match none of the 13 FLARE22 organs; rename them in Slicer's "
                "Segment Editor (e.g. 'Liver', 'Right kidney', 'Inferior vena cava'), pick the organ as terminology, or delete them"
            )
        labels = np.zeros(layers[0].shape, dtype=np.uint8)
        overlaps, written = 0, False
        for layer, mapping in zip(layers, organ_of, strict=True):
            if not mapping:
                continue
            mapped = _relabel(layer, mapping)
            if written:
                overlaps += int(np.count_nonzero((labels != 0) & (mapped != 0) & (labels != mapped)))
            np.copyto(labels, mapped, where=mapped != 0)  # overlapping segments on several layers: the later layer wins
            written = True
        if overlaps:
            warnings.warn(f"{path}: {overlaps} voxels belong to two organs' segments; the segment on the later layer was kept there", stacklevel=3)

    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image = sitk.GetImageFromArray(labels)
    try:
        image.SetSpacing([float(s) for s in spacing])
        image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        raise InputError(f"{path}: has an invalid voxel grid (space directions {axes.T.tolist()}); save it again from Slicer") from e
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


def _onto_reference(labels: sitk.Image, reference: sitk.Image, path: Path, image_name: str | None) -> sitk.Image:
    """Segmentation labels saved on a crop (or extension) of the reference's voxel lattice, placed on the reference grid.

    Slicer may save a .seg.nrrd cropped to the painted extent; that is fine as long as its voxels coincide
    with the CT's voxels and every labelled voxel lies inside the CT.
    """
    same_axes = np.allclose(labels.GetSpacing(), reference.GetSpacing(), rtol=GEOMETRY_TOLERANCE, atol=0) and np.allclose(
        labels.GetDirection(), reference.GetDirection(), rtol=0, atol=GEOMETRY_TOLERANCE
    )
    if not same_axes:
        raise _different_grid(path, labels, reference, image_name)
    start = np.array(reference.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
    if not np.allclose(start, np.round(start), rtol=0, atol=1e-3):
        raise _different_grid(path, labels, reference, image_name, f"; its voxels are shifted by a fraction of a voxel ({start % 1})")
    start = np.round(start).astype(int)
    array = sitk.GetArrayViewFromImage(labels)  # k, j, i
    size = np.array(labels.GetSize())
    lo = np.maximum(0, -start)  # the part of the labels inside the reference, in label indices (i, j, k)
    hi = np.minimum(size, np.array(reference.GetSize()) - start)
    inside = np.zeros(array.shape, dtype=bool)
    if np.all(hi > lo):
        inside[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = True
    outside = int(np.count_nonzero(array[~inside]))
    if outside:
        raise _different_grid(path, labels, reference, image_name, f"; {outside} labelled voxels lie outside the image")
    result = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    if np.all(hi > lo):
        dst_lo, dst_hi = start + lo, start + hi
        result[dst_lo[2]:dst_hi[2], dst_lo[1]:dst_hi[1], dst_lo[0]:dst_hi[0]] = array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    placed = sitk.GetImageFromArray(result)
    placed.CopyInformation(reference)
    return placed


def _is_slicer_segmentation(path: Path) -> bool:
    """A Slicer segmentation saved under a plain .nrrd name: its label values are segment values, not FLARE22 ids."""
    if path.suffix.lower() not in (".nrrd", ".nhdr") or not path.is_file():
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        return False  # _read_image reports it
    return any(key.startswith("Segment0_") or key == "Segmentation_MasterRepresentation" for key in reader.GetMetaDataKeys())


def read_labels(path: str | Path, reference: sitk.Image | None = None, *, image_name: str | Path | None = None) -> sitk.Image:
    """A uint8 FLARE22 labelmap from a labelmap file or a Slicer .seg.nrrd, on exactly `reference`'s grid.

    Labelmap files must hold ids 0-13 on the reference grid. A .seg.nrrd's segments are mapped to organs by
    terminology or name (`match_organ`) and it may be cropped to the painted extent. Without a reference the
    labels keep their own grid (when comparing two labelmaps). `image_name` names the reference in messages;
    by default the path read_ct read it from.
    """
    path = Path(path).expanduser()
    is_segmentation = _suffix(path) == SEGMENTATION_SUFFIX or _is_slicer_segmentation(path)
    if is_segmentation and path.is_file():
        labels = _segmentation_to_labelmap(path)
    else:
        image = _as_volume(_read_image(path), path, "a labelmap")
        labels = sitk.GetImageFromArray(_integer_labels(sitk.GetArrayViewFromImage(image), path))
        labels.CopyInformation(image)
    if reference is None:
        return labels
    if image_name is None and SOURCE_KEY in reference.GetMetaDataKeys():
        image_name = reference.GetMetaData(SOURCE_KEY)
    image_name = None if image_name is None else str(image_name)
    if _grid_differences(labels, reference):
        if not is_segmentation:
            raise _different_grid(path, labels, reference, image_name)
        labels = _onto_reference(labels, reference, path, image_name)
    labels.CopyInformation(reference)  # equal within tolerance: make it exact
    return labels


# --- writing --------------------------------------------------------------------------------------------


def _ijk_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _reference_geometry(image: sitk.Image) -> str:
    """Slicer's "Reference image geometry" conversion parameter: IJK-to-RAS row by row, then the extent."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ijk_to_lps(image)
    extent = [v for n in image.GetSize() for v in (0, n - 1)]
    # + 0.0 turns -0.0 into 0.0, so no "-0" appears
    return "".join(f"{v + 0.0:.17g};" for v in ijk_to_ras.ravel()) + "".join(f"{v};" for v in extent)


def segmentation_dict(labelmap: sitk.Image, all_organs: bool = False) -> dict:
    """slicerio's segmentation structure for a FLARE22 labelmap: one segment per organ present, on layer 0.

    Each segment's labelValue is the FLARE22 id, so the voxels are the labelmap itself. With `all_organs`,
    absent organs get an empty segment too (a ready-to-paint template with the right names and terminology).
    """
    voxels = sitk.GetArrayFromImage(labelmap).astype(np.uint8, copy=False).transpose(2, 1, 0)  # i, j, k (Fortran-ordered view)
    present = set(_value_counts(voxels))
    organs = ORGANS if all_organs else [organ_by_label(v) for v in sorted(present - {0})]
    segments = [
        {
            "id": f"Segment_{organ.label}",
            "name": organ.display_name,
            "nameAutoGenerated": False,  # keep our names if the user edits the terminology in Slicer
            "color": [round(c, 6) for c in organ.color_float],
            "colorAutoGenerated": False,
            "labelValue": organ.label,
            "layer": 0,
            "terminology": terminology_entry(organ),
        }
        for organ in organs
    ]
    return {
        "voxels": voxels,
        "ijkToLPS": _ijk_to_lps(labelmap),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [
            {
                "name": "Reference image geometry",
                "value": _reference_geometry(labelmap),
                "description": "Image geometry description string determining the geometry of the labelmap that is created in course of conversion.",
            }
        ],
    }


def write_labelmap(labelmap: sitk.Image, path: str | Path, *, all_organs: bool = False) -> Path:
    """Write a FLARE22 labelmap (ids 0-13) atomically, keeping its geometry; returns the path written.

    `.seg.nrrd`: a Slicer segmentation, one named, coloured, terminology-coded segment per organ present
    (all 13 with `all_organs`). `.nii.gz`, `.nii`, `.nrrd`, `.mha`, `.mhd`: a compressed uint8 labelmap.
    """
    path = check_output_path(path)
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        components = labelmap.GetNumberOfComponentsPerPixel()
        raise ValueError(f"write_labelmap needs a scalar 3D labelmap, got {labelmap.GetDimension()}D with {components} components")
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(labelmap)
    if stats.GetMinimum() < 0 or stats.GetMaximum() >= NUM_CLASSES:
        raise ValueError(f"labelmap values {stats.GetMinimum():g}..{stats.GetMaximum():g} are not FLARE22 ids 0-13")
    labelmap = sitk.Cast(labelmap, sitk.sitkUInt8)
    for key in labelmap.GetMetaDataKeys():  # e.g. DICOM patient tags or NIfTI fields of a source image: not ours to copy
        labelmap.EraseMetaData(key)
    with atomic_write_path(path) as tmp:
        if _suffix(path) == SEGMENTATION_SUFFIX:
            slicerio.write_segmentation(str(tmp), segmentation_dict(labelmap, all_organs), compression_level=SEG_COMPRESSION)
        else:
            sitk.WriteImage(labelmap, str(tmp), useCompression=True)
    return path
