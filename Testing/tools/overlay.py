"""Render a CT with a labelmap overlaid (axial slices + a coronal view) to a PNG, to check results by eye.

    python Testing/tools/overlay.py CT LABELS OUT.png [--slices 40 60 80] [--title TEXT]

LABELS may be a labelmap or a .seg.nrrd; it is read onto the CT grid (so a mismatched grid fails),
and both are shown in the model's canonical radiological layout (anterior up, patient right on the left).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from DiffusionSegLib.imageio import read_ct, read_labels  # noqa: E402
from DiffusionSegLib.organs import ORGANS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct")
    parser.add_argument("labels")
    parser.add_argument("out")
    parser.add_argument("--slices", type=int, nargs="*", help="axial slice indices (LPS order, inferior first)")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    ct = read_ct(args.ct)
    labels = read_labels(args.labels, ct)
    # DICOMOrient only permutes and flips axes: the pixels shown are exactly those in the files.
    ct_lps = sitk.GetArrayFromImage(sitk.DICOMOrient(ct, "LPS"))
    lab_lps = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPS"))
    spacing = sitk.DICOMOrient(ct, "LPS").GetSpacing()
    present = np.flatnonzero(lab_lps.any(axis=(1, 2)))
    slices = args.slices or list(np.linspace(present[0], present[-1], 5).round().astype(int)[1:4]) if present.size else [len(ct_lps) // 2]

    colours = np.zeros((14, 4))
    for organ in ORGANS:
        colours[organ.label] = (*organ.color_float, 0.55)
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(1, len(slices) + 1, figsize=(4 * (len(slices) + 1), 4.4))
    for ax, k in zip(axes, slices, strict=False):
        ax.imshow(ct_lps[k], cmap="gray", vmin=-160, vmax=240, aspect=spacing[1] / spacing[0])
        ax.imshow(np.ma.masked_equal(lab_lps[k], 0), cmap=cmap, vmin=0, vmax=13, interpolation="nearest", aspect=spacing[1] / spacing[0])
        ax.set_title(f"axial slice {k}")
        ax.axis("off")
    column = ct_lps.shape[1] // 2 + ct_lps.shape[1] // 8  # a coronal plane a little behind the centre
    axes[-1].imshow(ct_lps[::-1, column], cmap="gray", vmin=-160, vmax=240, aspect=spacing[2] / spacing[0])
    axes[-1].imshow(np.ma.masked_equal(lab_lps[::-1, column], 0), cmap=cmap, vmin=0, vmax=13, interpolation="nearest", aspect=spacing[2] / spacing[0])
    axes[-1].set_title("coronal")
    axes[-1].axis("off")
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)


if __name__ == "__main__":
    main()
