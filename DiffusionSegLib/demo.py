"""The bundled sample CT and where `diffusionseg demo` writes its results.

The sample (``sample/abdomen-ct-a.nii.gz``, Apache-2.0, see ``sample/README.md``) lets a new user run
the whole job on a fresh machine, with no CT of their own, and is what Slicer's Sample Data offers.
"""

from __future__ import annotations

from pathlib import Path

from .bridge.sample_data import sample_path

SAMPLE_CT = sample_path()  # one place says where the sample is, for the demo and for Slicer's Sample Data
DEFAULT_OUTPUT_DIR = "diffusionseg-demo"


def demo_outputs(folder: str | Path) -> dict[str, Path]:
    """The three files the demo writes into `folder`: segmentation, preview and statistics."""
    folder = Path(folder).expanduser()
    stem = SAMPLE_CT.name.removesuffix(".nii.gz")
    return {"segmentation": folder / f"{stem}.seg.nrrd", "preview": folder / f"{stem}.png", "statistics": folder / f"{stem}-statistics.json"}
