"""The FLARE22 label table: ids, names, display colours and SNOMED CT terminology as 3D Slicer uses it.

Codes and colours come from Slicer's terminology file
``Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json``
(identical in Slicer 5.2-5.8 and in the SlicerGeneralAnatomy list, which lacks the inferior vena cava).
Slicer recommends no colour for the inferior vena cava; its colour is the one the SlicerTotalSegmentator
extension's terminology (``SegmentationCategoryTypeModifier-TotalSegmentator.term.json``) gives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

NUM_CLASSES = 14  # background + 13 organs

# Both lists are loaded by default in Slicer (since 4.x); the DICOM master list holds all 13 types.
CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


class Code(NamedTuple):
    """A DICOM coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")
# Old Slicer files write SNOMED as "SRT"; the numeric concept ids are the same.
_SNOMED_SCHEMES = {"SCT", "SRT", "SNM3"}


@dataclass(frozen=True)
class Organ:
    label: int  # FLARE22 id, 1-13
    name: str  # lower-case English, as in the FLARE22 table
    display_name: str  # segment name shown in Slicer
    color: tuple[int, int, int]  # recommended display colour, 0-255
    type: Code  # terminology type
    modifier: Code | None = None  # terminology type modifier (side), kidneys and adrenal glands only
    category: Code = ANATOMICAL_STRUCTURE
    aliases: tuple[str, ...] = ()  # extra names (any case/separators) that mean this organ

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Colour as Slicer stores it in a .seg.nrrd (0-1)."""
        r, g, b = (c / 255.0 for c in self.color)
        return (r, g, b)


_KIDNEY = Code("SCT", "64033007", "Kidney")
_ADRENAL = Code("SCT", "23451007", "Adrenal gland")

ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", (221, 130, 101), Code("SCT", "10200004", "Liver"), aliases=("hepar",)),
    Organ(2, "right kidney", "Right kidney", (185, 102, 83), _KIDNEY, RIGHT, aliases=("rk",)),
    Organ(3, "spleen", "Spleen", (157, 108, 162), Code("SCT", "78961009", "Spleen"), aliases=("lien",)),
    Organ(4, "pancreas", "Pancreas", (249, 180, 111), Code("SCT", "15776009", "Pancreas")),
    Organ(5, "aorta", "Aorta", (224, 97, 76), Code("SCT", "15825003", "Aorta"), aliases=("abdominal aorta",)),
    Organ(6, "inferior vena cava", "Inferior vena cava", (0, 151, 206), Code("SCT", "64131007", "Inferior vena cava"),
          aliases=("ivc", "vena cava inferior", "postcava", "inf vena cava")),
    Organ(7, "right adrenal gland", "Right adrenal gland", (249, 186, 150), _ADRENAL, RIGHT, aliases=("rag",)),
    Organ(8, "left adrenal gland", "Left adrenal gland", (249, 186, 150), _ADRENAL, LEFT, aliases=("lag",)),
    Organ(9, "gallbladder", "Gallbladder", (139, 150, 98), Code("SCT", "28231008", "Gallbladder"), aliases=("gall bladder", "gall")),
    Organ(10, "esophagus", "Esophagus", (211, 171, 143), Code("SCT", "32849002", "Esophagus"), aliases=("oesophagus",)),
    Organ(11, "stomach", "Stomach", (216, 132, 105), Code("SCT", "69695003", "Stomach")),
    Organ(12, "duodenum", "Duodenum", (255, 253, 229), Code("SCT", "38848004", "Duodenum")),
    Organ(13, "left kidney", "Left kidney", (185, 102, 83), _KIDNEY, LEFT, aliases=("lk",)),
)

_BY_LABEL = {o.label: o for o in ORGANS}


def organ_by_label(label: int) -> Organ:
    """The organ with FLARE22 id `label` (1-13); KeyError otherwise."""
    try:
        return _BY_LABEL[int(label)]
    except KeyError:
        raise KeyError(f"no organ has label {label}; FLARE22 labels are 1-13") from None


# --- terminology ----------------------------------------------------------------------------------------


def _code_string(code: Code | None) -> str:
    return "^".join(code) if code else "^^"


def terminology_string(organ: Organ) -> str:
    """Slicer's serialised terminology entry, as stored in a .seg.nrrd (``SegmentN_Tags`` ``TerminologyEntry:``).

    Seven ``~``-separated fields: category context, category, type, type modifier, anatomic context,
    anatomic region, anatomic region modifier (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry).
    """
    return "~".join(
        [CATEGORY_CONTEXT, _code_string(organ.category), _code_string(organ.type), _code_string(organ.modifier), ANATOMIC_CONTEXT, "^^", "^^"]
    )


def terminology_entry(organ: Organ) -> dict:
    """The terminology as slicerio's segment dict holds it (what slicerio.write_segmentation expects)."""
    entry: dict = {
        "contextName": CATEGORY_CONTEXT,
        "category": list(organ.category),
        "type": list(organ.type),
        "anatomicContextName": ANATOMIC_CONTEXT,
    }
    if organ.modifier:
        entry["typeModifier"] = list(organ.modifier)
    return entry


def _as_code(code: object) -> tuple[str, str] | None:
    """(scheme, value) from a slicerio code list, a DICOM-JSON style dict or a "scheme^value^meaning" string."""
    if isinstance(code, str):
        code = code.split("^")
    if isinstance(code, dict):
        scheme, value = code.get("CodingSchemeDesignator", ""), code.get("CodeValue", "")
    elif isinstance(code, (list, tuple)) and len(code) >= 2:
        scheme, value = code[0], code[1]
    else:
        return None
    scheme, value = str(scheme or "").strip().upper(), str(value or "").strip()
    if not value:
        return None
    return ("SCT" if scheme in _SNOMED_SCHEMES else scheme), value


def _parse_terminology(terminology: str | dict) -> tuple[tuple[str, str] | None, tuple[str, str] | None, tuple[str, str] | None]:
    """(category, type, type modifier) codes of a Slicer terminology string or a slicerio/DICOM-JSON dict."""
    if isinstance(terminology, dict):
        get = terminology.get
        return (
            _as_code(get("category", get("SegmentedPropertyCategoryCodeSequence"))),
            _as_code(get("type", get("SegmentedPropertyTypeCodeSequence"))),
            _as_code(get("typeModifier", get("SegmentedPropertyTypeModifierCodeSequence"))),
        )
    parts = str(terminology).split("~")
    if len(parts) < 3:
        return None, None, None
    return _as_code(parts[1]), _as_code(parts[2]), _as_code(parts[3]) if len(parts) > 3 else None


def _match_terminology(terminology: str | dict) -> Organ | None:
    category, type_code, modifier = _parse_terminology(terminology)
    if type_code is None:
        return None
    # An organ type under another category (e.g. a lesion "in" the liver is coded as a region) is not the organ.
    if category is not None and category != ("SCT", ANATOMICAL_STRUCTURE.value):
        return None
    candidates = [o for o in ORGANS if ("SCT", o.type.value) == type_code]
    for organ in candidates:
        if (("SCT", organ.modifier.value) if organ.modifier else None) == modifier:
            return organ
    if len(candidates) == 1:  # an unpaired organ with a stray modifier is still that organ
        return candidates[0]
    return None  # e.g. "Kidney" without a side: let the name decide


# --- names ----------------------------------------------------------------------------------------------

_RIGHT_WORDS = {"right", "r", "rt", "dx", "dexter", "dextra"}
_LEFT_WORDS = {"left", "l", "lt", "sin", "sinister", "sinistra"}
# Paired organs: base names (without side) -> (right organ label, left organ label).
_PAIRED = {
    "kidney": (2, 13),
    "kidneys": (2, 13),
    "adrenal gland": (7, 8),
    "adrenal": (7, 8),
    "suprarenal gland": (7, 8),
    "suprarenal": (7, 8),
}


def _words(name: str) -> list[str]:
    # Split camel case ("rightKidney"), then any separator; drop trailing numbers ("Liver 2", "liver_1").
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()
    words = re.sub(r"[^a-z0-9]+", " ", name).split()
    while len(words) > 1 and words[-1].isdigit():
        words.pop()
    return words


def _normalise(name: str) -> str:
    return " ".join(_words(name))


_BY_NAME: dict[str, Organ] = {}
for _organ in ORGANS:
    for _alias in (_organ.name, _organ.display_name, *_organ.aliases):
        _BY_NAME[_normalise(_alias)] = _organ


def _match_name(name: str) -> Organ | None:
    words = _words(name)
    if not words:
        return None
    exact = _BY_NAME.get(" ".join(words))
    if exact is not None:
        return exact
    # Side given anywhere: "kidney_right", "Kidney, Left", "adrenal_gland_L", "L adrenal".
    sides = {"right" for w in words if w in _RIGHT_WORDS} | {"left" for w in words if w in _LEFT_WORDS}
    base = " ".join(w for w in words if w not in _RIGHT_WORDS | _LEFT_WORDS)
    if base in _PAIRED and len(sides) == 1:
        right, left = _PAIRED[base]
        return organ_by_label(right if sides == {"right"} else left)
    if not sides:
        return _BY_NAME.get(base)
    return None


def match_organ(name: str | None, terminology: str | dict | None = None) -> Organ | None:
    """The organ a segment stands for: by terminology type (+ side modifier) first, then by name.

    Names are matched case- and separator-insensitively, with the side anywhere ("Right Kidney",
    "kidney_right", "kidney R"), TotalSegmentator names ("inferior_vena_cava", "adrenal_gland_left"),
    FLARE22 abbreviations ("IVC", "RAG") and spelling variants ("oesophagus", "gall bladder").
    Slicer gives hand-made segments the generic "Tissue" terminology, so the name fallback matters.
    """
    if terminology:
        organ = _match_terminology(terminology)
        if organ is not None:
            return organ
    if name:
        return _match_name(name)
    return None


def parse_organs(text: str) -> set[int]:
    """Organ ids from a comma-separated list of names or FLARE22 ids, or "all"; ValueError names what is unknown."""
    if text.strip().lower() == "all":
        return {o.label for o in ORGANS}
    ids, unknown = set(), []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        organ = _BY_LABEL.get(int(item)) if item.isdigit() else match_organ(item)
        if organ is None:
            unknown.append(item)
        else:
            ids.add(organ.label)
    if unknown or not ids:
        raise ValueError(f"{', '.join(map(repr, unknown)) or repr(text)}: not organs; give names or ids 1-{len(ORGANS)} "
                         f"separated by commas (e.g. 'liver,spleen,2'), or 'all'")
    return ids
