"""Per-slice model uncertainty, to suggest which axial slice to annotate next (the engine side: computing it).

A slice's uncertainty is the mean normalised entropy of the class probabilities (0: certain, 1: uniform over
the model's classes: 14 for FLARE22) over the pixels inside the body (CT above -500 HU), so air around the patient, where the
model is trivially sure, does not dilute it. Slices are reported in the input image's slice indices along
its axial axis, the indices the user sees in Slicer (and that ``annotated_input_slices`` uses). Reading the
report and ranking slices is `DiffusionSegLib.bridge.slice_ranking`, which Slicer loads without torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import atomic
from .bridge.slice_ranking import METRIC, REPORT_VERSION  # one report format, read by the bridge
from .preprocessing import ModelSpaceVolume

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

    from .preprocessing import PreprocessingSpec
    from .progress import Progress
    from .segmentor import Segmentor

BODY_HU = -500.0
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
    """Write the report atomically (a cancelled or failed run leaves no partial file)."""
    return atomic.write_text(path, json.dumps(report, indent=1) + "\n")


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
