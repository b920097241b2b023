"""Bundled and per-user models found by reading their ``model.json`` cards, without torch or safetensors.

The panel lists models (and Segment becomes clickable) on a fresh install, before the engine's packages
are installed; loading weights is the engine's job (`DiffusionSegLib.models`). The folders and the
shadowing rule are the engine's: a user model with a bundled model's name replaces it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..organs import FLARE22, LabelSet  # standard library only

CARD_FILE = "model.json"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "weights"
APP_NAME = "DiffusionSeg"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # folder name: what ``--model`` accepts
    path: Path
    kind: str  # "pretrained" or "segmentor"
    source: str  # "bundled" or "user"
    card: dict = field(repr=False)


def _user_data_dir() -> Path:
    """platformdirs' ``user_data_dir("DiffusionSeg", appauthor=False)``, the engine's choice.

    platformdirs itself when it is installed (it is one of the engine's packages); before that the same
    conventions by hand: ``$XDG_DATA_HOME`` when set, else the platform's per-user data folder.
    """
    try:
        import platformdirs
    except ImportError:
        pass
    else:
        return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    if xdg:
        return Path(xdg) / APP_NAME
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / APP_NAME
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_NAME
    return Path.home() / ".local" / "share" / APP_NAME


def user_models_dir() -> Path:
    """Per-user model folder, as ``DiffusionSegLib.models.user_models_dir`` (``DIFFUSIONSEG_HOME`` overrides)."""
    home = os.environ.get("DIFFUSIONSEG_HOME")
    return (Path(home) if home else _user_data_dir()) / "models"


def read_card(folder: str | Path) -> dict | None:
    """The model card of `folder`; None if there is none or it is not a readable card of a known kind."""
    try:
        card = json.loads((Path(folder) / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and card.get("kind") in ("pretrained", "segmentor") else None


def list_models(kind: str | None = None, roots: tuple[tuple[str, Path], ...] | None = None) -> list[ModelEntry]:
    """Bundled and user models of `kind` (all kinds for None), sorted by name; user models shadow bundled ones."""
    found: dict[str, ModelEntry] = {}
    for source, root in roots or (("bundled", BUNDLED_DIR), ("user", user_models_dir())):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            card = read_card(folder)
            if card is not None and (kind is None or card["kind"] == kind):
                found[folder.name] = ModelEntry(folder.name, folder, card["kind"], source, card)
    return [found[name] for name in sorted(found)]


def find_card(model: str | Path) -> dict | None:
    """The card of `model`, a model folder or a name as ``--model`` takes it; None when there is no such model."""
    if Path(model).is_dir():
        return read_card(model)
    entry = next((e for e in list_models() if e.name == str(model)), None)
    return entry.card if entry is not None else None


def label_set(model: str | Path | None) -> LabelSet:
    """The organs `model` (a model folder or name) labels, from its card's ``labels``: what the panel lists and prepares.

    FLARE22's when there is no such model or its card has no ``labels``; also when they cannot be read, as the engine
    refuses that card with the reason when the model is used.
    """
    card = find_card(model) if model else None
    if card is None or not card.get("labels"):
        return FLARE22
    try:
        return LabelSet.from_card(card["labels"])
    except ValueError:
        return FLARE22


def segmentor_name(model: str | Path) -> str | None:
    """The name of segmentation model `model` (a model folder, or a name as ``--base`` takes it); None when it is not one."""
    card = find_card(model)
    if card is None or card.get("kind") != "segmentor":
        return None
    return str(card.get("name") or Path(model).name)


def is_user_model(path: str | Path) -> bool:
    """Whether `path` is a model folder directly inside the per-user models folder (only those may be deleted)."""
    if not path:
        return False
    folder = Path(path).resolve()
    return folder.parent == user_models_dir().resolve() and read_card(folder) is not None

