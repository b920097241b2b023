"""A PNG to check a segmentation by eye: a few axial slices and a coronal view with the organs overlaid,
and a legend in the organs' Slicer colours.

Rendered with numpy and Pillow (which scikit-image already installs), so it works in the plain
install. Views are in the radiological layout (anterior up on axial, superior up on coronal, patient
right on the image's left) whatever the file's orientation: the volumes are reoriented to LPS, which
only permutes and flips axes, so the pixels shown are exactly those in the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .organs import ORGANS

PANEL = 256  # each view is fitted into a PANEL x PANEL square, physical aspect kept
HEADER = 24  # title row above the views
LEGEND_WIDTH = 190
WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window (W 400, L 40)
ALPHA = 0.5
AXIAL_VIEWS = 3


def preview_size(num_axial: int = AXIAL_VIEWS) -> tuple[int, int]:
    """(width, height) in pixels of a preview with `num_axial` axial slices."""
    return (num_axial + 1) * PANEL + LEGEND_WIDTH, PANEL + HEADER


def default_slices(labels_lps: np.ndarray, count: int = AXIAL_VIEWS) -> list[int]:
    """`count` axial slices spread over the labelled range (inner points, so none is an organ's tip); the middle ones when nothing is labelled."""
    present = np.flatnonzero(labels_lps.any(axis=(1, 2)))
    low, high = (present[0], present[-1]) if present.size else (0, len(labels_lps) - 1)
    return [int(k) for k in np.linspace(low, high, count + 2).round()[1:-1]]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _colours() -> np.ndarray:
    table = np.zeros((256, 3), np.float32)
    for organ in ORGANS:
        table[organ.label] = organ.color
    return table


def _view(ct: np.ndarray, labels: np.ndarray, row_mm: float, col_mm: float) -> Image.Image:
    """One view: windowed CT with the organs blended in, scaled to fit the panel at its physical aspect."""
    low, high = WINDOW_HU
    grey = np.clip((ct.astype(np.float32) - low) / (high - low), 0, 1) * 255
    height_mm, width_mm = ct.shape[0] * row_mm, ct.shape[1] * col_mm
    scale = PANEL / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    grey = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize(size, Image.BILINEAR), np.float32)
    label_img = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    organ = label_img > 0
    rgb[organ] = (1 - ALPHA) * rgb[organ] + ALPHA * _colours()[label_img[organ]]
    panel = Image.new("RGB", (PANEL, PANEL))
    panel.paste(Image.fromarray(rgb.round().astype(np.uint8)), ((PANEL - size[0]) // 2, (PANEL - size[1]) // 2))
    return panel


def render_preview(ct: sitk.Image, labels: sitk.Image, slices: Sequence[int] | None = None, title: str = "") -> Image.Image:
    """The preview image of `labels` (FLARE22 ids, on the CT's grid) over `ct`.

    `slices` are axial indices of the LPS-reoriented volume (inferior first); by default
    `AXIAL_VIEWS` spread over the labelled range. The coronal view is the plane holding the most
    labelled voxels (the centre when nothing is labelled).
    """
    if ct.GetSize() != labels.GetSize():
        raise ValueError(f"labelmap size {labels.GetSize()} differs from the CT's {ct.GetSize()}")
    ct_lps = sitk.DICOMOrient(ct, "LPS")
    hu = sitk.GetArrayFromImage(ct_lps)  # [S, P, L]: rows anterior->posterior, columns right->left
    lab = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPS"))
    sx, sy, sz = ct_lps.GetSpacing()
    chosen = list(slices) if slices else default_slices(lab)
    if bad := [k for k in chosen if not 0 <= k < len(hu)]:
        raise ValueError(f"axial slices {bad} lie outside 0-{len(hu) - 1}")
    per_plane = (lab > 0).sum(axis=(0, 2))
    coronal = int(per_plane.argmax()) if per_plane.any() else hu.shape[1] // 2

    width, height = preview_size(len(chosen))
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    views = [(f"axial {k}", _view(hu[k], lab[k], sy, sx)) for k in chosen]
    views.append((f"coronal {coronal}", _view(hu[::-1, coronal], lab[::-1, coronal], sz, sx)))  # superior up
    for n, (name, view) in enumerate(views):
        canvas.paste(view, (n * PANEL, HEADER))
        draw.text((n * PANEL + 6, 4), name, fill=(255, 255, 255), font=font)
        draw.text((n * PANEL + 4, HEADER + PANEL // 2 - 8), "R", fill=(255, 255, 0), font=font)  # patient right is on the left

    x0 = len(views) * PANEL + 8
    draw.text((x0, 4), title or "organs", fill=(255, 255, 255), font=font)
    found = [o for o in ORGANS if (lab == o.label).any()]
    for row, organ in enumerate(found):
        y = HEADER + 4 + row * 18
        draw.rectangle((x0, y + 2, x0 + 12, y + 14), fill=organ.color)
        draw.text((x0 + 18, y), organ.display_name, fill=(255, 255, 255), font=font)
    if not found:
        draw.text((x0, HEADER + 4), "no organ found", fill=(255, 255, 255), font=font)
    return canvas


def write_preview(ct: sitk.Image, labels: sitk.Image, path: str | Path, slices: Sequence[int] | None = None, title: str = "") -> Path:
    """Render the preview and write it as PNG, atomically."""
    image = render_preview(ct, labels, slices, title)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path).expanduser()
