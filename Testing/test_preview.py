"""The --preview picture: organs a reader can tell apart, and a legend that names what is drawn.

Slicer's recommended colours (DiffusionSegLib/organs.py) give both kidneys one colour, both adrenal glands one
colour, and liver and stomach near-identical reds: fine in Slicer, where the segment list names every colour, but
not in a PNG. The preview draws with its own palette (`PREVIEW_COLOURS`); the .seg.nrrd keeps Slicer's colours
(checked in test_organs.py and test_imageio.py). Size, slices and errors of the preview are in test_first_run.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.color import deltaE_ciede2000, rgb2lab

from DiffusionSegLib.organs import ORGANS
from DiffusionSegLib.preview import (
    ALPHA,
    HEADER,
    PANEL,
    PREVIEW_COLOURS,
    SWATCH,
    TEXT,
    WINDOW_HU,
    legend_swatch,
    render_preview,
)

# CIEDE2000 thresholds. ~2 is "just noticeable"; 10 and more reads as a different colour at a glance. Outlines and
# legend squares are drawn in full colour; fills are blended with the CT at ALPHA, which brings every pair closer.
MIN_FULL = 15.0  # between two organs' full colours
MIN_FILL = 10.0  # between two organs' fills over the same CT grey
MIN_FROM_GREY = 20.0  # a full colour from every grey (else it reads as CT)
MIN_FROM_TEXT = 15.0  # from the white legend and marker text
CT_GREYS = (40, 128, 200)  # fat, soft tissue and contrast-enhanced parenchyma in the preview's window


def lab(rgb) -> np.ndarray:
    return rgb2lab(np.asarray(rgb, np.float64).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


def closest_pair(colours: dict[str, tuple[int, int, int]], over_grey: float | None = None) -> tuple[float, str, str]:
    """The smallest CIEDE2000 distance between two entries, as drawn: full colour, or blended over a CT grey."""
    names = list(colours)
    rgb = np.array([colours[n] for n in names], np.float64)
    if over_grey is not None:
        rgb = (1 - ALPHA) * over_grey + ALPHA * rgb
    points = lab(rgb)
    return min((float(deltaE_ciede2000(points[i], points[j])), names[i], names[j]) for i, j in itertools.combinations(range(len(names)), 2))


def by_name(table: dict[int, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    return {o.name: table[o.label] for o in ORGANS}


def test_the_palette_covers_every_organ():
    assert sorted(PREVIEW_COLOURS) == [o.label for o in ORGANS]


def test_preview_colours_are_pairwise_distinguishable():
    colours = by_name(PREVIEW_COLOURS)
    distance, a, b = closest_pair(colours)
    assert distance >= MIN_FULL, f"{a} and {b} are only {distance:.1f} apart (CIEDE2000)"
    for grey in CT_GREYS:
        distance, a, b = closest_pair(colours, over_grey=grey)
        assert distance >= MIN_FILL, f"over CT grey {grey}, the fills of {a} and {b} are only {distance:.1f} apart"


def test_preview_colours_stand_out_from_the_ct_and_the_text():
    greys = lab(np.repeat(np.arange(256)[:, None], 3, axis=1))
    text = lab(TEXT)[0]
    for organ in ORGANS:
        colour = lab(PREVIEW_COLOURS[organ.label])[0]
        from_grey = float(deltaE_ciede2000(np.broadcast_to(colour, greys.shape), greys).min())
        assert from_grey >= MIN_FROM_GREY, f"{organ.name} is {from_grey:.1f} from a grey"
        assert float(deltaE_ciede2000(colour, text)) >= MIN_FROM_TEXT, organ.name


def test_the_distance_check_rejects_slicer_colours():
    """Why the preview has its own palette: the same check fails on the Slicer colours the .seg.nrrd keeps."""
    distance, a, b = closest_pair({o.name: o.color for o in ORGANS})
    assert distance < 1.0 and {a, b} in ({"right kidney", "left kidney"}, {"right adrenal gland", "left adrenal gland"})
    liver, stomach = (lab(o.color)[0] for o in ORGANS if o.name in ("liver", "stomach"))
    assert float(deltaE_ciede2000(liver, stomach)) < MIN_FULL


# --- the legend matches the picture ------------------------------------------------------------------

CT_HU = 40.0  # a uniform CT: every fill is one known blend of this grey and the organ's colour
STRIPE, GAP = 3, 1  # voxels per organ stripe and between stripes


def striped(labels_present: list[int]) -> tuple[sitk.Image, sitk.Image]:
    """A CT with one stripe per organ, running through every axial slice and every coronal plane."""
    width = len(labels_present) * (STRIPE + GAP) + GAP
    lab_array = np.zeros((12, 20, width), np.uint8)  # z, y, x
    for n, label in enumerate(labels_present):
        start = GAP + n * (STRIPE + GAP)
        lab_array[:, 2:-2, start:start + STRIPE] = label
    ct = sitk.GetImageFromArray(np.full(lab_array.shape, CT_HU, np.int16))
    labels = sitk.GetImageFromArray(lab_array)
    for image in (ct, labels):
        image.SetSpacing((1.0, 1.0, 1.0))  # identity direction: already LPS, so axial rows and columns are y and x
    return ct, labels


def legend_rows(picture: np.ndarray, num_views: int) -> list[tuple[int, int, int]]:
    """The colours of the legend's squares, top to bottom, until a row has none."""
    rows = []
    for row in itertools.count():
        x, y = legend_swatch(row, num_views)
        if y + SWATCH > picture.shape[0]:
            break
        square = picture[y:y + SWATCH, x:x + SWATCH].reshape(-1, 3)
        if not (square == square[0]).all() or not square[0].any():
            break  # no square drawn here (background or text)
        rows.append(tuple(int(c) for c in square[0]))
    return rows


def views(picture: np.ndarray, num_views: int) -> list[np.ndarray]:
    return [picture[HEADER:HEADER + PANEL, n * PANEL:(n + 1) * PANEL] for n in range(num_views)]


@pytest.mark.parametrize("present", [[o.label for o in ORGANS], [1, 2, 13, 7, 8, 11]], ids=["all organs", "look-alikes in Slicer"])
def test_the_legend_shows_the_colours_drawn_for_exactly_the_organs_drawn(present):
    ct, labels = striped(present)
    picture = np.asarray(render_preview(ct, labels, slices=[3, 6, 9]).convert("RGB")).astype(int)
    num_views = 4
    expected = [PREVIEW_COLOURS[o.label] for o in ORGANS if o.label in present]  # the legend lists organs in FLARE22 order
    assert legend_rows(picture, num_views) == expected

    grey = (CT_HU - WINDOW_HU[0]) / (WINDOW_HU[1] - WINDOW_HU[0]) * 255
    for n, view in enumerate(views(picture, num_views)):
        pixels = view.reshape(-1, 3)
        for label in present:
            colour = np.array(PREVIEW_COLOURS[label])
            outline = (pixels == colour).all(axis=1).sum()
            assert outline >= 2 * PANEL // 4, f"view {n}: the outline of organ {label} is missing"
            fill = np.round((1 - ALPHA) * grey + ALPHA * colour)
            assert ((np.abs(pixels - fill) <= 1).all(axis=1)).sum() > outline, f"view {n}: organ {label} is not filled in its colour"
        absent = [c for label, c in PREVIEW_COLOURS.items() if label not in present]
        assert not any((pixels == c).all(axis=1).any() for c in absent), f"view {n} draws an organ the legend does not list"
        slicer_only = [o.color for o in ORGANS if o.label in present and o.color not in PREVIEW_COLOURS.values()]
        assert not any((pixels == c).all(axis=1).any() for c in slicer_only), f"view {n} uses a Slicer colour"
