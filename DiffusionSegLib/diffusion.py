"""Gaussian diffusion (DDPM): noise schedules, the forward process, the training loss and samplers.

The network predicts the noise epsilon. Schedules are computed in float64 numpy (as guided-diffusion
does) and gathered per timestep into the dtype and device of the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine")

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Betas of the `linear` (1e-4 to 0.02 at 1000 steps) or `cosine` (Nichol & Dhariwal) schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps  # keeps the total noise the same at other step counts
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999) for i in range(num_timesteps)],
            dtype=np.float64,
        )
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


class GaussianDiffusion:
    """The forward process q(x_t | x_0), the epsilon loss, and DDPM / DDIM reverse processes."""

    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000) -> None:
        self.schedule = schedule
        self.num_timesteps = int(num_timesteps)
        self.betas = beta_schedule(schedule, self.num_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef0 x_0 + coeft x_t, beta_tilde).
        self.posterior_coef_x0 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_coef_xt = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    def to_dict(self) -> dict:
        return {"schedule": self.schedule, "num_timesteps": self.num_timesteps, "prediction": "epsilon"}

    @classmethod
    def from_dict(cls, d: dict) -> GaussianDiffusion:
        if d.get("prediction", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, got {d.get('prediction')!r}")
        return cls(d.get("schedule", "cosine"), d.get("num_timesteps", 1000))

    @staticmethod
    def _gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast over a batch like `like`."""
        out = torch.as_tensor(values, device=like.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._gather(np.sqrt(self.alphas_cumprod), t, x0) * x0 + self._gather(np.sqrt(1 - self.alphas_cumprod), t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._gather(np.sqrt(1 / self.alphas_cumprod), t, x_t) * x_t - self._gather(np.sqrt(1 / self.alphas_cumprod - 1), t, x_t) * eps

    def training_loss(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error between the true and the predicted noise, t uniform over all steps."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        prediction = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(prediction.float(), noise.float())

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: EpsModel,
        shape: tuple[int, ...],
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        progress: Callable[[int, int], None] | None = None,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling over all T steps (Eq. 4 of the method, sigma_t^2 = beta_t).

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z. The mean is computed
        through the x_0 prediction and the posterior mean, which is the same expression algebraically
        and lets x_0 be clipped to the data range [-1, 1] (guided-diffusion's clip_denoised).
        """
        x = torch.randn(shape, device=device, generator=generator)
        for step, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            eps = model(x, t).float()
            x0 = self.predict_x0(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            mean = self._gather(self.posterior_coef_x0, t, x) * x0 + self._gather(self.posterior_coef_xt, t, x) * x
            if i > 0:
                noise = torch.randn(shape, device=device, generator=generator)
                x = mean + self._gather(np.sqrt(self.betas), t, x) * noise
            else:
                x = mean
            if progress is not None:
                progress(step + 1, self.num_timesteps)
        return x

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
        progress: Callable[[int, int], None] | None = None,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """DDIM (Song et al.) on `steps` evenly spaced timesteps; eta=0 is deterministic, for fast previews."""
        timesteps = np.linspace(0, self.num_timesteps - 1, min(steps, self.num_timesteps)).round().astype(int)[::-1]
        x = torch.randn(shape, device=device, generator=generator)
        for step, i in enumerate(timesteps):
            t = torch.full((shape[0],), int(i), device=device, dtype=torch.long)
            eps = model(x, t).float()
            x0 = self.predict_x0(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = (self._gather(np.sqrt(1 / self.alphas_cumprod), t, x) * x - x0) / self._gather(np.sqrt(1 / self.alphas_cumprod - 1), t, x)
            abar = float(self.alphas_cumprod[i])
            abar_prev = float(self.alphas_cumprod[timesteps[step + 1]]) if step + 1 < len(timesteps) else 1.0
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(shape, device=device, generator=generator)
            if progress is not None:
                progress(step + 1, len(timesteps))
        return x
