"""Render a CT with a labelmap overlaid (axial slices + a coronal view, organ legend) to a PNG, to check results by eye.

    python Testing/tools/overlay.py CT LABELS OUT.png [--slices 40 60 80] [--title TEXT]

LABELS may be a labelmap or a .seg.nrrd; it is read onto the CT grid (so a mismatched grid fails).
The picture is the one `diffusionseg segment --preview` writes (DiffusionSegLib.preview): the
canonical radiological layout (anterior up, patient right on the left).
"""

from __future__ import annotations

import argparse

from DiffusionSegLib.imageio import read_ct, read_labels
from DiffusionSegLib.preview import write_preview


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct", help="CT file or DICOM folder")
    parser.add_argument("labels", help="labelmap (FLARE22 ids) or .seg.nrrd on the CT's grid")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--slices", type=int, nargs="*", help="axial slice indices, LPS order, inferior first (default: 3 across the labelled range)")
    parser.add_argument("--title", default="", help="text above the legend (default: none)")
    args = parser.parse_args()
    ct = read_ct(args.ct)
    write_preview(ct, read_labels(args.labels, ct), args.out, slices=args.slices, title=args.title)


if __name__ == "__main__":
    main()
