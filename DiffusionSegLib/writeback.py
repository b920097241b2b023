"""Painted slices and write-back, the file side: read the CT and Slicer's .seg.nrrd, write what fine-tuning
learns from and the merged result.

The array logic (which slices are annotated, merging that keeps painted slices, the labels last written
back) is `DiffusionSegLib.bridge.annotation`, which Slicer loads before the engine's packages are installed;
this file needs SimpleITK and slicerio (through imageio) and runs once they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .bridge.annotation import (
    annotated_slices,
    annotation_summary,
    axial_axis,
    keep_only,
    load_written_labels,
    merge_keeping_painted,
    painted_slices,
    save_written_labels,
)
from .errors import InputError
from .imageio import read_ct, read_labels, write_labelmap


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _labelmap_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.CopyInformation(reference)
    return image


def prepare_annotation(
    ct_path: str | Path,
    annotation_path: str | Path,
    output: str | Path,
    recorded: Iterable[int] = (),
    written_path: str | Path | None = None,
) -> dict:
    """Write the annotated slices of a Slicer segmentation (all other slices cleared) for fine-tuning.

    `written_path`: the labels last written back (`save_written_labels`), if any. Returns the annotation
    summary. InputError when no slice is annotated.
    """
    ct = read_ct(ct_path)
    current = _array(read_labels(annotation_path, ct))
    axis = axial_axis(ct.GetDirection())
    slices = annotated_slices(current, axis, load_written_labels(written_path, current.shape), recorded)
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
    user cleared to background too). `written_output`, if given, receives the merged labels
    (`save_written_labels`): the reference for telling the user's later corrections from the model's
    output. Returns the summary.
    """
    ct = read_ct(ct_path)
    prediction = _array(read_labels(prediction_path, ct))
    painted = _array(read_labels(painted_path, ct))
    axis = axial_axis(ct.GetDirection())
    slices = painted_slices(painted, axis) if slices is None else sorted(set(slices))
    merged = merge_keeping_painted(prediction, painted, slices, axis)
    write_labelmap(_labelmap_like(merged, ct), output, all_organs=True)
    if written_output is not None:
        save_written_labels(merged, written_output)
    return annotation_summary(painted, slices, axis)
