"""Reading the per-slice uncertainty report and choosing the next slice to annotate (the Slicer side).

The engine writes the report (`DiffusionSegLib.slice_uncertainty`, ``diffusionseg segment --uncertainty``); the
module keeps it on the segmentation and ranks unannotated slices from it. Slices are the input image's
slice indices along its axial axis, the indices the user sees in Slicer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

REPORT_VERSION = 1
METRIC = "mean normalised entropy of the class probabilities within the body (CT > -500 HU)"
MIN_BODY_FRACTION = 0.02  # slices with less body than this (above the head, below the feet) are not suggested


def check_report(report: object, source: str = "the uncertainty report") -> dict:
    """`report` if it is a report of this version; ValueError naming `source` otherwise."""
    if not isinstance(report, dict) or report.get("version") != REPORT_VERSION or not isinstance(report.get("slices"), list):
        raise ValueError(f"{source}: not a DiffusionSeg uncertainty report (version {REPORT_VERSION}); segment again to recreate it")
    return report


def read_report(path: str | Path) -> dict:
    """A report written by the engine; ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the uncertainty report ({e}); segment again to recreate it") from e
    return check_report(report, str(path))


def rank_slices(report: dict, annotated: Iterable[int] = (), min_body_fraction: float = MIN_BODY_FRACTION) -> list[int]:
    """Input slice indices not yet annotated, most uncertain first (ties: lower index first).

    Slices with almost no body are left out: their few pixels make the mean noisy, and annotating them
    teaches the model little.
    """
    done = set(annotated)
    candidates = [s for s in report["slices"] if s["index"] not in done and s["body_fraction"] >= min_body_fraction]
    return [s["index"] for s in sorted(candidates, key=lambda s: (-s["uncertainty"], s["index"]))]
