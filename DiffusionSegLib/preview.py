"""A PNG to check a segmentation by eye: a few axial slices and a coronal view with the organs overlaid,
and a legend.

The picture has its own palette, not the organs' Slicer colours: Slicer gives both kidneys one colour,
both adrenal glands one colour, and liver, stomach and aorta near-identical reds, so in a picture without
Slicer's segment list a reader could not tell them apart. `PREVIEW_COLOURS` is a categorical palette
whose colours are pairwise far apart in CIELAB (Testing/test_preview.py measures it); each organ is
filled half-transparent over the CT and outlined in its full colour, and the legend shows that colour.
The .seg.nrrd keeps Slicer's colours (`organs.py`), which Slicer users know. Another label set takes the
palette in its own order (its n-th label the n-th colour), and the legend its names.

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
from .organs import FLARE22, LabelSet

PANEL = 256  # each view is fitted into a PANEL x PANEL square, physical aspect kept
HEADER = 24  # title row above the views
LEGEND_WIDTH = 190
LEGEND_ROW = 18  # pixels per legend line
SWATCH = 12  # legend colour square, pixels
WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window (W 400, L 40)
ALPHA = 0.5  # organ fill opacity over the CT; the outline is drawn opaque
AXIAL_VIEWS = 3
TEXT = (255, 255, 255)  # titles, legend names and the "R" marker

# FLARE22 id -> RGB. A categorical palette (colours from Kelly's and Okabe-Ito's lists of distinct colours, and
# ColorBrewer), chosen so that every pair differs by at least CIEDE2000 15 in full colour (what outlines and
# legend show) and no colour is close to grey (the CT) or to the white text. Where it costs nothing the hue
# follows convention: aorta red, IVC blue, gallbladder green, spleen purple, pancreas yellow.
PREVIEW_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (0xD5, 0x5E, 0x00),  # liver: vermilion
    2: (0x66, 0xC2, 0xA5),  # right kidney: teal
    3: (0x60, 0x4E, 0x97),  # spleen: violet
    4: (0xF6, 0xA6, 0x00),  # pancreas: orange-yellow
    5: (0xBE, 0x00, 0x32),  # aorta: red
    6: (0x00, 0x72, 0xB2),  # inferior vena cava: blue
    7: (0xDC, 0xD3, 0x00),  # right adrenal gland: greenish yellow
    8: (0xB2, 0xDF, 0x8A),  # left adrenal gland: light green
    9: (0x33, 0xA0, 0x2C),  # gallbladder: green
    10: (0xE7, 0x29, 0x8A),  # esophagus: magenta
    11: (0xE6, 0x8F, 0xAC),  # stomach: pink
    12: (0xF9, 0x93, 0x79),  # duodenum: salmon
    13: (0x56, 0xB4, 0xE9),  # left kidney: sky blue
}


def preview_size(num_axial: int = AXIAL_VIEWS) -> tuple[int, int]:
    """(width, height) in pixels of a preview with `num_axial` axial slices."""
    return (num_axial + 1) * PANEL + LEGEND_WIDTH, PANEL + HEADER


def legend_swatch(row: int, num_views: int = AXIAL_VIEWS + 1) -> tuple[int, int]:
    """Top-left pixel of the legend's colour square for its `row`-th organ (organs found, in the label set's order)."""
    return num_views * PANEL + 8, HEADER + 6 + row * LEGEND_ROW


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


def preview_colour(label: int) -> tuple[int, int, int]:
    """The picture's colour of label id `label` in any label set: FLARE22's `PREVIEW_COLOURS`, which another set's ids
    (1-N, in order) take in turn."""
    palette = list(PREVIEW_COLOURS.values())
    return palette[(label - 1) % len(palette)]


def _colours() -> np.ndarray:
    table = np.zeros((256, 3), np.float32)
    for label in range(1, 256):
        table[label] = preview_colour(label)
    return table


def _outline(label_img: np.ndarray) -> np.ndarray:
    """Organ pixels with a 4-neighbour of another label (or the panel's edge): each organ's border, inside it."""
    padded = np.pad(label_img, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (centre > 0)


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
    colours = _colours()
    rgb[organ] = (1 - ALPHA) * rgb[organ] + ALPHA * colours[label_img[organ]]
    edge = _outline(label_img)  # opaque, so touching organs stay apart even where their fills blend with the CT
    rgb[edge] = colours[label_img[edge]]
    panel = Image.new("RGB", (PANEL, PANEL))
    panel.paste(Image.fromarray(rgb.round().astype(np.uint8)), ((PANEL - size[0]) // 2, (PANEL - size[1]) // 2))
    return panel


def render_preview(ct: sitk.Image, labels: sitk.Image, slices: Sequence[int] | None = None, title: str = "",
                   label_set: LabelSet = FLARE22) -> Image.Image:
    """The preview image of `labels` (ids of `label_set`, on the CT's grid) over `ct`, with the set's names in the legend.

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
        draw.text((n * PANEL + 4, HEADER + PANEL // 2 - 8), "R", fill=TEXT, font=font)  # patient right is on the left

    x0 = len(views) * PANEL + 8
    draw.text((x0, 4), title or "organs", fill=TEXT, font=font)
    found = [o for o in label_set if (lab == o.label).any()]
    for row, organ in enumerate(found):
        x, y = legend_swatch(row, len(views))
        draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=preview_colour(organ.label))
        draw.text((x + SWATCH + 6, y - 2), organ.display_name, fill=TEXT, font=font)
    if not found:
        draw.text((x0, HEADER + 4), "no organ found", fill=TEXT, font=font)
    return canvas


def write_preview(ct: sitk.Image, labels: sitk.Image, path: str | Path, slices: Sequence[int] | None = None, title: str = "",
                  label_set: LabelSet = FLARE22) -> Path:
    """Render the preview and write it as PNG, atomically."""
    image = render_preview(ct, labels, slices, title, label_set)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path).expanduser()
