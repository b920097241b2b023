"""NIfTI header checks: ITK reads a truncated NIfTI silently (the missing voxels become zeros), so the header is checked first."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np


def nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file is incomplete, or None. ITK reads a truncated NIfTI silently, filling the rest with zeros."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    compressed = name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError):
        return None  # not even a header: ITK reports it
    expected = None
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348 and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix, offset = struct.unpack(endian + "h", header[72:74])[0], struct.unpack(endian + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540 and header[4:7] == b"n+2":
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix, offset = struct.unpack(endian + "h", header[14:16])[0], struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if 1 <= dims[0] <= 7 and bitpix > 0:
            expected = int(offset) + int(np.prod([max(int(d), 1) for d in dims[1:dims[0] + 1]], dtype=np.float64)) * bitpix // 8
        break
    if expected is None:
        return None
    if not compressed:
        size = path.stat().st_size
        return None if size >= expected else f"it holds {size} bytes but its header describes {expected}"
    with open(path, "rb") as f:  # gzip's trailer holds the uncompressed size (mod 2^32): a cheap check first
        f.seek(-4, os.SEEK_END)
        if struct.unpack("<I", f.read(4))[0] == expected % (1 << 32):
            return None
    try:
        with gzip.open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)  # several gzip members (bgzip) or damage: decompress to be sure
    except (OSError, EOFError) as e:
        return f"its compressed data is damaged or cut short: {e}"
    return None if size >= expected else f"it holds {size} bytes of image data but its header describes {expected}"
