"""CT volume <-> model space: the one preprocessing path shared by pretraining, fine-tuning and inference.

Model space is a stack of axial slices, N x S x S, in [-1, 1]:

1. Canonical orientation: the image axes are permuted and flipped (no interpolation) so that the
   slice columns run to the patient's left, rows to posterior and slices to superior (LPS). Whatever
   the file's direction matrix, row 0 is anterior and column 0 is the patient's right, as in
   radiological display. Oblique images keep their own slice planes (the nearest LPS permutation),
   so every model slice is exactly one slice of the input and annotated slices map one to one.
2. Unified in-plane spacing and model size in a single linear interpolation: each slice is resampled
   onto an S x S grid of spacing `spacing_mm` centred on the image, padding with air. The slice
   spacing is kept: a 2D model never interpolates between slices, and resampling through-plane would
   smear annotated slices into unannotated ones.
3. Per-scan intensity normalisation: clip to the 0.5 and 99.5 percentiles of the scan (values below
   -1024 HU, scanner padding, count as air), scale to [-1, 1].

`to_image_space` undoes steps 1-2 by resampling through physical space onto the input grid, so the
result has the input's size, spacing, origin and direction exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from .orientation import canonical_axes

# Above this many voxels the percentiles come from an evenly strided subsample: same estimate to about
# 1e-4 in quantile, without sorting a 600-slice volume.
_PERCENTILE_SAMPLE = 16_000_000


@dataclass(frozen=True)
class PreprocessingSpec:
    """How a model sees a CT; stored in every model folder so training and inference agree."""

    size: int = 256
    spacing_mm: float = 1.6  # 256 x 1.6 mm = 41 cm field of view, a typical abdominal FOV
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    # Scanners fill the corners outside the reconstruction circle with -2048 or -3024; those are not
    # tissue and would otherwise drag the low percentile far below air.
    air_floor_hu: float = -1024.0
    orientation: str = "LPS"

    def __post_init__(self) -> None:
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        if self.size < 8 or self.spacing_mm <= 0:
            raise ValueError(f"size must be >= 8 and spacing_mm > 0, got {self.size}, {self.spacing_mm}")
        if self.orientation != "LPS":
            raise ValueError(f"only LPS canonical orientation is supported, got {self.orientation!r}")

    @property
    def field_of_view_mm(self) -> float:
        return self.size * self.spacing_mm

    @classmethod
    def for_size(cls, size: int, field_of_view_mm: float = 409.6) -> PreprocessingSpec:
        """A spec that keeps the default field of view at another model size (e.g. 64 for tests)."""
        return cls(size=size, spacing_mm=field_of_view_mm / size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clip_percentiles"] = list(self.clip_percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessingSpec:
        d = dict(d)
        d["clip_percentiles"] = tuple(d.get("clip_percentiles", (0.5, 99.5)))
        return cls(**d)


@dataclass
class ModelSpaceVolume:
    """A CT in model space plus everything needed to map results back onto the input grid."""

    slices: np.ndarray  # float32, N x S x S, in [-1, 1]
    grid: Grid  # model-space geometry (S, S, N)
    reference: Grid  # the input's geometry
    slice_axis: int  # input index axis that runs along the model's slices
    slice_flipped: bool  # model slice k is input slice (n - 1 - k) along slice_axis
    clip_hu: tuple[float, float]

    @property
    def num_slices(self) -> int:
        return self.slices.shape[0]

    def model_slice(self, input_index: int) -> int:
        """Model slice holding input slice `input_index` along `slice_axis`."""
        return self.num_slices - 1 - input_index if self.slice_flipped else input_index


@dataclass(frozen=True)
class Grid:
    """Voxel grid geometry (SimpleITK order: x, y, z), held without any voxels."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def resample(self, image: sitk.Image, interpolator: int, default: float, pixel_type: int) -> sitk.Image:
        """`image` resampled through physical space onto this grid."""
        f = sitk.ResampleImageFilter()
        f.SetSize([int(s) for s in self.size])
        f.SetOutputSpacing(self.spacing)
        f.SetOutputOrigin(self.origin)
        f.SetOutputDirection(self.direction)
        f.SetInterpolator(interpolator)
        f.SetDefaultPixelValue(default)
        f.SetOutputPixelType(pixel_type)
        return f.Execute(image)

    def wrap(self, array: np.ndarray) -> sitk.Image:
        """A z, y, x array as an image on this grid."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def model_grid(reference: Grid, spec: PreprocessingSpec) -> tuple[Grid, int, bool]:
    """The S x S x N model-space grid for `reference`, centred on it, slices coinciding with its slices."""
    axis_for, signs = canonical_axes(reference.direction)
    d = np.asarray(reference.direction, dtype=float).reshape(3, 3)
    size = np.asarray(reference.size)
    spacing = np.asarray(reference.spacing)
    new_d = np.stack([signs[w] * d[:, axis_for[w]] for w in range(3)], axis=1)

    slice_axis = axis_for[2]
    n = int(size[slice_axis])
    new_spacing = np.array([spec.spacing_mm, spec.spacing_mm, spacing[slice_axis]])
    new_size = np.array([spec.size, spec.size, n])

    centre = np.asarray(reference.origin) + d @ ((size - 1) / 2.0 * spacing)
    new_origin = centre - new_d @ ((new_size - 1) / 2.0 * new_spacing)
    grid = Grid(
        size=tuple(int(s) for s in new_size),
        spacing=tuple(float(s) for s in new_spacing),
        origin=tuple(float(v) for v in new_origin),
        direction=tuple(float(v) for v in new_d.ravel()),
    )
    return grid, slice_axis, signs[2] < 0


def percentile_window(ct: sitk.Image, spec: PreprocessingSpec) -> tuple[float, float]:
    """The scan's intensity percentiles (HU, floored at air), from all voxels or an even subsample."""
    voxels = sitk.GetArrayViewFromImage(ct).ravel()
    if voxels.size > _PERCENTILE_SAMPLE:
        voxels = voxels[:: voxels.size // _PERCENTILE_SAMPLE + 1]
    low, high = np.percentile(np.maximum(voxels, spec.air_floor_hu), spec.clip_percentiles)
    if high <= low:  # a constant image; keep the scale finite
        high = low + 1.0
    return float(low), float(high)


def to_model_space(ct: sitk.Image, spec: PreprocessingSpec) -> ModelSpaceVolume:
    """Canonical orientation, unified spacing, model size and [-1, 1] scaling of a CT (see module doc)."""
    low, high = percentile_window(ct, spec)
    reference = Grid.of(ct)
    grid, slice_axis, flipped = model_grid(reference, spec)
    # Pad with the low clip value so the field of view outside the scan reads as air (-1).
    resampled = grid.resample(ct, sitk.sitkLinear, low, sitk.sitkFloat32)
    slices = sitk.GetArrayFromImage(resampled)  # (N, S, S): slice, row (posterior), column (left)
    np.clip(slices, low, high, out=slices)
    slices -= low
    slices *= 2.0 / (high - low)
    slices -= 1.0
    return ModelSpaceVolume(
        slices=slices,
        grid=grid,
        reference=reference,
        slice_axis=slice_axis,
        slice_flipped=flipped,
        clip_hu=(low, high),
    )


def labels_to_model_space(labels: sitk.Image, volume: ModelSpaceVolume) -> np.ndarray:
    """A labelmap on the input grid as uint8 N x S x S model-space slices (nearest neighbour)."""
    resampled = volume.grid.resample(labels, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled)


def to_image_space(labels: np.ndarray, volume: ModelSpaceVolume) -> sitk.Image:
    """Model-space labels (N x S x S) as a uint8 labelmap on the input grid (nearest neighbour)."""
    model_labels = volume.grid.wrap(np.ascontiguousarray(labels, dtype=np.uint8))
    return volume.reference.resample(model_labels, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
