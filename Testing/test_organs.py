"""The FLARE22 label table, its Slicer terminology, and matching segments to organs."""

from __future__ import annotations

import pytest
from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string

from DiffusionSegLib.organs import (
    NUM_CLASSES,
    ORGANS,
    match_organ,
    organ_by_label,
    terminology_entry,
    terminology_string,
)

# (id, name, SNOMED CT type code, meaning, side modifier code, colour) as in Slicer's
# SegmentationCategoryTypeModifier-DICOM-Master.json; the IVC colour is SlicerTotalSegmentator's.
EXPECTED = [
    (1, "liver", "10200004", "Liver", None, (221, 130, 101)),
    (2, "right kidney", "64033007", "Kidney", "24028007", (185, 102, 83)),
    (3, "spleen", "78961009", "Spleen", None, (157, 108, 162)),
    (4, "pancreas", "15776009", "Pancreas", None, (249, 180, 111)),
    (5, "aorta", "15825003", "Aorta", None, (224, 97, 76)),
    (6, "inferior vena cava", "64131007", "Inferior vena cava", None, (0, 151, 206)),
    (7, "right adrenal gland", "23451007", "Adrenal gland", "24028007", (249, 186, 150)),
    (8, "left adrenal gland", "23451007", "Adrenal gland", "7771000", (249, 186, 150)),
    (9, "gallbladder", "28231008", "Gallbladder", None, (139, 150, 98)),
    (10, "esophagus", "32849002", "Esophagus", None, (211, 171, 143)),
    (11, "stomach", "69695003", "Stomach", None, (216, 132, 105)),
    (12, "duodenum", "38848004", "Duodenum", None, (255, 253, 229)),
    (13, "left kidney", "64033007", "Kidney", "7771000", (185, 102, 83)),
]


def test_table_is_flare22_with_slicer_codes_and_colours():
    assert NUM_CLASSES == 14 and len(ORGANS) == 13
    for organ, (label, name, code, meaning, modifier, color) in zip(ORGANS, EXPECTED, strict=True):
        assert (organ.label, organ.name, organ.color) == (label, name, color)
        assert organ.display_name == name[0].upper() + name[1:]
        assert tuple(organ.category) == ("SCT", "123037004", "Anatomical Structure")
        assert tuple(organ.type) == ("SCT", code, meaning)
        assert (organ.modifier.value if organ.modifier else None) == modifier
        assert organ_by_label(label) is organ
        assert organ.color_float == pytest.approx([c / 255 for c in color])
    assert {o.modifier.meaning for o in ORGANS if o.modifier} == {"Right", "Left"}


@pytest.mark.parametrize("label", [0, 14, -1])
def test_organ_by_label_rejects_other_ids(label):
    with pytest.raises(KeyError, match="1-13"):
        organ_by_label(label)


def test_terminology_string_is_slicers_format():
    assert terminology_string(organ_by_label(1)) == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert terminology_string(organ_by_label(13)).split("~")[2:4] == ["SCT^64033007^Kidney", "SCT^7771000^Left"]
    for organ in ORGANS:  # 7 fields, each code a scheme^value^meaning triple
        fields = terminology_string(organ).split("~")
        assert len(fields) == 7 and all(f.count("^") == 2 for i, f in enumerate(fields) if i not in (0, 4))


@pytest.mark.parametrize("organ", ORGANS, ids=lambda o: o.name)
def test_terminology_identifies_each_organ(organ):
    text = terminology_string(organ)
    parsed = terminology_entry_from_string(text)
    assert parsed == terminology_entry(organ)
    assert terminology_entry_to_string(terminology_entry(organ)) == text  # what slicerio writes
    assert match_organ(None, text) is organ
    assert match_organ("a name the user typed", parsed) is organ  # terminology before name
    assert match_organ("Spleen" if organ.label != 3 else "Liver", text) is organ


def test_terminology_variants():
    general = "Segmentation category and type - 3D Slicer General Anatomy list"
    kidney_left_srt = f"{general}~SRT^123037004^Anatomical Structure~SRT^64033007^Kidney~SRT^7771000^Left~~^^~^^"
    assert match_organ(None, kidney_left_srt).label == 13
    tissue = f"{general}~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"
    assert match_organ("Gall bladder", tissue).label == 9  # Slicer's default terminology: the name decides
    assert match_organ(None, tissue) is None
    kidney_no_side = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "64033007", "Kidney"]}
    assert match_organ("kidney_left", kidney_no_side).label == 13
    assert match_organ("kidney", kidney_no_side) is None
    liver_right = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"], "typeModifier": ["SCT", "24028007", "Right"]}
    assert match_organ(None, liver_right).label == 1
    dicom_json = {"SegmentedPropertyTypeCodeSequence": {"CodingSchemeDesignator": "SCT", "CodeValue": "78961009", "CodeMeaning": "Spleen"}}
    assert match_organ(None, dicom_json).label == 3
    liver_mass = "ctx~SCT^49755003^Morphologically Altered Structure~SCT^10200004^Liver~^^~ctx~^^~^^"
    assert match_organ(None, liver_mass) is None  # an organ code under another category is not the organ
    assert match_organ("Pancreas", "garbage").label == 4


@pytest.mark.parametrize(
    "name, label",
    [
        ("Liver", 1), ("liver", 1), ("LIVER", 1), (" liver ", 1), ("Liver_1", 1),
        ("kidney_right", 2), ("Right Kidney", 2), ("right_kidney", 2), ("kidney right", 2), ("Kidney, Right", 2), ("rightKidney", 2),
        ("kidney_R", 2), ("RK", 2), ("spleen", 3), ("Pancreas", 4), ("aorta", 5),
        ("inferior_vena_cava", 6), ("Inferior vena cava", 6), ("IVC", 6), ("postcava", 6),
        ("adrenal_gland_right", 7), ("Right adrenal gland", 7), ("RAG", 7),
        ("adrenal_gland_left", 8), ("left adrenal", 8), ("Left Adrenal Gland", 8), ("suprarenal gland left", 8),
        ("gallbladder", 9), ("gall bladder", 9), ("Gall-bladder", 9),
        ("esophagus", 10), ("Oesophagus", 10), ("stomach", 11), ("duodenum", 12),
        ("kidney_left", 13), ("Left kidney", 13), ("kidney left", 13), ("L kidney", 13),
    ],
)
def test_names_match(name, label):
    assert match_organ(name).label == label
    assert match_organ(name, None).label == label


@pytest.mark.parametrize("name", ["tumor", "liver tumor", "Segment_1", "kidney", "adrenal gland", "right left kidney", "portal vein", "", None])
def test_unknown_segments_match_nothing(name):
    assert match_organ(name) is None


def test_unknown_terminology_falls_back_to_name():
    rib = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "113197003", "Rib"]}
    assert match_organ("Segment_1", rib) is None
    assert match_organ("Duodenum", rib).label == 12
    assert match_organ(None, None) is None
