"""Which index axis of a CT runs along which patient axis: the choice behind the model's slice planes.

Numpy only, so the Slicer side (``bridge/painting.py``) asks the same function as the engine's
preprocessing, and the slices a user paints are the model's slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def canonical_axes(direction: Sequence[float]) -> tuple[list[int], list[int]]:
    """For each LPS axis, the input index axis most aligned with it and the sign to make it point along +LPS.

    `direction` is SimpleITK's (row-major 3 x 3, column i the world direction of index axis i). The
    largest |cosines| are assigned first, so a near-45-degree oblique axis still yields a permutation;
    exact ties go to the earlier (world, index) pair.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)  # d[world, index axis]
    axis_for = [-1, -1, -1]
    used_index_axes: set[int] = set()
    for flat in np.argsort(-np.abs(d), axis=None, kind="stable"):
        world, index_axis = divmod(int(flat), 3)
        if axis_for[world] < 0 and index_axis not in used_index_axes:
            axis_for[world] = index_axis
            used_index_axes.add(index_axis)
    signs = [1 if d[world, axis_for[world]] >= 0 else -1 for world in range(3)]
    return axis_for, signs


def axial_axis(direction: Sequence[float]) -> int:
    """The index axis closest to the patient's superior-inferior axis: the one the model slices along."""
    return canonical_axes(direction)[0][2]
