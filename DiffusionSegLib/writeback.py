"""Painted slices and writing a new prediction back without overwriting them.

The annotate / fine-tune loop in Slicer works on one segmentation: the user paints some axial slices, the
model is fine-tuned on them, and its prediction for the whole volume is written back into the same
segmentation. The painted slices must survive that, and the next fine-tuning must train on the painted
slices only, not on the model's own output. So the module remembers, per segmentation, which slices were
annotated and the labels it wrote; a slice counts as annotated if it was annotated before or now differs
from what was written (the user corrected it). Before any write-back every touched slice is annotated.

Arrays are SimpleITK order (k, j, i); `slice_axis` is the SimpleITK index axis (0 = i, 2 = k) that runs
along the axial slices, as in ``annotations.annotated_input_slices``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .imageio import read_ct, read_labels, write_labelmap
from .organs import ORGANS, match_organ
from .preprocessing import canonical_axes


def axial_axis(direction: Sequence[float]) -> int:
    """The SimpleITK index axis closest to the patient's superior-inferior axis (direction: LPS, row-major 3 x 3)."""
    axis_for, _ = canonical_axes(tuple(direction))
    return axis_for[2]


def lps_direction_from_ras(ras_directions: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """Slicer's IJK-to-RAS direction matrix (3 x 3, columns are the index axes) as a SimpleITK LPS direction."""
    matrix = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(ras_directions, dtype=float).reshape(3, 3)
    return tuple(float(v) for v in matrix.ravel())


def _along(labels: np.ndarray, slice_axis: int) -> np.ndarray:
    """`labels` with the slices along `slice_axis` first (a view)."""
    if labels.ndim != 3 or not 0 <= slice_axis <= 2:
        raise ValueError(f"need a 3D (k, j, i) array and a slice axis 0-2, got {labels.ndim}D and axis {slice_axis}")
    return np.moveaxis(labels, 2 - slice_axis, 0)


def painted_slices(labels: np.ndarray, slice_axis: int) -> list[int]:
    """Slices holding any labelled voxel."""
    stacked = _along(labels, slice_axis)
    return [int(i) for i in np.flatnonzero(stacked.reshape(len(stacked), -1).any(axis=1))]


def edited_slices(current: np.ndarray, written: np.ndarray, slice_axis: int) -> list[int]:
    """Slices where `current` differs from the labels last written back."""
    if current.shape != written.shape:
        raise ValueError(f"labels {current.shape} and written labels {written.shape} differ in shape")
    a, b = _along(current, slice_axis), _along(written, slice_axis)
    return [int(i) for i in np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))]


def annotated_slices(current: np.ndarray, slice_axis: int, written: np.ndarray | None = None, recorded: Iterable[int] = ()) -> list[int]:
    """The user's annotated slices (see the module docstring)."""
    touched = painted_slices(current, slice_axis) if written is None else edited_slices(current, written, slice_axis)
    return sorted(set(int(i) for i in recorded) | set(touched))


def keep_only(labels: np.ndarray, slices: Iterable[int], slice_axis: int) -> np.ndarray:
    """A copy of `labels` with every slice not in `slices` cleared (what fine-tuning may learn from)."""
    kept = np.zeros_like(labels)
    index = sorted(set(slices))
    _along(kept, slice_axis)[index] = _along(labels, slice_axis)[index]
    return kept


def merge_keeping_painted(prediction: np.ndarray, painted: np.ndarray, slices: Iterable[int], slice_axis: int) -> np.ndarray:
    """`prediction`, except that the annotated `slices` are exactly `painted` (background included)."""
    if prediction.shape != painted.shape:
        raise ValueError(f"prediction {prediction.shape} and painted labels {painted.shape} differ in shape")
    merged = prediction.copy()
    index = sorted(set(slices))
    _along(merged, slice_axis)[index] = _along(painted, slice_axis)[index]
    return merged


def segment_organ_ids(segments: Sequence[tuple[str | None, str | dict | None]]) -> list[int | None]:
    """FLARE22 id of each (name, terminology) segment, None where it matches no organ."""
    ids = []
    for name, terminology in segments:
        organ = match_organ(name, terminology)
        ids.append(None if organ is None else organ.label)
    return ids


def organ_labels(values: np.ndarray, organ_ids: Sequence[int | None]) -> tuple[np.ndarray, list[int]]:
    """A segment-value labelmap (value v = segment v-1, as Slicer exports visible segments) as FLARE22 ids.

    Returns the labels and the segment numbers (0-based) that have voxels but match no organ.
    """
    table = np.zeros(max(len(organ_ids), int(values.max(initial=0))) + 1, dtype=np.uint8)
    for number, label in enumerate(organ_ids):
        if label is not None:
            table[number + 1] = label
    present = set(np.unique(values).tolist()) - {0}
    unmatched = sorted(v - 1 for v in present if v - 1 >= len(organ_ids) or organ_ids[v - 1] is None)
    return table[values], unmatched


def annotation_summary(labels: np.ndarray, slices: Iterable[int], slice_axis: int) -> dict:
    """Annotated slices and the organs painted on them (FLARE22 labels, names in table order)."""
    index = sorted(set(slices))
    present = set(np.unique(_along(labels, slice_axis)[index]).tolist()) if index else set()
    return {"slices": index, "organs": [o.name for o in ORGANS if o.label in present], "slice_axis": slice_axis}


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _labelmap_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.CopyInformation(reference)
    return image


def read_written(path: str | Path | None, ct: sitk.Image) -> np.ndarray | None:
    """The labels last written back (None when there is no such file, e.g. before the first write-back)."""
    if path is None or not Path(path).is_file():
        return None
    return _array(read_labels(path, ct))


def prepare_annotation(
    ct_path: str | Path,
    annotation_path: str | Path,
    output: str | Path,
    recorded: Iterable[int] = (),
    written_path: str | Path | None = None,
) -> dict:
    """Write the annotated slices of a Slicer segmentation (all other slices cleared) for fine-tuning.

    Returns the annotation summary. InputError when no slice is annotated.
    """
    ct = read_ct(ct_path)
    current = _array(read_labels(annotation_path, ct))
    axis = axial_axis(ct.GetDirection())
    slices = annotated_slices(current, axis, read_written(written_path, ct), recorded)
    if not slices:
        raise InputError(f"{annotation_path}: no annotated slice; paint at least one organ on one axial slice")
    write_labelmap(_labelmap_like(keep_only(current, slices, axis), ct), output)
    return annotation_summary(current, slices, axis)


def write_back(
    ct_path: str | Path,
    prediction_path: str | Path,
    painted_path: str | Path,
    output: str | Path,
    slices: Iterable[int] | None = None,
    written_output: str | Path | None = None,
) -> dict:
    """The prediction with the painted slices kept, as a .seg.nrrd with all 13 organ segments.

    `painted_path` holds the annotated slices only (as `prepare_annotation` wrote them); `slices` are kept
    as painted, by default every slice with a label there (pass the summary's slices to keep a slice the
    user cleared to background too). `written_output`, if given, receives a copy of the merged labels: the
    reference for telling the user's later corrections from the model's output. Returns the summary.
    """
    ct = read_ct(ct_path)
    prediction = _array(read_labels(prediction_path, ct))
    painted = _array(read_labels(painted_path, ct))
    axis = axial_axis(ct.GetDirection())
    slices = painted_slices(painted, axis) if slices is None else sorted(set(slices))
    merged = _labelmap_like(merge_keeping_painted(prediction, painted, slices, axis), ct)
    write_labelmap(merged, output, all_organs=True)
    if written_output is not None:
        write_labelmap(merged, written_output)
    return annotation_summary(painted, slices, axis)
