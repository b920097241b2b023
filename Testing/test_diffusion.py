"""Gaussian diffusion: schedules, forward process, loss and both samplers on a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.diffusion import GaussianDiffusion, beta_schedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules(name):
    betas = beta_schedule(name, 1000)
    abar = np.cumprod(1 - betas)
    assert betas.shape == (1000,) and np.all(betas > 0) and np.all(betas <= 0.999)
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < 1e-3 and abar[0] > 0.99


def test_linear_betas_are_the_ddpm_ones():
    betas = beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        beta_schedule("sigmoid")


def test_q_sample_statistics():
    diffusion = GaussianDiffusion("cosine")
    x0 = torch.full((20000,), 0.5)
    t = torch.full((20000,), 300, dtype=torch.long)
    noise = torch.randn(20000)
    xt = diffusion.q_sample(x0, t, noise)
    abar = diffusion.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(0.5 * np.sqrt(abar), abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)
    assert torch.allclose(diffusion.predict_x0(xt, t, noise), x0, atol=1e-5)


def test_training_loss_with_an_oracle_is_zero():
    diffusion = GaussianDiffusion("linear")
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    loss = diffusion.training_loss(lambda x, t: noise, x0, noise=noise)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert diffusion.training_loss(lambda x, t: torch.zeros_like(x), x0, noise=noise).item() == pytest.approx(noise.pow(2).mean().item())


def oracle_for(diffusion: GaussianDiffusion, point: torch.Tensor):
    """The exact noise predictor for data concentrated on one point."""
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)

    def model(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * point) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_a_known_point(schedule):
    diffusion = GaussianDiffusion(schedule, num_timesteps=100)
    point = torch.linspace(-0.8, 0.8, 16).reshape(1, 1, 4, 4)
    model = oracle_for(diffusion, point)
    g = torch.Generator().manual_seed(0)
    calls = []
    ddpm = diffusion.ddpm_sample(model, (3, 1, 4, 4), generator=g, progress=lambda i, n: calls.append(i))
    assert calls == list(range(1, 101))
    assert torch.allclose(ddpm, point.expand(3, -1, -1, -1), atol=1e-3)
    ddim = diffusion.ddim_sample(model, (3, 1, 4, 4), steps=10, generator=g)
    assert torch.allclose(ddim, point.expand(3, -1, -1, -1), atol=1e-3)
    noisy = diffusion.ddim_sample(model, (3, 1, 4, 4), steps=10, eta=1.0, generator=g)
    assert torch.allclose(noisy, point.expand(3, -1, -1, -1), atol=1e-3)


def test_dict_roundtrip():
    diffusion = GaussianDiffusion("linear", 500)
    again = GaussianDiffusion.from_dict(diffusion.to_dict())
    assert again.schedule == "linear" and again.num_timesteps == 500
    np.testing.assert_array_equal(again.betas, diffusion.betas)
