"""The fast argmax-of-interpolated-probabilities equals interpolating every class with SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import same_geometry

from DiffusionSegLib.preprocessing import ModelSpaceVolume, PreprocessingSpec, to_model_space
from DiffusionSegLib.probability_resampling import probabilities_to_image_space
from Training.benchmarks.phantom import FLIPPED_DIRECTION, make_phantom, oblique_direction

DIRECTIONS = {
    "identity": None,
    "flipped": FLIPPED_DIRECTION,
    "permuted": (0, 1, 0, 1, 0, 0, 0, 0, -1),  # x and y swapped, z reversed
    "oblique": oblique_direction((15, 10, 25)),
}


def itk_reference(probabilities: np.ndarray, volume: ModelSpaceVolume) -> np.ndarray:
    """The slow definition: every class resampled linearly onto the input grid, then the argmax."""
    best = labels = None
    for c in range(probabilities.shape[1]):
        channel = volume.grid.wrap(np.ascontiguousarray(probabilities[:, c], dtype=np.float32))
        p = sitk.GetArrayFromImage(volume.reference.resample(channel, sitk.sitkLinear, 1.0 if c == 0 else 0.0, sitk.sitkFloat32))
        if best is None:
            best, labels = p, np.zeros(p.shape, dtype=np.uint8)
        else:
            wins = p > best
            best[wins], labels[wins] = p[wins], c
    return labels


def smooth_probabilities(shape: tuple[int, int, int], classes: int, seed: int) -> np.ndarray:
    """Random blob-like class maps (N x C x S x S uint8 summing to ~255), so boundaries run through cells."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    coarse = rng.random((n, classes, h // 4 + 1, w // 4 + 1)).astype(np.float32) ** 4
    fine = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w] + 0.02 * rng.random((n, classes, h, w), dtype=np.float32)
    return np.round(255 * fine / fine.sum(axis=1, keepdims=True)).astype(np.uint8)


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("pixel", [1.3, 2.0, 4.0])
def test_matches_interpolating_every_class(name, pixel):
    """Finer, equal and coarser input grids, larger than the model field of view (outside is background)."""
    ct, _ = make_phantom(size=(70, 64, 6), spacing=(pixel, pixel * 1.1, 5.0), direction=DIRECTIONS[name], seed=0)
    volume = to_model_space(ct, PreprocessingSpec(size=32, spacing_mm=3.0))
    probabilities = smooth_probabilities(volume.slices.shape, 14, seed=len(name))
    fast = probabilities_to_image_space(probabilities, volume)
    assert same_geometry(fast, ct) and fast.GetPixelID() == sitk.sitkUInt8
    expected = itk_reference(probabilities, volume)
    # Equal except where two classes tie to float rounding (different summation order).
    assert (sitk.GetArrayViewFromImage(fast) == expected).mean() > 0.999
    assert 0 < (expected == 0).mean() < 1


def test_uniform_cells_need_no_probabilities():
    """Where a class wins all 4 pixels around a point it wins there, even against a near tie."""
    volume = to_model_space(make_phantom(size=(40, 40, 3), spacing=(1.5, 1.5, 5.0), seed=0)[0], PreprocessingSpec(size=16, spacing_mm=3.0))
    probabilities = np.zeros((3, 3, 16, 16), dtype=np.uint8)
    probabilities[:, 1], probabilities[:, 2] = 128, 127  # class 1 wins everywhere by 1/255
    labels = sitk.GetArrayFromImage(probabilities_to_image_space(probabilities, volume))
    inside = labels != 0
    assert inside.mean() > 0.5 and np.all(labels[inside] == 1)
