"""Per-slice model uncertainty, to suggest which axial slice to annotate next.

A slice's uncertainty is the mean normalised entropy of the class probabilities (0: certain, 1: uniform over
the 14 classes) over the pixels inside the body (CT above -500 HU), so air around the patient, where the
model is trivially sure, does not dilute it. Slices are reported in the input image's slice indices along
its axial axis, the indices the user sees in Slicer (and that ``annotated_input_slices`` uses).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .imageio import atomic_write_path
from .preprocessing import ModelSpaceVolume

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

    from .preprocessing import PreprocessingSpec
    from .progress import Progress
    from .segmentor import Segmentor

REPORT_VERSION = 1
METRIC = "mean normalised entropy of the class probabilities within the body (CT > -500 HU)"
BODY_HU = -500.0
MIN_BODY_FRACTION = 0.02  # slices with less body than this (above the head, below the feet) are not suggested
_CHUNK = 8  # slices per entropy batch: bounds the float32 copy of the probabilities


def body_mask(volume: ModelSpaceVolume, threshold_hu: float = BODY_HU) -> np.ndarray:
    """N x S x S: model-space pixels denser than `threshold_hu` (undoes the [-1, 1] intensity scaling)."""
    low, high = volume.clip_hu
    threshold = (threshold_hu - low) / (high - low) * 2.0 - 1.0
    return volume.slices > threshold


def slice_entropy(probabilities: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean normalised entropy within `mask` and the masked fraction, per slice.

    `probabilities` is N x C x S x S, float or uint8 (0-255, as predict_probabilities returns them);
    each pixel's values are renormalised to sum to 1, which also undoes the uint8 rounding.
    """
    n, classes = probabilities.shape[:2]
    if mask.shape != (n, *probabilities.shape[2:]):
        raise ValueError(f"mask {mask.shape} does not match probabilities {probabilities.shape}")
    entropy = np.zeros(n)
    fraction = mask.reshape(n, -1).mean(axis=1) if n else np.zeros(0)
    for start in range(0, n, _CHUNK):
        p = probabilities[start:start + _CHUNK].astype(np.float32)
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        h = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1) / math.log(classes)  # K x S x S
        m = mask[start:start + _CHUNK]
        counts = m.reshape(len(m), -1).sum(axis=1)
        sums = (h * m).reshape(len(m), -1).sum(axis=1)
        entropy[start:start + len(m)] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return entropy, fraction


def uncertainty_report(probabilities: np.ndarray, volume: ModelSpaceVolume) -> dict:
    """The per-slice report, indexed by input slice (model slice k is input slice n-1-k on flipped grids)."""
    entropy, fraction = slice_entropy(probabilities, body_mask(volume))
    n = volume.num_slices
    slices = []
    for index in range(n):
        k = volume.model_slice(index)
        slices.append({"index": index, "uncertainty": round(float(entropy[k]), 6), "body_fraction": round(float(fraction[k]), 4)})
    return {"version": REPORT_VERSION, "metric": METRIC, "slice_axis": volume.slice_axis, "num_slices": n, "slices": slices}


def write_report(report: dict, path: str | Path) -> Path:
    with atomic_write_path(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return Path(path)


def read_report(path: str | Path) -> dict:
    """A report written by `write_report`; ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the uncertainty report ({e}); segment again to recreate it") from e
    if not isinstance(report, dict) or report.get("version") != REPORT_VERSION or not isinstance(report.get("slices"), list):
        raise ValueError(f"{path}: not a DiffusionSeg uncertainty report (version {REPORT_VERSION}); segment again to recreate it")
    return report


def rank_slices(report: dict, annotated: Iterable[int] = (), min_body_fraction: float = MIN_BODY_FRACTION) -> list[int]:
    """Input slice indices not yet annotated, most uncertain first (ties: lower index first).

    Slices with almost no body are left out: their few pixels make the mean noisy, and annotating them
    teaches the model little.
    """
    done = set(annotated)
    candidates = [s for s in report["slices"] if s["index"] not in done and s["body_fraction"] >= min_body_fraction]
    return [s["index"] for s in sorted(candidates, key=lambda s: (-s["uncertainty"], s["index"]))]


def segment_with_uncertainty(
    ct: sitk.Image,
    segmentor: Segmentor,
    spec: PreprocessingSpec,
    device: torch.device,
    batch_size: int | None = None,
    progress: Progress | None = None,
    *,
    cleanup: bool = False,
) -> tuple[sitk.Image, dict]:
    """Like inference.segment_ct, plus the uncertainty report from the same class probabilities.

    Returns (labelmap on the CT grid, report). The probabilities are computed once and used for both;
    `cleanup` changes only the labelmap (the report describes the model's own probabilities).
    """
    from .inference import segment_ct

    reports: list[dict] = []
    labelmap = segment_ct(ct, segmentor, spec, device, batch_size, progress, lambda p, volume: reports.append(uncertainty_report(p, volume)),
                          cleanup=cleanup)
    return labelmap, reports[0]
