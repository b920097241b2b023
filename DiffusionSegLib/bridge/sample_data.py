"""The bundled sample CT, registered in 3D Slicer's Sample Data module so that Load sample -> Segment works.

The sample ships inside the package (``DiffusionSegLib/sample/``, with its licence); Sample Data copies it
from a ``file:`` URI into its cache and loads it as a volume. Its SHA-256 goes with it, so a cached copy of
an older sample is replaced when the package brings a new one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample"
SAMPLE_FILE = "abdomen-ct-a.nii.gz"
SAMPLE_NAME = "AbdomenCT-A"  # the node name and the button text in Sample Data
CATEGORY = "DiffusionSeg"


def sample_path() -> Path:
    return SAMPLE_DIR / SAMPLE_FILE


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_data_source(thumbnail: str | Path | None = None) -> dict | None:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``; None without the sample."""
    path = sample_path()
    if not path.is_file():
        return None  # a build without the sample: nothing to offer
    source = {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": path.resolve().as_uri(),
        "fileNames": SAMPLE_FILE,
        "nodeNames": SAMPLE_NAME,
        "loadFileTypes": "VolumeFile",
        "checksums": f"SHA256:{sha256(path)}",
    }
    if thumbnail is not None:
        source["thumbnailFileName"] = str(thumbnail)
    return source
