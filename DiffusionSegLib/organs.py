"""The FLARE22 label table: ids, names, display colours and SNOMED CT terminology as 3D Slicer uses it."""

from __future__ import annotations

import re
from dataclasses import dataclass

NUM_CLASSES = 14  # background + 13 organs

# Slicer's terminology context names (the "DICOM master list" is Slicer's default since 5.x).
CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
RIGHT = ("SCT", "24028007", "Right")
LEFT = ("SCT", "7771000", "Left")

Code = tuple[str, str, str]  # coding scheme designator, code value, code meaning


@dataclass(frozen=True)
class Organ:
    label: int
    name: str  # lower-case English, as in the FLARE22 table
    display_name: str  # segment name shown in Slicer
    color: tuple[int, int, int]  # Slicer's recommended display colour, 0-255
    type: Code
    modifier: Code | None = None
    aliases: tuple[str, ...] = ()

    @property
    def color_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]


ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", (221, 130, 101), ("SCT", "10200004", "Liver")),
    Organ(2, "right kidney", "Right kidney", (185, 102, 83), ("SCT", "64033007", "Kidney"), RIGHT, ("kidney right",)),
    Organ(3, "spleen", "Spleen", (157, 108, 162), ("SCT", "78961009", "Spleen")),
    Organ(4, "pancreas", "Pancreas", (249, 180, 111), ("SCT", "15776009", "Pancreas")),
    Organ(5, "aorta", "Aorta", (224, 97, 76), ("SCT", "15825003", "Aorta")),
    Organ(6, "inferior vena cava", "Inferior vena cava", (0, 151, 206), ("SCT", "64131007", "Inferior vena cava"), None, ("ivc",)),
    Organ(7, "right adrenal gland", "Right adrenal gland", (249, 186, 150), ("SCT", "23451007", "Adrenal gland"), RIGHT,
          ("adrenal gland right", "right adrenal", "rag")),
    Organ(8, "left adrenal gland", "Left adrenal gland", (249, 186, 150), ("SCT", "23451007", "Adrenal gland"), LEFT,
          ("adrenal gland left", "left adrenal", "lag")),
    Organ(9, "gallbladder", "Gallbladder", (139, 150, 98), ("SCT", "28231008", "Gallbladder"), None, ("gall bladder",)),
    Organ(10, "esophagus", "Esophagus", (211, 171, 143), ("SCT", "32849002", "Esophagus"), None, ("oesophagus",)),
    Organ(11, "stomach", "Stomach", (216, 132, 105), ("SCT", "69695003", "Stomach")),
    Organ(12, "duodenum", "Duodenum", (255, 253, 229), ("SCT", "38848004", "Duodenum")),
    Organ(13, "left kidney", "Left kidney", (185, 102, 83), ("SCT", "64033007", "Kidney"), LEFT, ("kidney left",)),
)

_BY_LABEL = {o.label: o for o in ORGANS}


def organ_by_label(label: int) -> Organ:
    try:
        return _BY_LABEL[int(label)]
    except KeyError:
        raise KeyError(f"no organ has label {label}; FLARE22 labels are 1-13") from None


def _code(code: Code | None) -> str:
    return "^".join(code) if code else "^^"


def terminology_string(organ: Organ) -> str:
    """Slicer's serialised terminology entry (the ``SegmentN_Terminology`` field of a .seg.nrrd)."""
    return "~".join(
        [CATEGORY_CONTEXT, _code(ANATOMICAL_STRUCTURE), _code(organ.type), _code(organ.modifier), ANATOMIC_CONTEXT, "^^", "^^"]
    )


def _normalise(name: str) -> str:
    return " ".join(re.sub(r"[_\-.,/]+", " ", name.lower()).split())


_BY_NAME: dict[str, Organ] = {}
for _organ in ORGANS:
    for _alias in (_organ.name, _organ.display_name, *_organ.aliases):
        _BY_NAME[_normalise(_alias)] = _organ
# TotalSegmentator-style names: "kidney_right", "adrenal_gland_left", "inferior_vena_cava", ...
for _organ in ORGANS:
    for _side in ("right", "left"):
        if _organ.name.startswith(_side + " "):
            _BY_NAME[_normalise(_organ.name[len(_side) + 1:] + " " + _side)] = _organ


def _parse_terminology(terminology: str | dict) -> tuple[str | None, str | None]:
    """(type code value, modifier code value) from a Slicer terminology string or a slicerio dict.

    slicerio gives codes as [scheme, value, meaning] lists; DICOM-JSON style dicts use CodeValue.
    """
    if isinstance(terminology, dict):

        def value(code: object) -> str | None:
            if isinstance(code, dict):
                return code.get("CodeValue") or None
            if isinstance(code, (list, tuple)) and len(code) >= 2:
                return str(code[1]) or None
            return None

        return value(terminology.get("type")), value(terminology.get("typeModifier"))
    parts = terminology.split("~")
    if len(parts) < 4:
        return None, None
    type_value = parts[2].split("^")[1] if parts[2].count("^") >= 2 else None
    modifier_value = parts[3].split("^")[1] if parts[3].count("^") >= 2 else None
    return type_value or None, modifier_value or None


def match_organ(name: str | None, terminology: str | dict | None = None) -> Organ | None:
    """The organ a segment stands for: by terminology type (+ side) first, then by name."""
    if terminology:
        type_value, modifier_value = _parse_terminology(terminology)
        candidates = [o for o in ORGANS if o.type[1] == type_value]
        for organ in candidates:
            if (organ.modifier[1] if organ.modifier else None) == modifier_value:
                return organ
        if len(candidates) == 1:  # e.g. "Liver" with a spurious modifier
            return candidates[0]
    if name:
        return _BY_NAME.get(_normalise(name))
    return None
