"""A procedural abdominal CT phantom: smooth deformed organs with realistic HU and noise, on any grid.

The anatomy is defined in patient (LPS) coordinates, in millimetres, around the physical origin: each
voxel's physical position is computed from the grid's origin, spacing and direction, and the organs
are evaluated there. So one patient rendered on identity, flipped or oblique grids shows the same
anatomy at the same physical places, which is what orientation tests need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

FLIPPED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the NIfTI (RAS-like) case


def oblique_direction(angles_deg: tuple[float, float, float]) -> tuple[float, ...]:
    """Rotation about x, then y, then z (degrees) as a row-major 3 x 3 direction matrix."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


@dataclass(frozen=True)
class Blob:
    """An ellipsoid (mm, LPS) whose surface is perturbed by low-order harmonics."""

    label: int
    hu: float
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    wobble: float = 0.15  # relative amplitude of the surface deformation


# Centres in mm: +x patient left, +y posterior, +z superior; the body spans z in about [-100, 100].
ORGAN_BLOBS = (
    Blob(1, 60, (-65, -10, 55), (65, 75, 60)),  # liver: right, anterior-superior
    Blob(3, 50, (85, 35, 50), (28, 40, 45)),  # spleen: left posterior-lateral
    Blob(11, 35, (45, -40, 40), (40, 32, 40)),  # stomach: left anterior
    Blob(9, 10, (-45, -50, 15), (15, 18, 25)),  # gallbladder: under the liver
    Blob(2, 30, (-60, 45, -10), (25, 28, 50)),  # right kidney
    Blob(13, 30, (60, 45, 0), (25, 28, 50)),  # left kidney
    Blob(7, 25, (-45, 35, 48), (10, 12, 18)),  # right adrenal: above the right kidney
    Blob(8, 25, (45, 30, 55), (10, 12, 18)),  # left adrenal
    Blob(4, 45, (5, 5, 20), (60, 14, 16)),  # pancreas: across the midline
    Blob(12, 35, (-25, 0, -15), (28, 20, 40)),  # duodenum: right of the pancreas head
)
TUBES = (  # (label, hu, x, y, radius, z range): vessels and esophagus run along z
    (5, 200, 18, 30, 12, (-100, 100)),  # aorta: left-anterior of the spine, contrast-enhanced
    (6, 150, -22, 25, 12, (-100, 80)),  # inferior vena cava: right-anterior of the spine
    (10, 30, 12, 15, 8, (60, 100)),  # esophagus: upper slices only, beside the aorta
)


def _harmonics(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    return rng.normal(0, amplitude, size=(3, 4))


def _perturbed(theta: np.ndarray, phi: np.ndarray, c: np.ndarray) -> np.ndarray:
    """1 + a smooth random function on the sphere (low-order harmonics in the angles)."""
    return (
        1
        + c[0, 0] * np.cos(2 * theta) + c[0, 1] * np.sin(2 * theta)
        + c[1, 0] * np.cos(3 * theta + 1.0) + c[1, 1] * np.sin(phi * 2)
        + c[2, 0] * np.cos(phi) * np.cos(theta) + c[2, 1] * np.sin(theta + phi)
    )


def _physical_points(size, spacing, origin, direction) -> np.ndarray:
    """z, y, x arrays of LPS coordinates (mm) of every voxel: shape (3, nz, ny, nx)."""
    nx, ny, nz = size
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([i * spacing[0], j * spacing[1], k * spacing[2]]).reshape(3, -1).astype(np.float32)
    points = np.asarray(direction, dtype=np.float32).reshape(3, 3) @ index + np.asarray(origin, dtype=np.float32)[:, None]
    return points.reshape(3, nz, ny, nx)


def make_phantom(
    size: tuple[int, int, int] = (96, 96, 40),
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    direction: Sequence[float] | None = None,
    origin: tuple[float, float, float] | None = None,
    seed: int = 0,
    noise_hu: float = 15.0,
    pixel_type: int = sitk.sitkInt16,
) -> tuple[sitk.Image, sitk.Image]:
    """(CT in HU, uint8 FLARE22 labelmap) on the requested grid; centred on the body when origin is None."""
    direction = tuple(float(v) for v in (direction or (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    d = np.asarray(direction).reshape(3, 3)
    if origin is None:  # put the grid's centre at the physical origin, for any direction
        origin = tuple(float(v) for v in -d @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing)))
    rng = np.random.default_rng(seed)
    x, y, z = _physical_points(size, spacing, origin, direction)

    # Body: an elliptical cylinder with a fat layer; outside is air.
    body_shape = _harmonics(rng, 0.03)
    theta = np.arctan2(y, x)
    body_r = np.sqrt((x / 165) ** 2 + (y / 120) ** 2) / _perturbed(theta, np.zeros_like(theta), body_shape)
    ct = np.full(x.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(x.shape, dtype=np.uint8)
    ct[body_r < 1.0] = -100.0  # subcutaneous fat
    ct[body_r < 0.93] = 45.0  # abdominal wall muscle
    ct[body_r < 0.85] = -60.0  # visceral fat between the organs
    # Spine: vertebral body and canal, posterior midline.
    spine = ((x / 22) ** 2 + ((y - 75) / 20) ** 2) < 1
    ct[spine] = 550.0
    ct[(x / 8) ** 2 + ((y - 100) / 8) ** 2 < 1] = 20.0

    for blob in ORGAN_BLOBS:
        c = np.asarray(blob.centre) + rng.normal(0, 3, 3)
        radii = np.asarray(blob.radii) * rng.uniform(0.9, 1.1, 3)
        dx, dy, dz = (x - c[0]) / radii[0], (y - c[1]) / radii[1], (z - c[2]) / radii[2]
        r = np.sqrt(dx**2 + dy**2 + dz**2)
        shape = _perturbed(np.arctan2(dy, dx), np.arctan2(dz, np.hypot(dx, dy)), _harmonics(rng, blob.wobble))
        inside = (r < shape) & (body_r < 0.85)
        ct[inside] = blob.hu
        labels[inside] = blob.label
        if blob.label == 11:  # gas in the stomach's anterior part
            gas = inside & (dy < -0.4)
            ct[gas] = -900.0
    for label, hu, cx, cy, radius, (z0, z1) in TUBES:
        bend = rng.normal(0, 0.03, 2)
        inside = (((x - cx - bend[0] * z) ** 2 + (y - cy - bend[1] * z) ** 2) < radius**2) & (z >= z0) & (z <= z1) & (body_r < 0.85)
        ct[inside] = hu
        labels[inside] = label

    # Mild smooth texture within tissue, then scanner noise.
    texture = 8 * np.sin(x / 17 + rng.uniform(0, 6)) * np.cos(y / 13 + rng.uniform(0, 6)) * np.sin(z / 19)
    ct += np.where(body_r < 1.0, texture, 0).astype(np.float32)
    ct += rng.normal(0, noise_hu, ct.shape).astype(np.float32)

    image = sitk.Cast(sitk.GetImageFromArray(np.round(ct)), pixel_type)
    label_image = sitk.GetImageFromArray(labels)
    for im in (image, label_image):
        im.SetSpacing([float(s) for s in spacing])
        im.SetOrigin([float(o) for o in origin])
        im.SetDirection(direction)
    return image, label_image


def write_dicom_series(ct: sitk.Image, folder: Path) -> list[Path]:
    """Write `ct` as a CT DICOM series (one file per slice) that ImageSeriesReader reads back identically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct = sitk.Cast(ct, sitk.sitkInt16)
    direction = ct.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(abs(hash(direction)) % 10**12)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    paths = []
    for k in range(ct.GetDepth()):
        slice_image = ct[:, :, k]
        position = ct.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": orientation,
            "0028|0030": f"{ct.GetSpacing()[1]:.6f}\\{ct.GetSpacing()[0]:.6f}",
            "0018|0050": f"{ct.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
            "0010|0010": "Phantom^Abdomen",
            "0010|0020": "PHANTOM",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        path = folder / f"slice{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_image)
        paths.append(path)
    return paths
