"""ADM U-Net: presets, parameter counts, shapes, encode/decode split, checkpointing, config checks."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel, count_parameters, preset_config, timestep_embedding


def perturbed(model: UNetModel, seed: int = 0) -> UNetModel:
    """Perturb every weight, so zero-initialised layers do not make comparisons trivially true."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# guided-diffusion's 256x256 U-Net with 1 input and 1 output channel at widths 256 / 128 / 32.
@pytest.mark.parametrize("name, expected, exact", [("small", 8.7e6, 8_673_505), ("b", 138e6, 138_281_857), ("l", 553e6, 552_797_953)])
def test_parameter_counts_match_the_method(name, expected, exact):
    with torch.device("meta"):  # count without allocating 2 GB for U-Net-L
        model = UNetModel(preset_config(name))
    assert count_parameters(model) == pytest.approx(expected, rel=0.05)
    assert count_parameters(model) == exact  # any change here breaks existing checkpoints


def test_every_preset_builds_and_tiny_is_small():
    for name in PRESETS:
        with torch.device("meta"):
            model = UNetModel(preset_config(name))
        assert model.feature_channels == model.config.model_channels * model.config.channel_mult[0]
    tiny = UNetModel(preset_config("tiny"))
    assert count_parameters(tiny) < 2e6


@pytest.mark.parametrize("name", ["b", pytest.param("l", marks=pytest.mark.slow)])
def test_large_presets_run_a_forward_pass(name):
    torch.manual_seed(0)
    model = UNetModel(preset_config(name)).eval()
    with torch.inference_mode():  # U-Net-L: ~2.2 GB of fp32 weights, no activations kept
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


def test_zero_initialised_output_and_tiny_trains():
    torch.manual_seed(0)
    model = UNetModel(preset_config("tiny"))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([5, 900])
    assert torch.count_nonzero(model(x, t)) == 0  # ADM: the output conv starts at zero
    perturbed(model)
    out = model(x, t)
    assert out.shape == (2, 1, 64, 64)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_encode_decode_split():
    model = perturbed(UNetModel(preset_config("tiny")).eval())
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([3, 500])
    with torch.no_grad():
        hs, h, emb = model.encode(x, t)
        cached = list(hs)
        features = model.decode(hs, h, emb)
        assert len(hs) == len(cached) and all(a is b for a, b in zip(hs, cached, strict=True))  # the cache is not consumed
        assert features.shape == (2, model.feature_channels, 64, 64)
        assert torch.allclose(model.out(features), model(x, t), atol=1e-6)
        assert torch.allclose(model.out(model.decode(hs, h, emb)), model(x, t), atol=1e-6)  # reusable
        assert torch.allclose(model(x[:1], torch.tensor(3)), model(x[:1], t[:1]), atol=1e-6)  # a 0-d timestep broadcasts


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_same_gradients(dropout):
    model = perturbed(UNetModel(UNetConfig(**{**preset_config("tiny").to_dict(), "dropout": dropout})))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([1, 2])

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.use_checkpoint = checkpointing
        torch.manual_seed(1)  # the same dropout masks; checkpoint replays the RNG in its recomputation
        model(x, t).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_channels_last_and_bf16_autocast():
    model = perturbed(UNetModel(preset_config("tiny")))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([10, 400])
    reference = model(x, t).detach()
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    out.float().square().mean().backward()
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 64)
    assert emb.shape == (3, 64)
    assert torch.allclose(emb[0, :32], torch.ones(32)) and torch.allclose(emb[0, 32:], torch.zeros(32))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(1.0))) and torch.allclose(emb[1, 32], torch.sin(torch.tensor(1.0)))
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


def test_config_roundtrip():
    for config in PRESETS.values():
        d = config.to_dict()
        assert isinstance(d["channel_mult"], list) and UNetConfig.from_dict(d) == config
    assert UNetConfig(image_size=64, channel_mult=[1, 2, 2], attention_resolutions=[16]) == UNetConfig(
        image_size=64, channel_mult=(1, 2, 2), attention_resolutions=(16,)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 100}, "image_size 100 must be divisible by 32"),
        ({"model_channels": 48}, "not divisible by norm_groups"),
        ({"num_head_channels": 48}, "not divisible by num_head_channels"),
        ({"attention_resolutions": (), "num_head_channels": 1024}, "not divisible by num_head_channels"),  # the middle block
        ({"attention_resolutions": (12,)}, "attention resolution 12"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_config_and_preset_errors():
    with pytest.raises(ValueError, match=r"unknown U-Net config keys: \['depth'\]"):
        UNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="unknown preset 'xl'; choose one of b, l, small, tiny"):
        preset_config("xl")
    with pytest.raises(ValueError, match="divisible"):
        preset_config("b", image_size=200)


def test_presets_at_other_sizes_keep_the_attention_downsample_factors():
    assert preset_config("small", image_size=128).attention_resolutions == (16, 8, 4)
    assert preset_config("b", image_size=512).attention_resolutions == (64, 32, 16)
    assert preset_config("tiny", image_size=128).attention_resolutions == (32,)
    assert preset_config("l", image_size=256) is PRESETS["l"]
    model = UNetModel(preset_config("tiny", image_size=32)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32), torch.tensor([0])).shape == (1, 1, 32, 32)
