"""Per-organ statistics of a labelmap on its CT: volume, Hounsfield units, voxel count, slice range.

The figures TotalSegmentator's ``--statistics`` gives, for each organ of the model's label set (FLARE22's 13 for
the bundled models). Every organ is listed, so a reader can tell "not found" (``present: false``) from "not segmented".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import write_text
from .organ_trust import CHECK_BELOW, VOLUME_SOURCE, organ_trust
from .organs import FLARE22, LabelSet
from .preprocessing import canonical_axes


def organ_statistics(ct: sitk.Image, labelmap: sitk.Image, label_set: LabelSet = FLARE22) -> dict:
    """Statistics of each organ of `label_set` (the model's) in `labelmap` (its ids) over the CT voxels it covers.

    Volumes are voxel count x voxel volume (no partial voxels). ``cut_off``: the organ reaches the first or
    last axial slice, so the scan may not hold all of it. The HU standard deviation is the
    population one (ddof 0). Slice ranges are inclusive indices along the image's third axis, the
    slice numbers a viewer shows for an axially acquired CT.
    """
    if ct.GetSize() != labelmap.GetSize():
        raise ValueError(f"labelmap size {labelmap.GetSize()} differs from the CT's {ct.GetSize()}")
    hu = sitk.GetArrayViewFromImage(ct)
    labels = sitk.GetArrayViewFromImage(labelmap)  # [k, j, i]
    voxel_ml = math.prod(ct.GetSpacing()) / 1000.0  # mm^3 -> mL
    axial_axis = 2 - canonical_axes(ct.GetDirection())[0][2]  # array axis running head to feet
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False), minlength=label_set.num_classes)
    organs: dict[str, dict] = {}
    for organ in label_set:
        voxels = int(counts[organ.label]) if organ.label < len(counts) else 0
        entry: dict = {"label": organ.label, "present": voxels > 0, "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3)}
        if voxels:
            mask = labels == organ.label
            values = hu[mask].astype(np.float64)
            slices = np.flatnonzero(mask.any(axis=(1, 2)))
            axial = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axial_axis)))
            entry.update(mean_hu=round(float(values.mean()), 2), std_hu=round(float(values.std()), 2),
                         slice_range=[int(slices[0]), int(slices[-1])],
                         cut_off=bool(axial[0] == 0 or axial[-1] == labels.shape[axial_axis] - 1))
        else:
            entry.update(mean_hu=None, std_hu=None, slice_range=None, cut_off=None)
        organs[organ.name] = entry
    return {
        "spacing_mm": [round(s, 6) for s in ct.GetSpacing()],
        "voxel_volume_ml": voxel_ml,
        "slice_axis": "third image axis (k), 0-based, inclusive range",
        "organs": organs,
        "absent": [name for name, entry in organs.items() if not entry["present"]],
    }


def add_trust(statistics: dict, card: dict, warnings: list[str]) -> dict:
    """Add to each organ found its held-out DSC from the model's card, "check" and any volume note; and the scan's warnings.

    An organ that reaches the first or last slice is cut off by the scan: its volume is not judged.
    """
    found = {name: entry for name, entry in statistics["organs"].items() if entry["present"]}
    cut_off = {name: entry["cut_off"] for name, entry in found.items()}
    trust = organ_trust(card, {name: entry["volume_ml"] for name, entry in found.items()}, cut_off)
    for name, verdict in trust.items():
        statistics["organs"][name].update(held_out_dsc=None if verdict.held_out_dsc is None else round(verdict.held_out_dsc, 4),
                                          check=verdict.check, volume_note=verdict.volume_note)
    statistics["trust"] = {
        "held_out_dsc": "the model's leave-one-patient-out DSC for the organ (model card); absent when the card has none",
        "check_below": CHECK_BELOW,
        "volume_ranges": VOLUME_SOURCE,
        "measured": any(v.measured for v in trust.values()),
    }
    statistics["warnings"] = [f"{name}: {v.volume_note}" for name, v in trust.items() if v.volume_note] + list(warnings)
    return statistics


def write_statistics(statistics: dict, path: str | Path) -> Path:
    """Write the statistics as JSON, atomically."""
    return write_text(path, json.dumps(statistics, indent=2) + "\n")


def statistics_table(statistics: dict) -> list[str]:
    """Lines of a short text table: organs found with volume, mean HU and held-out DSC ("check" below the bar), then the absent ones."""
    measured = statistics.get("trust", {}).get("measured", False)
    lines = [f"{'organ':22s} {'volume mL':>10s} {'mean HU':>8s} {'slices':>9s}" + (f" {'held-out DSC':>12s}" if measured else "")]
    for name, entry in statistics["organs"].items():
        if entry["present"]:
            first, last = entry["slice_range"]
            line = f"{name:22s} {entry['volume_ml']:10.1f} {entry['mean_hu']:8.1f} {first:>4d}-{last:<4d}"
            if measured:
                dsc = entry.get("held_out_dsc")
                line += f" {'-' if dsc is None else f'{dsc:.2f}':>12s}" + ("  check" if entry.get("check") else "")
            lines.append(line)
    if measured:
        lines.append(f"held-out DSC: the model on patients it was not trained on; 'check': below {statistics['trust']['check_below']:.2f} "
                     "or not measured, look at that organ before using it")
    if statistics["absent"]:
        lines.append(f"not found: {', '.join(statistics['absent'])}")
    return lines
