"""Adapting a pretrained backbone to the user's scan: more DDPM training on its own, unlabelled slices.

Beyond the method, which pretrains once on a large corpus: before fine-tuning, the noise predictor is
trained a little longer, with the pretraining's own loss, on every slice of the user's own CT, so
its features see that scanner's noise, reconstruction kernel and anatomy before the few labelled slices
do. The recipe is pretraining's (``Training/pretrain.py``): epsilon-MSE at uniformly drawn timesteps of
the model card's noise schedule, Adam, random horizontal flips. It runs for a wall-clock budget, not an
iteration count, because what the user can spare is time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .devices import autocast
from .diffusion import GaussianDiffusion
from .unet import UNetModel

# Loss means at the start and end of a run are taken over this many steps (fewer for short runs).
LOSS_WINDOW = 10


@dataclass
class AdaptationResult:
    iterations: int
    seconds: float
    loss_first: float | None  # mean loss of the first steps; None when no step ran
    loss_last: float | None  # mean loss of the last steps
    losses: list[float] = field(default_factory=list)

    def provenance(self) -> dict:
        """What a model card records about the adaptation."""
        return {"seconds": round(self.seconds, 1), "iterations": self.iterations, "loss_first": self.loss_first, "loss_last": self.loss_last}


def as_batch(slices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Model-space slices (N x S x S or N x 1 x S x S, in [-1, 1]) as a float32 N x 1 x S x S CPU tensor."""
    tensor = torch.as_tensor(slices).float().cpu()
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if tensor.dim() != 4 or tensor.shape[1] != 1 or tensor.shape[0] == 0:
        raise ValueError(f"expected N x S x S or N x 1 x S x S slices with N >= 1, got shape {tuple(tensor.shape)}")
    return tensor


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over epochs of a fresh permutation each, so every slice is seen once per epoch."""
    batch = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch + 1, batch):
            yield order[start : start + batch]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each slice mirrored left-right with probability 1/2 (as in pretraining: the noise loss has no sides)."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _window_mean(losses: list[float], first: bool) -> float | None:
    if not losses:
        return None
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))  # first and last windows do not overlap once there are 2 steps
    return float(np.mean(losses[:window] if first else losses[-window:]))


def adapt_backbone(
    unet: UNetModel,
    slices: np.ndarray | torch.Tensor,
    diffusion: GaussianDiffusion,
    seconds: float,
    device: torch.device | str,
    *,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> AdaptationResult:
    """Continue DDPM training of `unet` (in place, with its noise output layer) on `slices` for `seconds`.

    Stops after the step that crosses the budget (set-up included), so any positive budget runs at least
    one step; 0 runs none and leaves the weights untouched. Batches, flips, timesteps and noise come from
    one generator seeded with `seed`, so two runs with the same seed take the same steps (only their
    number depends on the clock). `on_step(iteration, loss)` follows every step (progress; raise to
    cancel). The model is left on `device` in eval mode.
    """
    start = time.monotonic()  # the budget covers set-up too: it is the user's wall-clock time
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"adaptation seconds must be 0 or more, got {seconds}")
    if batch_size < 1 or not lr > 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0, got {batch_size} and {lr}")
    images = as_batch(slices)
    device = torch.device(device)
    if seconds == 0:
        return AdaptationResult(0, 0.0, None, None)
    generator = torch.Generator().manual_seed(seed)
    unet.to(device).train().requires_grad_(True)
    # The lr is half pretraining's peak: a budget of minutes buys a few dozen steps on the CPU, which at
    # pretraining's final rate would hardly move the weights. No EMA: the exported weights already are
    # pretraining's average, and an EMA of its decay over a few dozen steps would stay at the starting
    # weights, undoing the adaptation; steps this small do not make the raw weights noisy.
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr, fused=device.type == "cuda" or None)
    losses: list[float] = []
    for pick in shuffled_batches(images.shape[0], batch_size, generator):
        losses.append(_step(unet, random_hflip(images[pick], generator).to(device), diffusion, optimizer, generator, device))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"adaptation diverged at step {len(losses)} (loss {losses[-1]})")
        if on_step is not None:
            on_step(len(losses), losses[-1])
        if time.monotonic() - start >= seconds:
            break
    unet.eval()
    return AdaptationResult(len(losses), time.monotonic() - start, _window_mean(losses, True), _window_mean(losses, False), losses)


def _step(
    unet: UNetModel, x0: torch.Tensor, diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer, generator: torch.Generator, device: torch.device
) -> float:
    """One optimiser step on the noise loss; returns the loss."""
    with autocast(device, fp16=False):  # fp16 without a gradient scaler could underflow
        loss = diffusion.training_loss(unet, x0, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
