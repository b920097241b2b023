"""Adapting the pretrained backbone to the user's CT (more DDPM training on its unlabelled slices) before
fine-tuning: the loop, its time bound and seeding, `finetune --adapt`, the Slicer command line and progress."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from DiffusionSegLib.adaptation import AdaptationResult, adapt_backbone, as_batch
from DiffusionSegLib.bridge import commands
from DiffusionSegLib.bridge.progress_parser import ProgressParser, ProgressUpdate
from DiffusionSegLib.cli import main
from DiffusionSegLib.diffusion import GaussianDiffusion
from DiffusionSegLib.imageio import read_ct
from DiffusionSegLib.models import ModelCard, read_weights, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec, to_model_space
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import UNetModel, preset_config

# A random `tiny` model needs a larger rate than the default (1e-4) to show an effect in the
# handful of steps a test can afford; the mechanics under test are the same.
LR = 1e-3
BATCH = 4  # slices per step: half the default, for quicker steps
DIFFUSION = GaussianDiffusion()


class Stop(Exception):
    pass


def random_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return UNetModel(preset_config("tiny"))


def fixed_set_loss(unet: UNetModel, slices: torch.Tensor) -> float:
    """The noise loss on every slice, twice, at fixed timesteps spread over the schedule and fixed noise."""
    x0 = torch.cat([slices, slices])
    t = torch.linspace(0, DIFFUSION.num_timesteps - 1, x0.shape[0]).round().long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        return float(DIFFUSION.training_loss(unet.eval(), x0, t=t, noise=noise))


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def user_slices(phantom_files) -> torch.Tensor:
    return as_batch(to_model_space(read_ct(phantom_files["ct"]), PreprocessingSpec.for_size(64)).slices)


def step_seconds(slices: torch.Tensor) -> float:
    """How long a step takes on this machine now (the second step: the first one includes warm-up)."""
    stamps: list[float] = []

    def on_step(iteration: int, loss: float) -> None:
        stamps.append(time.monotonic())
        if iteration == 2:
            raise Stop

    with pytest.raises(Stop):
        adapt_backbone(random_unet(1), slices, DIFFUSION, 1e6, "cpu", lr=LR, batch_size=BATCH, on_step=on_step)
    return stamps[1] - stamps[0]


@pytest.fixture(scope="module")
def adapted(user_slices) -> dict:
    """One adaptation run with a budget sized to this machine (about 6 steps, at least 0.5 s), so that it
    takes several steps however slow or busy the machine is."""
    budget = max(0.5, 6 * step_seconds(user_slices))

    unet = random_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    loss_before = fixed_set_loss(unet, user_slices)
    stamps: list[float] = []
    started = time.monotonic()
    result = adapt_backbone(unet, user_slices, DIFFUSION, budget, "cpu", lr=LR, batch_size=BATCH, on_step=lambda i, loss: stamps.append(time.monotonic()))
    wall = time.monotonic() - started
    return {"unet": unet, "before": before, "loss_before": loss_before, "loss_after": fixed_set_loss(unet, user_slices), "result": result,
            "budget": budget, "wall": wall, "steps": np.diff([started, *stamps])}


def test_adaptation_lowers_the_noise_loss_on_the_users_slices(adapted):
    result: AdaptationResult = adapted["result"]
    assert result.iterations >= 2 and len(result.losses) == result.iterations
    assert adapted["loss_after"] < 0.97 * adapted["loss_before"], (adapted["loss_before"], adapted["loss_after"], result.iterations)
    assert result.loss_last < result.loss_first


def test_time_budget_is_kept(adapted):
    result, budget, steps = adapted["result"], adapted["budget"], adapted["steps"]
    assert result.seconds >= budget  # it trained until the budget was spent...
    assert result.seconds <= budget + steps[-1] + 0.5  # ...and stopped after the step that crossed it
    assert adapted["wall"] <= budget + 2 * steps.max() + 5.0


def test_weights_change_only_with_time(adapted, user_slices):
    assert not states_equal(adapted["unet"].state_dict(), adapted["before"])
    unet = random_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = adapt_backbone(unet, user_slices, DIFFUSION, 0, "cpu", lr=LR)
    assert (result.iterations, result.loss_first, result.loss_last) == (0, None, None)
    assert states_equal(unet.state_dict(), before)


def run_steps(slices: torch.Tensor, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Weights after exactly `steps` steps (stopped by raising from on_step, as a cancel does)."""
    unet = random_unet()

    def on_step(iteration: int, loss: float) -> None:
        if iteration == steps:
            raise Stop

    with pytest.raises(Stop):
        adapt_backbone(unet, slices, DIFFUSION, 1e6, "cpu", lr=LR, batch_size=2, seed=seed, on_step=on_step)
    return unet.state_dict()


def test_same_seed_same_steps_and_on_step_cancels(user_slices):
    first = run_steps(user_slices, 2, seed=0)
    assert states_equal(first, run_steps(user_slices, 2, seed=0))
    assert not states_equal(first, run_steps(user_slices, 2, seed=1))


def test_bad_arguments_are_refused(user_slices):
    with pytest.raises(ValueError, match="0 or more"):
        adapt_backbone(random_unet(), user_slices, DIFFUSION, -1, "cpu")
    with pytest.raises(ValueError, match="0 or more"):
        adapt_backbone(random_unet(), user_slices, DIFFUSION, math.nan, "cpu")
    with pytest.raises(ValueError, match="N >= 1"):
        adapt_backbone(random_unet(), np.zeros((0, 64, 64), np.float32), DIFFUSION, 1, "cpu")
    assert as_batch(np.zeros((3, 8, 8))).shape == (3, 1, 8, 8)


def test_provenance_record():
    result = AdaptationResult(12, 30.04, 0.05, 0.04, [0.05] * 12)
    assert result.provenance() == {"seconds": 30.0, "iterations": 12, "loss_first": 0.05, "loss_last": 0.04}


# --- finetune --adapt ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A random `tiny` noise predictor whose output layer is not zero, as a trained one's is not: with the
    zero output layer of an initialisation no gradient reaches the backbone in the first step."""
    unet = random_unet()
    torch.nn.init.normal_(unet.out[-1].weight, std=0.02)
    card = ModelCard(kind="pretrained", unet=unet.config, preprocessing=PreprocessingSpec.for_size(64), preset="tiny", name="tiny-pretrained")
    return str(save_model(tmp_path_factory.mktemp("models") / "tiny-pretrained", card, unet.state_dict()))


@pytest.fixture(scope="module")
def painted(phantom_files, tmp_path_factory) -> str:
    """The phantom's labels on four axial slices only (a quick fine-tune)."""
    labels = sitk.ReadImage(str(phantom_files["labels"]))
    array = sitk.GetArrayFromImage(labels)
    keep = np.zeros_like(array)
    keep[[6, 10, 14, 18]] = array[[6, 10, 14, 18]]
    image = sitk.GetImageFromArray(keep)
    image.CopyInformation(labels)
    path = tmp_path_factory.mktemp("painted") / "painted.nii.gz"
    sitk.WriteImage(image, str(path))
    return str(path)


def finetune(phantom_files, painted, out, *extra: str) -> list[str]:
    return ["finetune", "--image", str(phantom_files["ct"]), "--labels", painted, "-o", str(out), "--iterations", "1", "--no-augment", *extra]


@pytest.mark.parametrize("adapt", ["0", "0.3"])
def test_finetune_adapt_trains_the_backbone_and_records_it(adapt, pretrained, phantom_files, painted, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(finetune(phantom_files, painted, out, "--base", pretrained, "--progress", "json", "--adapt", adapt))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    adaptation = json.loads((out / "model.json").read_text())["provenance"]["adaptation"]
    # ft-dec freezes the encoder, so the saved encoder is exactly the backbone fine-tuning started from.
    base, trained = read_weights(pretrained), load_file(str(out / "weights.safetensors"))
    encoder = [k for k in base if k.startswith(("input_blocks.", "middle_block.", "time_embed."))]
    same = all(torch.equal(base[k], trained[f"unet.{k}"].float()) for k in encoder)
    updates = [e for e in ProgressParser().feed(stdout) if isinstance(e, ProgressUpdate)]
    stages = [u.stage for u in updates]
    if adapt == "0":
        assert adaptation is None and same and "adapt" not in stages
        return
    assert not same
    assert adaptation["iterations"] >= 1 and adaptation["seconds"] >= 0.3 - 0.05
    assert isinstance(adaptation["loss_first"], float) and isinstance(adaptation["loss_last"], float)
    assert stages.index("adapt") < stages.index("finetune")
    timed = [u for u in updates if u.stage == "adapt"]
    assert all(u.total == 1 and 0 <= u.step <= 1 for u in timed)
    assert timed[-1].describe().startswith("adapting to this CT, 0:0")


def test_finetune_adapt_skips_a_segmentation_model_base(phantom_files, painted, tmp_path, capsys):
    config = preset_config("tiny")
    segmentor = Segmentor(config, 32)
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(64), head={"width": 32, "layers": 2},
                     strategy="ft-dec", preset="tiny", name="tiny-segmentor")
    base = save_model(tmp_path / "segmentor", card, segmentor.state_dict())
    out = tmp_path / "model"
    code = main(finetune(phantom_files, painted, out, "--base", str(base), "--progress", "json", "--adapt", "5"))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "--adapt skipped: the base tiny-segmentor is a segmentation model" in stdout
    assert json.loads((out / "model.json").read_text())["provenance"]["adaptation"] is None


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "soon"])
def test_finetune_adapt_must_be_seconds(value, phantom_files, painted, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(finetune(phantom_files, painted, tmp_path / "m", "--adapt", value))
    assert exit_info.value.code == 2
    assert f"argument --adapt: must be 0 or more seconds, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_finetune_adapt_refuses_fs(phantom_files, painted, tmp_path, capsys):
    code = main(finetune(phantom_files, painted, tmp_path / "m", "--strategy", "fs", "--preset", "tiny", "--adapt", "10", "--progress", "none"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--adapt: fs trains from random weights" in err


# --- the Slicer side: command line and progress ---------------------------------------------------------------


def test_settings_emit_adapt_seconds():
    def pairs(settings: commands.FinetuneSettings) -> dict[str, str]:
        args = commands.finetune_args(["ct.nrrd"], ["painted.seg.nrrd"], "out", settings)
        return dict(zip(args[5::2], args[6::2], strict=True))

    assert pairs(commands.FinetuneSettings(adapt_s=30))["--adapt"] == "30"
    assert pairs(commands.FinetuneSettings(adapt_s=2.5))["--adapt"] == "2.5"
    assert pairs(commands.FinetuneSettings(adapt_s=0))["--adapt"] == "0"  # explicit off, whatever the engine's default
    assert "--adapt" not in pairs(commands.FinetuneSettings())
    for bad in (-1, math.inf):
        with pytest.raises(ValueError, match="adaptation time"):
            commands.FinetuneSettings(adapt_s=bad)
    with pytest.raises(ValueError, match="pretrained backbone"):
        commands.FinetuneSettings(strategy="fs", adapt_s=10)


def test_progress_shows_the_adapt_stage_as_time():
    update = ProgressUpdate("adapt", 12, 60, 0.031234, 12.3, 49.0)
    assert update.label == "adapting to this CT"
    assert update.describe() == "adapting to this CT, 0:12 of 1:00, loss 0.0312"
    assert update.fraction == pytest.approx(0.2)
    assert ProgressUpdate("finetune", 40, 300, 0.41234, 12.5, 81.2).describe() == "finetune 40/300, loss 0.4123, 1:21 left"
    assert ProgressUpdate("finetune", 1, 3).label == "finetune"


def test_slicer_panel_has_the_adapt_setting():
    from test_slicer_module import module_tree, parameter_types, ui_parameter_widgets

    assert parameter_types(module_tree())["adaptSeconds"] == "int"
    assert ui_parameter_widgets()["adaptSeconds"] == ("adaptSecondsSpinBox", "QSpinBox")
