"""Model folders: safetensors + model.json, atomic writes, lookup by name, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from DiffusionSegLib.diffusion import GaussianDiffusion
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.models import (
    ModelCard,
    list_models,
    load_segmentor,
    load_unet,
    read_card,
    resolve_model,
    save_model,
    user_models_dir,
)
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import UNetModel, preset_config


def segmentor_card(**kw) -> ModelCard:
    fields = dict(
        kind="segmentor", unet=preset_config("tiny"), preprocessing=PreprocessingSpec.for_size(64), head={"width": 32, "layers": 2},
        strategy="ft-dec", timestep=0, preset="tiny",
    )
    return ModelCard(**{**fields, **kw})


def test_save_and_load_segmentor(tmp_path):
    torch.manual_seed(0)
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    folder = save_model(tmp_path / "m", segmentor_card(provenance={"iterations": 5}), segmentor.state_dict())
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.safetensors"]
    loaded, card = load_segmentor(folder)
    assert card.provenance["iterations"] == 5 and card.name == "m"
    assert len(card.labels) == 13 and card.labels[0]["name"] == "liver"
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), segmentor.eval()(x))
    card_json = json.loads((folder / "model.json").read_text())
    for key in ("preset", "head", "strategy", "timestep", "preprocessing", "labels", "schedule", "provenance", "unet"):
        assert key in card_json


def test_half_precision_weights_load_as_float32(tmp_path):
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    folder = save_model(tmp_path / "half", segmentor_card(), segmentor.state_dict(), half=True)
    assert (folder / "weights.safetensors").stat().st_size < 0.6 * sum(v.numel() * 4 for v in segmentor.state_dict().values())
    loaded, _ = load_segmentor(folder)
    assert next(loaded.parameters()).dtype == torch.float32


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    folder = save_model(tmp_path / "m", segmentor_card(provenance={"v": 1}), segmentor.state_dict())

    import DiffusionSegLib.models as models

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models, "save_file", broken)
    with pytest.raises(OSError):
        save_model(folder, segmentor_card(provenance={"v": 2}), segmentor.state_dict())
    assert read_card(folder).provenance == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind
    monkeypatch.undo()
    save_model(folder, segmentor_card(provenance={"v": 3}), segmentor.state_dict())
    assert read_card(folder).provenance == {"v": 3}


def test_corrupt_and_mismatched_models_are_input_errors(tmp_path, tiny_pretrained):
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    folder = save_model(tmp_path / "m", segmentor_card(), segmentor.state_dict())
    (folder / "weights.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt weights"):
        load_segmentor(folder)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt or unsupported model card"):
        load_segmentor(folder)
    with pytest.raises(InputError, match="not a DiffusionSeg model folder"):
        load_segmentor(tmp_path)
    with pytest.raises(InputError, match="not a segmentation model"):
        load_segmentor(tiny_pretrained)
    wrong = save_model(tmp_path / "wrong", segmentor_card(head={"width": 64, "layers": 2}), segmentor.state_dict())
    with pytest.raises(InputError, match="do not match model.json"):
        load_segmentor(wrong)


def test_pretrained_roundtrip_keeps_weights_and_predictions(tmp_path, tiny_pretrained):
    torch.manual_seed(3)
    config = preset_config("tiny")
    unet = UNetModel(config).eval()
    card = ModelCard(kind="pretrained", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size), preset="tiny",
                     schedule=GaussianDiffusion("linear", 200).to_dict())
    loaded, loaded_card = load_unet(save_model(tmp_path / "pre", card, unet.state_dict()))
    assert loaded_card.kind == "pretrained" and loaded_card.schedule == GaussianDiffusion("linear", 200).to_dict()
    assert loaded.state_dict().keys() == unet.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in unet.state_dict().items())
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([5, 150])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t), unet(x, t))
    assert load_unet(tiny_pretrained)[1].kind == "pretrained"


def test_user_models_are_listed_and_resolved_by_name():
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    save_model(user_models_dir() / "liver-v1", segmentor_card(), segmentor.state_dict())
    names = [(m.name, m.kind, m.source) for m in list_models()]
    assert ("liver-v1", "segmentor", "user") in names
    assert resolve_model("liver-v1", "segmentor") == user_models_dir() / "liver-v1"
    with pytest.raises(InputError, match="liver-v1"):
        resolve_model("no-such-model", "segmentor")


def test_no_default_model_says_so(no_bundled_models):
    with pytest.raises(InputError, match="no segmentation model is installed"):
        resolve_model(None, "segmentor")
    with pytest.raises(InputError, match="no DDPM-pretrained model is installed"):
        resolve_model(None, "pretrained")


def test_refuses_to_overwrite_a_non_model_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    with pytest.raises(InputError, match="not a DiffusionSeg model folder"):
        save_model(tmp_path / "photos", segmentor_card(), segmentor.state_dict())
    assert (tmp_path / "photos" / "holiday.jpg").exists()


def test_model_folders_get_the_usual_permissions(tmp_path):
    import os
    import stat

    segmentor = Segmentor(preset_config("tiny"), head_width=32)
    folder = save_model(tmp_path / "shared-model", segmentor_card(), segmentor.state_dict())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in folder.iterdir())
