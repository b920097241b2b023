"""Segmentor head, strategies (what is frozen) and optimiser groups."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.segmentor import DEFAULT_HEAD_WIDTH, Segmentor
from DiffusionSegLib.unet import UNetModel, preset_config


@pytest.fixture
def segmentor() -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(preset_config("tiny"), head_width=32)


def trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def test_output_shape_and_head_not_zero(segmentor):
    logits = segmentor(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 14, 64, 64)
    assert segmentor.head.layers[-1].weight.abs().sum() > 0
    assert logits.std() > 0  # a zero-initialised head would give every class the same logit
    assert not hasattr(segmentor.unet, "out")  # the noise output layer is gone, not merely unused


@pytest.mark.parametrize(
    "strategy, encoder, decoder",
    [("ft-dec", False, True), ("lp", False, False), ("fs", True, True)],
)
def test_strategy_freezing(segmentor, strategy, encoder, decoder):
    segmentor.configure_strategy(strategy)
    for module in segmentor.encoder_modules():
        assert trainable(module) == encoder
    assert trainable(segmentor.unet.output_blocks) == decoder
    assert all(p.requires_grad for p in segmentor.head.parameters())


def test_unknown_strategy(segmentor):
    with pytest.raises(ValueError, match="unknown strategy"):
        segmentor.configure_strategy("ft-all")


def test_parameter_groups_follow_the_method(segmentor):
    segmentor.configure_strategy("ft-dec")
    groups = {g["name"]: g for g in segmentor.parameter_groups(1e-4, 1e-4, 10.0, 1e-3)}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["head"]["weight_decay"] == 1e-3
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["backbone"]["weight_decay"] == 1e-4
    n_backbone = sum(p.numel() for p in groups["backbone"]["params"])
    assert n_backbone == sum(p.numel() for p in segmentor.unet.output_blocks.parameters())
    segmentor.configure_strategy("lp")
    assert [g["name"] for g in segmentor.parameter_groups(1e-4, 1e-4, 10.0, 1e-3)] == ["head"]


def test_load_pretrained_copies_backbone(segmentor):
    torch.manual_seed(1)
    unet = UNetModel(preset_config("tiny"))
    segmentor.load_pretrained(unet.state_dict())
    for name, tensor in segmentor.unet.state_dict().items():
        assert torch.equal(tensor, unet.state_dict()[name])
    with pytest.raises(ValueError, match="do not fit"):
        segmentor.load_pretrained(UNetModel(preset_config("small")).state_dict())


def test_timestep_changes_features():
    torch.manual_seed(0)
    a = Segmentor(preset_config("tiny"), head_width=32, timestep=0)
    b = Segmentor(preset_config("tiny"), head_width=32, timestep=200)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 64, 64)
    # Zero-initialised ADM convs hide the timestep at init; perturb them so the test can see it.
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x), b(x))


def test_default_head_widths():
    """The method's h128 for B and h256 for L, and fine-tuning without --head builds exactly that head."""
    import argparse

    from DiffusionSegLib.cli import _new_segmentor
    from DiffusionSegLib.models import ModelCard
    from DiffusionSegLib.preprocessing import PreprocessingSpec

    assert DEFAULT_HEAD_WIDTH["b"] == 128 and DEFAULT_HEAD_WIDTH["l"] == 256
    card = ModelCard(kind="pretrained", unet=preset_config("tiny"), preprocessing=PreprocessingSpec.for_size(64), preset="tiny")
    built = _new_segmentor(card, argparse.Namespace(head=None, timestep=None))
    assert built.head.hidden == DEFAULT_HEAD_WIDTH["tiny"]
    assert [m.out_channels for m in built.head.layers if isinstance(m, torch.nn.Conv2d)][0] == DEFAULT_HEAD_WIDTH["tiny"]
    assert _new_segmentor(card, argparse.Namespace(head=48, timestep=None)).head.hidden == 48


def test_channels_last_prediction_matches_and_leaves_the_weights_as_they_were():
    import numpy as np

    from DiffusionSegLib.inference import predict_probabilities

    torch.manual_seed(0)
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    slices = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    fast = predict_probabilities(segmentor, slices, torch.device("cpu"), batch_size=2, channels_last=True)
    plain = predict_probabilities(segmentor, slices, torch.device("cpu"), batch_size=2, channels_last=False)
    assert fast.dtype == np.uint8 and fast.shape == (3, 14, 64, 64)
    assert np.abs(fast.astype(int) - plain.astype(int)).max() <= 1
    assert all(p.is_contiguous() for p in segmentor.parameters())
