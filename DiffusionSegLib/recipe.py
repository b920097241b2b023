"""The fine-tuning recipe: which network a fine-tune starts from, and the one function that trains it and writes its card.

Decided here only: the head width by preset, which weights a strategy loads (``strategies.py``), the
timestep check, continuing a segmentation model head included, adapting the backbone first, partial
labels (a segmentor base keeps the organs a CT leaves unlabelled), the cleanup default and everything a
model card records. ``diffusionseg finetune`` parses its flags, calls `finetune_model` and saves what it
returns; the benchmarks build their networks with `new_segmentor` / `build_segmentor`.

From Python, e.g. to refine a model on a few corrected slices::

    segmentor, card = finetune_model([TrainingCT(ct, labels, organs={1, 2})], base="my-model")
    save_model(folder, card, segmentor.state_dict())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch

from . import __version__, strategies
from .adaptation import adapt_backbone
from .devices import describe_hardware, resolve_device
from .diffusion import GaussianDiffusion
from .errors import InputError
from .finetune import FinetuneConfig, finetune
from .models import DEFAULT_SEGMENTOR, ModelCard, load_segmentor, load_unet, now_iso, portable_path, read_card, resolve_model
from .organs import LabelSet
from .preprocessing import PreprocessingSpec, to_model_space
from .progress import Progress
from .segmentor import DEFAULT_HEAD_WIDTH, Segmentor
from .strategies import DEFAULT_HEAD_LAYERS, DEFAULT_STRATEGY, STRATEGIES
from .training_slices import TrainingSlices, training_slices
from .unet import preset_config


def head_width(card: ModelCard, width: int | None = None) -> int:
    """`width`, else the preset's (the method's h128 for U-Net-B, h256 for U-Net-L), else 64."""
    return width or DEFAULT_HEAD_WIDTH.get(card.preset or "", 64)


def random_base(preset: str, size: int | None = None) -> ModelCard:
    """The card of a randomly initialised `preset` at its native slice size (or `size`): what fs starts from without a base."""
    config = preset_config(preset, size)
    return ModelCard(kind="pretrained", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size), preset=preset,
                     name=f"random-{preset}")


def new_segmentor(card: ModelCard, strategy: str = DEFAULT_STRATEGY, *, head: int | None = None, head_layers: int = DEFAULT_HEAD_LAYERS,
                  timestep: int | None = None, unet_state: dict[str, torch.Tensor] | None = None,
                  label_set: LabelSet | None = None) -> Segmentor:
    """A segmentor of `card`'s architecture with a new head of `head` width (default by preset) at `timestep` (default 0),
    one class per label of `label_set` (default: the card's) and background.

    Its backbone takes `unet_state` (a pretrained noise predictor's weights) when given and the strategy starts from a
    pretrained backbone; otherwise it keeps its random initialisation.
    """
    timestep = 0 if timestep is None else timestep
    steps = GaussianDiffusion.from_dict(card.schedule).num_timesteps
    if not 0 <= timestep < steps:
        raise InputError(f"--timestep {timestep}: must lie within the model's diffusion steps (0-{steps - 1})")
    classes = (label_set or card.label_set).num_classes
    segmentor = Segmentor(card.unet, head_width(card, head), head_layers=head_layers, timestep=timestep, num_classes=classes)
    if unet_state is not None and strategies.get(strategy).pretrained:
        segmentor.load_pretrained(unet_state)
    return segmentor


@dataclass
class Start:
    """What a fine-tune starts from: the network, and the base model it was built from."""

    segmentor: Segmentor
    card: ModelCard  # the base's card: architecture, preprocessing, schedule, preset, licence
    path: Path | None  # the base model folder; None: random weights of a preset (or of the default base's architecture)
    strategy: str
    continued: bool = False  # a segmentation model continued, head included: it already segments the organs
    label_set: LabelSet | None = None  # the organs the new model labels; None: the base card's

    def __post_init__(self) -> None:
        self.label_set = self.label_set or self.card.label_set
        if self.label_set.num_classes != self.segmentor.num_classes:
            raise ValueError(f"a segmentor with {self.segmentor.num_classes} classes for {self.label_set.describe()}")

    @property
    def kept_organs(self) -> str:
        """What becomes of organs a CT leaves unlabelled."""
        return "kept as the base model knows them" if self.continued else "not learned"


def default_base(strategy: str, head: int | None = None, adapt_seconds: float = 0.0, preset: str | None = None,
                 own_label_set: bool = False) -> str | None:
    """The base a fine-tune starts from when none is given (None: the bundled pretrained model).

    The bundled segmentation model, continued, for a strategy that starts from trained weights: held out, four painted
    slices of a new patient refined from the segmentor (trained without that patient) beat the same slices refined from
    the pretrained model (docs/model-figures.md, leave-one-out). The pretrained model when the run asks for what only
    a pretrained backbone has: a new head (`head`, or a label set of its own) or DDPM adaptation; for fs (or a
    `preset` of its own) only the architecture is used, and the pretrained model's is the same.
    """
    if not strategies.get(strategy).pretrained or head is not None or adapt_seconds > 0 or preset is not None or own_label_set:
        return None
    return DEFAULT_SEGMENTOR


def build_segmentor(base: str | Path | None = None, strategy: str = DEFAULT_STRATEGY, head: int | None = None, timestep: int | None = None,
                    preset: str | None = None, label_set: LabelSet | None = None) -> Start:
    """The network to fine-tune: a pretrained backbone with a new head, a segmentation model continued, or random weights.

    `base` is a model name or folder (None: the bundled pretrained model). A strategy without a pretrained backbone
    (fs) keeps only the base's architecture and preprocessing; without a base it takes `preset` (None: the bundled
    pretrained model's architecture, so FS and FT-dec see the same pixels). A segmentation model as base is continued,
    head included, unless the strategy starts from random weights.

    `label_set`: the organs the new model labels (None: the base's; FLARE22 for the bundled models). A segmentation
    model whose set differs gives its backbone only: the head is new, with one class per label of `label_set`.
    """
    row = strategies.get(strategy)
    if not row.pretrained and base is None:
        card = read_card(resolve_model(None, "pretrained")) if preset is None else random_base(preset)
        return Start(new_segmentor(card, strategy, head=head, timestep=timestep, label_set=label_set), card, None, strategy, label_set=label_set)
    path = resolve_model(base, "pretrained")
    card = read_card(path)
    if preset and card.preset and preset != card.preset:
        raise InputError(f"--preset {preset}: the base model {path} is preset {card.preset}; drop --preset or choose another base")
    if card.kind == "segmentor" and row.pretrained:
        segmentor, card = load_segmentor(path)
        if timestep is not None:
            segmentor.timestep = timestep
        if label_set is None or label_set == card.label_set:
            return Start(segmentor, card, path, strategy, continued=True)
        new = new_segmentor(card, strategy, head=head, timestep=segmentor.timestep, label_set=label_set)
        new.unet.load_state_dict(segmentor.unet.state_dict())  # its trained backbone; its head labels another set
        return Start(new, card, path, strategy, label_set=label_set)
    segmentor = new_segmentor(card, strategy, head=head, timestep=timestep, label_set=label_set)
    if row.pretrained:
        unet, _ = load_unet(path)
        segmentor.load_pretrained(unet.state_dict())
    return Start(segmentor, card, path, strategy, label_set=label_set)


def check_adapt(strategy: str, seconds: float) -> None:
    """Adapting needs a pretrained backbone."""
    if seconds > 0 and not strategies.get(strategy).pretrained:
        others = " or ".join(s for s in STRATEGIES if strategies.get(s).pretrained)
        raise InputError(f"--adapt: {strategy} trains from random weights, so there is no pretrained backbone to adapt; drop --adapt or use "
                         f"--strategy {others}")


@dataclass
class TrainingCT:
    """A CT and its labels (ids of the model's label set, on the CT's grid) to fine-tune on."""

    ct: sitk.Image
    labels: sitk.Image
    organs: set[int] | None = None  # the organ ids its labels label; None: those with any voxel
    source: dict = field(default_factory=dict)  # what the model card records of where it came from, e.g. {"image": ..., "labels": ...}
    name: str = ""  # how messages name it, e.g. its labels file


def finetune_model(
    training: Sequence[TrainingCT],
    base: Start | str | Path | None = None,
    config: FinetuneConfig | None = None,
    *,
    head: int | None = None,
    timestep: int | None = None,
    preset: str | None = None,
    adapt_seconds: float = 0.0,
    device: torch.device | str = "auto",
    progress: Progress | None = None,
    fit_batch_size: bool = True,
    name: str = "",
) -> tuple[Segmentor, ModelCard]:
    """Fine-tune on the annotated slices of `training` (``config.strategy``, default settings when None); the model and its card.

    `base` is where it starts: a `Start` from `build_segmentor`, or a model name or folder (None: the bundled pretrained
    model) built here with `head`, `timestep` and `preset`. `adapt_seconds` first continues the pretrained backbone's
    DDPM training on every slice of the CTs. `fit_batch_size`: the batch size was not chosen, so a smaller one that fits
    may be taken on the CPU. Nothing is written; ``models.save_model(folder, card, segmentor.state_dict())`` saves it.
    """
    config = config or FinetuneConfig()
    check_adapt(config.strategy, adapt_seconds)
    device = resolve_device(device) if isinstance(device, str) else device
    start = base if isinstance(base, Start) else build_segmentor(base, config.strategy, head, timestep, preset)
    if start.strategy != config.strategy:
        raise ValueError(f"the start was built for {start.strategy}, the settings say {config.strategy}")
    progress = progress or Progress("none")
    slices = training_slices([(t.ct, t.labels) for t in training], start.card.preprocessing, [t.organs for t in training], start.label_set)
    data = _data_record(training, slices)

    adaptation = _adapt(start, [t.ct for t in training], adapt_seconds, config.seed, device, progress)
    organs = ", ".join(slices.summary()["organs"])
    if start.path is not None and start.card.kind == "segmentor" and not start.continued and strategies.get(config.strategy).pretrained:
        progress.message(f"{start.card.name} labels {start.card.label_set.describe()}: its backbone is the start, with a new head for "
                         f"{start.label_set.describe()}")
    progress.message(f"fine-tuning ({config.strategy}) on {len(slices.sources)} annotated slices, organs: {organs}; device {device}")
    if unlabelled := slices.unlabelled_organs():
        progress.message(f"partial labels: {', '.join(unlabelled)} unlabelled in at least one CT; there, unlabelled voxels may be them "
                         f"({start.kept_organs})")
    progress.start("finetune", config.iterations)
    segmentor = start.segmentor
    result = finetune(segmentor, slices.images, slices.labels, config, device, lambda _, loss: progress.advance(loss=loss),
                      fit_batch_size=fit_batch_size, on_message=progress.message, labelled=slices.labelled(segmentor.num_classes),
                      keep_unlabelled=start.continued)
    progress.finish()

    base_card = start.card
    card = ModelCard(
        kind="segmentor",
        unet=base_card.unet,
        preprocessing=base_card.preprocessing,
        schedule=base_card.schedule,
        head={"width": segmentor.head.hidden, "layers": segmentor.head.num_layers},
        strategy=config.strategy,
        timestep=segmentor.timestep,
        preset=base_card.preset,
        postprocessing=postprocessing_of(base_card, config.strategy),
        licence=dict(base_card.licence),
        name=name,
        labels=start.label_set.to_card(),
        provenance={
            "created": now_iso(),
            "diffusionseg_version": __version__,
            "base": None if start.path is None else base_record(start.path, base_card),
            "adaptation": adaptation,
            "data": data,
            "training_slices": slices.summary(),
            "iterations": result.iterations,
            "stopped_by": result.stopped_by,
            "final_loss": result.final_loss,
            "seconds": round(result.seconds, 1),
            "device": str(device),
            "hardware": describe_hardware(device),
            "config": config.to_dict(),
            "metrics": {},
        },
    )
    return segmentor, card


def _data_record(training: Sequence[TrainingCT], slices: TrainingSlices) -> list[dict]:
    """Per CT: where it came from, its annotated slices and the organs it labels; InputError for a CT with no annotated slice."""
    data = []
    for number, t in enumerate(training):
        entry = {**t.source, "annotated_slices": [index for n, index in slices.sources if n == number],
                 "labelled_organs": slices.label_set.names(slices.organ_sets[number])}
        if not entry["annotated_slices"]:
            raise InputError(f"{t.name or f'labelled CT {number + 1}'}: no annotated slice (no labelled voxel); paint at least one organ on one axial slice")
        data.append(entry)
    return data


def base_record(base_path: Path, base_card: ModelCard) -> dict:
    """What the new card says of its base. A fine-tuned base keeps its own training record (metrics dropped: they
    describe the base, not this model), so a model continued in stages tells its whole recipe."""
    record = {"path": portable_path(base_path), "name": base_card.name, "kind": base_card.kind}
    if base_card.kind == "segmentor":
        record["provenance"] = {k: v for k, v in base_card.provenance.items() if k != "metrics"}
    return record


def postprocessing_of(base_card: ModelCard, strategy: str) -> dict:
    """A segmentor base passes on its cleanup setting. Fine-tuned from pretrained weights, cleanup is on: held out it raised
    mean DSC for every such model measured (docs/model-figures.md). A strategy from random weights was not measured so and
    keeps the plain labelmap."""
    if base_card.kind == "segmentor":
        return dict(base_card.postprocessing)
    return {"cleanup": True} if strategies.get(strategy).pretrained else {}


def _adapt(start: Start, cts: list[sitk.Image], seconds: float, seed: int, device: torch.device, progress: Progress) -> dict | None:
    """Continue the base's DDPM training on every slice of the CTs and give the start's segmentor the adapted backbone.

    Returns the provenance record, or None when nothing was adapted. A segmentation model as base is
    skipped with a message, not refused: its noise output layer, which the denoising loss trains, was
    replaced by its head, and the Slicer module keeps the setting while the user fine-tunes again.
    """
    if seconds <= 0:
        return None
    base_card = start.card
    if base_card.kind != "pretrained" or start.path is None:
        progress.message(f"--adapt skipped: the base {base_card.name} is a segmentation model, which cannot be trained as a denoiser; "
                         "fine-tune from a pretrained model to adapt")
        return None
    unet, _ = load_unet(start.path)  # with its noise output layer, which the loss needs
    slices = torch.cat([torch.from_numpy(to_model_space(ct, base_card.preprocessing).slices) for ct in cts])
    progress.message(f"adapting the pretrained backbone to {len(slices)} unlabelled slices for {seconds:g} s")
    progress.start("adapt", math.ceil(seconds))  # steps are seconds: the budget is time, not iterations

    def on_step(_: int, loss: float) -> None:
        progress.advance(min(int(progress.elapsed), progress.total) - progress.step, loss=loss)

    result = adapt_backbone(unet, slices, GaussianDiffusion.from_dict(base_card.schedule), seconds, device, seed=seed, on_step=on_step)
    progress.finish()
    start.segmentor.load_pretrained(unet.state_dict())
    progress.message(f"adapted in {result.iterations} iterations, denoising loss {result.loss_first:.4f} -> {result.loss_last:.4f}")
    return result.provenance()
