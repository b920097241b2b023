"""Fine-tuning a segmentor on a few annotated axial slices: augmentation, loss, optimiser, loop.

The loss is 0.5 x cross-entropy + smoothed Dice (eps 1e-5); Adam with weight decay 1e-3 on the head
and 1e-4 elsewhere and a head learning rate 10x the backbone's, as in the method. With the encoder
frozen (ft-dec, lp) its forward pass runs without autograd, so no activation memory is kept for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast
from .segmentor import Segmentor


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


@dataclass
class FinetuneConfig:
    strategy: str = "ft-dec"
    iterations: int = 300
    batch_size: int = 4
    lr: float = 1e-4  # backbone learning rate; the head uses lr x head_lr_factor
    head_lr_factor: float = 10.0
    weight_decay: float = 1e-4
    head_weight_decay: float = 1e-3
    ce_weight: float = 0.5
    dice_eps: float = 1e-5
    dice_background: bool = False  # background Dice would dominate a slice that is mostly background
    time_limit: float | None = None  # seconds; training stops after the iteration that crosses it
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

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
    stopped_by: str  # "iterations" or "time-limit"
    losses: list[float]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    """`ce_weight` x cross-entropy + (1 - smoothed soft Dice) averaged over classes."""
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
    if not config.enabled:
        return images, labels
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

    contrast = uniform(1 - config.intensity_scale, 1 + config.intensity_scale).to(images.device)
    offset = uniform(-config.intensity_shift, config.intensity_shift).to(images.device)
    warped = (warped * contrast[:, None, None, None] + offset[:, None, None, None]).clamp(-1, 1)
    return warped, warped_labels[:, 0].long()


def finetune(
    segmentor: Segmentor,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train `segmentor` in place on annotated slices (images K x 1 x S x S in [-1, 1], labels K x S x S).

    `on_step(iteration, loss)` is called after every iteration (progress, cancellation by raising).
    """
    if images.shape[0] == 0:
        raise ValueError("no annotated slices to train on")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    segmentor.configure_strategy(config.strategy)
    segmentor.to(device)
    segmentor.train()
    encoder_frozen = segmentor.encoder_frozen()
    if encoder_frozen:
        for module in segmentor.encoder_modules():
            module.eval()
    decoder_frozen = segmentor.decoder_frozen()
    if decoder_frozen:
        segmentor.unet.output_blocks.eval()

    groups = segmentor.parameter_groups(config.lr, config.weight_decay, config.head_lr_factor, config.head_weight_decay)
    optimizer = torch.optim.Adam(groups)
    images, labels = images.float(), labels.long()
    batch = min(config.batch_size, images.shape[0])
    losses: list[float] = []
    start = time.monotonic()
    stopped_by = "iterations"
    for iteration in range(1, config.iterations + 1):
        pick = torch.randperm(images.shape[0], generator=generator)[:batch]
        x, y = augment_batch(images[pick], labels[pick], config.augment, generator)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            if encoder_frozen:
                with torch.no_grad():
                    encoded = segmentor.encode(x)
                if decoder_frozen:
                    with torch.no_grad():
                        features = segmentor.unet.decode(*encoded)
                    logits = segmentor.head(features)
                else:
                    logits = segmentor.decode(*encoded)
            else:
                logits = segmentor(x)
        loss = segmentation_loss(logits.float(), y, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"fine-tuning diverged at iteration {iteration} (loss {value}); lower --lr")
        losses.append(value)
        if on_step is not None:
            on_step(iteration, value)
        if config.time_limit is not None and time.monotonic() - start >= config.time_limit:
            stopped_by = "time-limit"
            break
    segmentor.eval()
    return FinetuneResult(
        iterations=len(losses),
        final_loss=float(np.mean(losses[-10:])),
        seconds=time.monotonic() - start,
        stopped_by=stopped_by,
        losses=losses,
    )
