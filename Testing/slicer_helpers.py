"""Helpers for the tests of the Slicer module's engine side: a random tiny segmentation model, painted slices."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DiffusionSegLib.models import ModelCard, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import preset_config


def random_tiny_segmentor(folder: Path, name: str = "test-random-segmentor") -> Path:
    """A randomly initialised `tiny` segmentation model: exercises the mechanics in seconds, predicts nonsense."""
    torch.manual_seed(0)
    config = preset_config("tiny")
    segmentor = Segmentor(config, head_width=32)
    card = ModelCard(
        kind="segmentor",
        unet=config,
        preprocessing=PreprocessingSpec.for_size(config.image_size),
        head={"width": 32, "layers": 2},
        strategy="fs",
        preset="tiny",
        name=name,
        provenance={"note": "random initialisation, test fixture"},
    )
    return save_model(folder, card, segmentor.state_dict())


def keep_array_slices(labels: sitk.Image, indices: Iterable[int]) -> sitk.Image:
    """`labels` with only the given array-z slices painted."""
    array = sitk.GetArrayFromImage(labels)
    kept = np.zeros_like(array)
    index = list(indices)
    kept[index] = array[index]
    image = sitk.GetImageFromArray(kept)
    image.CopyInformation(labels)
    return image
