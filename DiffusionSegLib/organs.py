"""Label sets: which organ each label id of a model stands for, with its name, display colour and SNOMED CT terminology.

A model's label set is data: its card holds it (``model.json`` ``labels``), `LabelSet.from_card` reads it, and the
segmentor's class count, the label ids allowed in input files, the segments of a written ``.seg.nrrd``, the statistics,
the metrics, ``--organs`` and the Slicer panel all follow from it. FLARE22's 13 abdominal organs (`FLARE22`) are the
default set: the bundled models segment them, and a card without ``labels`` means them. A user's own set comes from a
JSON file (`read_label_set`, ``diffusionseg finetune --label-set``; docs/label-sets.md). Label ids are class indices:
a set's ids are 1-N, 0 is background.

Standard library only: the Slicer module (through ``bridge/``) reads a model's set before torch is installed.

FLARE22's codes and colours come from Slicer's terminology file
``Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json``
(identical in Slicer 5.2-5.8 and in the SlicerGeneralAnatomy list, which lacks the inferior vena cava).
Slicer recommends no colour for the inferior vena cava; its colour is the one the SlicerTotalSegmentator
extension's terminology (``SegmentationCategoryTypeModifier-TotalSegmentator.term.json``) gives it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from .errors import InputError

MAX_LABELS = 255  # labelmaps are uint8

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
    """One entry of a label set: an organ (or any structure, e.g. a tumour) and its label id."""

    label: int  # id in its label set, 1-N (FLARE22: 1-13)
    name: str  # lower-case English, as in the FLARE22 table
    display_name: str  # segment name shown in Slicer
    color: tuple[int, int, int]  # recommended display colour, 0-255
    type: Code | None  # terminology type; None: the set gives no terminology (matched by name only)
    modifier: Code | None = None  # terminology type modifier (side), e.g. FLARE22's kidneys and adrenal glands
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

# Colours for entries of a user's set that give none and are no FLARE22 organ: Slicer's GenericAnatomyColors 1-12
# (tissue, bone, skin, connective tissue, blood, organ, mass, muscle, foreign object, waste, teeth, fat).
DEFAULT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101),
    (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70),
)


# --- terminology ----------------------------------------------------------------------------------------


def _code_string(code: Code | None) -> str:
    return "^".join(code) if code else "^^"


def terminology_string(organ: Organ) -> str | None:
    """Slicer's serialised terminology entry, as stored in a .seg.nrrd (``SegmentN_Tags`` ``TerminologyEntry:``).

    Seven ``~``-separated fields: category context, category, type, type modifier, anatomic context,
    anatomic region, anatomic region modifier (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry).
    None for an entry without terminology (Slicer then gives the segment its generic one).
    """
    if organ.type is None:
        return None
    return "~".join(
        [CATEGORY_CONTEXT, _code_string(organ.category), _code_string(organ.type), _code_string(organ.modifier), ANATOMIC_CONTEXT, "^^", "^^"]
    )


def terminology_entry(organ: Organ) -> dict | None:
    """The terminology as slicerio's segment dict holds it (what slicerio.write_segmentation expects); None without terminology."""
    if organ.type is None:
        return None
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


def _match_terminology(terminology: str | dict, organs: Sequence[Organ]) -> Organ | None:
    category, type_code, modifier = _parse_terminology(terminology)
    if type_code is None:
        return None
    # An organ type under another category (e.g. a lesion "in" the liver is coded as a region) is not the organ.
    candidates = [o for o in organs if o.type is not None and _as_code(o.type) == type_code
                  and (category is None or category == _as_code(o.category))]
    for organ in candidates:
        if (_as_code(organ.modifier) if organ.modifier else None) == modifier:
            return organ
    if len(candidates) == 1:  # an unpaired organ with a stray modifier is still that organ
        return candidates[0]
    return None  # e.g. "Kidney" without a side: let the name decide


# --- names ----------------------------------------------------------------------------------------------

_RIGHT_WORDS = {"right", "r", "rt", "dx", "dexter", "dextra"}
_LEFT_WORDS = {"left", "l", "lt", "sin", "sinister", "sinistra"}
# Names of a paired organ without its side, and the base name its sided entries use ("left kidney" -> "kidney").
_BASE_SYNONYMS = {"kidneys": "kidney", "adrenal": "adrenal gland", "suprarenal gland": "adrenal gland", "suprarenal": "adrenal gland"}


def _words(name: str, numbered: bool = False) -> list[str]:
    # Split camel case ("rightKidney"), then any separator; drop trailing numbers ("Liver 2", "liver_1") unless `numbered`.
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()
    words = re.sub(r"[^a-z0-9]+", " ", name).split()
    while not numbered and len(words) > 1 and words[-1].isdigit():
        words.pop()
    return words


def _normalise(name: str, numbered: bool = False) -> str:
    return " ".join(_words(name, numbered))


# --- label sets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSet:
    """The organs a model labels, by id (1-N, in order; 0 is background): the segmentor has N + 1 classes."""

    organs: tuple[Organ, ...]
    name: str = ""  # "FLARE22" for the built-in set; "" for one read from a card or a file

    def __post_init__(self) -> None:
        organs = tuple(sorted(self.organs, key=lambda o: o.label))
        object.__setattr__(self, "organs", organs)
        ids = [o.label for o in organs]
        if not ids:
            raise ValueError("a label set needs at least one label")
        if len(ids) > MAX_LABELS:
            raise ValueError(f"{len(ids)} labels: a label set holds at most {MAX_LABELS} (labelmaps are 8-bit)")
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"label ids {', '.join(map(str, ids))}: they must be 1-{len(ids)}, each once (0 is background); renumber them")
        self._by_name  # noqa: B018  (ambiguous names are refused here, not at the first match)

    def __iter__(self) -> Iterator[Organ]:
        return iter(self.organs)

    def __len__(self) -> int:
        return len(self.organs)

    @property
    def num_classes(self) -> int:
        """Background and one class per label: the segmentor's outputs."""
        return len(self.organs) + 1

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(o.label for o in self.organs)

    def describe(self) -> str:
        """How messages name the set: "the 13 FLARE22 organs", "the label set's 2 labels (1 tumour, 2 liver)"."""
        if self.name:
            return f"the {len(self)} {self.name} organs"
        return f"the label set's {len(self)} labels ({self.listing(limit=8)})"

    def id_phrase(self) -> str:
        """"FLARE22 ids", "the label set's ids": what a labelmap's values are."""
        return f"{self.name} ids" if self.name else "the label set's ids"

    def listing(self, limit: int | None = None) -> str:
        """"1 liver, 2 right kidney, ...": ids and names, the first `limit` of them."""
        shown = [f"{o.label} {o.name}" for o in self.organs[:limit]]
        return ", ".join(shown) + (", ..." if limit is not None and len(self) > limit else "")

    def organ(self, label: int) -> Organ:
        """The organ with id `label`; KeyError otherwise."""
        try:
            return self._by_label[int(label)]
        except KeyError:
            owner = self.name or "the label set's"
            raise KeyError(f"no organ has label {label}; {owner} labels are 1-{len(self)}") from None

    def names(self, labels: Iterable[int]) -> list[str]:
        """Names of the organs with ids in `labels`, in table order (other ids are left out)."""
        chosen = set(labels)
        return [o.name for o in self.organs if o.label in chosen]

    @cached_property
    def _by_label(self) -> dict[int, Organ]:
        return {o.label: o for o in self.organs}

    @cached_property
    def _by_name(self) -> dict[str, Organ]:
        by_name: dict[str, Organ] = {}
        for organ in self.organs:
            for alias in (organ.name, organ.display_name, *organ.aliases):
                key = _normalise(alias, numbered=True)
                if not key:
                    raise ValueError(f"label {organ.label}: {alias!r} is not a name (it needs a letter or digit)")
                other = by_name.setdefault(key, organ)
                if other is not organ:
                    raise ValueError(f"labels {other.label} ({other.name}) and {organ.label} ({organ.name}) are both called {alias!r}; "
                                     "give each label its own names")
        return by_name

    # --- matching segments to organs ---

    def _match_name(self, name: str) -> Organ | None:
        exact = self._by_name.get(_normalise(name, numbered=True))
        if exact is not None:
            return exact
        words = _words(name)
        if not words:
            return None
        exact = self._by_name.get(" ".join(words))
        if exact is not None:
            return exact
        # Side given anywhere: "kidney_right", "Kidney, Left", "adrenal_gland_L", "L adrenal".
        sides = {"right" for w in words if w in _RIGHT_WORDS} | {"left" for w in words if w in _LEFT_WORDS}
        base = " ".join(w for w in words if w not in _RIGHT_WORDS | _LEFT_WORDS)
        base = _BASE_SYNONYMS.get(base, base)
        if len(sides) == 1:
            return self._by_name.get(f"{next(iter(sides))} {base}")
        if not sides:
            return self._by_name.get(base)
        return None

    def match(self, name: str | None, terminology: str | dict | None = None) -> Organ | None:
        """The organ a segment stands for: by terminology type (+ side modifier) first, then by name.

        Names are matched case- and separator-insensitively, with the side anywhere ("Right Kidney",
        "kidney_right", "kidney R"), TotalSegmentator names ("inferior_vena_cava", "adrenal_gland_left"),
        FLARE22 abbreviations ("IVC", "RAG") and spelling variants ("oesophagus", "gall bladder").
        Slicer gives hand-made segments the generic "Tissue" terminology, so the name fallback matters.
        """
        if terminology:
            organ = _match_terminology(terminology, self.organs)
            if organ is not None:
                return organ
        if name:
            return self._match_name(name)
        return None

    def parse(self, text: str) -> set[int]:
        """Organ ids from a comma-separated list of names or ids, or "all"; ValueError names what is unknown."""
        if text.strip().lower() == "all":
            return set(self.labels)
        ids, unknown = set(), []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            organ = self._by_label.get(int(item)) if item.isdigit() else self.match(item)
            if organ is None:
                unknown.append(item)
            else:
                ids.add(organ.label)
        if unknown or not ids:
            last = len(self) - 1
            example = f"{self.organs[0].name},{self.organs[min(2, last)].name},{self.organs[min(1, last)].label}"
            what = "not organs" if self.name else f"not among {self.describe()}"
            raise ValueError(f"{', '.join(map(repr, unknown)) or repr(text)}: {what}; give names or ids 1-{len(self)} "
                             f"separated by commas (e.g. '{example}'), or 'all'")
        return ids

    # --- the model card's `labels` ---

    def to_card(self) -> list[dict]:
        """The set as a model card's ``labels``. FLARE22's entries are id, name, display name and colour (its terminology is
        known); another set's also carry their terminology and extra names, so the card describes the set on its own."""
        entries = []
        for o in self.organs:
            entry: dict = {"label": o.label, "name": o.name, "display_name": o.display_name, "color": list(o.color)}
            if self.organs != ORGANS:
                if o.type is not None:
                    entry["terminology"] = {"category": list(o.category), "type": list(o.type),
                                            **({"typeModifier": list(o.modifier)} if o.modifier else {})}
                if o.aliases:
                    entry["aliases"] = list(o.aliases)
            entries.append(entry)
        return entries

    @classmethod
    def from_card(cls, entries: object) -> LabelSet:
        """The set a card's ``labels`` (or a label-set file's list) describes; ValueError saying what is wrong.

        Each entry: ``label`` (1-N) and ``name``, optionally ``display_name``, ``color`` ([r, g, b], 0-255), ``terminology``
        (``{"category": [scheme, value, meaning], "type": [...], "typeModifier": [...]}`` or Slicer's terminology string)
        and ``aliases``. An entry named like a FLARE22 organ takes that organ's terminology, extra names and colour unless
        it gives its own; a list equal to FLARE22's is `FLARE22`.
        """
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError(f"labels must be a non-empty list of objects like {{\"label\": 1, \"name\": \"liver\"}}, got {entries!r:.80}")
        organs = tuple(_organ_from_entry(entry, number) for number, entry in enumerate(entries))
        if tuple(sorted(organs, key=lambda o: o.label)) == ORGANS:
            return FLARE22
        return cls(organs)


_ENTRY_KEYS = ("label", "name", "display_name", "color", "terminology", "aliases")


def _organ_from_entry(entry: object, number: int) -> Organ:
    where = f"label entry {number + 1}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: {entry!r:.80} is not an object like {{\"label\": 1, \"name\": \"liver\"}}")
    if unknown := sorted(set(entry) - set(_ENTRY_KEYS)):
        raise ValueError(f"{where}: unknown keys {', '.join(map(repr, unknown))}; an entry has {', '.join(_ENTRY_KEYS)}")
    label, name = entry.get("label"), entry.get("name")
    if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= MAX_LABELS:
        raise ValueError(f"{where}: label {label!r} is not an id 1-{MAX_LABELS}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} (label {label}): needs a name")
    name = name.strip()
    known = _FLARE22_BY_NAME.get(_normalise(name, numbered=True))  # FLARE22's liver is a liver in any set
    display = entry.get("display_name") or (known.display_name if known and known.name == name else name[0].upper() + name[1:])
    if not isinstance(display, str):
        raise ValueError(f"{where} ({name}): display_name {display!r} is not text")
    color = entry.get("color")
    if color is None:
        color = known.color if known else DEFAULT_COLOURS[(label - 1) % len(DEFAULT_COLOURS)]
    if not isinstance(color, (list, tuple)) or len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
        raise ValueError(f"{where} ({name}): color {color!r} is not [red, green, blue] with each 0-255")
    category, type_code, modifier = (known.category, known.type, known.modifier) if known else (ANATOMICAL_STRUCTURE, None, None)
    if entry.get("terminology") is not None:
        category, type_code, modifier = _terminology_codes(entry["terminology"], f"{where} ({name})")
    aliases = entry.get("aliases")
    if aliases is None:
        aliases = known.aliases if known else ()
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError(f"{where} ({name}): aliases {aliases!r} is not a list of names")
    return Organ(label, name, display.strip(), (int(color[0]), int(color[1]), int(color[2])), type_code, modifier, category, tuple(aliases))


def _terminology_codes(terminology: object, where: str) -> tuple[Code, Code, Code | None]:
    """(category, type, type modifier) of an entry's terminology: a dict of [scheme, value, meaning] lists, or Slicer's string."""
    if isinstance(terminology, str):
        parts = terminology.split("~")
        terminology = dict(zip(("contextName", "category", "type", "typeModifier"), parts[:4], strict=False))
    if not isinstance(terminology, Mapping):
        raise ValueError(f"{where}: terminology {terminology!r:.80} is not an object like {{\"type\": [\"SCT\", \"10200004\", \"Liver\"]}}")

    def code(key: str) -> Code | None:
        value = terminology.get(key)
        if value in (None, "", "^^"):
            return None
        items = value.split("^") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not 2 <= len(items) <= 3 or not all(isinstance(i, str) for i in items) or not items[1]:
            raise ValueError(f"{where}: terminology {key} {value!r} is not [coding scheme, code value, code meaning]")
        return Code(items[0], items[1], items[2] if len(items) > 2 else "")

    type_code = code("type")
    if type_code is None:
        raise ValueError(f"{where}: terminology needs a type, e.g. [\"SCT\", \"10200004\", \"Liver\"]")
    return code("category") or ANATOMICAL_STRUCTURE, type_code, code("typeModifier")


def read_label_set(path: str | Path) -> LabelSet:
    """A label set from a JSON file; InputError naming the file and the problem.

    The file holds the card's list of entries (`LabelSet.from_card`), an object with that list as ``labels``, or an
    nnU-Net v2 ``dataset.json`` (``"labels": {"background": 0, "liver": 1, ...}``; names only, region lists not taken).
    """
    path = Path(path).expanduser()
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read a label set ({e}); pass a JSON file (docs/label-sets.md)") from e
    entries = content.get("labels") if isinstance(content, Mapping) else content
    if isinstance(entries, Mapping):  # nnU-Net: name -> id
        if bad := [name for name, value in entries.items() if isinstance(value, bool) or not isinstance(value, int)]:
            raise InputError(f"{path}: labels {', '.join(map(repr, bad))} are not single ids (nnU-Net regions are not supported); give one id per label")
        entries = [{"label": value, "name": name} for name, value in entries.items() if value != 0]
    try:
        return LabelSet.from_card(entries)
    except ValueError as e:
        raise InputError(f"{path}: {e} (docs/label-sets.md)") from e


FLARE22 = LabelSet(ORGANS, "FLARE22")
_FLARE22_BY_NAME = {_normalise(alias, numbered=True): o for o in ORGANS for alias in (o.name, o.display_name)}
NUM_CLASSES = FLARE22.num_classes  # FLARE22's: background + 13 organs; a model's is its card's label set's


# FLARE22's own lookups, for FLARE22 data (the benchmark, the tests). The engine takes a model's set (`ModelCard.label_set`).


def organ_by_label(label: int) -> Organ:
    """The FLARE22 organ with id `label` (1-13); KeyError otherwise."""
    return FLARE22.organ(label)


def match_organ(name: str | None, terminology: str | dict | None = None) -> Organ | None:
    """The FLARE22 organ a segment stands for (`LabelSet.match`)."""
    return FLARE22.match(name, terminology)


def parse_organs(text: str) -> set[int]:
    """FLARE22 ids from a comma-separated list of names or ids, or "all" (`LabelSet.parse`)."""
    return FLARE22.parse(text)
