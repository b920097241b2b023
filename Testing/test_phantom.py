"""The phantom generator itself: geometry, anatomy in physical space, DICOM round trip."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from phantom import FLIPPED_DIRECTION, make_phantom, oblique_direction, write_dicom_series

OBLIQUE = oblique_direction((20, 10, 30))


def test_default_phantom_has_all_organs_and_plausible_hu():
    ct, labels = make_phantom()
    ct_a, lab_a = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(labels)
    assert ct.GetSize() == (96, 96, 40) and ct.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(lab_a)) == set(range(14))
    assert ct_a.min() < -900
    assert 40 < ct_a[lab_a == 1].mean() < 80  # liver
    assert ct_a[lab_a == 5].mean() > 150  # contrast-enhanced aorta
    assert set(np.unique(lab_a[ct_a < -950])) <= {0, 11}  # only stomach gas is labelled air


@pytest.mark.parametrize("direction", [None, FLIPPED_DIRECTION, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_anatomy_is_defined_in_physical_space(direction):
    _, reference = make_phantom(seed=4)
    _, labels = make_phantom(seed=4, direction=direction, spacing=(4.0, 4.0, 5.0))
    assert np.allclose(labels.GetDirection(), direction or np.eye(3).ravel())
    centroid = np.argwhere(sitk.GetArrayViewFromImage(reference) == 1).mean(axis=0)[::-1]  # x, y, z index
    point = reference.TransformContinuousIndexToPhysicalPoint(centroid.tolist())
    assert point[0] < 0  # the liver is on the patient's right (LPS: -x)
    index = labels.TransformPhysicalPointToIndex(point)
    assert labels[index] == 1


def test_seed_controls_shapes():
    a = sitk.GetArrayFromImage(make_phantom(seed=1)[1])
    assert np.array_equal(a, sitk.GetArrayFromImage(make_phantom(seed=1)[1]))
    assert not np.array_equal(a, sitk.GetArrayFromImage(make_phantom(seed=2)[1]))


@pytest.mark.parametrize("direction", [None, OBLIQUE], ids=["identity", "oblique"])
def test_dicom_roundtrip(direction, tmp_path):
    ct, _ = make_phantom(size=(40, 36, 8), spacing=(5.0, 5.0, 7.5), direction=direction)
    write_dicom_series(ct, tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    back = reader.Execute()
    assert back.GetSize() == ct.GetSize()
    assert np.allclose(back.GetSpacing(), ct.GetSpacing())
    assert np.allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), ct.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct))
