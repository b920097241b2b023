"""The phantom generator itself: geometry, anatomy in physical space, HU, determinism, DICOM round trip."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from Training.benchmarks.phantom import FLIPPED_DIRECTION, make_phantom, oblique_direction, write_dicom_series

OBLIQUE = oblique_direction((20, 10, 30))
DIRECTIONS = {"identity": None, "flipped": FLIPPED_DIRECTION, "oblique": OBLIQUE}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def grid_centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def physical_centroid(labels: sitk.Image, organ: int) -> np.ndarray:
    index = np.argwhere(array(labels) == organ).mean(axis=0)[::-1]  # x, y, z continuous index
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(index.tolist()))


@pytest.fixture(scope="module")
def default_phantom() -> tuple[np.ndarray, np.ndarray]:
    ct, labels = make_phantom()
    return array(ct), array(labels)


def test_default_grid_and_pixel_types():
    ct, labels = make_phantom()
    for image in (ct, labels):
        assert image.GetSize() == (96, 96, 40)
        assert image.GetSpacing() == (4.0, 4.0, 5.0)
        assert image.GetDirection() == IDENTITY
        assert np.allclose(grid_centre(image), 0, atol=1e-6)  # centred on the body
    assert ct.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_requested_geometry(name):
    direction = DIRECTIONS[name]
    size, spacing = (50, 44, 18), (3.5, 4.5, 7.0)  # anisotropic, non-cubic
    ct, labels = make_phantom(size=size, spacing=spacing, direction=direction, seed=2)
    for image in (ct, labels):
        assert image.GetSize() == size
        assert np.allclose(image.GetSpacing(), spacing)
        assert np.allclose(image.GetDirection(), direction or IDENTITY)
        assert np.allclose(grid_centre(image), 0, atol=1e-6)
    assert np.array_equal(ct.GetOrigin(), labels.GetOrigin())


def test_explicit_origin_and_float_pixels():
    ct, labels = make_phantom(size=(30, 30, 10), origin=(-50.0, -60.0, -20.0), pixel_type=sitk.sitkFloat32)
    assert ct.GetOrigin() == (-50.0, -60.0, -20.0) == labels.GetOrigin()
    assert ct.GetPixelID() == sitk.sitkFloat32
    assert not np.array_equal(array(ct), np.rint(array(ct)))  # not rounded


def test_all_organs_present_with_plausible_hu(default_phantom):
    ct, labels = default_phantom
    assert set(np.unique(labels)) == set(range(14))
    assert (ct < -900).mean() > 0.1  # air around the body
    assert np.any(ct > 400)  # bone
    mean = {organ: ct[labels == organ].mean() for organ in range(1, 14)}
    assert 40 < mean[1] < 80  # liver
    assert 35 < mean[3] < 70  # spleen
    assert 15 < mean[2] < 50 and 15 < mean[13] < 50  # kidneys
    assert 30 < mean[4] < 60  # pancreas
    assert mean[5] > 150  # contrast-enhanced aorta
    assert mean[9] < mean[1] - 30  # bile is darker than liver
    assert (ct[labels == 11] < -800).any()  # stomach gas
    assert mean[5] > mean[6] > mean[1]  # inferior vena cava: less enhanced than the aorta
    assert all(0 < mean[organ] < 80 for organ in (7, 8, 10))  # adrenals, esophagus: soft tissue
    for organ in (7, 8, 10):  # small organs still span a few slices
        assert len(np.unique(np.nonzero(labels == organ)[0])) >= 3


def test_organs_sit_at_anatomical_levels(default_phantom):
    _, labels = default_phantom
    slices = {organ: np.unique(np.nonzero(labels == organ)[0]) for organ in range(1, 14)}
    assert not all(len(s) == labels.shape[0] for s in slices.values())  # not every slice has every organ
    assert slices[10].min() > labels.shape[0] // 2  # esophagus: upper slices only
    assert slices[1].mean() > slices[2].mean() and slices[3].mean() > slices[13].mean()  # liver/spleen above kidneys
    assert slices[7].mean() > slices[2].mean() and slices[8].mean() > slices[13].mean()  # adrenals above kidneys


def test_no_label_outside_the_body():
    ct, labels = make_phantom(noise_hu=0)
    air = sitk.ConnectedThreshold(ct, seedList=[(0, 0, 0)], lower=-2000, upper=-500)  # air connected to the corner
    assert sitk.GetArrayViewFromImage(air).sum() > 0
    assert not np.any(array(labels)[sitk.GetArrayViewFromImage(air) > 0])


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_patient_left_right_and_front_back_for_every_direction(name):
    _, labels = make_phantom(direction=DIRECTIONS[name], seed=5)
    liver, spleen = physical_centroid(labels, 1), physical_centroid(labels, 3)
    assert liver[0] < 0 < spleen[0]  # LPS: the liver on the patient's right (-x), the spleen on the left
    assert physical_centroid(labels, 2)[0] < 0 < physical_centroid(labels, 13)[0]
    assert physical_centroid(labels, 11)[1] < physical_centroid(labels, 2)[1]  # stomach anterior to the kidneys
    assert liver[2] > physical_centroid(labels, 2)[2]  # liver superior to the right kidney


def test_flipped_grid_is_the_same_patient_mirrored_in_index_space():
    """FLIPPED_DIRECTION with a centred origin samples exactly the same physical points, in reverse x/y order."""
    ct, labels = make_phantom(seed=4, noise_hu=0)
    ct_f, labels_f = make_phantom(seed=4, noise_hu=0, direction=FLIPPED_DIRECTION)
    assert np.array_equal(array(labels_f), array(labels)[:, ::-1, ::-1])
    assert np.array_equal(array(ct_f), array(ct)[:, ::-1, ::-1])


@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_anatomy_is_defined_in_physical_space(name):
    _, reference = make_phantom(seed=4)
    _, labels = make_phantom(seed=4, direction=DIRECTIONS[name])
    # The label at the liver centroid, looked up by physical point.
    point = physical_centroid(reference, 1)
    assert reference[reference.TransformPhysicalPointToIndex(point.tolist())] == 1
    assert labels[labels.TransformPhysicalPointToIndex(point.tolist())] == 1
    # Organ voxels of the reference grid, looked up in the other grid by physical point: mostly the same organ
    # (the oblique grid's voxels are elsewhere, so boundary voxels may differ).
    ref = array(reference)
    other = array(labels)
    picks = np.argwhere(ref > 0)[:: 7]
    agree = total = 0
    for k, j, i in picks:
        index = np.array(labels.TransformPhysicalPointToContinuousIndex(reference.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))))
        nearest = np.rint(index).astype(int)
        if np.all(nearest >= 0) and np.all(nearest < labels.GetSize()):
            total += 1
            agree += other[nearest[2], nearest[1], nearest[0]] == ref[k, j, i]
    assert total > 0.5 * len(picks)
    assert agree / total > (0.999 if name == "flipped" else 0.8)


def test_seed_controls_the_patient():
    ct, labels = make_phantom(seed=1)
    ct2, labels2 = make_phantom(seed=1)
    assert np.array_equal(array(labels), array(labels2)) and np.array_equal(array(ct), array(ct2))
    other_ct, other_labels = make_phantom(seed=2)
    assert not np.array_equal(array(labels), array(other_labels))
    assert not np.array_equal(array(ct), array(other_ct))


def test_noise_level():
    ct, labels = make_phantom(noise_hu=0)
    noisy, _ = make_phantom(noise_hu=20)
    difference = (array(noisy).astype(float) - array(ct))[array(labels) == 1]
    assert 17 < difference.std() < 23


@pytest.mark.parametrize("direction", [None, OBLIQUE], ids=["identity", "oblique"])
def test_dicom_roundtrip(direction, tmp_path):
    ct, _ = make_phantom(size=(40, 36, 8), spacing=(5.0, 4.0, 7.5), direction=direction)
    paths = write_dicom_series(ct, tmp_path)
    assert len(paths) == 8 and all(p.exists() for p in paths)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(tmp_path))
    assert len(series) == 1
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path), series[0]))
    back = reader.Execute()
    assert back.GetSize() == ct.GetSize()
    assert np.allclose(back.GetSpacing(), ct.GetSpacing())
    assert np.allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), ct.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(array(back), array(ct))
    first = sitk.ReadImage(str(paths[0]))
    assert first.GetMetaData("0008|0060").strip() == "CT"
