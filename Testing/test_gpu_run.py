"""The budgeted one-GPU run (Training/gpu_run.py) in its reduced CPU form, and pretrain's wall-clock budget it relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA, shared_data

from DiffusionSegLib.preprocessing import PreprocessingSpec
from Training import gpu_run
from Training.benchmarks.phantom import make_phantom
from Training.cli import main as train_main
from Training.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, seed: int, keep: list[int] | None = None, labelled: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ct, labels = make_phantom(size=(64, 64, 16), spacing=(6.0, 6.0, 10.0), seed=seed)
    if not labelled:
        sitk.WriteImage(ct, str(folder / "scan.nii.gz"))
        return
    if keep is not None:  # partially labelled, as the shared data's ircadb case: the other organs are 0
        array = sitk.GetArrayFromImage(labels)
        array[~np.isin(array, keep)] = 0
        partial = sitk.GetImageFromArray(array)
        partial.CopyInformation(labels)
        labels = partial
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))


@pytest.fixture(scope="module")
def fake_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared data folder's layout with phantoms: two fully labelled CTs, one with 4 organs labelled, one unlabelled."""
    root = tmp_path_factory.mktemp("shared")
    _write(root / "ct-a", 0)
    _write(root / "ct-b", 1)
    _write(root / "ct-partial", 2, keep=[1, 2, 3, 13])
    _write(root / "unlabeled", 3, labelled=False)
    return root


def test_pretrain_time_limit_pauses_with_a_checkpoint(tmp_path, capsys):
    """--time-limit: the run stops at the step the budget runs out in, saves it, keeps the schedule of --iterations and resumes."""
    ct, _ = make_phantom(size=(48, 48, 8), spacing=(8.0, 8.0, 10.0), seed=5)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    prepare([str(tmp_path / "ct.nii.gz")], tmp_path / "slices", PreprocessingSpec.for_size(64), show_progress=False)
    common = ["pretrain", "--data", str(tmp_path / "slices"), "--out", str(tmp_path / "run"), "--preset", "tiny", "--batch-size", "2",
              "--iterations", "100000", "--workers", "0", "--sample-every", "0", "--checkpoint-every", "100000", "--no-progress"]
    start = time.monotonic()
    assert train_main([*common, "--time-limit", "1"]) == 0
    assert time.monotonic() - start < 60
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["stopped_by"] == "time-limit" and 1 <= first["step"] < 100000
    assert (tmp_path / "run" / "checkpoints" / f"step-{first['step']:08d}").is_dir()
    assert train_main([*common, "--time-limit", "1", "--resume"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["stopped_by"] == "time-limit" and second["step"] > first["step"]
    assert train_main([*common, "--time-limit", "0"]) == 2


def test_a_stage_over_its_budget_is_stopped_then_killed(tmp_path):
    """SIGTERM at the budget less the grace, SIGKILL at the budget: a command that ignores SIGTERM still ends on time."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True); time.sleep(60)"
    start = time.monotonic()
    outcome = gpu_run.run_stage([sys.executable, "-c", stubborn], tmp_path / "x.log", budget=3.0, grace=1.0, env=None)
    assert outcome.status == "killed" and time.monotonic() - start < 10
    polite = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('saved')\n"
    outcome = gpu_run.run_stage([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n" + polite],
                                tmp_path / "y.log", budget=3.0, grace=1.0, env=None)
    assert outcome.status == "stopped" and outcome.returncode == 0


def test_mfu_from_the_logged_rate_and_the_datasheet_peak(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "images_per_s": r}) + "\n" for i, r in enumerate([5.0, 100.0, 100.0])))
    result = gpu_run.throughput({"flops_per_image": 1e12, "datasheet_peak_flops": 1e15, "measured_peak_flops": 5e14}, metrics)
    assert result["images_per_s"] == pytest.approx(100.0)  # the first window (warm-up) is left out
    assert result["mfu"] == pytest.approx(0.1) and result["mfu_vs_measured_matmul"] == pytest.approx(0.2)
    assert gpu_run.datasheet_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert gpu_run.datasheet_peak("NVIDIA H100 PCIe") == pytest.approx(756.5e12)


@pytest.mark.slow
def test_reduced_run_leaves_every_stage_and_a_summary(fake_shared, tmp_path):
    """The whole pipeline in its reduced form through the shell wrapper: every stage runs, each within its budget; the figures stage,
    cut short by its budget on a slow machine, still leaves (and the summary reports) the cases it finished."""
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "Training" / "gpu_run.sh"), str(fake_shared), str(out), "--reduced"]
    start = time.monotonic()
    # The wrapper runs `python` from PATH, as a user's activated environment provides it: this interpreter's.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    wall = time.monotonic() - start
    assert (out / "summary.json").is_file(), f"exit {done.returncode} after {wall:.0f} s, no summary:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == list(gpu_run.STAGES), done.stdout + done.stderr
    assert summary["labelled_cts"] == {"ct-a": {"organs": 13, "partial": False}, "ct-b": {"organs": 13, "partial": False},
                                       "ct-partial": {"organs": 4, "partial": True}}
    assert stages["nvidia-smi"]["status"] in ("skipped", "ok")
    for name in ("prepare", "pretrain", "export", "throughput", "finetune"):
        # pretrain may also be stopped by SIGTERM at its budget when start-up on a loaded machine ate the reserve: a checkpoint either way
        assert stages[name]["status"] in (("ok", "stopped") if name == "pretrain" else ("ok",)), (name, stages[name], done.stdout, done.stderr)
        assert stages[name]["seconds"] <= stages[name]["budget_s"] + 2
    assert stages["prepare"]["volumes"] == 4  # the unlabelled scan and the three labelled CTs' images, no labelmap
    assert stages["pretrain"]["result"]["stopped_by"] in ("time-limit", "signal")
    assert stages["throughput"]["images_per_s"] > 0 and stages["throughput"]["flops_per_image"] > 0
    assert "mfu_vs_measured_matmul" in stages["throughput"]
    assert "--image" in stages["finetune"]["command"] and stages["finetune"]["command"].count("--labels") == 3  # the partial CT too
    assert (out / "segmentor" / "model.json").is_file() and (out / "pretrained" / "model.json").is_file()
    figures = stages["figures"]
    assert figures["cts"] == ["ct-a", "ct-b"] and figures["not_scored"] == ["ct-partial"]
    assert figures["status"] in ("ok", "stopped", "killed") and figures["seconds"] <= figures["budget_s"] + 2
    finished = json.loads((out / "figures" / "figures.json").read_text()) if (out / "figures" / "figures.json").is_file() else {}
    assert sorted(figures.get("held_out", {})) == sorted(finished)
    if figures["status"] == "ok":
        assert {"ct-a-all-ft-dec", "ct-b-all-ft-dec"} <= set(finished)
    assert wall < summary["settings"]["total"] + 30


def test_real_data_prepare_finds_every_image_and_no_labelmap():
    """On the shared data: what prepare is given (and what fine-tuning and the figures take) before any training."""
    shared_data("abdomen-ct-ircadb01", "labels.nii.gz")
    cts = gpu_run.labelled_cts(SHARED_DATA)
    by_name = {ct.name: ct for ct in cts}
    assert by_name["abdomen-ct-ircadb01"].organs == 4 and by_name["abdomen-ct-a"].organs >= gpu_run.FULL_LABEL_ORGANS
    images = gpu_run.pretraining_images(SHARED_DATA, cts)
    assert SHARED_DATA / "unlabeled" in images and all(p.name != "labels.nii.gz" for p in images)
    assert len(images) == 1 + len(cts)


@pytest.mark.slow
def test_reduced_run_on_the_real_data_through_fine_tuning(tmp_path):
    """The real CTs (512 x 512 volumes, a DICOM series, the partially labelled ircadb case) through prepare, pretrain, export and
    FT-dec in the reduced form; the figures stage is the phantom test's."""
    shared_data("abdomen-ct-ircadb01", "labels.nii.gz")
    out = tmp_path / "out"
    assert gpu_run.main([str(SHARED_DATA), str(out), "--reduced", "--stages", "prepare", "pretrain", "export", "finetune"]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert all(stages[s]["status"] == "ok" for s in ("prepare", "export", "finetune")), stages
    assert stages["pretrain"]["status"] in ("ok", "stopped") and stages["pretrain"]["result"]["stopped_by"] in ("time-limit", "signal")
    assert stages["prepare"]["inputs_skipped"] == 0 and stages["prepare"]["slices"] > 800
    assert "abdomen-ct-ircadb01/labels.nii.gz" in stages["finetune"]["command"]
    assert stages["finetune"]["cts"]["abdomen-ct-ircadb01"] == {"organs": 4}


def _peer_speed():
    from Training.benchmarks import peer_speed

    return peer_speed


def test_peer_network_has_the_nnunet_shape_and_windows():
    """The speed benchmark's peer: nnU-Net's 6-stage PlainConvUNet (about 31 M parameters) and its window placement, 4 windows of
    128^3 at step 0.5 on the 128 x 137 x 137 grid of a 512 x 512 x 200 CT at 3 mm."""
    peer = _peer_speed()
    network = peer.plain_conv_unet(118)
    assert 30e6 < sum(p.numel() for p in network.parameters()) < 33e6
    assert [peer.window_starts(n, 128) for n in (128, 137, 137)] == [[0], [0, 9], [0, 9]]
    assert peer.window_starts(300, 128) == [0, 57, 115, 172]
    import torch

    labels, windows = peer.sliding_window_argmax(peer.plain_conv_unet(3).eval(), torch.zeros(64, 70, 64), 3, 64, torch.device("cpu"))
    assert labels.shape == (64, 70, 64) and windows == 2
