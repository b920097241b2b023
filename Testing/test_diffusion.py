"""Gaussian diffusion: schedules, forward process, loss and both samplers on a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DiffusionSegLib.diffusion import GaussianDiffusion, beta_schedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 100])
def test_schedules(name, steps):
    betas = beta_schedule(name, steps)
    abar = np.cumprod(1 - betas)
    assert betas.dtype == np.float64 and betas.shape == (steps,)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    assert np.all(np.diff(abar) < 0) and np.all((abar > 0) & (abar < 1))
    assert abar[-1] < 1e-3 and abar[0] > 0.98


def test_linear_betas_are_the_ddpm_ones():
    betas = beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    short = beta_schedule("linear", 100)  # scaled by 1000/T so the chain still ends in noise
    assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)
    assert beta_schedule("linear", 10).max() == 0.999  # 0.02 x 100 would be 2: capped like the cosine schedule


def test_cosine_alpha_bar_is_the_closed_form():
    abar = np.cumprod(1 - beta_schedule("cosine", 1000))

    def f(t: float) -> float:
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):  # before the 0.999 cap matters
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'; choose one of linear, cosine"):
        beta_schedule("sigmoid")
    with pytest.raises(ValueError, match="positive"):
        GaussianDiffusion("cosine", 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_statistics(schedule):
    diffusion = GaussianDiffusion(schedule)
    torch.manual_seed(0)
    n = 40000
    for step in (0, 300, 999):
        t = torch.full((n,), step, dtype=torch.long)
        abar = diffusion.alphas_cumprod[step]
        xt = diffusion.q_sample(torch.zeros(n), t)  # x0 = 0: pure scaled noise
        assert xt.mean().item() == pytest.approx(0.0, abs=0.03)
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)
        shifted = diffusion.q_sample(torch.full((n,), 0.5), t)
        assert shifted.mean().item() == pytest.approx(0.5 * np.sqrt(abar), abs=0.03)


def test_q_sample_per_sample_timesteps_and_inverses():
    diffusion = GaussianDiffusion("cosine")
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 400, 900])
    xt = diffusion.q_sample(x0, t, noise)
    for i in range(3):
        abar = diffusion.alphas_cumprod[t[i]]
        assert torch.allclose(xt[i], math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i], atol=1e-6)
    assert torch.allclose(diffusion.predict_x0(xt, t, noise), x0, atol=1e-4)
    assert torch.allclose(diffusion.predict_eps(xt, t, x0), noise, atol=1e-4)
    assert diffusion.q_sample(x0.double(), t, noise.double()).dtype == torch.float64


def test_training_loss_with_an_oracle_is_zero():
    diffusion = GaussianDiffusion("linear")
    torch.manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    seen = []

    def oracle(x, t):
        seen.append(t)
        return noise

    loss = diffusion.training_loss(oracle, x0, noise=noise)
    assert loss.ndim == 0 and loss.item() == pytest.approx(0.0, abs=1e-12)
    assert seen[0].dtype == torch.long and seen[0].shape == (4,) and 0 <= seen[0].min() and seen[0].max() < 1000
    zero = diffusion.training_loss(lambda x, t: torch.zeros_like(x), x0, noise=noise)
    assert zero.item() == pytest.approx(noise.pow(2).mean().item())


def test_training_loss_draws_from_the_generator():
    diffusion = GaussianDiffusion("cosine")
    x0 = torch.zeros(8, 1, 4, 4)
    losses = [diffusion.training_loss(lambda x, t: x, x0, generator=torch.Generator().manual_seed(s)).item() for s in (1, 1, 2)]
    assert losses[0] == losses[1] != losses[2]


def oracle_for(diffusion: GaussianDiffusion, point: torch.Tensor):
    """The exact noise predictor for data concentrated on one point: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)

    def model(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = abar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * point) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_a_known_point(schedule):
    diffusion = GaussianDiffusion(schedule, num_timesteps=100)
    point = torch.linspace(-0.8, 0.8, 16).reshape(1, 1, 4, 4)
    target = point.expand(3, -1, -1, -1)
    model = oracle_for(diffusion, point)
    g = torch.Generator().manual_seed(0)
    calls = []
    ddpm = diffusion.ddpm_sample(model, (3, 1, 4, 4), generator=g, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 100) for i in range(1, 101)]
    assert torch.allclose(ddpm, target, atol=1e-3)
    assert torch.allclose(diffusion.ddpm_sample(model, (3, 1, 4, 4), generator=g, clip_denoised=False), target, atol=1e-3)
    calls.clear()
    ddim = diffusion.ddim_sample(model, (3, 1, 4, 4), steps=10, generator=g, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 10) for i in range(1, 11)]
    assert torch.allclose(ddim, target, atol=1e-3)
    noisy = diffusion.ddim_sample(model, (3, 1, 4, 4), steps=10, eta=1.0, generator=g)
    assert torch.allclose(noisy, target, atol=1e-3)
    unclipped = diffusion.ddim_sample(model, (3, 1, 4, 4), steps=10, generator=g, clip_denoised=False)
    assert torch.allclose(unclipped, target, atol=1e-3)


def test_ddpm_step_is_eq_4():
    """Unclipped sampling is x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z."""
    diffusion = GaussianDiffusion("linear", num_timesteps=50)

    def model(x, t):  # any deterministic predictor will do
        return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)

    shape = (2, 1, 3, 3)
    sampled = diffusion.ddpm_sample(model, shape, generator=torch.Generator().manual_seed(5), clip_denoised=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).double()  # the sampler's own draws, in its order
    for i in reversed(range(50)):
        beta, abar = diffusion.betas[i], diffusion.alphas_cumprod[i]
        eps = model(x, torch.full((2,), i))
        x = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
        if i > 0:
            x = x + math.sqrt(beta) * torch.randn(shape, generator=g).double()
    assert torch.allclose(sampled.double(), x, atol=1e-4)


def test_clipped_ddpm_is_the_same_chain_when_nothing_is_clipped():
    diffusion = GaussianDiffusion("cosine", num_timesteps=100)
    point = torch.linspace(-0.5, 0.5, 16).reshape(1, 1, 4, 4)
    model = oracle_for(diffusion, point)  # predicts x0 = point exactly: clipping never acts
    a = diffusion.ddpm_sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3), clip_denoised=True)
    b = diffusion.ddpm_sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3), clip_denoised=False)
    assert torch.allclose(a, b, atol=1e-4)


def test_clipping_keeps_samples_in_range():
    diffusion = GaussianDiffusion("linear", num_timesteps=20)
    model = oracle_for(diffusion, torch.full((1, 1, 2, 2), 3.0))  # data outside [-1, 1]
    g = torch.Generator().manual_seed(0)
    assert diffusion.ddpm_sample(model, (2, 1, 2, 2), generator=g).abs().max() <= 1.0 + 1e-6
    assert diffusion.ddim_sample(model, (2, 1, 2, 2), steps=5, generator=g).abs().max() <= 1.0 + 1e-6


def test_ddim_timesteps():
    diffusion = GaussianDiffusion("cosine", num_timesteps=1000)
    steps = diffusion.ddim_timesteps(50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0 and steps == sorted(set(steps), reverse=True)
    assert diffusion.ddim_timesteps(1) == [999]
    assert GaussianDiffusion("cosine", 10).ddim_timesteps(50) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="at least one step"):
        diffusion.ddim_timesteps(0)


def test_samplers_are_reproducible_and_leave_no_graph():
    diffusion = GaussianDiffusion("cosine", num_timesteps=20)
    weight = torch.nn.Parameter(torch.tensor(0.5))

    def model(x, t):
        return weight * x

    runs = [diffusion.ddim_sample(model, (1, 1, 2, 2), steps=5, eta=1.0, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not runs[0].requires_grad
    assert not diffusion.ddpm_sample(model, (1, 1, 2, 2)).requires_grad


def test_dict_roundtrip():
    diffusion = GaussianDiffusion("linear", 500)
    assert diffusion.to_dict() == {"schedule": "linear", "num_timesteps": 500, "prediction": "epsilon"}
    again = GaussianDiffusion.from_dict(diffusion.to_dict())
    assert again.schedule == "linear" and again.num_timesteps == 500
    np.testing.assert_array_equal(again.betas, diffusion.betas)
    with pytest.raises(ValueError, match="only epsilon prediction"):
        GaussianDiffusion.from_dict({"schedule": "cosine", "prediction": "v"})
    with pytest.raises(ValueError, match="unknown diffusion settings"):
        GaussianDiffusion.from_dict({"schedule": "cosine", "sigma": "learned"})
