"""Painted slices and write-back, the image side: the annotated slices of a Slicer segmentation (what fine-tuning
learns from) and the merged result, as SimpleITK images on the CT grid, and as files.

The array logic (which slices are annotated and for which organs, merging that keeps painted slices, the
labels last written back) is `DiffusionSegLib.bridge.painting`, which Slicer loads before the engine's
packages are installed; this file needs SimpleITK and slicerio (through imageio). `DiffusionSegLib.refine`
runs it in the engine's process, one Fine-tune click as one ``diffusionseg refine`` run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .bridge.painting import (
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
from .organs import FLARE22, LabelSet


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _labelmap_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.CopyInformation(reference)
    return image


def annotated_labels(ct: sitk.Image, current: sitk.Image, recorded: Iterable[int] = (), written: np.ndarray | None = None,
                     source: str | Path = "the annotation", label_set: LabelSet = FLARE22) -> tuple[sitk.Image, dict]:
    """The annotated slices of `current` (the annotation's labels on `ct`'s grid; all other slices cleared) and the
    annotation summary (slices, the organs they label, slice axis).

    `recorded`: slices annotated in earlier rounds; `written`: the labels last written back (`load_written_labels`),
    if any. InputError naming `source` when no slice is annotated or a recorded slice lies outside the CT.
    """
    labels = _array(current)
    axis = axial_axis(ct.GetDirection())
    count = ct.GetSize()[axis]
    if outside := sorted(i for i in set(recorded) if not 0 <= i < count):
        raise InputError(f"{source}: recorded annotated slices {', '.join(map(str, outside))} lie outside the CT's {count} axial slices "
                         f"(0-{count - 1}); the annotation belongs to another CT")
    slices = annotated_slices(labels, axis, written, recorded)
    if not slices:
        raise InputError(f"{source}: no annotated slice; paint at least one organ on one axial slice")
    return _labelmap_like(keep_only(labels, slices, axis), ct), annotation_summary(labels, slices, axis, written, label_set)


def merged_labels(ct: sitk.Image, prediction: sitk.Image, painted: sitk.Image, slices: Iterable[int] | None = None) -> sitk.Image:
    """`prediction` with the annotated `slices` exactly as in `painted` (background included), on `ct`'s grid.

    By default the slices with a label in `painted`; pass the summary's slices to keep a slice the user cleared to
    background too.
    """
    painted_array = _array(painted)
    axis = axial_axis(ct.GetDirection())
    slices = painted_slices(painted_array, axis) if slices is None else sorted(set(slices))
    return _labelmap_like(merge_keeping_painted(_array(prediction), painted_array, slices, axis), ct)


def prepare_annotation(
    ct_path: str | Path,
    annotation_path: str | Path,
    output: str | Path,
    recorded: Iterable[int] = (),
    written_path: str | Path | None = None,
    label_set: LabelSet = FLARE22,
) -> dict:
    """Write the annotated slices of a Slicer segmentation (all other slices cleared) for fine-tuning.

    `written_path`: the labels last written back (`save_written_labels`), if any. Returns the annotation
    summary. InputError when no slice is annotated. Segments are read as organs of `label_set`.
    """
    ct = read_ct(ct_path)
    current = read_labels(annotation_path, ct, label_set=label_set)
    written = load_written_labels(written_path, _array(current).shape)
    labels, summary = annotated_labels(ct, current, recorded, written, annotation_path, label_set)
    write_labelmap(labels, output, label_set=label_set)
    return summary


def write_back(
    ct_path: str | Path,
    prediction_path: str | Path,
    painted_path: str | Path,
    output: str | Path,
    slices: Iterable[int] | None = None,
    written_output: str | Path | None = None,
    label_set: LabelSet = FLARE22,
) -> dict:
    """The prediction with the painted slices kept, as a .seg.nrrd with a segment for every organ of `label_set`.

    `painted_path` holds the annotated slices only (as `prepare_annotation` wrote them); `slices` are kept
    as painted, by default every slice with a label there (pass the summary's slices to keep a slice the
    user cleared to background too). `written_output`, if given, receives the merged labels
    (`save_written_labels`): the reference for telling the user's later corrections from the model's
    output. Returns the summary.
    """
    ct = read_ct(ct_path)
    painted = read_labels(painted_path, ct, label_set=label_set)
    merged = merged_labels(ct, read_labels(prediction_path, ct, label_set=label_set), painted, slices)
    write_labelmap(merged, output, all_organs=True, label_set=label_set)
    if written_output is not None:
        save_written_labels(_array(merged), written_output)
    axis = axial_axis(ct.GetDirection())
    painted_array = _array(painted)
    return annotation_summary(painted_array, painted_slices(painted_array, axis) if slices is None else slices, axis, label_set=label_set)
