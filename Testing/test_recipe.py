"""The strategy table, the fine-tuning recipe as a Python API, and the one orientation rule."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib import strategies
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.finetune import FinetuneConfig
from DiffusionSegLib.models import load_segmentor, read_card, save_model
from DiffusionSegLib.orientation import axial_axis, canonical_axes
from DiffusionSegLib.recipe import TrainingCT, build_segmentor, finetune_model, new_segmentor, random_base
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import preset_config
from Training.benchmarks.phantom import make_phantom


def test_the_table_is_consistent():
    assert strategies.STRATEGIES == ("ft-dec", "lp", "fs") and strategies.ALL_STRATEGIES == ("ft-dec", "lp", "lp-mlp", "fs")
    for row in strategies.TABLE:
        assert row.trains == strategies.PARTS[len(strategies.PARTS) - len(row.trains):]  # a tail: the frozen part leads
        assert strategies.get(row.finetune_as).offered
    assert strategies.get("lp-mlp").finetune_as == "lp" and strategies.get("fs").frozen == ()
    assert strategies.summaries() == "ft-dec: encoder frozen; lp: head only; fs: from scratch"
    assert strategies.tooltip() == "FT-dec: encoder frozen (default); LP: head only; FS: from scratch"
    with pytest.raises(ValueError, match="unknown strategy"):
        strategies.get("ft-all")
    with pytest.raises(ValueError, match="not a tail"):
        strategies.Strategy("odd", "O", "", "", "", pretrained=True, trains=("encoder", "head"), head_layers=2)


def test_the_table_imports_with_the_standard_library_only():
    code = ("import sys; sys.modules.update(torch=None, numpy=None, SimpleITK=None); "
            "from DiffusionSegLib import strategies, errors; print(strategies.STRATEGIES, errors.EXIT_CANCELLED)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "('ft-dec', 'lp', 'fs') 130" in out


@pytest.mark.parametrize("name, frozen", [("ft-dec", ("encoder",)), ("lp", ("encoder", "decoder")), ("lp-mlp", ("encoder", "decoder")), ("fs", ())])
def test_the_segmentor_splits_its_forward_pass_where_the_strategy_freezes(name, frozen):
    torch.manual_seed(0)
    segmentor = Segmentor(preset_config("tiny"), head_width=32).eval()
    segmentor.configure_strategy(name)
    assert segmentor.frozen_parts() == frozen and segmentor.trainable_parts() == strategies.get(name).trains
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        features = segmentor.frozen_features(x)
        assert torch.allclose(segmentor.trainable_logits(features), segmentor(x), atol=1e-5)


def test_new_segmentor_takes_the_backbone_only_for_pretrained_strategies(tiny_pretrained):
    card = read_card(tiny_pretrained)
    state = {k: torch.ones_like(v) for k, v in Segmentor(card.unet, 8).unet.state_dict().items()}
    name = "input_blocks.0.0.weight"
    assert torch.equal(new_segmentor(card, "ft-dec", unet_state=state).unet.state_dict()[name], state[name])
    assert not torch.equal(new_segmentor(card, "fs", unet_state=state).unet.state_dict()[name], state[name])
    assert new_segmentor(card, "lp", head_layers=0).head.num_layers == 0
    with pytest.raises(InputError, match="--timestep 5000"):
        new_segmentor(card, timestep=5000)
    assert random_base("tiny", 32).preprocessing.size == 32


def test_finetune_model_from_python_then_continue_it(tiny_pretrained, tmp_path):
    ct, labels = make_phantom(size=(40, 36, 6), spacing=(10.0, 10.0, 30.0), seed=3)
    painted = sitk.GetArrayFromImage(labels)
    painted[[0, 1, 2, 4, 5]] = 0  # one annotated slice
    painted_image = sitk.GetImageFromArray(painted)
    painted_image.CopyInformation(labels)
    config = FinetuneConfig(iterations=2, batch_size=1)
    segmentor, card = finetune_model([TrainingCT(ct, painted_image, source={"image": "ct"})], tiny_pretrained, config, name="first")
    assert card.kind == "segmentor" and card.strategy == "ft-dec" and card.name == "first" and card.postprocessing == {"cleanup": True}
    assert card.provenance["data"][0]["image"] == "ct" and card.provenance["data"][0]["annotated_slices"] == [3]
    assert card.provenance["base"]["kind"] == "pretrained" and card.provenance["iterations"] == 2
    first = save_model(tmp_path / "first", card, segmentor.state_dict())

    liver = {1}  # partial labels: only the liver counts as labelled, so the others are kept as the base knows them
    only_liver = sitk.GetImageFromArray(np.where(painted == 1, 1, 0).astype(painted.dtype))
    only_liver.CopyInformation(labels)
    start = build_segmentor(first, "ft-dec")
    assert start.continued and start.segmentor.head.hidden == segmentor.head.hidden
    again, card2 = finetune_model([TrainingCT(ct, only_liver, organs=liver)], start, config)
    assert card2.provenance["base"]["provenance"]["iterations"] == 2  # the whole recipe is told
    assert card2.provenance["data"][0]["labelled_organs"] == ["liver"]
    loaded, _ = load_segmentor(save_model(tmp_path / "second", card2, again.state_dict()))
    assert loaded.head.hidden == again.head.hidden

    with pytest.raises(InputError, match="labelled CT 1: no annotated slice"):
        finetune_model([TrainingCT(ct, sitk.Image(labels) * 0)], tiny_pretrained, config)
    with pytest.raises(InputError, match="--adapt"):
        finetune_model([TrainingCT(ct, painted_image)], None, FinetuneConfig(strategy="fs"), adapt_seconds=5)


def test_one_orientation_rule():
    half = np.sqrt(0.5)
    tie = (half, half, 0, -half, half, 0, 0, 0, 1.0)
    assert canonical_axes(tie)[0] == [0, 1, 2] and axial_axis(tie) == 2
    assert axial_axis((0, 1, 0, 0, 0, 1, 1, 0, 0)) == 0


def test_finetune_starts_from_the_bundled_segmentor_unless_it_needs_a_pretrained_backbone():
    from DiffusionSegLib.models import DEFAULT_SEGMENTOR
    from DiffusionSegLib.recipe import default_base

    assert default_base("ft-dec") == default_base("lp") == DEFAULT_SEGMENTOR
    assert default_base("fs") is None  # architecture only: the pretrained model's
    assert default_base("ft-dec", head=128) is None and default_base("ft-dec", adapt_seconds=30) is None
    assert default_base("ft-dec", preset="tiny") is None
    assert default_base("ft-dec", own_label_set=True) is None  # another label set needs a new head


def test_finetune_without_base_continues_the_bundled_segmentor(tmp_path):
    from DiffusionSegLib.cli import main
    from DiffusionSegLib.models import DEFAULT_SEGMENTOR

    ct, labels = make_phantom(size=(48, 40, 6), spacing=(8.0, 8.0, 30.0), seed=4)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    common = ["--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"), "--iterations", "1", "--batch-size", "1",
              "--progress", "none", "--device", "cpu"]
    assert main(["finetune", *common, "-o", str(tmp_path / "continued")]) == 0
    base = read_card(tmp_path / "continued").provenance["base"]
    assert base["kind"] == "segmentor" and base["name"] == DEFAULT_SEGMENTOR
    assert main(["finetune", *common, "-o", str(tmp_path / "new-head"), "--head", "h32"]) == 0
    assert read_card(tmp_path / "new-head").provenance["base"]["kind"] == "pretrained"
