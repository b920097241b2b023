"""Training pipeline at small scale: prepare, pretrain (kill, resume, torchrun), sample, export, finetune."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SHARED_DATA

from DiffusionSegLib.cli import main as diffusionseg
from DiffusionSegLib.models import load_unet
from Training.benchmarks.phantom import make_phantom, write_dicom_series
from Training.checkpoint import Checkpoint, complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from Training.cli import build_parser
from Training.cli import main as train
from Training.pretrain import PretrainConfig, ema_decay_at, lr_at
from Training.shards import SliceDataset, read_index

FAST = ["--preset", "tiny", "--batch-size", "4", "--workers", "0", "--log-every", "5", "--sample-every", "0", "--no-progress"]


def unlabeled_inputs(tmp_path_factory) -> list[Path]:
    """The real unlabeled CT when present (a DICOM series among it), else phantoms (one as DICOM) plus a bad file."""
    if (SHARED_DATA / "unlabeled").is_dir():
        return [SHARED_DATA / "unlabeled"]
    folder = tmp_path_factory.mktemp("unlabeled")
    ct, _ = make_phantom(size=(64, 64, 12), spacing=(6.0, 6.0, 10.0), seed=1)
    sitk.WriteImage(ct, str(folder / "a.nii.gz"))
    write_dicom_series(make_phantom(size=(64, 64, 10), spacing=(6.0, 6.0, 10.0), seed=2)[0], folder / "dicom")
    return [folder]


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory) -> Path:
    inputs = unlabeled_inputs(tmp_path_factory)
    extra = tmp_path_factory.mktemp("bad")
    (extra / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path_factory.mktemp("slices") / "slices"
    assert train(["prepare", *map(str, inputs), str(extra), "-o", str(out), "--size", "64", "--workers", "2"]) == 0
    return out


def test_prepare_writes_shards_index_and_skip_report(slices_dir):
    index = read_index(slices_dir)
    assert index.spec.size == 64 and index.num_slices >= 20
    assert any("#series=" in v["source"] for v in index.volumes)  # the DICOM series was found
    assert [Path(s["source"]).name for s in index.skipped] == ["broken.nii.gz"]
    assert "cannot be read" in index.skipped[0]["reason"]
    dataset = SliceDataset(slices_dir)
    assert len(dataset) == index.num_slices
    x = dataset[len(dataset) - 1]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert np.load(slices_dir / index.volumes[0]["shard"], mmap_mode="r").dtype == np.float16


def test_prepare_resumes_without_redoing_work(slices_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in slices_dir.glob("*.npy")}
    index = read_index(slices_dir)
    assert train(["prepare", *{str(Path(v["source"].split("#series=")[0]).parent) for v in index.volumes}, "-o", str(slices_dir),
                  "--size", "64"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in slices_dir.glob("*.npy")} == before
    assert train(["prepare", str(tmp_path), "-o", str(slices_dir), "--size", "128"]) == 2  # another preprocessing


def test_precision_settings_stay_local():
    """Importing the training CLI leaves PyTorch's TF32 settings alone; pretraining turns TF32 on only while it trains."""
    script = ("import torch; before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32); import Training.cli; "
              "assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before, before")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from Training.pretrain import tf32_matmuls

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError), tf32_matmuls():
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        raise RuntimeError("a failed run restores them too")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_lr_decays_from_2e4_to_2e5():
    config = PretrainConfig(iterations=101)
    assert lr_at(0, config) == pytest.approx(2e-4) and lr_at(100, config) == pytest.approx(2e-5)
    assert PretrainConfig().ema_decay == 0.9999 and PretrainConfig().schedule == "cosine" and PretrainConfig().hflip


def test_ema_decay_warms_up_to_the_configured_value():
    config = PretrainConfig()
    assert ema_decay_at(0, config) == pytest.approx(0.1) and ema_decay_at(90, config) == pytest.approx(0.91)
    assert ema_decay_at(200_000, config) == 0.9999
    assert ema_decay_at(0, PretrainConfig(ema_warmup=False)) == 0.9999
    decays = [ema_decay_at(n, config) for n in range(0, 100_000, 1000)]
    assert decays == sorted(decays)


def test_bad_configuration_fails_at_once(slices_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    train(["prepare", str(tmp_path / "nothing"), "-o", str(empty), "--size", "64"])
    assert train(["pretrain", "--data", str(empty), "--out", str(tmp_path / "r"), *FAST, "--iterations", "2"]) == 2
    assert "empty" in capsys.readouterr().err
    odd = tmp_path / "odd"  # 48-pixel slices cannot pass the 5 downsamplings of the 256-style presets
    sitk.WriteImage(make_phantom(size=(32, 32, 4), spacing=(8.0, 8.0, 10.0))[0], str(tmp_path / "p.nii.gz"))
    train(["prepare", str(tmp_path / "p.nii.gz"), "-o", str(odd), "--size", "48"])
    assert train(["pretrain", "--data", str(odd), "--out", str(tmp_path / "r"), "--preset", "small", "--iterations", "2", "--no-progress"]) == 2
    assert "cannot run at the dataset's slice size 48" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("iterations: 3\nwarmup: 10\n")
    assert train(["pretrain", "--data", str(slices_dir), "--out", str(tmp_path / "r"), "--config", str(tmp_path / "bad.yaml"), *FAST]) == 2
    assert "warmup" in capsys.readouterr().err


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = {"w": torch.randn(3, 3)}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, Checkpoint(step, model, model, opt.state_dict(), {"config": {}}), keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    # A save killed midway leaves a temporary folder, never a half checkpoint that looks complete.
    (tmp_path / ".step-00000005.tmp-123").mkdir()
    (tmp_path / ".step-00000005.tmp-123" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))])
    fresh.load_state_dict(saved.optimizer)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while latest_checkpoint(run / "checkpoints") is None:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_pretrain_kill_resume_sample_export_finetune(slices_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "Training", "pretrain", "--data", str(slices_dir), "--out", str(run), *FAST,
           "--iterations", "100000", "--checkpoint-every", "5", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_checkpoint(run, proc)
        # Preemption as a scheduler does it, to the whole process group (loader worker included):
        # checkpoint at the end of the step, then exit.
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    stopped = json.loads(proc.stdout.read().strip().splitlines()[-1])
    assert stopped["stopped_by"] == "signal"
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"), restore_random_state=False).step == stopped["step"]

    # A kill -9 during a later save must not hurt the last good checkpoint.
    (run / "checkpoints" / f".step-{stopped['step'] + 1:08d}.tmp-999").mkdir()

    target = stopped["step"] + 6
    assert train(["pretrain", "--data", str(slices_dir), "--out", str(run), *FAST, "--iterations", str(target), "--resume"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == target  # the loss curve continues
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"), restore_random_state=False).step == target

    assert train(["sample", "--run", str(run), "-n", "3", "-o", str(tmp_path / "samples"), "--sampler", "ddim", "--steps", "4"]) == 0
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.shape == (3, 64, 64) and (tmp_path / "samples.png").stat().st_size > 0

    model_dir = tmp_path / "pretrained"
    assert train(["export", "--run", str(run), "-o", str(model_dir)]) == 0
    unet, card = load_unet(model_dir)
    assert card.provenance["iterations"] == target and card.schedule["schedule"] == "cosine"
    assert card.provenance["weights"] == "EMA" and card.preprocessing.size == 64

    ct, labels = make_phantom(size=(64, 64, 12), spacing=(6.0, 6.0, 10.0), seed=9)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    assert diffusionseg(["finetune", "--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                         "-o", str(tmp_path / "ft"), "--base", str(model_dir), "--iterations", "2", "--progress", "none"]) == 0


def test_pretrain_stop_at_pauses_on_the_full_schedule_and_resumes(slices_dir, tmp_path, capsys):
    """--stop-at: a run budgeted in pieces keeps the learning-rate schedule of --iterations, with a checkpoint at the pause."""
    run = tmp_path / "run"
    common = ["pretrain", "--data", str(slices_dir), "--out", str(run), *FAST, "--iterations", "10", "--lr", "1e-3", "--lr-final", "1e-4"]
    capsys.readouterr()
    assert train([*common, "--stop-at", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stopped_by"] == "stop-at"
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"), restore_random_state=False).step == 5
    lr_at_5 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["lr"]
    assert 1e-4 < lr_at_5 < 1e-3  # halfway down the 10-iteration schedule, not at its end
    assert train([*common, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) | {"final_loss": 0} == {"step": 10, "stopped_by": "iterations", "final_loss": 0}


@pytest.mark.skipif(not shutil.which("torchrun", path=os.path.dirname(sys.executable)), reason="torchrun not installed")
def test_torchrun_two_processes_on_cpu(slices_dir, tmp_path):
    run = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "Training", "pretrain", "--data", str(slices_dir), "--out", str(run), *FAST,
         "--iterations", "6", "--checkpoint-every", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000003", "step-00000006"]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2


@pytest.fixture(scope="module")
def short_run(slices_dir, tmp_path_factory) -> Path:
    """6 tiny pretraining steps, a checkpoint every 2; 10 diffusion steps, so the full DDPM sampler is quick."""
    run = tmp_path_factory.mktemp("short") / "run"
    assert train(["pretrain", "--data", str(slices_dir), "--out", str(run), *FAST, "--iterations", "6", "--checkpoint-every", "2",
                  "--keep-checkpoints", "3", "--num-timesteps", "10"]) == 0
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004", "step-00000006"]
    return run


def exported_ema(folder: Path) -> dict[str, torch.Tensor]:
    return load_unet(folder)[0].state_dict()


def test_export_picks_the_checkpoint_asked_for(short_run, tmp_path, capsys):
    assert train(["export", "--run", str(short_run), "-o", str(tmp_path / "two"), "--checkpoint", "2"]) == 0
    ema = load_checkpoint(short_run / "checkpoints" / "step-00000002", restore_random_state=False).ema
    exported = exported_ema(tmp_path / "two")
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    latest = load_checkpoint(short_run / "checkpoints" / "step-00000006", restore_random_state=False).ema
    assert not all(torch.equal(exported[k], latest[k]) for k in exported)  # the EMA moved between steps 2 and 6
    card = load_unet(tmp_path / "two")[1]
    assert card.provenance["checkpoint"] == "step-00000002" and card.provenance["iterations"] == 2 and card.provenance["selected_by"] == "step"
    assert train(["export", "--run", str(short_run), "-o", str(tmp_path / "latest")]) == 0
    assert load_unet(tmp_path / "latest")[1].provenance["iterations"] == 6
    assert train(["export", "--run", str(short_run), "-o", str(tmp_path / "x"), "--checkpoint", "3"]) == 2
    assert "no checkpoint of step 3; kept steps: 2, 4, 6" in capsys.readouterr().err
    assert train(["export", "--run", str(short_run), "-o", str(tmp_path / "x"), "--checkpoint", "best"]) == 2
    assert "evaluate-generation --run" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_sample_defaults_to_the_full_ddpm_sampler(short_run, tmp_path, capsys):
    args = build_parser().parse_args(["sample", "--run", "r", "-o", "x"])
    assert args.sampler == "ddpm" and args.steps is None
    assert train(["sample", "--run", str(short_run), "-n", "2", "-o", str(tmp_path / "ddpm"), "--device", "cpu"]) == 0
    with np.load(tmp_path / "ddpm.npz") as saved:
        assert str(saved["sampler"]) == "ddpm" and int(saved["steps"]) == 10 and saved["samples"].shape == (2, 64, 64)
    assert train(["sample", "--run", str(short_run), "-n", "2", "-o", str(tmp_path / "ddim"), "--sampler", "ddim", "--steps", "3",
                  "--checkpoint", "2", "--device", "cpu"]) == 0
    with np.load(tmp_path / "ddim.npz") as saved:
        assert str(saved["sampler"]) == "ddim" and int(saved["steps"]) == 3
    assert train(["sample", "--run", str(short_run), "-n", "2", "-o", str(tmp_path / "bad"), "--steps", "3"]) == 2
    assert "--steps applies to --sampler ddim" in capsys.readouterr().err


def test_best_fid_checkpoint_is_found_and_exported(short_run, slices_dir, random_inception, tmp_path, capsys):
    evaluate = ["evaluate-generation", "--run", str(short_run), "--reference", str(slices_dir), "--count", "4", "--max-reference", "6",
                "--inception-weights", str(random_inception), "--batch-size", "4", "--device", "cpu", "--no-progress"]
    precision = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert train(evaluate) == 0
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == precision  # TF32 off only while it measured
    record = json.loads((short_run / "fid.json").read_text())
    assert sorted(record["checkpoints"], key=int) == ["2", "4", "6"]
    assert record["settings"]["sampler"] == "ddpm" and record["settings"]["steps"] == 10 and record["settings"]["count"] == 4
    fids = {int(step): m["fid"] for step, m in record["checkpoints"].items()}
    assert record["best"] == {"step": min(fids, key=fids.get), "fid": min(fids.values())}
    assert f"best: step {record['best']['step']}" in capsys.readouterr().out
    # Evaluating one checkpoint again under the same settings keeps the others.
    assert train([*evaluate, "--checkpoints", "4"]) == 0
    assert sorted(json.loads((short_run / "fid.json").read_text())["checkpoints"], key=int) == ["2", "4", "6"]
    assert train(["export", "--run", str(short_run), "-o", str(tmp_path / "best"), "--checkpoint", "best"]) == 0
    card = load_unet(tmp_path / "best")[1]
    assert card.provenance["iterations"] == record["best"]["step"] and card.provenance["selected_by"] == "lowest FID"
    assert card.provenance["generation_metrics"]["fid"] == pytest.approx(record["best"]["fid"])
    assert train([*evaluate, "--checkpoints", "5"]) == 2
    assert "kept steps: 2, 4, 6" in capsys.readouterr().err


def test_pretrain_init_grows_a_model_to_another_slice_size(short_run, tmp_path, capsys):
    """--init: a 64 px model's weights start a run at 32 px (the same convolutions and attention levels)."""
    assert train(["export", "--run", str(short_run), "-o", str(tmp_path / "tiny64")]) == 0
    small_slices = tmp_path / "slices32"
    assert train(["prepare", *map(str, unlabeled_inputs_for(tmp_path)), "-o", str(small_slices), "--size", "32"]) == 0
    run = tmp_path / "grown"
    # A learning rate of ~0 so the one step leaves the weights where --init put them.
    assert train(["pretrain", "--data", str(small_slices), "--out", str(run), *FAST, "--iterations", "1", "--checkpoint-every", "1",
                  "--num-timesteps", "10", "--lr", "1e-12", "--lr-final", "1e-12", "--init", str(tmp_path / "tiny64")]) == 0
    start = exported_ema(tmp_path / "tiny64")
    grown = load_checkpoint(run / "checkpoints" / "step-00000001", restore_random_state=False)
    assert json.loads((run / "config.json").read_text())["unet"]["image_size"] == 32
    assert all(torch.allclose(grown.model[k], start[k], atol=1e-6) for k in start)
    # Resumed with another --init: the weights come from the checkpoint, and the record keeps the origin.
    capsys.readouterr()
    assert train(["pretrain", "--data", str(small_slices), "--out", str(run), *FAST, "--iterations", "2", "--checkpoint-every", "1",
                  "--num-timesteps", "10", "--lr", "1e-12", "--lr-final", "1e-12", "--init", str(short_run), "--resume"]) == 0
    assert "is ignored (the run started from" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["config"]["init"] == str(tmp_path / "tiny64")
    assert train(["pretrain", "--data", str(small_slices), "--out", str(tmp_path / "other"), *FAST[2:], "--preset", "small",
                  "--iterations", "1", "--init", str(tmp_path / "tiny64")]) == 2
    assert "differs from --preset's" in capsys.readouterr().err


def unlabeled_inputs_for(tmp_path: Path) -> list[Path]:
    """A small phantom CT: enough slices for a 32 px dataset without preparing the real data again."""
    ct, _ = make_phantom(size=(48, 48, 12), spacing=(8.0, 8.0, 10.0), seed=3)
    sitk.WriteImage(ct, str(tmp_path / "phantom.nii.gz"))
    return [tmp_path / "phantom.nii.gz"]
