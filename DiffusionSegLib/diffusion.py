"""Gaussian diffusion (DDPM): noise schedules, the forward process, the training loss and samplers.

The network predicts the noise epsilon. Schedules and their derived coefficients are computed once in
float64 numpy (as guided-diffusion does); each coefficient table is converted to a tensor the first
time it is needed on a device (float32, or float64 for float64 data) and gathered per timestep from
there, so no float64 tensor ever reaches devices without float64 support (Apple MPS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine")

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Betas (float64) of the `linear` (1e-4 to 0.02 at 1000 steps) or `cosine` (Nichol & Dhariwal) schedule."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    if name == "linear":
        scale = 1000 / num_timesteps  # the same total noise at other step counts, as guided-diffusion
        # Below 21 steps the scaled betas reach 1 (alpha_bar = 0, x_0 unrecoverable): cap them as the cosine schedule does.
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64), 0.999)
    if name == "cosine":
        # alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2) for s = t/T; beta_t = 1 - alpha_bar(t+1)/alpha_bar(t),
        # capped at 0.999 so the last step does not divide by (almost) zero.
        s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise on `device`, drawn from `generator` on whatever device that generator lives."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class GaussianDiffusion:
    """The forward process q(x_t | x_0), the epsilon loss, and DDPM / DDIM reverse processes."""

    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000) -> None:
        self.schedule = schedule
        self.num_timesteps = int(num_timesteps)
        self.betas = beta_schedule(schedule, self.num_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.sqrt_betas = np.sqrt(self.betas)
        # Eq. 4: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z.
        self.recip_sqrt_alphas = 1.0 / np.sqrt(self.alphas)
        self.eps_coef = self.betas / self.sqrt_one_minus_alphas_cumprod
        # Posterior q(x_{t-1} | x_t, x_0) mean = coef_x0 x_0 + coef_xt x_t.
        self.posterior_coef_x0 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_coef_xt = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        self._tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "num_timesteps": self.num_timesteps, "prediction": "epsilon"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianDiffusion:
        unknown = set(d) - {"schedule", "num_timesteps", "prediction"}
        if unknown:
            raise ValueError(f"unknown diffusion settings: {sorted(unknown)}")
        if d.get("prediction", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, got {d.get('prediction')!r}")
        return cls(d.get("schedule", "cosine"), d.get("num_timesteps", 1000))

    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient table `name` at timesteps t, shaped (B, 1, ...) to broadcast over a batch like `like`."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (name, like.device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(dtype).to(like.device)  # cast on the CPU first
            self._tables[key] = table
        return table[t.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x_0 to x_t (inverse of predict_x0)."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._coef("sqrt_recipm1_alphas_cumprod", t, x_t)

    def training_loss(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error (float32 scalar) between the true and the predicted noise, t uniform over all steps."""
        if t is None:
            if generator is None:
                t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
            else:
                t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=generator.device).to(x0.device)
        if noise is None:
            noise = _randn(tuple(x0.shape), generator, x0.device).to(x0.dtype)
        prediction = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(prediction.float(), noise.float())

    def _timesteps(self, i: int, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch,), i, device=device, dtype=torch.long)

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: EpsModel,
        shape: tuple[int, ...],
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling over all T steps (Eq. 4 of the method, sigma_t^2 = beta_t; no noise at t=0).

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z. With `clip_denoised`
        the mean is computed instead through the x_0 prediction, clipped to the data range [-1, 1], and the
        posterior mean of q(x_{t-1} | x_t, x_0) (guided-diffusion's clip_denoised): algebraically the same
        mean when nothing is clipped, but it keeps the early, very noisy steps from overshooting the data
        range. Without it, Eq. 4 is applied literally.
        """
        batch = shape[0]
        x = _randn(shape, generator, device)
        for step, i in enumerate(reversed(range(self.num_timesteps))):
            t = self._timesteps(i, batch, device)
            eps = model(x, t).float()
            if clip_denoised:
                x0 = self.predict_x0(x, t, eps).clamp(-1, 1)
                mean = self._coef("posterior_coef_x0", t, x) * x0 + self._coef("posterior_coef_xt", t, x) * x
            else:
                mean = self._coef("recip_sqrt_alphas", t, x) * (x - self._coef("eps_coef", t, x) * eps)
            if i > 0:
                mean = mean + self._coef("sqrt_betas", t, x) * _randn(shape, generator, device)
            x = mean
            if progress is not None:
                progress(step + 1, self.num_timesteps)
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced timesteps from T-1 down to 0 (just T-1 for one step)."""
        if steps < 1:
            raise ValueError(f"DDIM needs at least one step, got {steps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        spaced = np.linspace(0, self.num_timesteps - 1, min(steps, self.num_timesteps)).round().astype(int)
        return [int(i) for i in np.unique(spaced)[::-1]]

    @torch.no_grad()
    def ddim_sample(
        self,
        model: EpsModel,
        shape: tuple[int, ...],
        *,
        steps: int = 50,
        eta: float = 0.0,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """DDIM (Song et al.) on `steps` evenly spaced timesteps; eta=0 is deterministic, eta=1 DDPM-like.

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
        sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)). With `clip_denoised`, x0 is
        clipped to [-1, 1] and eps recomputed from it, as guided-diffusion does.
        """
        batch = shape[0]
        timesteps = self.ddim_timesteps(steps)
        x = _randn(shape, generator, device)
        for step, i in enumerate(timesteps):
            t = self._timesteps(i, batch, device)
            eps = model(x, t).float()
            x0 = self.predict_x0(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = self.predict_eps(x, t, x0)
            abar = float(self.alphas_cumprod[i])
            abar_prev = float(self.alphas_cumprod[timesteps[step + 1]]) if step + 1 < len(timesteps) else 1.0
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * _randn(shape, generator, device)
            if progress is not None:
                progress(step + 1, len(timesteps))
        return x
