"""Overlap metrics between a predicted and a reference labelmap, per organ."""

from __future__ import annotations

import numpy as np

from .organs import ORGANS


def organ_overlap(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Per-organ DSC and Jaccard, and their means over organs present in either labelmap.

    An organ absent from both is left out (its overlap is undefined, not perfect); an organ present
    in only one counts as 0.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    # One pass over the voxels: a joint histogram of (pred, ref) label pairs.
    # Labels are uint8, so each pair fits in a uint16 code and the histogram in 256 x 256 bins.
    n = 256
    codes = pred.astype(np.uint16).ravel() * np.uint16(n) + ref.astype(np.uint16).ravel()
    joint = np.bincount(codes, minlength=n * n).reshape(n, n)
    per_organ = {}
    for organ in ORGANS:
        k = organ.label
        inter = int(joint[k, k])
        p, r = int(joint[k].sum()), int(joint[:, k].sum())
        if p + r == 0:
            continue
        per_organ[organ.name] = {
            "label": k,
            "dsc": 2 * inter / (p + r),
            "jaccard": inter / (p + r - inter),
            "pred_voxels": p,
            "ref_voxels": r,
        }
    values = list(per_organ.values())
    return {
        "organs": per_organ,
        "mean_dsc": float(np.mean([v["dsc"] for v in values])) if values else None,
        "mean_jaccard": float(np.mean([v["jaccard"] for v in values])) if values else None,
    }
