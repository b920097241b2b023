"""The FLARE22 label table and matching segments to organs."""

from __future__ import annotations

import pytest
from slicerio.segmentation import terminology_entry_from_string

from DiffusionSegLib.organs import NUM_CLASSES, ORGANS, match_organ, organ_by_label, terminology_string


def test_table_is_flare22():
    assert NUM_CLASSES == 14
    assert [o.label for o in ORGANS] == list(range(1, 14))
    assert [o.name for o in ORGANS] == [
        "liver", "right kidney", "spleen", "pancreas", "aorta", "inferior vena cava", "right adrenal gland",
        "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney",
    ]
    assert all(all(0 <= c <= 255 for c in o.color) for o in ORGANS)
    with pytest.raises(KeyError):
        organ_by_label(14)


def test_terminology_strings_parse_in_slicerio():
    liver = terminology_entry_from_string(terminology_string(organ_by_label(1)))
    assert liver["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert liver["type"] == ["SCT", "10200004", "Liver"]
    left_kidney = terminology_entry_from_string(terminology_string(organ_by_label(13)))
    assert left_kidney["typeModifier"] == ["SCT", "7771000", "Left"]


@pytest.mark.parametrize("organ", ORGANS, ids=lambda o: o.name)
def test_terminology_identifies_each_organ(organ):
    text = terminology_string(organ)
    assert match_organ(None, text) is organ
    assert match_organ("whatever the user typed", terminology_entry_from_string(text)) is organ


@pytest.mark.parametrize(
    "name, label",
    [
        ("Liver", 1), ("kidney_right", 2), ("Right Kidney", 2), ("right_kidney", 2), ("kidney left", 13),
        ("inferior_vena_cava", 6), ("IVC", 6), ("adrenal_gland_left", 8), ("Left adrenal", 8), ("gall bladder", 9),
        ("Oesophagus", 10), ("esophagus", 10), ("Duodenum", 12),
    ],
)
def test_names_match(name, label):
    assert match_organ(name).label == label


def test_unknown_segments_match_nothing():
    assert match_organ("tumor") is None
    assert match_organ("Segment_1", {"type": ["SCT", "113197003", "Rib"]}) is None
    assert match_organ(None, None) is None
