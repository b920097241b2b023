"""Fine-tuning mechanics: loss, augmentation, the loop, frozen parts stay frozen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DiffusionSegLib.finetune import (
    AugmentConfig,
    FinetuneConfig,
    PlateauStop,
    augment_batch,
    augment_with,
    augmented_pool,
    cache_pool_size,
    class_frequencies,
    finetune,
    segmentation_loss,
)
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.segmentor import SegmentationHead, Segmentor
from DiffusionSegLib.training_slices import annotated_input_slices, training_slices
from DiffusionSegLib.unet import preset_config
from Training.benchmarks.phantom import make_phantom

CPU = torch.device("cpu")


def test_loss_is_small_for_a_confident_correct_prediction():
    target = torch.randint(0, 14, (2, 16, 16))
    logits = torch.nn.functional.one_hot(target, 14).permute(0, 3, 1, 2).float() * 30
    config = FinetuneConfig()
    assert segmentation_loss(logits, target, config) < 1e-3
    wrong = segmentation_loss(-logits, target, config)
    assert wrong > 1.0


def test_loss_weights():
    target = torch.randint(0, 14, (2, 8, 8))
    logits = torch.randn(2, 14, 8, 8)
    ce = torch.nn.functional.cross_entropy(logits, target)
    only_dice = segmentation_loss(logits, target, FinetuneConfig(ce_weight=0.0))
    both = segmentation_loss(logits, target, FinetuneConfig())
    assert both.item() == pytest.approx(only_dice.item() + 0.5 * ce.item(), rel=1e-5)


def test_augmentation_keeps_shapes_values_and_labels_aligned():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    labels[:, 8:24, 8:24] = 5
    images = torch.where(labels == 5, 0.5, -0.5)[:, None].float()
    x, y = augment_batch(images, labels, AugmentConfig(probability=1.0, intensity_scale=0, intensity_shift=0), g)
    assert x.shape == images.shape and y.shape == labels.shape and y.dtype == torch.long
    assert set(torch.unique(y).tolist()) <= {0, 5}
    inside = x[:, 0][y == 5]
    assert inside.mean() > 0.3  # the label moved with the image
    assert not torch.equal(y, labels)
    same = augment_batch(images, labels, AugmentConfig(enabled=False), g)
    assert same[0] is images


def test_class_probabilities_follow_the_warp_of_their_slice():
    """The keep loss's reference (the base's probabilities on the clean slice) goes through the batch's own warp: the same
    draws as augment_batch, so images and labels do not change, and probabilities that still sum to 1, background outside."""
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    labels[:, 8:24, 10:26] = 3
    images = torch.where(labels == 3, 0.5, -0.5)[:, None].float()
    probabilities = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    config = AugmentConfig(probability=1.0, rotate_deg=20, scale=0.2, translate=0.2)
    x, y = augment_batch(images, labels, config, torch.Generator().manual_seed(3))
    x2, y2, warped = augment_with(images, labels, probabilities, config, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert warped.shape == probabilities.shape
    assert torch.allclose(warped.sum(dim=1), torch.ones(4, 32, 32), atol=1e-5)
    agree = (warped.argmax(dim=1) == y).float().mean()
    assert agree > 0.97  # bilinear against nearest: only edge pixels may differ
    assert warped[:, 0][y == 0].mean() > 0.95  # outside the moved square, and the border the warp brings in, are background
    same = augment_with(images, labels, probabilities, AugmentConfig(enabled=False), torch.Generator())
    assert same[2] is probabilities


def test_window_jitter_scales_about_air():
    # A scan-window change keeps air at -1 and moves tissue; values stay in [-1, 1].
    g = torch.Generator().manual_seed(1)
    images = torch.tensor([-1.0, 0.0, 0.4]).repeat(16, 1, 1, 1)
    labels = torch.zeros(16, 1, 3, dtype=torch.long)
    config = AugmentConfig(probability=0.0, intensity_scale=0, intensity_shift=0, window_scale=0.4)
    x, _ = augment_batch(images, labels, config, g)
    assert torch.allclose(x[..., 0], torch.tensor(-1.0))
    factors = (x[..., 1] + 1).flatten()
    assert factors.min() >= 1 / 1.4 - 1e-6 and factors.max() <= 1.4 + 1e-6
    assert factors.min() < 0.9 and factors.max() > 1.1  # both ways, not a constant
    assert torch.allclose(x[..., 2], ((0.4 + 1) * factors - 1).clamp(max=1).view_as(x[..., 2]))
    off = AugmentConfig(probability=0.0, intensity_scale=0, intensity_shift=0)
    assert torch.allclose(augment_batch(images, labels, off, g)[0], images, atol=1e-6)


def phantom_slices(spec: PreprocessingSpec, count: int = 4):
    ct, labels = make_phantom(size=(80, 72, 24), spacing=(5.0, 5.0, 8.0), seed=3)
    full = training_slices([(ct, labels)], spec)
    pick = np.linspace(0, len(full.sources) - 1, count).round().astype(int)
    return full.images[pick], full.labels[pick]


def test_annotated_slices_are_those_with_any_label():
    ct, labels = make_phantom(size=(40, 40, 12), spacing=(8.0, 8.0, 15.0), seed=0)
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(labels)
    array[:] = 0
    array[[2, 7]] = 0
    array[2, 10, 10] = 1
    array[7, 20, 20:25] = 11
    painted = sitk.GetImageFromArray(array)
    painted.CopyInformation(labels)
    assert annotated_input_slices(painted, 2) == [2, 7]
    result = training_slices([(ct, painted)], PreprocessingSpec(size=64, spacing_mm=8.0))
    assert [s for _, s in result.sources] == [2, 7]
    assert result.summary()["organs"] == ["liver", "stomach"]


@pytest.mark.parametrize("strategy", ["ft-dec", "lp", "fs"])
def test_finetune_learns_and_freezes_what_it_should(strategy):
    torch.manual_seed(0)
    spec = PreprocessingSpec.for_size(64)
    images, labels = phantom_slices(spec)
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    before = {k: v.clone() for k, v in segmentor.state_dict().items()}
    config = FinetuneConfig(strategy=strategy, iterations=40, lr=1e-3, patience=0, augment=AugmentConfig(enabled=False))
    steps = []
    result = finetune(segmentor, images, labels, config, CPU, on_step=lambda i, loss: steps.append(i))
    assert steps == list(range(1, 41)) and result.iterations == 40
    assert np.mean(result.losses[-5:]) < 0.8 * np.mean(result.losses[:5])
    after = segmentor.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    encoder = {k for k in after if k.startswith(("unet.input_blocks", "unet.middle_block", "unet.time_embed"))}
    decoder = {k for k in after if k.startswith("unet.output_blocks")}
    assert any(k.startswith("head.") for k in changed)
    assert bool(changed & encoder) == (strategy == "fs")
    assert bool(changed & decoder) == (strategy != "lp")


def test_class_frequencies_and_prior_bias():
    labels = torch.tensor([[0, 0, 0, 2], [0, 0, 0, 0]])
    assert torch.allclose(class_frequencies(labels, 4), torch.tensor([0.875, 0.0, 0.125, 0.0], dtype=torch.float64))
    head = SegmentationHead(8, 16, num_classes=4, layers=0)  # a linear classifier
    torch.nn.init.zeros_(head.layers[-1].weight)
    head.set_class_prior(class_frequencies(labels, 4))
    share = head(torch.randn(1, 8, 5, 5)).softmax(1).mean((0, 2, 3))
    assert torch.allclose(share, torch.tensor([0.875, 1e-4, 0.125, 1e-4]), atol=1e-3)  # absent classes: the floor, not -inf
    with pytest.raises(ValueError, match="3 class frequencies for a head with 4 classes"):
        head.set_class_prior(torch.ones(3))


@pytest.mark.parametrize("prior_bias", [False, True])
def test_prior_bias_starts_the_head_at_the_label_prior(prior_bias):
    spec = PreprocessingSpec.for_size(64)
    images, labels = phantom_slices(spec, count=2)
    torch.manual_seed(0)
    segmentor = Segmentor(preset_config("tiny"), head_width=32, head_layers=0)
    initial = segmentor.head.layers[-1].bias.clone()
    config = FinetuneConfig(strategy="lp", iterations=1, lr=0.0, patience=0, prior_bias=prior_bias, augment=AugmentConfig(enabled=False))
    finetune(segmentor, images, labels, config, CPU)
    expected = class_frequencies(labels, segmentor.num_classes).clamp(min=1e-4).log().float() if prior_bias else initial
    assert torch.allclose(segmentor.head.layers[-1].bias, expected)


def test_time_limit_stops_early():
    spec = PreprocessingSpec.for_size(64)
    images, labels = phantom_slices(spec, count=2)
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    result = finetune(segmentor, images, labels, FinetuneConfig(iterations=10_000, time_limit=0.5), CPU)
    assert result.stopped_by == "time-limit" and result.iterations < 10_000


def test_cancel_from_callback_propagates():
    spec = PreprocessingSpec.for_size(64)
    images, labels = phantom_slices(spec, count=2)
    segmentor = Segmentor(preset_config("tiny"), head_width=32)

    def cancel(iteration, loss):
        if iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(segmentor, images, labels, FinetuneConfig(iterations=100), CPU, on_step=cancel)


@pytest.mark.parametrize("strategy", ["ft-dec", "lp"])
def test_frozen_cache_trains_exactly_like_recomputing(strategy):
    """Without augmentation the cached frozen outputs are the recomputed ones: same losses, same weights."""
    spec = PreprocessingSpec.for_size(64)
    images, labels = phantom_slices(spec)
    runs = []
    for copies in (0, 16):
        torch.manual_seed(1)
        segmentor = Segmentor(preset_config("tiny"), head_width=32)
        config = FinetuneConfig(strategy=strategy, iterations=8, lr=1e-3, patience=0, cache_copies=copies, augment=AugmentConfig(enabled=False))
        runs.append((finetune(segmentor, images, labels, config, CPU).losses, segmentor.state_dict()))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert np.allclose(losses_a, losses_b, rtol=1e-4, atol=1e-6)
    # The two runs differ only in float32 rounding (the cache runs the encoder in chunks, so sums are taken
    # in another order). Adam turns a gradient into a step of about lr whatever its size, so a rounding
    # difference in a gradient near zero (m / sqrt(v) a ratio of two tiny numbers) can move a step by a
    # sizeable fraction of lr, and that compounds over the steps: 8 steps x lr x 1e-2 bounds it, per
    # parameter group (the head's lr is 10x). A wrong cache (stale or misaligned features) moves weights
    # by whole steps, about lr each, so this bound still fails it.
    steps, lr = config.iterations, config.lr
    for k in state_a:
        group_lr = lr * config.head_lr_factor if k.startswith("head.") else lr
        assert torch.allclose(state_a[k], state_b[k], rtol=0, atol=steps * group_lr * 1e-2), k


def test_cache_pool_holds_the_slices_then_augmented_copies():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    labels = torch.randint(0, 3, (3, 16, 16))
    x, y = augmented_pool(images, labels, 12, AugmentConfig(probability=1.0), g)
    assert x.shape == (12, 1, 16, 16) and y.shape == (12, 16, 16)
    assert torch.equal(x[:3], images) and torch.equal(y[:3], labels)
    assert not torch.equal(x[3:6], images)


def test_cache_pool_size_follows_the_memory_cap():
    config = FinetuneConfig(cache_copies=16, cache_memory_mb=100)
    mb = 2**20
    assert cache_pool_size(config, 4, 1 * mb) == 64  # 16 copies of 4 slices fit
    assert cache_pool_size(config, 4, 10 * mb) == 8  # 10 entries fit: whole copies only
    assert cache_pool_size(config, 4, 30 * mb) == 0  # not even the slices themselves: no cache
    assert cache_pool_size(FinetuneConfig(cache_copies=0), 4, 1) == 0
    assert cache_pool_size(FinetuneConfig(cache_copies=16, augment=AugmentConfig(enabled=False)), 4, 1) == 4


def test_plateau_stop():
    flat = PlateauStop(patience=10, min_improvement=0.02, min_iterations=30)
    losses = []
    stops = []
    for _ in range(100):
        losses.append(1.0)
        stops.append(flat.update(losses))
    assert stops.index(True) == 29  # flat from the start: stops as soon as allowed
    falling = PlateauStop(patience=10, min_improvement=0.02, min_iterations=30)
    losses = [math.exp(-i / 20) for i in range(200)]
    assert not any(falling.update(losses[: i + 1]) for i in range(200))
    assert not PlateauStop(patience=0, min_improvement=0.02, min_iterations=0).update([1.0] * 50)


def test_finetune_stops_on_plateau():
    spec = PreprocessingSpec.for_size(64)
    images, labels = phantom_slices(spec, count=2)
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    config = FinetuneConfig(iterations=10_000, lr=0.0, patience=5, min_iterations=12, augment=AugmentConfig(enabled=False))
    result = finetune(segmentor, images, labels, config, CPU)
    assert result.stopped_by == "plateau" and result.iterations == 12
