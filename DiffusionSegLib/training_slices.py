"""Annotated slices: which axial slices a user painted, and the training pairs they give.

A slice with any labelled voxel counts as annotated for the organs labelled in that CT: an unlabelled
voxel of it is background, or one of the organs that CT does not label (partial labels: the
marginal loss in `finetune.segmentation_loss` handles those). That is what makes four painted slices
enough, and why the user is told so. Which organs a CT labels is, unless declared, the organs with any
voxel in its labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from .organs import FLARE22, LabelSet
from .preprocessing import PreprocessingSpec, labels_to_model_space, to_model_space


def annotated_input_slices(labels: sitk.Image, slice_axis: int) -> list[int]:
    """Indices along `slice_axis` (SimpleITK axis order) of the slices holding any labelled voxel."""
    array = sitk.GetArrayViewFromImage(labels)  # z, y, x: SimpleITK axis i is array axis 2 - i
    other = tuple(a for a in range(3) if a != 2 - slice_axis)
    return [int(i) for i in np.flatnonzero(array.any(axis=other))]


def organs_in(labels: np.ndarray, label_set: LabelSet = FLARE22) -> list[str]:
    return label_set.names(np.unique(labels).tolist())


def labelled_organs(labels: sitk.Image | np.ndarray) -> set[int]:
    """The organ ids with any voxel in `labels`: what a CT labels unless told otherwise."""
    array = sitk.GetArrayViewFromImage(labels) if isinstance(labels, sitk.Image) else labels
    return {int(v) for v in np.unique(array) if v > 0}


@dataclass
class TrainingSlices:
    images: torch.Tensor  # K x 1 x S x S float32 in [-1, 1]
    labels: torch.Tensor  # K x S x S int64 ids of `label_set`
    sources: list[tuple[int, int]]  # (volume number, input slice index) per training slice
    organ_sets: list[set[int]] = field(default_factory=list)  # per volume: the organ ids its labels cover
    label_set: LabelSet = FLARE22  # the organs the ids stand for

    def labelled(self, num_classes: int | None = None) -> torch.Tensor:
        """K x C bool: the classes labelled on each training slice (what `finetune` takes as `labelled`)."""
        num_classes = self.label_set.num_classes if num_classes is None else num_classes
        sets = [self.organ_sets[n] if self.organ_sets else None for n, _ in self.sources]
        mask = torch.ones(len(sets), num_classes, dtype=torch.bool)
        for row, organs in enumerate(sets):
            if organs is not None:
                mask[row, 1:] = False
                mask[row, sorted(o for o in organs if 0 < o < num_classes)] = True
        return mask

    def unlabelled_organs(self) -> list[str]:
        """Organs left unlabelled by at least one volume that has training slices, in the label set's order."""
        used = {n for n, _ in self.sources}
        every = set(self.label_set.labels)
        missing = set().union(*(every - self.organ_sets[n] for n in used)) if self.organ_sets and used else set()
        return self.label_set.names(missing)

    def summary(self) -> dict:
        summary = {"slices": len(self.sources), "organs": organs_in(self.labels.numpy(), self.label_set)}
        if unlabelled := self.unlabelled_organs():
            summary["labelled_organs"] = [self.label_set.names(organs) for organs in self.organ_sets]
            summary["unlabelled_organs"] = unlabelled
        return summary


def training_slices(pairs: list[tuple[sitk.Image, sitk.Image]], spec: PreprocessingSpec,
                    organ_sets: list[set[int] | None] | None = None, label_set: LabelSet = FLARE22) -> TrainingSlices:
    """Model-space images and labels (ids of `label_set`) of the annotated slices of each (ct, labels) pair.

    `organ_sets[n]` declares the organ ids pair n labels (its labels must hold no other); None, or
    no list, takes the organs with any voxel in its labels.
    """
    declared = list(organ_sets) if organ_sets is not None else [None] * len(pairs)
    if len(declared) != len(pairs):
        raise ValueError(f"{len(declared)} organ sets for {len(pairs)} labelled CTs")
    images, labels, sources, sets = [], [], [], []
    for number, (ct, labelmap) in enumerate(pairs):
        present = labelled_organs(labelmap)
        if declared[number] is not None and present - declared[number]:
            extra = label_set.names(present - declared[number])
            raise ValueError(f"labelled CT {number + 1} holds {', '.join(extra)}, which its declared organs leave out")
        sets.append(present if declared[number] is None else set(declared[number]))
        volume = to_model_space(ct, spec)
        model_labels = labels_to_model_space(labelmap, volume)
        for index in annotated_input_slices(labelmap, volume.slice_axis):
            k = volume.model_slice(index)
            images.append(volume.slices[k])
            labels.append(model_labels[k])
            sources.append((number, index))
    if not sources:
        return TrainingSlices(torch.zeros(0, 1, spec.size, spec.size), torch.zeros(0, spec.size, spec.size, dtype=torch.long), [], sets, label_set)
    return TrainingSlices(
        images=torch.from_numpy(np.stack(images))[:, None],
        labels=torch.from_numpy(np.stack(labels)).long(),
        sources=sources,
        organ_sets=sets,
        label_set=label_set,
    )
