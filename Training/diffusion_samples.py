"""Sampling from a noise predictor and picturing the samples (lung and abdominal windows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from DiffusionSegLib.atomic import atomic_path
from DiffusionSegLib.diffusion import GaussianDiffusion
from DiffusionSegLib.unet import UNetConfig, UNetModel

from .checkpoint import load_checkpoint

SAMPLERS = ("ddpm", "ddim")
DEFAULT_DDIM_STEPS = 50

# Model space maps each scan's 0.5-99.5 percentiles to [-1, 1]; for abdominal CT these are about
# air (-1024 HU) and dense bone (~1000 HU), which is close enough to show windows by eye.
TYPICAL_CLIP_HU = (-1024.0, 1000.0)
WINDOWS = {"lung": (-600.0, 1500.0), "abdomen": (40.0, 400.0)}  # (level, width) in HU


@torch.no_grad()
def sample(model: UNetModel, diffusion: GaussianDiffusion, count: int, *, sampler: str = "ddpm", steps: int = DEFAULT_DDIM_STEPS,
           device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """`count` samples (N x S x S float32 in [-1, 1]): DDPM over all the schedule's steps (the method's Eq. 4), or DDIM on `steps`."""
    model.eval().to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    size = model.config.image_size
    out = []
    for start in range(0, count, batch_size):
        shape = (min(batch_size, count - start), 1, size, size)
        if sampler == "ddpm":
            x = diffusion.ddpm_sample(model, shape, device=device, generator=generator)
        elif sampler == "ddim":
            x = diffusion.ddim_sample(model, shape, steps=steps, device=device, generator=generator)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
        out.append(x[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def sampler_steps(sampler: str, steps: int, diffusion: GaussianDiffusion) -> int:
    """Denoising steps a sampler takes: all of the schedule's for DDPM, `steps` (at most all) for DDIM."""
    return diffusion.num_timesteps if sampler == "ddpm" else len(diffusion.ddim_timesteps(steps))


def ema_model(checkpoint: str | Path) -> tuple[UNetModel, GaussianDiffusion]:
    """The EMA noise predictor of a training checkpoint and its diffusion schedule."""
    saved = load_checkpoint(checkpoint, restore_random_state=False)
    model = UNetModel(UNetConfig.from_dict(saved.state["unet"]))
    model.load_state_dict(saved.ema)
    return model.eval(), GaussianDiffusion.from_dict(saved.state["schedule"])


def window(samples: np.ndarray, level: float, width: float, clip_hu: tuple[float, float] = TYPICAL_CLIP_HU) -> np.ndarray:
    """uint8 display of model-space samples in an HU window."""
    low, high = clip_hu
    hu = (samples + 1) / 2 * (high - low) + low
    return (np.clip((hu - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


def grid_image(samples: np.ndarray, columns: int = 8) -> np.ndarray:
    """Rows of samples, each shown in the lung window above the abdominal window."""
    n, size, _ = samples.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = np.zeros((rows * 2 * size, columns * size), dtype=np.uint8)
    for w, (level, width) in enumerate(WINDOWS.values()):
        shown = window(samples, level, width)
        for i in range(n):
            r, c = divmod(i, columns)
            canvas[(2 * r + w) * size:(2 * r + w + 1) * size, c * size:(c + 1) * size] = shown[i]
    return canvas


def save_grid(samples: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid_image(samples)).save(tmp)
    return path


def save_sample_grid(model: UNetModel, diffusion: GaussianDiffusion, path: Path, count: int, steps: int, device: torch.device) -> Path:
    """A quick DDIM preview during training (the model is put back in training mode after)."""
    was_training = model.training
    samples = sample(model, diffusion, count, sampler="ddim", steps=steps, device=device)
    model.train(was_training)
    return save_grid(samples, path)
