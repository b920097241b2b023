"""Label value arrays: a label set's ids checked, counted and remapped without whole-volume copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .organs import FLARE22, LabelSet


def integer_labels(array: np.ndarray, path: Path, label_set: LabelSet = FLARE22) -> np.ndarray:
    """`array` as uint8 ids of `label_set`; InputError naming any value outside 0-N."""
    top = len(label_set)
    if array.size == 0:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: label values are not whole numbers; pass a labelmap of {label_set.id_phrase()} 0-{top} (or a Slicer .seg.nrrd)")
    low, high = array.min(), array.max()
    if low < 0 or high > top:
        bad = np.unique(array[(array < 0) | (array > top)])  # only the few bad voxels are sorted
        shown = ", ".join(f"{v:g}" for v in bad[:10].astype(float)) + (", ..." if bad.size > 10 else "")
        raise InputError(
            f"{path}: label ids {shown} are outside 0-{top}; the labels must use {label_set.id_phrase()} ({label_set.listing(limit=40)}); "
            "relabel them, or save them from Slicer as a .seg.nrrd with named segments"
        )
    return array.astype(np.uint8, copy=False)


def value_counts(array: np.ndarray) -> dict[int, int]:
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


def relabel(layer: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
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
