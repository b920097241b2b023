"""Warnings when a scan or a segmentation does not look like the abdominal anatomy the model was trained on.

The model sees one axial slice at a time and was trained on abdominal CT, so on a chest CT it answers with
abdominal organs anyway (the heart taken for the liver). The lungs give the level: in an axial slice of the
chest, air-filled lung fills a large part of the body's cross-section; below the lung bases it does not. Two
checks follow from that, both warnings (the user decides):

- the scan holds little below the lung bases: it does not look abdominal;
- an abdominal organ lies mostly in slices where the lungs fill the chest, where it cannot be. The liver dome
  and the spleen's upper pole do reach those levels, but only with a small part of their volume (5-12 % of the
  liver on the labelled CTs this was checked on);
- "liver" at those levels left of the body's midline, where the heart sits on the diaphragm: the true liver
  dome lies under the right lung (0 and 14 mL left of the midline at chest level on the two labelled CTs that
  reach the chest), while the heart taken for the liver put 113 and 365 mL there on the two scans it happened on.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .organs import FLARE22, LabelSet
from .preprocessing import canonical_axes

BODY_HU = -500.0  # denser than this: tissue (air and lung are below)
LUNG_HU = -400.0  # inside the body and below this: lung (or gas)
LUNG_FRACTION = 0.15  # a slice where lung fills this share of the body is a chest slice
CHEST_FRACTION = 0.25  # ... and at this share well above the lung bases (the heart's level)
MIN_LUNG_RUN_MM = 20.0  # lungs span many centimetres; a shorter run of air is bowel gas
MIN_ABDOMEN_MM = 60.0  # less than this below the lung bases: not an abdominal scan
MOSTLY = 0.5  # an organ with more of its volume at chest level than this is out of place
HEART_SIDE_ML = 50.0  # more "liver" than this left of the midline at chest level: the heart
# Structures that run through the chest as well as the abdomen: no level check.
_THROUGH_CHEST = {"aorta", "inferior vena cava", "esophagus"}
_WORKING_SIZE = 128  # slices are measured at about this many pixels across: enough for area fractions


def _superior_posterior_left(image: sitk.Image, array: np.ndarray) -> tuple[np.ndarray, float]:
    """`array` ([k, j, i] of `image`) as a view with axes (feet -> head, front -> back, right -> left); the first axis' spacing in mm."""
    axes, signs = canonical_axes(image.GetDirection())
    view = np.transpose(array, [2 - axes[2], 2 - axes[1], 2 - axes[0]])
    for dimension, sign in enumerate((signs[2], signs[1], signs[0])):
        if sign < 0:
            view = np.flip(view, dimension)
    return view, float(image.GetSpacing()[axes[2]])


def lung_fractions(ct: sitk.Image) -> tuple[np.ndarray, float]:
    """Share of the body's cross-section that is lung (or gas) in each axial slice, feet to head; and the slice spacing."""
    hu, spacing = _superior_posterior_left(ct, sitk.GetArrayViewFromImage(ct))
    step = max(1, max(hu.shape[1:]) // _WORKING_SIZE)
    fractions = np.zeros(hu.shape[0])
    for index, plane in enumerate(hu[:, ::step, ::step]):
        body = ndimage.binary_fill_holes(ndimage.binary_opening(plane > BODY_HU, iterations=2))
        area = int(body.sum())
        if area:
            fractions[index] = float(((plane < LUNG_HU) & body).sum()) / area
    return fractions, spacing


def lung_base(fractions: np.ndarray, spacing: float) -> int | None:
    """Index (feet to head) of the lowest slice of the lowest long run of lung slices; None when no lungs are in the scan."""
    lung = fractions >= LUNG_FRACTION
    runs, count = ndimage.label(lung)
    for run in range(1, count + 1):
        where = np.flatnonzero(runs == run)
        if len(where) * spacing >= MIN_LUNG_RUN_MM:
            return int(where[0])
    return None


def anatomy_warnings(ct: sitk.Image, labelmap: sitk.Image, label_set: LabelSet = FLARE22) -> list[str]:
    """Warnings, each saying what looks wrong and what to do; [] when the scan and the organs look abdominal.

    The checks know FLARE22's abdominal organs (and were measured on them): a model of another label set gets none.
    """
    if label_set != FLARE22:
        return []
    fractions, spacing = lung_fractions(ct)
    base = lung_base(fractions, spacing)
    if base is None:  # no lungs: an abdomen or pelvis scan, nothing above the diaphragm to confuse
        return []
    warnings = []
    below_mm = base * spacing
    if below_mm < MIN_ABDOMEN_MM:
        warnings.append(
            f"this scan looks like a chest CT: only {below_mm / 10:.1f} cm of it lie below the lung bases, and the model was trained on "
            "abdominal CT; organs it reports in the chest are likely wrong (the heart taken for the liver). Check every organ, or "
            "segment a scan that covers the abdomen")
    labels, _ = _superior_posterior_left(labelmap, sitk.GetArrayViewFromImage(labelmap))
    classes = FLARE22.num_classes
    per_slice = np.stack([np.bincount(plane.ravel(), minlength=classes)[:classes] for plane in labels])
    chest = np.flatnonzero((fractions >= CHEST_FRACTION) & (np.arange(len(fractions)) >= base))
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    for organ in FLARE22:
        if organ.name in _THROUGH_CHEST:
            continue
        total = int(per_slice[:, organ.label].sum())
        in_chest = int(per_slice[chest, organ.label].sum())
        if total * voxel_ml >= 1.0 and in_chest > MOSTLY * total:
            hint = " (probably the heart)" if organ.name == "liver" else ""
            warnings.append(
                f"{organ.name}: {in_chest * voxel_ml:.0f} of its {total * voxel_ml:.0f} mL lie in slices where the lungs fill the chest, "
                f"above the lung bases, where the {organ.name} cannot be{hint}; check it, and erase it or paint a few slices and fine-tune")
        elif organ.name == "liver" and (left_ml := _left_of_midline(ct, labels, chest, organ.label) * voxel_ml) > HEART_SIDE_ML:
            warnings.append(
                f"liver: {left_ml:.0f} mL of it lie left of the midline above the lung bases, where the heart sits and the liver cannot "
                "be; that part is probably the heart: check it, erase it or paint a few slices and fine-tune")
    return warnings


def _left_of_midline(ct: sitk.Image, labels: np.ndarray, slices: np.ndarray, label: int) -> int:
    """Voxels of `label` on the patient's left of the body's midline in the given slices (arrays feet-head, front-back, right-left)."""
    hu, _ = _superior_posterior_left(ct, sitk.GetArrayViewFromImage(ct))
    count = 0
    for index in slices:
        across = np.flatnonzero((hu[index] > BODY_HU).any(axis=0))
        if len(across):
            count += int((labels[index][:, (across[0] + across[-1]) // 2 + 1 :] == label).sum())
    return count
