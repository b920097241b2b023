"""Overlap metrics between a predicted and a reference labelmap, per organ."""

from __future__ import annotations

import numpy as np

from .organs import FLARE22, LabelSet


def organ_overlap(pred: np.ndarray, ref: np.ndarray, label_set: LabelSet = FLARE22) -> dict:
    """Per-organ DSC and Jaccard (organs of `label_set`, named as it names them), and their means over the organs present in the reference.

    An organ absent from both is left out (its overlap is undefined, not perfect). An organ only in the
    prediction is listed with DSC 0 but not averaged: a reference that labels some organs (or a scan
    that holds some) cannot say whether it is there, and scores are means over the organs the
    reference has, as FLARE reports them. Those organs are named in `absent_from_reference`.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    # One pass over the voxels: a joint histogram of (pred, ref) label pairs.
    # Labels are uint8, so each pair fits in a uint16 code and the histogram in 256 x 256 bins.
    n = 256
    codes = pred.astype(np.uint16).ravel() * np.uint16(n) + ref.astype(np.uint16).ravel()
    joint = np.bincount(codes, minlength=n * n).reshape(n, n)
    per_organ = {}
    for organ in label_set:
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
    values = [v for v in per_organ.values() if v["ref_voxels"]]
    return {
        "organs": per_organ,
        "mean_dsc": float(np.mean([v["dsc"] for v in values])) if values else None,
        "mean_jaccard": float(np.mean([v["jaccard"] for v in values])) if values else None,
        "reference_organs": [name for name, v in per_organ.items() if v["ref_voxels"]],
        "absent_from_reference": [o.name for o in label_set if not joint[:, o.label].sum()],
        "predicted_not_in_reference": [name for name, v in per_organ.items() if not v["ref_voxels"]],
    }
