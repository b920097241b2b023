"""Sample quality against real slices: FID, sFID, improved precision / recall (k = 3) and their F1.

Definitions follow the guided-diffusion evaluator: FID on Inception pool_3 features, sFID on the
first 7 channels of mixed_6/conv, precision and recall of Kynkäänniemi et al. (2019) on pool_3.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from DiffusionSegLib.atomic import write_text
from DiffusionSegLib.errors import InputError

from .diffusion_samples import ema_model, sample
from .inception import FIDInception, to_inception_input
from .shards import SliceDataset

NEIGHBOURS = 3
MIN_IMAGES = NEIGHBOURS + 1  # each point needs k other points for its radius; a covariance needs 2
FID_FILE = "fid.json"  # in a run folder: FID of each evaluated checkpoint, and the best


@dataclass
class Features:
    pool: np.ndarray     # N x 2048
    spatial: np.ndarray  # N x 2023


@dataclass
class GenerationMetrics:
    fid: float
    sfid: float
    precision: float
    recall: float
    f1: float
    num_samples: int
    num_reference: int
    neighbours: int = NEIGHBOURS

    def to_dict(self) -> dict:
        return asdict(self)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors; got array of shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) is taken as Tr (S1^(1/2) S2 S1^(1/2))^(1/2): the same eigenvalues, but of a
    symmetric PSD matrix, so eigh gives them stably even when the covariances are singular
    (fewer images than features), where a general matrix square root goes complex.
    """
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def feature_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two sets of feature vectors (rows)."""
    mu1, mu2 = statistics(a)[0], statistics(b)[0]  # also checks there are 2 or more vectors
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*statistics(a), *statistics(b))
    # Fewer vectors than dimensions: with centred rows A, B, S1 = A'A / (n1-1) and S2 = B'B / (n2-1), the nonzero
    # eigenvalues of S1 S2 are the squared singular values of A B' / sqrt((n1-1)(n2-1)): an n1 x n2 problem that is
    # exact, where d x d eigenvalues of a singular matrix would carry rounding noise through the square root.
    a0 = np.asarray(a, dtype=np.float64) - mu1
    b0 = np.asarray(b, dtype=np.float64) - mu2
    n1, n2 = len(a0) - 1, len(b0) - 1
    trace_sqrt = np.linalg.svd(a0 @ b0.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a0 * a0) / n1 + np.sum(b0 * b0) / n2 - 2 * trace_sqrt)


ROWS = 1024  # distance rows per chunk: 1024 x 50k floats stay a few hundred MB


def _kth_neighbour_distances(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (the point itself is the 0th)."""
    return torch.cat([torch.kthvalue(torch.cdist(chunk, points), k + 1, dim=1).values for chunk in torch.split(points, ROWS)])


def _fraction_covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = torch.cat([(torch.cdist(chunk, centres) <= radii[None]).any(1) for chunk in torch.split(points, ROWS)])
    return inside.float().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS, device: torch.device | str = "cpu") -> tuple[float, float]:
    """Precision: share of generated points on the real manifold; recall: share of real points on the generated one.

    Each manifold is the union of balls around its points reaching their k-th nearest neighbour.
    """
    for name, f in (("reference", real), ("generated", fake)):
        if len(f) < k + 1:
            raise ValueError(f"precision/recall with k={k} needs at least {k + 1} {name} feature vectors; got {len(f)}")
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    g = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = _fraction_covered(g, r, _kth_neighbour_distances(r, k))
    recall = _fraction_covered(r, g, _kth_neighbour_distances(g, k))
    return precision, recall


def f1_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@torch.no_grad()
def extract_features(network: FIDInception, batches: Iterable[torch.Tensor], total: int, device: torch.device | str = "cpu",
                     desc: str = "features", show_progress: bool = True) -> Features:
    """Inception features of batches of model-space grey images (B x H x W or B x 1 x H x W, in [-1, 1])."""
    network.eval().to(device)
    pools, spatials = [], []
    with tqdm(total=total, desc=desc, unit="image", disable=not show_progress, dynamic_ncols=True) as bar:
        for batch in batches:
            pool, spatial = network(to_inception_input(torch.as_tensor(batch).to(device)))
            pools.append(pool.float().cpu().numpy())
            spatials.append(spatial.float().cpu().numpy())
            bar.update(len(batch))
    return Features(np.concatenate(pools), np.concatenate(spatials))


def load_samples(path: str | Path) -> np.ndarray:
    """The `samples` array of a `diffusionseg-train sample` .npz, as N x H x W float32."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--samples {path}: no such file; draw samples with 'diffusionseg-train sample ... -o PREFIX' (writes PREFIX.npz)")
    try:
        data = np.load(path)
        if isinstance(data, np.ndarray):  # a bare .npy is accepted too
            samples = data
        else:
            with data:
                if "samples" not in data.files:
                    raise InputError(f"{path}: no 'samples' array (found {', '.join(data.files) or 'none'}); expected the .npz of 'diffusionseg-train sample'")
                samples = data["samples"]
        samples = np.asarray(samples, dtype=np.float32)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from e
    if samples.ndim == 4 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 3 or min(samples.shape[1:]) < 1:
        raise InputError(f"{path}: samples of shape {samples.shape}; expected N x H x W (or N x 1 x H x W) grey images in [-1, 1]")
    if not np.isfinite(samples).all():
        raise InputError(f"{path}: samples contain NaN or infinite values")
    return samples


def reference_subset(folder: str | Path, max_images: int | None) -> Dataset:
    """The slices of a `prepare` dataset, at most `max_images` of them, evenly spaced so every volume is represented."""
    try:
        dataset = SliceDataset(folder)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--reference: {e}") from e
    if len(dataset) == 0:
        raise InputError(f"--reference {folder}: the slice dataset is empty (see its report.json for skipped inputs)")
    if max_images is None or max_images >= len(dataset):
        return dataset
    return Subset(dataset, np.unique(np.linspace(0, len(dataset) - 1, max_images).round().astype(int)).tolist())


def check_counts(num_samples: int, num_reference: int) -> None:
    """Fail before any network runs when a set is too small for the metrics."""
    for what, n in (("--samples", num_samples), ("--reference", num_reference)):
        if n < MIN_IMAGES:
            raise InputError(f"{what}: {n} images; FID needs at least 2 for a covariance and precision/recall (k={NEIGHBOURS}) "
                             f"at least {MIN_IMAGES}: use {MIN_IMAGES} or more (thousands for FID values worth comparing)")


def sample_features(samples: np.ndarray, network: FIDInception, *, batch_size: int = 32, device: torch.device | str = "cpu",
                    show_progress: bool = True) -> Features:
    return extract_features(network, (torch.from_numpy(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)),
                            len(samples), device, "samples", show_progress)


def reference_features(reference: Dataset, network: FIDInception, *, batch_size: int = 32, device: torch.device | str = "cpu",
                       show_progress: bool = True) -> Features:
    return extract_features(network, DataLoader(reference, batch_size=batch_size), len(reference), device, "reference", show_progress)


def metrics_from_features(real: Features, fake: Features, device: torch.device | str = "cpu") -> GenerationMetrics:
    precision, recall = precision_recall(real.pool, fake.pool, NEIGHBOURS, device)
    return GenerationMetrics(fid=feature_fid(real.pool, fake.pool), sfid=feature_fid(real.spatial, fake.spatial), precision=precision,
                             recall=recall, f1=f1_score(precision, recall), num_samples=len(fake.pool), num_reference=len(real.pool))


def evaluate_generation(samples: np.ndarray, reference: Dataset, network: FIDInception, *, batch_size: int = 32,
                        device: torch.device | str = "cpu", show_progress: bool = True) -> GenerationMetrics:
    """All metrics of generated `samples` (N x H x W in [-1, 1]) against the `reference` slices."""
    check_counts(len(samples), len(reference))
    fake = sample_features(samples, network, batch_size=batch_size, device=device, show_progress=show_progress)
    real = reference_features(reference, network, batch_size=batch_size, device=device, show_progress=show_progress)
    return metrics_from_features(real, fake, device)


def checkpoint_metrics(checkpoint: Path, real: Features, network: FIDInception, *, count: int, sampler: str, steps: int, seed: int,
                       batch_size: int = 32, device: torch.device | str = "cpu", show_progress: bool = True) -> GenerationMetrics:
    """Metrics of `count` samples from a training checkpoint's EMA weights against precomputed reference features."""
    model, diffusion = ema_model(checkpoint)
    samples = sample(model, diffusion, count, sampler=sampler, steps=steps, device=device, seed=seed, batch_size=batch_size)
    return metrics_from_features(real, sample_features(samples, network, batch_size=batch_size, device=device, show_progress=show_progress), device)


def evaluate_checkpoints(checkpoints: dict[int, Path], real: Features, network: FIDInception, *, count: int, sampler: str, steps: int,
                         seed: int = 0, batch_size: int = 32, device: torch.device | str = "cpu", show_progress: bool = True,
                         on_checkpoint: Callable[[int, GenerationMetrics], None] | None = None) -> dict[int, GenerationMetrics]:
    """Metrics per checkpoint step; every checkpoint is sampled with the same sampler, count and seed, so their FIDs compare."""
    results = {}
    for step, path in sorted(checkpoints.items()):
        results[step] = checkpoint_metrics(path, real, network, count=count, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                                           device=device, show_progress=show_progress)
        if on_checkpoint is not None:
            on_checkpoint(step, results[step])
    return results


def record_fids(run_dir: Path, settings: dict, results: dict[int, GenerationMetrics]) -> dict:
    """Merge `results` into the run's fid.json (entries made under other settings are dropped) and mark the lowest FID as best."""
    path = Path(run_dir) / FID_FILE
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    entries = previous.get("checkpoints", {}) if previous.get("settings") == settings else {}
    entries.update({str(step): metrics.to_dict() for step, metrics in results.items()})
    best = min(entries, key=lambda step: entries[step]["fid"])
    record = {"settings": settings, "checkpoints": dict(sorted(entries.items(), key=lambda kv: int(kv[0]))),
              "best": {"step": int(best), "fid": entries[best]["fid"]}}
    write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def best_fid_step(run_dir: Path) -> int:
    """The step with the lowest FID in the run's fid.json."""
    path = Path(run_dir) / FID_FILE
    if not path.is_file():
        raise InputError(f"{run_dir}: no {FID_FILE}, so no best-FID checkpoint is known; first run "
                         f"'diffusionseg-train evaluate-generation --run {run_dir} --reference SLICES'")
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["best"]["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a fid.json written by evaluate-generation --run ({e})") from e
