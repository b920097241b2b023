"""Fine-tuning a segmentor on a few annotated axial slices: augmentation, loss, optimiser, loop.

The loss is 0.5 x cross-entropy + smoothed Dice (eps 1e-5); Adam with weight decay 1e-3 on the head
and 1e-4 elsewhere and a head learning rate 10x the backbone's, as in the method. With the encoder
frozen (ft-dec, lp) its forward pass runs without autograd, so no activation memory is kept for it;
better, its outputs are computed once for a fixed pool of augmented copies of the annotated slices
(the frozen part is deterministic), and each iteration runs only the trainable part on a batch drawn
from that pool. Training stops early when the loss has plateaued.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast
from .errors import InputError
from .memory import available_memory, fit_batch, measure_step, out_of_memory_message
from .segmentor import Segmentor
from .strategies import DEFAULT_STRATEGY


@dataclass
class AugmentConfig:
    """Augmentations that stay plausible with 4 slices: small affine warps and intensity jitter.

    No flips: left and right organs (kidneys, adrenal glands) must keep their side.
    """

    enabled: bool = True
    probability: float = 0.8  # chance that a slice is warped at all
    rotate_deg: float = 10.0
    scale: float = 0.1  # zoom factor in [1 - scale, 1 + scale]
    translate: float = 0.05  # fraction of the slice width
    intensity_scale: float = 0.1  # contrast factor in [1 - s, 1 + s]
    intensity_shift: float = 0.1  # offset in model units (the [-1, 1] range)
    # Percentile-window jitter: (x + 1) x f - 1 with f log-uniform in [1 / (1 + w), 1 + w]. The per-scan
    # clip pins air near -1 while the 99.5th percentile moves with the scan's bone, contrast and field
    # of view (HU 50 lands anywhere from 0.0 to 0.6 in model units across scanners), which is a scale
    # about air, not about 0 like `intensity_scale`. 0 disables it (no random draw).
    window_scale: float = 0.0


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (``--config`` JSON).

    A field whose metadata has a `flag` help text is also a ``diffusionseg finetune`` flag of its name,
    its default shown from here (`none`: how a None default reads; `positive`: the flag takes 1 or more).
    """

    strategy: str = DEFAULT_STRATEGY  # strategies.py: which parts learn
    # A short schedule at twice the method's learning rate: what a user waits for on a laptop CPU is
    # minutes, and held out it scores as the method's longer, slower schedule did (docs/engine-notes.md).
    # The method's 1e-4 is for tens of thousands of iterations; the label-efficiency benchmark keeps it.
    iterations: int = field(default=160, metadata={"flag": "training iterations", "positive": True})
    batch_size: int = field(default=3, metadata={
        "flag": "slices per iteration; unless given, a smaller one is taken on the CPU when it would not fit in memory", "positive": True})
    lr: float = field(default=2e-4, metadata={"flag": "backbone learning rate; the head uses 10x"})  # the head's is lr x head_lr_factor
    head_lr_factor: float = 10.0
    weight_decay: float = 1e-4
    head_weight_decay: float = 1e-3
    ce_weight: float = 0.5
    dice_eps: float = 1e-5
    dice_background: bool = False  # background Dice would dominate a slice that is mostly background
    # Seconds; training stops after the iteration that crosses it.
    time_limit: float | None = field(default=None, metadata={"flag": "stop after this many seconds of training", "none": "no limit"})
    seed: int = field(default=0, metadata={"flag": "random seed"})
    # Frozen-part cache: augmented copies per slice (copy 0 is the slice itself) and a memory cap. Off by
    # default (0: fresh augmentation every iteration, frozen part recomputed without autograd): with few
    # slices a fixed pool of copies is too little variety and costs accuracy, while for FT-dec it saves
    # only the encoder pass, a small share of a step. LP, whose frozen part is nearly the whole network,
    # gains several-fold in speed: turn it on there. Figures in docs/engine-notes.md.
    cache_copies: int = 0
    # Partial labels from a segmentor base: weight of keeping the base's answer among background and the
    # organs a slice leaves unlabelled (a KL term on its unlabelled pixels). The marginal loss alone gives
    # those organs no gradient at all, so a few hundred Adam steps scramble what the base knew of them.
    keep_weight: float = 1.0
    cache_memory_mb: float = 2048.0
    # Plateau stop: after `min_iterations`, stop once the mean loss of the last `patience` iterations
    # is not `min_improvement` (relative) below the best earlier such mean. 0 patience disables it.
    patience: int = field(default=60, metadata={"flag": "stop once the loss has not improved for this many iterations; 0 never stops early"})
    min_improvement: float = 0.02
    min_iterations: int = 100
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Start the head's class biases at the log class frequencies of the training labels (about 90% of
    # pixels are background). A linear head needs it: at the head's learning rate Adam moves a bias by
    # ~lr per step, far too little to learn that prior in a few hundred steps. Off by default because
    # it would reset a trained head continued with --base.
    prior_bias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """Build from a (partial) dict, e.g. a JSON file; unknown keys are an error, not ignored."""
        d = dict(d)
        augment = d.pop("augment", {}) or {}
        for given, known in ((d, cls.__dataclass_fields__), (augment, AugmentConfig.__dataclass_fields__)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"unknown fine-tuning settings {unknown}; known: {sorted(known)}")
        return cls(**d, augment=AugmentConfig(**augment))


@dataclass
class FinetuneResult:
    iterations: int
    final_loss: float
    seconds: float
    stopped_by: str  # "iterations", "time-limit" or "plateau"
    losses: list[float]


def class_frequencies(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of the pixels of `labels` (any shape, class indices) in each class."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes].double()
    return counts / counts.sum().clamp(min=1)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, config: FinetuneConfig, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """`ce_weight` x cross-entropy + (1 - smoothed soft Dice) averaged over classes.

    `labelled` (B x C bool, column 0 background) says which classes were labelled on each slice; None
    means all. Where a slice leaves organs unlabelled, its 0 means "background or one of those", so the
    marginal loss of Shi et al. (Medical Image Analysis 2021) is used: cross-entropy against the summed
    probability of background and the unlabelled organs, Dice only over the organs labelled on a slice.
    With every class labelled (None, or an all-true mask) it is the plain loss, bit for bit.
    """
    if labelled is None or bool(labelled.all()):
        return _full_label_loss(logits, target, config)
    return _marginal_loss(logits, target, config, labelled)


def _marginal_loss(logits: torch.Tensor, target: torch.Tensor, config: FinetuneConfig, labelled: torch.Tensor) -> torch.Tensor:
    labelled = labelled.to(logits.device, torch.bool)
    log_probs = logits.float().log_softmax(dim=1)
    merged = ~labelled
    merged[:, 0] = True  # the classes an unlabelled (0) pixel may belong to
    background = torch.logsumexp(log_probs.masked_fill(~merged[:, :, None, None], -math.inf), dim=1)
    picked = log_probs.gather(1, target[:, None])[:, 0]
    ce = -torch.where(target == 0, background, picked).mean()
    probs = log_probs.exp()
    probs = torch.cat([background.exp()[:, None], probs[:, 1:]], dim=1)  # background Dice sees the merged class
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    weight = labelled[:, :, None, None].to(probs.dtype)  # a class counts only on the slices that label it
    dims = (0, 2, 3)
    intersection = (probs * onehot * weight).sum(dims)
    denominator = ((probs + onehot) * weight).sum(dims)
    dice = (2 * intersection + config.dice_eps) / (denominator + config.dice_eps)
    counted = labelled.any(dim=0)
    if not config.dice_background:
        counted[0] = False
    # A class no slice of the batch labels drops out of the mean's sum but not its count: each labelled
    # organ keeps the weight it has with full labels, so Dice does not swamp the cross-entropy.
    classes = logits.shape[1] - (0 if config.dice_background else 1)
    return config.ce_weight * ce + ((1 - dice) * counted).sum() / classes


def _full_label_loss(logits: torch.Tensor, target: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    ce = F.cross_entropy(logits, target)
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    if not config.dice_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3)  # Dice over the whole batch: a class absent from one slice does not blow up
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + config.dice_eps) / (denominator + config.dice_eps)
    return config.ce_weight * ce + (1 - dice.mean())


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine warp (bilinear image, nearest labels) and intensity jitter, per slice."""
    x, y, _ = augment_with(images, labels, None, config, generator)
    return x, y


def augment_with(
    images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor | None, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`augment_batch`, and class `probabilities` (B x C x S x S) warped with the images (bilinear; outside the slice is
    background, as for the labels). The same random draws as `augment_batch`: the images and labels do not change."""
    if not config.enabled:
        return images, labels, probabilities
    b = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    warp = torch.rand(b, generator=generator) < config.probability
    angle = torch.where(warp, uniform(-1, 1) * math.radians(config.rotate_deg), torch.zeros(b))
    zoom = torch.where(warp, uniform(1 - config.scale, 1 + config.scale), torch.ones(b))
    shift = torch.where(warp[:, None], (torch.rand(b, 2, generator=generator) * 2 - 1) * 2 * config.translate, torch.zeros(b, 2))
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Outside the slice is air (-1) and background (0).
    warped = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    warped_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if probabilities is not None:
        probabilities = F.grid_sample(probabilities.to(grid.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        outside = (1 - probabilities.sum(dim=1)).clamp_min(0)  # the share of each pixel that came from outside the slice
        probabilities = torch.cat([probabilities[:, :1] + outside[:, None], probabilities[:, 1:]], dim=1)

    if config.window_scale > 0:
        bound = math.log1p(config.window_scale)
        window = uniform(-bound, bound).exp().to(images.device, images.dtype)
        warped = (warped + 1) * window[:, None, None, None] - 1
    contrast = uniform(1 - config.intensity_scale, 1 + config.intensity_scale).to(images.device)
    offset = uniform(-config.intensity_shift, config.intensity_shift).to(images.device)
    warped = (warped * contrast[:, None, None, None] + offset[:, None, None, None]).clamp(-1, 1)
    return warped, warped_labels[:, 0].long(), probabilities


class FrozenCache:
    """Outputs of the frozen part of a segmentor (`Segmentor.frozen_features`) for a fixed pool of (augmented) slices.

    For ft-dec the frozen part is the encoder (skip activations, middle block); for lp it is the whole
    U-Net (decoder features).
    """

    def __init__(self, segmentor: Segmentor, images: torch.Tensor, labels: torch.Tensor, device: torch.device, chunk: int = 4) -> None:
        self.labels = labels.to(device)
        parts: list[list[torch.Tensor]] = []
        with torch.no_grad(), autocast(device):
            for start in range(0, images.shape[0], chunk):
                parts.append([t.float() for t in segmentor.frozen_features(images[start : start + chunk].to(device))])
        self.tensors = [torch.cat(column) for column in zip(*parts, strict=True)]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def logits(self, segmentor: Segmentor, pick: torch.Tensor) -> torch.Tensor:
        return segmentor.trainable_logits([t[pick] for t in self.tensors])


def frozen_bytes_per_slice(segmentor: Segmentor, size: int) -> int:
    """Bytes the frozen part's outputs take per slice (float32), measured on a meta-device copy."""
    probe = torch.zeros(1, 1, size, size, device="meta")
    with torch.device("meta"):
        meta = Segmentor(segmentor.unet.config, segmentor.head.hidden, segmentor.head.num_layers, segmentor.timestep, segmentor.num_classes)
    meta.set_trainable(segmentor.trainable_parts())
    return sum(t.numel() for t in meta.frozen_features(probe)) * 4


def cache_pool_size(config: FinetuneConfig, slices: int, bytes_per_slice: int) -> int:
    """Pool entries the memory cap allows (0: no cache); at least the slices themselves or nothing."""
    if config.cache_copies <= 0:
        return 0
    copies = config.cache_copies if config.augment.enabled else 1
    affordable = int(config.cache_memory_mb * 2**20 // max(bytes_per_slice, 1))
    if affordable < slices:
        return 0
    return min(slices * copies, affordable // slices * slices)


def augmented_pool(
    images: torch.Tensor, labels: torch.Tensor, size: int, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices themselves followed by augmented copies, `size` entries in all."""
    copies = size // images.shape[0]
    pool_x, pool_y = [images], [labels]
    for _ in range(copies - 1):
        x, y = augment_batch(images, labels, config, generator)
        pool_x.append(x)
        pool_y.append(y)
    return torch.cat(pool_x), torch.cat(pool_y)


class PlateauStop:
    """Says when the windowed mean loss has stopped improving by a relative margin."""

    def __init__(self, patience: int, min_improvement: float, min_iterations: int) -> None:
        self.patience, self.min_improvement, self.min_iterations = patience, min_improvement, min_iterations
        self.best = math.inf
        self.best_at = 0

    def update(self, losses: list[float]) -> bool:
        if self.patience <= 0 or len(losses) < self.patience:
            return False
        mean = float(np.mean(losses[-self.patience :]))
        if mean < self.best * (1 - self.min_improvement):
            self.best, self.best_at = mean, len(losses)
        return len(losses) >= self.min_iterations and len(losses) - self.best_at >= self.patience


def finetune(
    segmentor: Segmentor,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
    *,
    fit_batch_size: bool = False,
    on_message: Callable[[str], None] | None = None,
    labelled: torch.Tensor | None = None,
    keep_unlabelled: bool = False,
) -> FinetuneResult:
    """Train `segmentor` in place on annotated slices (images K x 1 x S x S in [-1, 1], labels K x S x S).

    `on_step(iteration, loss)` is called after every iteration (progress, cancellation by raising).
    Before the first iteration the memory a step needs is measured (DiffusionSegLib.memory): if it does
    not fit, a smaller batch is taken on the CPU when `fit_batch_size` (no batch size was asked for),
    said through `on_message`; otherwise InputError names a batch size that fits.
    `labelled` (K x C bool, `TrainingSlices.labelled`) marks the classes labelled on each slice (None: all);
    see `segmentation_loss` for how the unlabelled ones are treated. With `keep_unlabelled` (the
    segmentor already segments those organs: a fine-tuned base) the starting model says what its unlabelled
    pixels are among background and the unlabelled organs (`keep_loss`). It answers once per slice before
    training, and each batch takes that answer through the batch's own augmentation warp: the base's reading of
    the clean slice, at the cost of one forward pass per slice instead of one per step.
    """
    if images.shape[0] == 0:
        raise ValueError("no annotated slices to train on")
    partial = labelled is not None and not bool(labelled.all())
    keep = partial and keep_unlabelled and config.keep_weight > 0
    teacher = _frozen_copy(segmentor, device) if keep else None
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    segmentor.configure_strategy(config.strategy)
    if config.prior_bias:
        segmentor.head.set_class_prior(class_frequencies(labels, segmentor.num_classes))
    segmentor.to(device)
    segmentor.train()
    for module in segmentor.frozen_modules():
        module.eval()

    groups = segmentor.parameter_groups(config.lr, config.weight_decay, config.head_lr_factor, config.head_weight_decay)
    optimizer = torch.optim.Adam(groups)
    images, labels = images.float(), labels.long()
    if labelled is not None and labelled.shape != (images.shape[0], segmentor.num_classes):
        raise ValueError(f"labelled classes {tuple(labelled.shape)} do not match {images.shape[0]} slices x {segmentor.num_classes} classes")
    if labelled is not None and bool(labelled.all()):
        labelled = None  # every class labelled: the plain loss
    free = available_memory(device)
    batch = _fit_batch(segmentor, images, labels, config, device, free, fit_batch_size, on_message)
    start = time.monotonic()
    cache = None
    if segmentor.frozen_parts():
        # The cache may take at most a quarter of the free memory, whatever the settings allow: the steps need the rest.
        cache_config = replace(config, cache_memory_mb=min(config.cache_memory_mb, free * CACHE_SHARE / 2**20))
        pool = cache_pool_size(cache_config, images.shape[0], frozen_bytes_per_slice(segmentor, images.shape[-1]))
        if pool:
            pool_images, pool_labels = augmented_pool(images, labels, pool, config.augment, generator)
            cache = FrozenCache(segmentor, pool_images, pool_labels, device)
            if labelled is not None:  # the pool is whole copies of the slices, in order
                labelled = labelled.repeat(pool // images.shape[0], 1)
            if teacher is not None:  # the pool is fixed, so is the base's answer on it
                cache.teacher = _teacher_logits(teacher, pool_images, device)
    # Fresh augmentation: the base's class probabilities on each slice as it is, warped with the batch.
    # Kept beside the slices (on the CPU, where the batches are augmented).
    answers = None if teacher is None or cache is not None else _teacher_logits(teacher, images, device).softmax(dim=1).cpu()
    teacher = None  # not needed any more: its memory goes back before the steps
    losses: list[float] = []
    plateau = PlateauStop(config.patience, config.min_improvement, config.min_iterations)
    stopped_by = "iterations"
    for iteration in range(1, config.iterations + 1):
        with autocast(device):
            if cache is not None:
                pick = torch.randperm(len(cache), generator=generator)[:batch]
                y = cache.labels[pick.to(cache.labels.device)]
                logits = cache.logits(segmentor, pick.to(device))
                reference = cache.teacher[pick.to(device)] if keep else None
            else:
                pick = torch.randperm(images.shape[0], generator=generator)[:batch]
                x, y, answer = augment_with(images[pick], labels[pick], None if answers is None else answers[pick],
                                            config.augment, generator)
                x, y = x.to(device), y.to(device)
                logits = _logits(segmentor, x)
                reference = None if answer is None else answer.to(device).clamp_min(1e-12).log()  # keep_loss renormalises what it compares
        picked = None if labelled is None else labelled[pick]
        loss = segmentation_loss(logits.float(), y, config, picked)
        if reference is not None:
            loss = loss + config.keep_weight * keep_loss(logits.float(), reference, y, picked)
        value = float(loss.detach())
        if not np.isfinite(value):  # checked before the update: the weights are not spoilt
            raise Diverged(f"finetune: the loss became {value} at iteration {iteration} (fine-tuning diverged); nothing was written; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        try:
            loss.backward()
        except torch.cuda.OutOfMemoryError as e:
            raise InputError(out_of_memory_message("finetune", iteration, len(y), "nothing was written")) from e
        optimizer.step()
        losses.append(value)
        if on_step is not None:
            on_step(iteration, value)
        if config.time_limit is not None and time.monotonic() - start >= config.time_limit:
            stopped_by = "time-limit"
            break
        if plateau.update(losses):
            stopped_by = "plateau"
            break
    segmentor.eval()
    return FinetuneResult(
        iterations=len(losses),
        final_loss=float(np.mean(losses[-10:])),
        seconds=time.monotonic() - start,
        stopped_by=stopped_by,
        losses=losses,
    )


def keep_loss(logits: torch.Tensor, reference: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) over background and the slice's unlabelled organs, on its unlabelled pixels.

    Both distributions are renormalised over those classes, so the term says nothing about the labelled
    organs (the marginal loss does) and everything about which unlabelled organ a pixel is. Averaged
    over all pixels, as the cross-entropy is.
    """
    merged = ~labelled.to(logits.device, torch.bool)
    merged[:, 0] = True
    outside = ~merged[:, :, None, None]
    model = logits.masked_fill(outside, -math.inf).log_softmax(dim=1)
    base = reference.float().masked_fill(outside, -math.inf).log_softmax(dim=1)
    kl = (base.exp() * (base - model)).masked_fill(outside, 0).sum(dim=1)
    return torch.where(target == 0, kl, torch.zeros_like(kl)).mean()


def _frozen_copy(segmentor: Segmentor, device: torch.device) -> Segmentor:
    teacher = copy.deepcopy(segmentor).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def _teacher_logits(teacher: Segmentor, images: torch.Tensor, device: torch.device, chunk: int = 8) -> torch.Tensor:
    with torch.no_grad(), autocast(device):
        return torch.cat([teacher(images[i : i + chunk].to(device)).float() for i in range(0, images.shape[0], chunk)])


class Diverged(InputError, FloatingPointError):
    """The loss became NaN or infinite; the command line reports it in one line (exit 2)."""


CACHE_SHARE = 0.25  # of the free memory, at most, for the frozen-part cache


def _fit_batch(segmentor: Segmentor, images: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig, device: torch.device, free: int,
               may_lower: bool, on_message: Callable[[str], None] | None) -> int:
    """The batch size a step fits with: measured on one slice through the trainable part (what a step's backward needs)."""
    batch = min(config.batch_size, images.shape[0])
    x, y = images[:1].to(device), labels[:1].to(device)

    def loss_at(n: int) -> torch.Tensor:  # copies of one slice: there may be a single training slice
        return segmentation_loss(_logits(segmentor, x.repeat(n, *(1,) * (x.dim() - 1))).float(), y.repeat(n, *(1,) * (y.dim() - 1)), config)

    cache = free * CACHE_SHARE if segmentor.frozen_parts() and config.cache_copies > 0 else 0
    memory = measure_step(segmentor, loss_at, batch, available=int(free - cache))
    decision = fit_batch(memory, batch, device, may_lower=may_lower and device.type == "cpu", what="finetune", available=int(free - cache))
    if decision.note and on_message is not None:
        on_message(decision.note)
    return decision.batch_size


def _logits(segmentor: Segmentor, x: torch.Tensor) -> torch.Tensor:
    """Forward pass without autograd through whatever is frozen."""
    with torch.no_grad():
        features = segmentor.frozen_features(x)
    return segmentor.trainable_logits(features)
