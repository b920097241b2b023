"""What tells a user which organs to trust: held-out DSC from the card, adult volume ranges, anatomy warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_data

from DiffusionSegLib.anatomy_check import anatomy_warnings, lung_base, lung_fractions
from DiffusionSegLib.cli import main
from DiffusionSegLib.organ_trust import CHECK_BELOW, VOLUME_RANGES_ML, organ_trust, volume_note
from DiffusionSegLib.segment_statistics import add_trust, organ_statistics, statistics_table

CARD = {"provenance": {"metrics": {"held_out": {"organ_dsc": {"liver": 0.93, "pancreas": 0.31}}}}}


def test_held_out_dsc_marks_weak_and_unmeasured_organs():
    trust = organ_trust(CARD, {"liver": 1500.0, "pancreas": 70.0, "aorta": 90.0})
    assert trust["liver"].held_out_dsc == 0.93 and not trust["liver"].check
    assert trust["pancreas"].check and "0.31: check" in trust["pancreas"].describe()
    assert trust["aorta"].held_out_dsc is None and trust["aorta"].check  # no held-out patient labels it
    assert 0.31 < CHECK_BELOW < 0.93


def test_a_card_without_figures_says_so_and_marks_nothing():
    trust = organ_trust({"provenance": {}}, {"liver": 1500.0})
    assert not trust["liver"].check and not trust["liver"].measured
    assert "no held-out figures" in trust["liver"].describe()


@pytest.mark.parametrize(("organ", "volume", "expected"), [
    ("liver", 1500.0, None), ("liver", 300.0, "below"), ("liver", 4000.0, "above"), ("spleen", 900.0, "above"),
    ("stomach", 5000.0, None),  # hollow: not bounded
])
def test_volume_ranges(organ, volume, expected):
    note = volume_note(organ, volume)
    assert (note is None) if expected is None else (expected in note)


def test_a_cut_off_organ_is_not_judged_by_volume():
    low, _ = VOLUME_RANGES_ML["liver"]
    assert volume_note("liver", low / 3) is not None
    assert volume_note("liver", low / 3, cut_off=True) is None


def _thorax_and_abdomen(liver_side: str) -> tuple[sitk.Image, sitk.Image]:
    """60 axial slices of 5 mm (30 cm), feet to head: abdomen below, lungs filling the chest in the top 24 slices."""
    k, j, i = np.mgrid[0:60, 0:96, 0:96]
    body = ((i - 48) / 44.0) ** 2 + ((j - 48) / 34.0) ** 2 <= 1
    ct = np.where(body, 40, -1000).astype(np.int16)
    chest = k >= 36
    for centre in (28, 68):  # right and left lung (i grows toward the patient's left in LPS), inside the chest wall
        ct[chest & (((i - centre) / 12.0) ** 2 + ((j - 48) / 20.0) ** 2 <= 1)] = -800
    labels = np.zeros(ct.shape, np.uint8)
    liver = (((i - 30) / 14.0) ** 2 + ((j - 48) / 14.0) ** 2 <= 1) & (k >= 8) & (k < 36)  # under the right lung
    if liver_side == "heart":
        liver |= (((i - 50) / 5.0) ** 2 + ((j - 40) / 8.0) ** 2 <= 1) & (k >= 40) & (k < 56)  # between the lungs, left of midline
    labels[liver] = 1
    images = []
    for array in (ct, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.0, 3.0, 5.0))
        images.append(image)
    return images[0], images[1]


def test_lungs_give_the_level():
    ct, _ = _thorax_and_abdomen("right")
    fractions, spacing = lung_fractions(ct)
    assert spacing == 5.0 and lung_base(fractions, spacing) == 36
    assert fractions[:36].max() < 0.05 < 0.25 < fractions[40]


def test_heart_taken_for_liver_is_flagged_and_a_normal_liver_is_not():
    assert anatomy_warnings(*_thorax_and_abdomen("right")) == []
    warnings = anatomy_warnings(*_thorax_and_abdomen("heart"))
    assert len(warnings) == 1 and "probably the heart" in warnings[0] and "fine-tune" in warnings[0]


def test_flipped_axis_gives_the_same_warnings():
    ct, labels = _thorax_and_abdomen("heart")
    flipped = []
    for image in (ct, labels):
        turned = sitk.Flip(image, [False, False, True])  # slices stored head to feet, direction says so
        flipped.append(turned)
    assert flipped[0].GetDirection()[8] == -1
    assert anatomy_warnings(*flipped) == anatomy_warnings(ct, labels)


def test_chest_scan_warns_once_about_coverage():
    ct, labels = _thorax_and_abdomen("right")
    chest_only = [image[:, :, 30:] for image in (ct, labels)]  # 3 cm below the lung bases
    warnings = anatomy_warnings(*chest_only)
    assert any("looks like a chest CT" in w for w in warnings)


def test_statistics_carry_trust_and_warnings():
    ct, labels = _thorax_and_abdomen("heart")
    statistics = organ_statistics(ct, labels)
    add_trust(statistics, CARD, anatomy_warnings(ct, labels))
    liver = statistics["organs"]["liver"]
    assert liver["held_out_dsc"] == 0.93 and liver["check"] is False and liver["cut_off"] is False
    assert any("probably the heart" in w for w in statistics["warnings"])
    assert any("held-out DSC" in line for line in statistics_table(statistics))


def test_segment_of_a_chest_ct_warns_about_the_liver(tmp_path, capsys):
    chest = shared_data("unlabeled", "chest-ct-elastix.nii.gz")
    stats = tmp_path / "stats.json"
    assert main(["segment", str(chest), "-o", str(tmp_path / "seg.nii.gz"), "--statistics", str(stats), "--progress", "none"]) == 0
    err = capsys.readouterr().err
    assert "looks like a chest CT" in err and "probably the heart" in err
    assert json.loads(stats.read_text())["warnings"]


def test_the_slicer_panel_shows_held_out_dsc_checks_and_warnings():
    import io

    from DiffusionSegLib.bridge.organ_volumes import OrganVolume, describe_volumes
    from DiffusionSegLib.bridge.progress_parser import Message, ProgressParser
    from DiffusionSegLib.progress import Progress

    stream = io.StringIO()
    Progress("json", stream).warning("liver: 109 mL of it lie left of the midline")
    events = [e for e in ProgressParser().feed(stream.getvalue()) if isinstance(e, Message)]
    assert [e.warning for e in events] == ["liver: 109 mL of it lie left of the midline"]
    rows = [OrganVolume("Liver", 1500.0, 60.0, 15.0), OrganVolume("Pancreas", 70.0, 80.0, 20.0), OrganVolume("Aorta", 90.0, 150.0, 30.0)]
    text = describe_volumes(rows, ["Gallbladder"], CARD, [events[0].warning]).splitlines()
    assert text[0].endswith("held-out DSC 0.93") and text[1].endswith("held-out DSC 0.31: check")
    assert text[2].endswith("not measured: check") and text[-1] == "Warning: liver: 109 mL of it lie left of the midline"
    assert describe_volumes(rows, [], None) .splitlines()[0] == "Liver: 1500.0 mL, 60 ± 15 HU"  # no card: as before
