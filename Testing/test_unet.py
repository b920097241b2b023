"""ADM U-Net: presets, parameter counts, shapes, encode/decode split, checkpointing."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel, count_parameters, preset_config, timestep_embedding


@pytest.mark.parametrize("name, expected", [("small", 8.7e6), ("b", 138e6), ("l", 553e6)])
def test_parameter_counts_match_the_method(name, expected):
    with torch.device("meta"):  # count without allocating 2 GB for U-Net-L
        model = UNetModel(preset_config(name))
    assert count_parameters(model) == pytest.approx(expected, rel=0.03)


def test_tiny_is_small():
    assert count_parameters(UNetModel(preset_config("tiny"))) < 2e6


@pytest.mark.parametrize("name", ["b", "l"])
def test_large_presets_run_a_forward_pass(name):
    torch.manual_seed(0)
    model = UNetModel(preset_config(name)).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 1, 256, 256), torch.tensor([10]))
    assert out.shape == (1, 1, 256, 256) and torch.isfinite(out).all()
    assert len(model.input_blocks) == 18 and len(model.output_blocks) == 18


def test_small_forward_and_attention_layout():
    model = UNetModel(preset_config("small")).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 256, 256), torch.tensor([0, 999])).shape == (2, 1, 256, 256)
    # Attention at 32, 16 and 8 pixels: downsample factors 8, 16 and 32.
    assert preset_config("small").attention_downsample == {8, 16, 32}
    n_attention = sum(type(m).__name__ == "AttentionBlock" for m in model.modules())
    assert n_attention == 2 * 3 + 1 + 3 * 3  # encoder, middle, decoder


def test_encode_decode_split():
    torch.manual_seed(0)
    model = UNetModel(preset_config("tiny")).eval()
    with torch.no_grad():  # perturb the zero-initialised layers so the check is not trivially true
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([3, 500])
    with torch.no_grad():
        hs, h, emb = model.encode(x, t)
        n = len(hs)
        features = model.decode(hs, h, emb)
        assert len(hs) == n  # the cache is not consumed
        assert torch.allclose(model.out(features), model(x, t), atol=1e-6)
        assert features.shape[1] == model.feature_channels


def test_tiny_trains_and_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UNetModel(preset_config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([1, 2])

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.use_checkpoint = checkpointing
        model(x, t).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 64)
    assert emb.shape == (3, 64)
    assert torch.allclose(emb[0, :32], torch.ones(32)) and torch.allclose(emb[0, 32:], torch.zeros(32))


def test_config_roundtrip_and_validation():
    for config in PRESETS.values():
        assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=100)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("xl")
    resized = preset_config("small", image_size=128)
    assert resized.attention_downsample == {8, 16, 32}
