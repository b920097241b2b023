"""Model space: orientation, spacing, intensity, and the exact way back to the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import same_geometry, shared_data

from DiffusionSegLib.imageio import read_ct
from DiffusionSegLib.preprocessing import (
    Grid,
    PreprocessingSpec,
    canonical_axes,
    labels_to_model_space,
    to_image_space,
    to_model_space,
)
from DiffusionSegLib.probability_resampling import probabilities_to_image_space
from Training.benchmarks.phantom import FLIPPED_DIRECTION, make_phantom, oblique_direction

# x and y swapped and z reversed: a file whose index axes are not in LPS order at all.
PERMUTED_DIRECTION = (0, 1, 0, 1, 0, 0, 0, 0, -1)
OBLIQUE = oblique_direction((15, 10, 25))
DIRECTIONS = {"identity": None, "flipped": FLIPPED_DIRECTION, "permuted": PERMUTED_DIRECTION, "oblique": OBLIQUE}

# In-plane spacing equal to the phantom's, so model grid points coincide with input voxels.
SPEC = PreprocessingSpec(size=64, spacing_mm=5.0)


def phantom(direction, size=(48, 48, 20), spacing=(5.0, 5.0, 8.0), noise_hu=15.0):
    return make_phantom(size=size, spacing=spacing, direction=direction, seed=1, noise_hu=noise_hu)



def test_canonical_axes():
    assert canonical_axes((1, 0, 0, 0, 1, 0, 0, 0, 1)) == ([0, 1, 2], [1, 1, 1])
    assert canonical_axes(FLIPPED_DIRECTION) == ([0, 1, 2], [-1, -1, 1])
    assert canonical_axes(PERMUTED_DIRECTION) == ([1, 0, 2], [1, 1, -1])
    axes, _ = canonical_axes(OBLIQUE)
    assert sorted(axes) == [0, 1, 2]


@pytest.mark.parametrize("name", ["flipped", "permuted"])
def test_model_space_is_independent_of_file_orientation(name):
    """The same patient stored with another axis order/sign gives the same model-space slices."""
    # Noiseless: the phantom's noise is drawn per array element, so it differs between storage orders.
    reference = to_model_space(phantom(None, noise_hu=0)[0], SPEC)
    other = to_model_space(phantom(DIRECTIONS[name], noise_hu=0)[0], SPEC)
    assert other.slices.shape == reference.slices.shape
    np.testing.assert_allclose(other.slices, reference.slices, atol=1e-5)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_radiological_layout_in_model_space(name):
    """Row 0 is anterior and column 0 the patient's right, whatever the direction matrix."""
    ct, labels = phantom(DIRECTIONS[name])
    volume = to_model_space(ct, SPEC)
    model_labels = labels_to_model_space(labels, volume)

    def centroid(*organs: int) -> np.ndarray:
        return np.argwhere(np.isin(model_labels, organs)).mean(axis=0)  # slice, row, column

    right, left = centroid(1, 2), centroid(3, 13)  # liver + right kidney, spleen + left kidney
    anterior, posterior = centroid(11), centroid(2, 13)  # stomach, kidneys
    assert right[2] < left[2]
    assert anterior[1] < posterior[1]
    assert centroid(1)[0] > centroid(2, 13)[0]  # superior slices come last: liver above the kidneys


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_labels_roundtrip_exactly_onto_input_grid(name):
    ct, labels = phantom(DIRECTIONS[name])
    volume = to_model_space(ct, SPEC)
    back = to_image_space(labels_to_model_space(labels, volume), volume)
    assert same_geometry(back, ct)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_probabilities_roundtrip_on_a_finer_input_grid(name):
    """Input finer than the model grid: geometry exact, organs recovered up to boundary voxels."""
    ct, labels = phantom(DIRECTIONS[name], size=(120, 120, 20), spacing=(2.0, 2.0, 8.0))
    spec = PreprocessingSpec(size=64, spacing_mm=4.0)
    volume = to_model_space(ct, spec)
    onehot = np.eye(14, dtype=np.float32)[labels_to_model_space(labels, volume)].transpose(0, 3, 1, 2)
    back = probabilities_to_image_space((onehot * 255).astype(np.uint8), volume)
    assert same_geometry(back, ct)
    a, b = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels)
    assert back.GetPixelID() == sitk.sitkUInt8
    assert (a == b).mean() > 0.97
    liver = (a == 1) & (b == 1)
    assert 2 * liver.sum() / ((a == 1).sum() + (b == 1).sum()) > 0.9


def test_intensity_scaling_and_padding():
    ct, _ = phantom(None, size=(40, 40, 10))
    spec = PreprocessingSpec(size=64, spacing_mm=5.0)  # 64 x 5 mm is wider than the 40 x 5 mm scan
    volume = to_model_space(ct, spec)
    assert volume.slices.dtype == np.float32
    assert volume.slices.min() >= -1 and volume.slices.max() <= 1
    assert np.all(volume.slices[:, 0, :] == -1)  # padding outside the scan reads as air
    low, high = volume.clip_hu
    array = sitk.GetArrayViewFromImage(ct)
    assert low == pytest.approx(np.percentile(np.maximum(array, -1024), 0.5))
    assert high == pytest.approx(np.percentile(array, 99.5))


def test_scanner_padding_does_not_set_the_window():
    """-3024 outside the reconstruction circle must not drag the low clip value below air."""
    ct, _ = phantom(None, size=(40, 40, 10))
    array = sitk.GetArrayFromImage(ct)
    array[:, :6, :] = -3024
    padded = sitk.GetImageFromArray(array)
    padded.CopyInformation(ct)
    assert to_model_space(padded, SPEC).clip_hu[0] >= -1024


def test_flipped_slice_axis_maps_annotated_slices():
    ct, labels = phantom(PERMUTED_DIRECTION)  # z reversed: input slice i is model slice n-1-i
    volume = to_model_space(ct, SPEC)
    assert volume.slice_flipped
    model_labels = labels_to_model_space(labels, volume)
    array = sitk.GetArrayViewFromImage(labels)
    for index in (3, 10, 15):
        assert np.array_equal(np.unique(array[index]), np.unique(model_labels[volume.model_slice(index)]))


def test_spec_dict_roundtrip_and_validation():
    spec = PreprocessingSpec.for_size(64)
    assert spec.field_of_view_mm == pytest.approx(409.6)
    assert PreprocessingSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        PreprocessingSpec(clip_percentiles=(99.5, 0.5))


def test_grid_wrap_keeps_geometry():
    ct, _ = phantom(OBLIQUE)
    grid = Grid.of(ct)
    assert same_geometry(grid.wrap(sitk.GetArrayFromImage(ct)), ct)


def test_real_ct_geometry_and_orientation():
    """abdomen-ct-a is stored RAS-like (diag(-1,-1,1)); model space must still be radiological."""
    ct = read_ct(shared_data("abdomen-ct-a", "ct.nii.gz"))
    labels = sitk.ReadImage(str(shared_data("abdomen-ct-a", "labels.nii.gz")))
    volume = to_model_space(ct, PreprocessingSpec())
    model_labels = labels_to_model_space(labels, volume)
    _, _, liver_cols = np.nonzero(model_labels == 1)
    _, _, spleen_cols = np.nonzero(model_labels == 3)
    stomach_rows = np.nonzero(model_labels == 11)[1]
    kidney_rows = np.nonzero(np.isin(model_labels, (2, 13)))[1]
    assert liver_cols.mean() < 128 < spleen_cols.mean()  # patient right on the image left
    assert stomach_rows.mean() < kidney_rows.mean()  # anterior at the top
    back = to_image_space(model_labels, volume)
    assert same_geometry(back, ct)
    agreement = (sitk.GetArrayViewFromImage(back) == sitk.GetArrayViewFromImage(labels)).mean()
    assert agreement > 0.99
