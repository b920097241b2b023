"""Shared fixtures: real-data location, small models and phantom CTs on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.models import ModelCard, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.unet import UNetModel, preset_config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, and spacing, origin and direction equal to float precision."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when the real data is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real CT data not available at {path} (../shared/data is only present in the project workspace and CI)")
    return path


@pytest.fixture(autouse=True)
def isolated_models_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep tests away from the user's real model folder."""
    home = tmp_path_factory.mktemp("diffusionseg-home")
    monkeypatch.setenv("DIFFUSIONSEG_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised `tiny` noise predictor saved as a pretrained model folder.

    It stands in for a DDPM-pretrained model in tests of the fine-tuning mechanics only; nothing
    ships or is evaluated with it.
    """
    torch.manual_seed(0)
    config = preset_config("tiny")
    unet = UNetModel(config)
    card = ModelCard(
        kind="pretrained",
        unet=config,
        preprocessing=PreprocessingSpec.for_size(config.image_size),
        preset="tiny",
        name="test-random-tiny",
        provenance={"note": "random initialisation, test fixture"},
    )
    return save_model(tmp_path_factory.mktemp("models") / "tiny-pretrained", card, unet.state_dict())


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom CT and its labels as NIfTI files."""
    from Training.benchmarks.phantom import make_phantom

    folder = tmp_path_factory.mktemp("phantom")
    ct, labels = make_phantom(size=(80, 72, 24), spacing=(5.0, 5.0, 8.0), seed=3)
    paths = {"ct": folder / "ct.nii.gz", "labels": folder / "labels.nii.gz"}
    sitk.WriteImage(ct, str(paths["ct"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    return paths


@pytest.fixture
def no_bundled_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installation whose bundled models are missing (what the default-model errors are about)."""
    from DiffusionSegLib import models

    empty = tmp_path / "no-bundled-models"
    empty.mkdir()
    monkeypatch.setattr(models, "BUNDLED_DIR", empty)
    return empty


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Inception weights: the generation metrics' mechanics without downloading the real ones."""
    from safetensors.torch import save_file

    from Training.inception import FIDInception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "random.safetensors"
    save_file(FIDInception().state_dict(), str(path))
    return path
