"""Painted slices, and writing a new prediction back without overwriting them (the array side, numpy only).

The annotate / fine-tune loop in Slicer works on one segmentation: the user paints some axial slices, the
model is fine-tuned on them, and its prediction for the whole volume is written back into the same
segmentation. The painted slices must survive that, and the next fine-tuning must train on the painted
slices only, not on the model's own output. So the module remembers, per segmentation, which slices were
annotated and the labels it wrote; a slice counts as annotated if it was annotated before or now differs
from what was written (the user corrected it). Before any write-back every touched slice is annotated.

Labels are partial: an annotated slice is annotated for the organs the user painted on any annotated slice
(`annotated_organs`), not for every organ of the model's label set (`organs.LabelSet`; FLARE22's 13 unless the model's
card says otherwise). An organ segment that exists but is empty (the annotation segmentation is prepared with every
organ of the set) labels nothing; the organs not labelled are kept from the model fine-tuning
starts from when that is a segmentation model (`describe_organ_plan` words it for the panel).

Arrays are SimpleITK order (k, j, i); `slice_axis` is the SimpleITK index axis (0 = i, 2 = k) that runs
along the axial slices, as in ``annotations.annotated_input_slices``. The file side (reading the CT and
.seg.nrrd files, writing the merged result) is `DiffusionSegLib.writeback`, run by the engine's
``diffusionseg refine`` (`DiffusionSegLib.refine`); everything here also runs in Slicer before the engine's
packages are installed, e.g. for the annotated-slice count.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np

from .. import atomic  # standard library only
from ..organs import FLARE22, LabelSet
from ..orientation import axial_axis as axial_axis  # numpy only: the slices painted here are the model's slices

WRITTEN_SUFFIX = ".npz"
WRITTEN_MAX_AGE_DAYS = 90  # a written-labels file the open scene does not use is deleted after this long unused
PARTIAL_MAX_AGE_DAYS = 1  # a leftover of a killed writer (not a file another Slicer is writing right now)


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


def segment_organ_ids(segments: Sequence[tuple[str | None, str | dict | None]], label_set: LabelSet = FLARE22) -> list[int | None]:
    """The id in `label_set` of each (name, terminology) segment, None where it matches no organ of the set.

    Write-back replaces only the segments with an id and keeps the others (a tumour, a note) as they are.
    """
    ids = []
    for name, terminology in segments:
        organ = label_set.match(name, terminology)
        ids.append(None if organ is None else organ.label)
    return ids


def organ_labels(values: np.ndarray, organ_ids: Sequence[int | None]) -> tuple[np.ndarray, list[int]]:
    """A segment-value labelmap (value v = segment v-1, as Slicer exports visible segments) as label ids (`segment_organ_ids`).

    Returns the labels and the segment numbers (0-based) that have voxels but match no organ.
    """
    table = np.zeros(max(len(organ_ids), int(values.max(initial=0))) + 1, dtype=np.uint8)
    for number, label in enumerate(organ_ids):
        if label is not None:
            table[number + 1] = label
    present = set(np.unique(values).tolist()) - {0}
    unmatched = sorted(v - 1 for v in present if v - 1 >= len(organ_ids) or organ_ids[v - 1] is None)
    return table[values], unmatched


def annotated_organs(labels: np.ndarray, slices: Iterable[int], slice_axis: int, written: np.ndarray | None = None,
                     label_set: LabelSet = FLARE22) -> set[int]:
    """Ids (of `label_set`) of the organs the annotated `slices` label: those painted on any of them, and those erased there from
    the labels last written back (erasing the model's wrong liver says where the liver is not).

    Only the annotated slices count: after a write-back the rest of the segmentation is the model's output, not
    painting; before one, every voxel lies on an annotated slice, so these are the organs with a voxel anywhere.
    """
    index = sorted(set(slices))
    if not index:
        return set()
    current = _along(labels, slice_axis)[index]
    present = set(np.unique(current).tolist())
    if written is not None:
        before = _along(written, slice_axis)[index]
        present |= set(np.unique(before[before != current]).tolist())
    return {o.label for o in label_set if o.label in present}


def annotation_summary(labels: np.ndarray, slices: Iterable[int], slice_axis: int, written: np.ndarray | None = None,
                       label_set: LabelSet = FLARE22) -> dict:
    """Annotated slices and the organs they label (`annotated_organs`; names in the label set's order)."""
    index = sorted(set(slices))
    organs = annotated_organs(labels, index, slice_axis, written, label_set)
    return {"slices": index, "organs": label_set.names(organs), "slice_axis": slice_axis}


def describe_organ_plan(organs: Iterable[str], starting_model: str | None, label_set: LabelSet = FLARE22) -> str:
    """What fine-tuning does with each organ, in a few sentences for the panel and its log.

    `organs`: names of the organs the annotation labels (`annotation_summary`), of the new model's `label_set`.
    `starting_model`: the name of the segmentation model fine-tuning starts from, which keeps the organs not labelled;
    None when it starts from the pretrained base or from scratch, where nothing teaches them
    (`commands.FinetuneSettings.starting_segmentor`).
    """
    labelled = {name.lower() for name in organs}
    learned = [o.display_name for o in label_set if o.name in labelled]
    others = [o.display_name for o in label_set if o.name not in labelled]
    if not learned:
        return "No organ painted yet: fine-tuning learns the organs you paint."
    text = f"Learned from your slices: {', '.join(learned)}."
    if not others:
        return text
    if starting_model:
        return f"{text} Kept from the starting model ({starting_model}): {', '.join(others)}."
    return (f"{text} Not learned, as fine-tuning does not start from a segmentation model (the new model will not find them): "
            f"{', '.join(others)}. Paint them, or start from a segmentation model to keep them.")


# --- the labels last written back: the reference that tells the user's corrections from the model's output ---


def new_written_path(folder: str | Path) -> Path:
    """A fresh file name in `folder` for one segmentation's written labels."""
    return Path(folder) / f"{uuid.uuid4().hex}{WRITTEN_SUFFIX}"


def save_written_labels(labels: np.ndarray, path: str | Path) -> Path:
    """Store the labels written back (k, j, i) as compressed numpy, replacing `path` only once complete.

    Numpy, not NRRD: the annotated-slice count reads it on every paint stroke, before SimpleITK extras or
    slicerio are installed and without a geometry to check (the shape is checked against the CT).
    """
    with atomic.atomic_path(path) as partial, open(partial, "wb") as f:
        np.savez_compressed(f, labels=np.ascontiguousarray(labels, dtype=np.uint8))
    return Path(path)


def load_written_labels(path: str | Path | None, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """The labels last written back; None when there is none, it cannot be read, or it has another `shape`."""
    if path is None or not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            labels = stored["labels"]
    except (OSError, ValueError, KeyError):
        return None  # then the recorded slices alone say what was annotated
    return labels if shape is None or labels.shape == tuple(shape) else None


def prune_written_labels(folder: str | Path, keep: Collection[str | Path] = (), max_age_days: float = WRITTEN_MAX_AGE_DAYS,
                         now: float | None = None) -> list[Path]:
    """Delete written-labels files in `folder` not in `keep` and untouched for `max_age_days`; returns those deleted.

    A file is tied to a segmentation only through a node attribute, which a saved scene keeps, so a file
    the open scene does not use may still belong to a scene on disk: only long-unused ones are removed.
    Leftovers of interrupted writes go after a day.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    kept = {Path(p).resolve() for p in keep}
    now = time.time() if now is None else now
    deleted = []
    for path in folder.iterdir():
        if path.resolve() in kept:
            continue
        if path.name.startswith(".") and atomic.TEMP_MARK in path.name:
            days = PARTIAL_MAX_AGE_DAYS
        elif path.is_file() and path.suffix == WRITTEN_SUFFIX:
            days = max_age_days
        else:
            continue  # not ours
        if path.stat().st_mtime < now - days * 86400:
            atomic.remove(path)
            deleted.append(path)
    return deleted
