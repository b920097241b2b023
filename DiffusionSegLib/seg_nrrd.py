"""Slicer `.seg.nrrd` segmentations: segments and layers to a labelmap of a label set's ids (FLARE22's by default), and back.

slicerio keeps voxels in (i, j, k) order with a 4 x 4 `ijkToLPS` matrix (columns: direction x spacing,
then origin); SimpleITK arrays are (k, j, i), hence the transposes below.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from .dicom import quiet_itk
from .errors import InputError
from .label_values import integer_labels, relabel, value_counts
from .organs import FLARE22, LabelSet, terminology_entry

SEG_COMPRESSION = 6  # zlib's default level; 9 took ~20 % longer for ~15 % smaller files on a 512 x 512 x 336 labelmap


def segmentation_to_labelmap(path: Path, label_set: LabelSet = FLARE22) -> sitk.Image:
    """A .seg.nrrd as a labelmap of `label_set`'s ids on its own (possibly cropped) grid."""
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
        # A plain labelmap saved under a .seg.nrrd name: its values are taken as the set's ids.
        labels = integer_labels(np.maximum.reduce(layers), path, label_set)
    else:
        counts = [value_counts(layer) for layer in layers]
        # Slicer before 4.11 wrote one binary layer per segment, without Layer/LabelValue fields.
        one_per_layer = len(segments) == len(layers) > 1 and not any("layer" in s or "labelValue" in s for s in segments)
        organ_of: list[dict[int, int]] = [{} for _ in layers]  # per layer: label value -> the set's id
        unmatched = []
        for number, segment in enumerate(segments):
            layer = number if one_per_layer else int(segment.get("layer", 0))
            value = int(segment.get("labelValue", 1))
            if not 0 <= layer < len(layers):
                raise InputError(f"{path}: segment {segment.get('name')!r} is on layer {layer}, but the file has {len(layers)}; save it again from Slicer")
            if not counts[layer].get(value):
                continue  # an empty segment adds nothing, whatever it is called (e.g. a "tumour" yet to be painted)
            organ = label_set.match(segment.get("name"), segment.get("terminology"))
            if organ is None:
                unmatched.append(str(segment.get("name") or segment.get("id") or f"layer {layer} value {value}"))
            else:
                organ_of[layer][value] = organ.label
        if unmatched:
            shown = (1, 2, 6) if label_set == FLARE22 else label_set.labels[:3]
            examples = ", ".join(repr(label_set.organ(label).display_name) for label in shown)
            raise InputError(
                f"{path}: segments {', '.join(repr(n) for n in unmatched)} match none of {label_set.describe()}; rename them in Slicer's "
                f"Segment Editor (e.g. {examples}), pick the organ as terminology, or delete them"
            )
        labels = np.zeros(layers[0].shape, dtype=np.uint8)
        overlaps, written = 0, False
        for layer, mapping in zip(layers, organ_of, strict=True):
            if not mapping:
                continue
            mapped = relabel(layer, mapping)
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


def segment_organs(path: Path, label_set: LabelSet = FLARE22) -> set[int]:
    """Ids (of `label_set`) of the organs a .seg.nrrd has segments for, empty segments included.

    An empty "Pancreas" segment says the user labels the pancreas and found none on the painted slices;
    a segment that is no organ (a tumour) is not counted.
    """
    try:
        segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception as e:  # as in segmentation_to_labelmap: slicerio/pynrrd raise many kinds of errors
        raise InputError(f"{path}: cannot be read as a Slicer segmentation ({str(e)[:200]}); save it again from Slicer as .seg.nrrd") from e
    organs = (label_set.match(s.get("name"), s.get("terminology")) for s in segmentation.get("segments") or [])
    return {organ.label for organ in organs if organ is not None}


def is_slicer_segmentation(path: Path) -> bool:
    """A Slicer segmentation saved under a plain .nrrd name: its label values are segment values, not label ids."""
    if path.suffix.lower() not in (".nrrd", ".nhdr") or not path.is_file():
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        return False  # _read_image reports it
    return any(key.startswith("Segment0_") or key == "Segmentation_MasterRepresentation" for key in reader.GetMetaDataKeys())


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def reference_geometry(image: sitk.Image) -> str:
    """Slicer's "Reference image geometry" conversion parameter: IJK-to-RAS row by row, then the extent."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(image)
    extent = [v for n in image.GetSize() for v in (0, n - 1)]
    # + 0.0 turns -0.0 into 0.0, so no "-0" appears
    return "".join(f"{v + 0.0:.17g};" for v in ijk_to_ras.ravel()) + "".join(f"{v};" for v in extent)


def segmentation_dict(labelmap: sitk.Image, all_organs: bool = False, label_set: LabelSet = FLARE22) -> dict:
    """slicerio's segmentation structure for a labelmap of `label_set`'s ids: one segment per organ present, on layer 0.

    Each segment's labelValue is the organ's id, so the voxels are the labelmap itself; names, colours and terminology
    come from the set (an entry without terminology gets none: Slicer shows its generic one). With `all_organs`,
    absent organs get an empty segment too (a ready-to-paint template with the right names and terminology).
    """
    voxels = sitk.GetArrayFromImage(labelmap).astype(np.uint8, copy=False).transpose(2, 1, 0)  # i, j, k (Fortran-ordered view)
    present = set(value_counts(voxels))
    organs = label_set.organs if all_organs else [label_set.organ(v) for v in sorted(present - {0})]
    segments = []
    for organ in organs:
        segment = {
            "id": f"Segment_{organ.label}",
            "name": organ.display_name,
            "nameAutoGenerated": False,  # keep our names if the user edits the terminology in Slicer
            "color": [round(c, 6) for c in organ.color_float],
            "colorAutoGenerated": False,
            "labelValue": organ.label,
            "layer": 0,
        }
        if (terminology := terminology_entry(organ)) is not None:
            segment["terminology"] = terminology
        segments.append(segment)
    return {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps(labelmap),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [
            {
                "name": "Reference image geometry",
                "value": reference_geometry(labelmap),
                "description": "Image geometry description string determining the geometry of the labelmap that is created in course of conversion.",
            }
        ],
    }


def write_segmentation(labelmap: sitk.Image, path: str | Path, all_organs: bool = False, label_set: LabelSet = FLARE22) -> None:
    """Write a labelmap of `label_set`'s ids as a Slicer segmentation file (not atomically: give it a temporary path)."""
    slicerio.write_segmentation(str(path), segmentation_dict(labelmap, all_organs, label_set), compression_level=SEG_COMPRESSION)
