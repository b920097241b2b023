"""Voxel grids: how a labelmap's grid differs from a CT's, and placing a cropped segmentation on the CT's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

GEOMETRY_TOLERANCE = 1e-4  # relative to the voxel spacing; direction cosines absolutely


def size_text(image: sitk.Image) -> str:
    return " x ".join(map(str, image.GetSize()))


def grid_differences(a: sitk.Image, b: sitk.Image) -> list[str]:
    """How grid `a` differs from grid `b`, in words; empty when they agree within tolerance."""
    differences = []
    if a.GetSize() != b.GetSize():
        differences.append(f"size {size_text(a)} vs {size_text(b)}")
    tol = GEOMETRY_TOLERANCE * min(b.GetSpacing())
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=GEOMETRY_TOLERANCE, atol=0):
        differences.append(f"spacing {' x '.join(f'{s:g}' for s in a.GetSpacing())} vs {' x '.join(f'{s:g}' for s in b.GetSpacing())} mm")
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=max(tol, 1e-3)):
        differences.append(f"origin ({', '.join(f'{o:.2f}' for o in a.GetOrigin())}) vs ({', '.join(f'{o:.2f}' for o in b.GetOrigin())}) mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=GEOMETRY_TOLERANCE):
        differences.append(f"direction ({', '.join(f'{d:.3g}' for d in a.GetDirection())}) vs ({', '.join(f'{d:.3g}' for d in b.GetDirection())})")
    return differences


def different_grid(path: Path, labels: sitk.Image, reference: sitk.Image, image_name: str | None, detail: str = "") -> InputError:
    differences = "; ".join(grid_differences(labels, reference)) or "the labels do not fit on the image's voxel grid"
    return InputError(
        f"labels {path} are on a different grid than {'image ' + image_name if image_name else 'the CT'} ({differences}){detail}; "
        "check that the labels belong to this CT, or paint them on this CT in Slicer and save again"
    )


def onto_reference(labels: sitk.Image, reference: sitk.Image, path: Path, image_name: str | None) -> sitk.Image:
    """Segmentation labels saved on a crop (or extension) of the reference's voxel lattice, placed on the reference grid.

    Slicer may save a .seg.nrrd cropped to the painted extent; that is fine as long as its voxels coincide
    with the CT's voxels and every labelled voxel lies inside the CT.
    """
    same_axes = np.allclose(labels.GetSpacing(), reference.GetSpacing(), rtol=GEOMETRY_TOLERANCE, atol=0) and np.allclose(
        labels.GetDirection(), reference.GetDirection(), rtol=0, atol=GEOMETRY_TOLERANCE
    )
    if not same_axes:
        raise different_grid(path, labels, reference, image_name)
    start = np.array(reference.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
    if not np.allclose(start, np.round(start), rtol=0, atol=1e-3):
        raise different_grid(path, labels, reference, image_name, f"; its voxels are shifted by a fraction of a voxel ({start % 1})")
    start = np.round(start).astype(int)
    array = sitk.GetArrayViewFromImage(labels)  # k, j, i
    size = np.array(labels.GetSize())
    lo = np.maximum(0, -start)  # the part of the labels inside the reference, in label indices (i, j, k)
    hi = np.minimum(size, np.array(reference.GetSize()) - start)
    inside = np.zeros(array.shape, dtype=bool)
    if np.all(hi > lo):
        inside[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = True
    outside = int(np.count_nonzero(array[~inside]))
    if outside:
        raise different_grid(path, labels, reference, image_name, f"; {outside} labelled voxels lie outside the image")
    result = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    if np.all(hi > lo):
        dst_lo, dst_hi = start + lo, start + hi
        result[dst_lo[2]:dst_hi[2], dst_lo[1]:dst_hi[1], dst_lo[0]:dst_hi[0]] = array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    placed = sitk.GetImageFromArray(result)
    placed.CopyInformation(reference)
    return placed
