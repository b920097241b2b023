"""Annotated slices: which axial slices a user painted, and the training pairs they give.

A slice with any labelled voxel counts as fully annotated: every unlabelled voxel of it is taken as
background. That is what makes four painted slices enough, and why the user is told so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .organs import ORGANS
from .preprocessing import ModelSpaceVolume, PreprocessingSpec, labels_to_model_space, to_model_space


def annotated_input_slices(labels: sitk.Image, slice_axis: int) -> list[int]:
    """Indices along `slice_axis` (SimpleITK axis order) of the slices holding any labelled voxel."""
    array = sitk.GetArrayViewFromImage(labels)  # z, y, x: SimpleITK axis i is array axis 2 - i
    other = tuple(a for a in range(3) if a != 2 - slice_axis)
    return [int(i) for i in np.flatnonzero(array.any(axis=other))]


def organs_in(labels: np.ndarray) -> list[str]:
    present = set(np.unique(labels).tolist())
    return [o.name for o in ORGANS if o.label in present]


@dataclass
class TrainingSlices:
    images: torch.Tensor  # K x 1 x S x S float32 in [-1, 1]
    labels: torch.Tensor  # K x S x S int64 FLARE22 ids
    sources: list[tuple[int, int]]  # (volume number, input slice index) per training slice

    def summary(self) -> dict:
        return {"slices": len(self.sources), "organs": organs_in(self.labels.numpy())}


def training_slices(pairs: list[tuple[sitk.Image, sitk.Image]], spec: PreprocessingSpec) -> TrainingSlices:
    """Model-space images and labels of the annotated slices of each (ct, labels) pair."""
    images, labels, sources = [], [], []
    for number, (ct, labelmap) in enumerate(pairs):
        volume = to_model_space(ct, spec)
        model_labels = labels_to_model_space(labelmap, volume)
        for index in annotated_input_slices(labelmap, volume.slice_axis):
            k = volume.model_slice(index)
            images.append(volume.slices[k])
            labels.append(model_labels[k])
            sources.append((number, index))
    if not sources:
        return TrainingSlices(torch.zeros(0, 1, spec.size, spec.size), torch.zeros(0, spec.size, spec.size, dtype=torch.long), [])
    return TrainingSlices(
        images=torch.from_numpy(np.stack(images))[:, None],
        labels=torch.from_numpy(np.stack(labels)).long(),
        sources=sources,
    )


def model_space_annotated(volume: ModelSpaceVolume, labels: sitk.Image) -> list[int]:
    """Model slice indices of the annotated slices of `labels` (on `volume`'s input grid)."""
    return [volume.model_slice(i) for i in annotated_input_slices(labels, volume.slice_axis)]
