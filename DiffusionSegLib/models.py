"""Model folders: ``weights.safetensors`` + ``model.json``, bundled or per-user, found by name or path.

Two kinds of model share the format:
- ``pretrained``: a DDPM noise predictor (U-Net with its noise output layer), the base for fine-tuning;
- ``segmentor``: backbone + segmentation head, used by ``diffusionseg segment``.

Weights are only ever read with safetensors (never unpickled). A folder is written next to its final
place and renamed into it, so a crash or cancel never leaves a half-written model.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder
from .bridge import model_cards as bridge_cards
from .bridge.model_cards import BUNDLED_DIR, CARD_FILE, user_models_dir
from .diffusion import GaussianDiffusion
from .errors import InputError
from .organs import FLARE22, LabelSet
from .preprocessing import PreprocessingSpec
from .segmentor import Segmentor
from .unet import UNetConfig, UNetModel

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
KINDS = ("pretrained", "segmentor")

# Names looked up when no model is given; a later release bundles models with these names.
DEFAULT_SEGMENTOR = "flare22-segmentor"
DEFAULT_PRETRAINED = "ddpm-pretrained"



def is_bare_name(text: str | Path) -> bool:
    """Whether `text` is a model name rather than a path: no path separator, not '.', '..' or '~...'."""
    text = str(text)
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(sep in text for sep in separators) and text not in {"", ".", ".."} and not text.startswith("~")


def finetune_destination(output: str | Path) -> Path:
    """Where `finetune -o OUTPUT` writes: a bare name goes to the per-user models folder (as the Slicer
    module saves), so `diffusionseg models` lists it and `--model NAME` finds it from any folder; a
    path, or a name that is an existing folder here, is written where given."""
    if is_bare_name(output) and not Path(output).is_dir():
        return user_models_dir() / str(output)
    return Path(output).expanduser()


def portable_path(path: str | Path) -> str:
    """A file or folder as a model card records it: its folder's name and its own (``abdomen-ct-a/ct.nii.gz``).

    Cards travel with the weights; an absolute path of the training machine tells a reader nothing
    useful and leaks its user and folder names.
    """
    resolved = Path(path).expanduser().resolve()
    parts = [part for part in resolved.parts if part != resolved.anchor]
    return "/".join(parts[-2:])


def label_table() -> list[dict]:
    """The default card ``labels``: FLARE22's."""
    return FLARE22.to_card()


@dataclass
class ModelCard:
    """Everything needed to rebuild and use a model, plus where it came from (``model.json``)."""

    kind: str
    unet: UNetConfig
    preprocessing: PreprocessingSpec
    schedule: dict = field(default_factory=lambda: GaussianDiffusion().to_dict())
    head: dict | None = None  # {"width": 128, "layers": 2} for segmentors
    strategy: str | None = None
    timestep: int = 0
    preset: str | None = None
    name: str = ""
    labels: list[dict] = field(default_factory=label_table)  # the label set (`label_set`); segmentors have one class per entry + background
    provenance: dict = field(default_factory=dict)
    # Steps applied to the labelmap after segmentation, e.g. {"cleanup": true}; absent or {} means none.
    postprocessing: dict = field(default_factory=dict)
    # Terms of use the weights inherit from their training data, e.g. {"use": "non-commercial", "because": [...]};
    # {} when no data with a restriction went in. A model fine-tuned from another keeps its base's entry.
    licence: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def label_set(self) -> LabelSet:
        """The organs the model labels, from ``labels`` (FLARE22's for the bundled models); ValueError for a broken entry."""
        return LabelSet.from_card(self.labels)

    @property
    def cleanup(self) -> bool:
        """Whether `segment` cleans the labelmap by default (``cleanup.clean_image``)."""
        return bool(self.postprocessing.get("cleanup", False))

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "name": self.name,
            "preset": self.preset,
            "unet": self.unet.to_dict(),
            "head": self.head,
            "strategy": self.strategy,
            "timestep": self.timestep,
            "preprocessing": self.preprocessing.to_dict(),
            "schedule": self.schedule,
            "labels": self.labels,
            "provenance": self.provenance,
            "postprocessing": self.postprocessing,
            "licence": self.licence,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelCard:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
        if d.get("kind") not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {d.get('kind')!r}")
        if d["kind"] == "segmentor" and not d.get("head"):
            raise ValueError("a segmentor model needs a 'head' entry")
        LabelSet.from_card(d.get("labels") or label_table())  # a broken label set is a broken card, said when it is read
        return cls(
            kind=d["kind"],
            unet=UNetConfig.from_dict(d["unet"]),
            preprocessing=PreprocessingSpec.from_dict(d["preprocessing"]),
            schedule=dict(d.get("schedule") or GaussianDiffusion().to_dict()),
            head=d.get("head"),
            strategy=d.get("strategy"),
            timestep=int(d.get("timestep", 0)),
            preset=d.get("preset"),
            name=d.get("name", ""),
            labels=list(d.get("labels") or label_table()),
            provenance=dict(d.get("provenance") or {}),
            postprocessing=_postprocessing(d.get("postprocessing")),
            licence=dict(d.get("licence") or {}),
        )


def _postprocessing(entry: object) -> dict:
    """The card's postprocessing entry, checked: a typo'd value must not silently switch cleanup off."""
    if entry is None:
        return {}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("cleanup", False), bool):
        raise ValueError(f"postprocessing must be an object like {{\"cleanup\": true}}, got {entry!r}")
    return dict(entry)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    kind: str
    source: str  # "bundled" or "user"
    card: ModelCard


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_model(folder: str | Path, card: ModelCard, state_dict: Mapping[str, torch.Tensor], *, half: bool = False) -> Path:
    """Write a model folder atomically (replacing an existing one only once the new one is complete)."""
    folder = Path(folder).expanduser().resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not (folder / CARD_FILE).exists() and any(folder.iterdir()):
        raise InputError(f"{folder}: exists and is not a DiffusionSeg model folder; choose another output path")
    card.name = card.name or folder.name
    tensors = {
        k: (v.detach().to("cpu", torch.float16 if half and v.is_floating_point() else v.dtype)).contiguous()
        for k, v in state_dict.items()
    }
    # A full disk or read-only folder is a WriteError naming the folder; nothing half-written stays, an older model stays whole.
    with atomic_folder(folder) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "kind": card.kind})
        (staging / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        _usual_permissions(staging)
    return folder


def _usual_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; a model folder is shared like any other
    file (installed packages, a lab's models folder), so give it the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def read_card(folder: str | Path) -> ModelCard:
    folder = Path(folder)
    path = folder / CARD_FILE
    if not path.is_file():
        raise InputError(f"{folder}: not a DiffusionSeg model folder (no {CARD_FILE}); pass a folder written by 'diffusionseg finetune' or a model name")
    try:
        return ModelCard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: corrupt or unsupported model card ({e}); re-export or re-train the model") from e


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(f"{folder}: model folder has no {WEIGHTS_FILE}; re-export or re-train the model")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: corrupt weights file ({e}); re-export or re-train the model") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _check_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise InputError(f"{folder}: weights do not match model.json ({first}); the folder is inconsistent or corrupt") from e


def load_segmentor(folder: str | Path) -> tuple[Segmentor, ModelCard]:
    """A segmentor model, on the CPU, in eval mode."""
    folder = Path(folder)
    card = read_card(folder)
    if card.kind != "segmentor":
        raise InputError(f"{folder}: is a {card.kind} model, not a segmentation model; fine-tune it first with 'diffusionseg finetune --base {folder}'")
    segmentor = Segmentor(card.unet, card.head["width"], card.head.get("layers", 2), card.timestep, card.label_set.num_classes)
    _check_fits(segmentor, read_weights(folder), folder)
    return segmentor.eval(), card


def load_unet(folder: str | Path) -> tuple[UNetModel, ModelCard]:
    """A pretrained noise predictor, on the CPU, in eval mode."""
    folder = Path(folder)
    card = read_card(folder)
    if card.kind != "pretrained":
        raise InputError(f"{folder}: is a {card.kind} model, not a DDPM-pretrained noise predictor")
    unet = UNetModel(card.unet)
    _check_fits(unet, read_weights(folder), folder)
    return unet.eval(), card


def _is_model(folder: Path) -> bool:
    return (folder / CARD_FILE).is_file()


def list_models(kind: str | None = None) -> list[ModelInfo]:
    """Bundled and user models (user models with the same name shadow bundled ones), sorted by name."""
    # The folders and the shadowing rule live in the torch-free bridge, so Slicer lists exactly what the engine loads.
    found = []
    for entry in bridge_cards.list_models(kind):
        try:
            found.append(ModelInfo(entry.name, entry.path, entry.kind, entry.source, ModelCard.from_dict(entry.card)))
        except (ValueError, KeyError, TypeError):
            continue  # a broken folder must not hide the others; resolving it by path reports why
    return found


def resolve_model(name_or_path: str | Path | None, kind: str) -> Path:
    """The folder for a model given by path or name; None means the default model of `kind`."""
    if name_or_path is None:
        default = DEFAULT_SEGMENTOR if kind == "segmentor" else DEFAULT_PRETRAINED
        for root in (user_models_dir(), BUNDLED_DIR):
            if _is_model(root / default):
                return root / default
        if kind == "segmentor":
            raise InputError(
                f"no segmentation model is installed: the bundled '{DEFAULT_SEGMENTOR}' is missing from {BUNDLED_DIR} "
                "(reinstall DiffusionSeg, or rebuild it with Training/reproduce_bundled_models.sh). "
                "Or fine-tune one with 'diffusionseg finetune --image CT --labels LABELS -o MODEL_DIR' and pass '--model MODEL_DIR'"
            )
        raise InputError(
            f"no DDPM-pretrained model is installed: the bundled '{DEFAULT_PRETRAINED}' is missing from {BUNDLED_DIR}. Pass '--base MODEL_DIR' "
            "(e.g. one exported by 'diffusionseg-train export') or train from scratch with '--strategy fs --preset small'"
        )
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path}: a model is a folder holding {WEIGHTS_FILE} and {CARD_FILE}, not a file")
        return path
    for info in list_models():
        if info.name == str(name_or_path):
            return info.path
    names = ", ".join(i.name for i in list_models(kind)) or "none installed"
    raise InputError(f"{name_or_path}: no such model folder or model name (available {kind} models: {names})")
