"""A procedural abdominal CT phantom for fast, self-contained tests.

The patient is defined in physical LPS coordinates (millimetres; +x patient left, +y posterior,
+z superior) around the physical origin: the physical position of every voxel of the requested grid
(origin + direction @ (index * spacing)) is computed and the anatomy is evaluated there. So one
patient (one seed) rendered on identity, flipped or oblique grids shows the same anatomy at the same
physical places, which is what tests of orientation handling need.

Anatomy: an elliptical body (skin-side fat, muscle wall, visceral fat), spine, ribs, back muscles,
psoas, lung bases, colon and small-bowel loops (unlabelled), and the 13 FLARE22 organs as smooth
ellipsoids and tubes deformed by a seed-driven low-frequency displacement field. Rough, not
photorealistic. Organs are painted in a fixed order; a voxel's label is that of the last organ
painted there, and only labelled organs change the labelmap.

    ct, labels = make_phantom(size=(96, 96, 40), spacing=(4.0, 4.0, 5.0), direction=FLIPPED_DIRECTION, seed=3)
    write_dicom_series(ct, Path("dicom"))
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the NIfTI (RAS-like) case

# Fractions of the body's normalised radius (1 = skin) where the layers end.
_MUSCLE_WALL, _VISCERA = 0.89, 0.83
_AIR = -1000.0
_SLAB_VOXELS = 4_000_000  # evaluate the grid in blocks of slices of about this many voxels


def oblique_direction(angles_deg: tuple[float, float, float]) -> tuple[float, ...]:
    """Rotation about x, then y, then z (degrees), composed as Rz @ Ry @ Rx: a row-major 9-tuple like sitk's."""
    return tuple(float(v) for v in _rotation(angles_deg).ravel())


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------------------------------------
# The grid: index <-> physical, and index boxes around physical regions.

Box = tuple[slice, slice, slice]  # (z, y, x) array order


class _Grid:
    def __init__(self, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]):
        self.size = tuple(int(n) for n in size)  # x, y, z
        self.origin = np.asarray(origin, dtype=np.float64)
        self.index_to_mm = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=np.float64))
        self.mm_to_index = np.linalg.inv(self.index_to_mm)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Index box (z, y, x slices) of the voxels whose centres may lie in the physical box [lo, hi]; None if empty."""
        corners = np.array([[(lo, hi)[(c >> a) & 1][a] for a in range(3)] for c in range(8)])
        index = self.mm_to_index @ (corners - self.origin).T  # 3 x 8, continuous x, y, z indices
        start = np.maximum(np.floor(index.min(axis=1)).astype(int), 0)
        stop = np.minimum(np.floor(index.max(axis=1)).astype(int) + 1, self.size)
        if np.any(stop <= start):
            return None
        return slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0])

    def points(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical x, y, z (mm, float32) of the voxels in `box`, each shaped like the box."""
        k = np.arange(box[0].start, box[0].stop, dtype=np.float64)[:, None, None]
        j = np.arange(box[1].start, box[1].stop, dtype=np.float64)[None, :, None]
        i = np.arange(box[2].start, box[2].stop, dtype=np.float64)[None, None, :]
        m, o = self.index_to_mm, self.origin
        return tuple((o[a] + m[a, 0] * i + m[a, 1] * j + m[a, 2] * k).astype(np.float32) for a in range(3))


def _intersect(a: Box, b: Box | None) -> Box | None:
    if b is None:
        return None
    out = tuple(slice(max(s.start, t.start), min(s.stop, t.stop)) for s, t in zip(a, b, strict=True))
    return None if any(s.stop <= s.start for s in out) else out


def _relative(inner: Box, outer: Box) -> Box:
    return tuple(slice(s.start - t.start, s.stop - t.start) for s, t in zip(inner, outer, strict=True))


# ---------------------------------------------------------------------------------------------
# Shapes. A part's `level` is < 1 inside (a squared normalised distance); organs are unions of parts.


@dataclass
class _Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray  # columns: the ellipsoid's axes in LPS

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1))
        return self.centre - half, self.centre + half

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = (x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2]))
        out = None
        for a in range(3):
            w = (self.rotation[:, a] / self.radii[a]).astype(np.float32)
            u = w[0] * d[0] + w[1] * d[1] + w[2] * d[2]
            out = u * u if out is None else out + u * u
        return out


@dataclass
class _Capsule:
    """A segment swept by a sphere whose radius goes linearly from r0 to r1: one piece of a tube."""

    a: np.ndarray
    b: np.ndarray
    r0: float
    r1: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.r0, self.r1)
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        ab = (self.b - self.a).astype(np.float32)
        d = (x - np.float32(self.a[0]), y - np.float32(self.a[1]), z - np.float32(self.a[2]))
        t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) * np.float32(1 / max(float(ab @ ab), 1e-6)), 0, 1)
        dist2 = sum((d[a] - t * ab[a]) ** 2 for a in range(3))
        r = np.float32(self.r0) + t * np.float32(self.r1 - self.r0)
        return dist2 / (r * r)


def _tube(points: Sequence[Sequence[float]], radii: Sequence[float], subdivisions: int = 3) -> list[_Capsule]:
    """Capsules along a Catmull-Rom spline through `points` (mm), radius interpolated from `radii`."""
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = (np.arange(subdivisions) / subdivisions)[:, None]
    dense, dense_r = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i : i + 4]
        dense.extend(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
        dense_r.extend(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    dense.append(p[-1])
    dense_r.append(r[-1])
    return [_Capsule(dense[i], dense[i + 1], dense_r[i], dense_r[i + 1]) for i in range(len(dense) - 1)]


@dataclass
class _Deformation:
    """A smooth random displacement field: a sum of a few plane waves (mm)."""

    amplitudes: np.ndarray  # M x 3, mm
    wavevectors: np.ndarray  # M x 3, rad / mm
    phases: np.ndarray  # M
    centre: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, centre: Sequence[float], amplitude_mm: float, wavelength_mm: float, waves: int = 3):
        directions = rng.normal(size=(waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = wavelength_mm * rng.uniform(0.7, 1.4, waves)
        amplitudes = rng.normal(0, amplitude_mm / math.sqrt(waves), (waves, 3))
        # Keep the map a smooth bijection: sum |a| |k| well below 1.
        strain = float((np.linalg.norm(amplitudes, axis=1) * 2 * np.pi / wavelengths).sum())
        amplitudes *= min(1.0, 0.6 / max(strain, 1e-9))
        return cls(amplitudes, directions * (2 * np.pi / wavelengths)[:, None], rng.uniform(0, 2 * np.pi, waves), np.asarray(centre, float))

    def margin(self) -> np.ndarray:
        return np.abs(self.amplitudes).sum(axis=0)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dx, dy, dz = (x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2]))
        out = [x.copy(), y.copy(), z.copy()]
        for a, k, phi in zip(self.amplitudes.astype(np.float32), self.wavevectors.astype(np.float32), self.phases, strict=True):
            s = np.sin(k[0] * dx + k[1] * dy + k[2] * dz + np.float32(phi))
            for axis in range(3):
                out[axis] += a[axis] * s
        return tuple(out)


@dataclass
class _Structure:
    """Something painted into the phantom: an organ (label > 0) or unlabelled anatomy (label 0)."""

    name: str
    label: int
    hu: float
    parts: list
    deformation: _Deformation
    cuts: list = field(default_factory=list)  # parts removed from the union
    kind: str = "plain"  # selects the interior pattern in _interior
    extra: dict = field(default_factory=dict)
    box: Box | None = None  # on the current grid
    part_boxes: list = field(default_factory=list)

    def locate(self, grid: _Grid) -> None:
        margin = self.deformation.margin() + 1e-3
        self.part_boxes = [grid.box(lo - margin, hi + margin) for lo, hi in (p.bounds() for p in self.parts + self.cuts)]
        boxes = [b for b in self.part_boxes[: len(self.parts)] if b is not None]
        if not boxes:
            self.box = None
            return
        self.box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))


# ---------------------------------------------------------------------------------------------
# The patient, drawn from the seed (independent of the grid).


@dataclass
class _Body:
    semi_x: float
    semi_anterior: float
    semi_posterior: float
    harmonics: np.ndarray  # cos 2t, sin 2t, cos 3t, sin 3t amplitudes
    texture: list  # (amplitude HU, wavevector 3, phase)
    spine_y: float
    spine_tilt: float  # mm of posterior shift per mm of z
    vertebra_height: float
    vertebra_phase: float


def _build_patient(rng: np.random.Generator) -> tuple[_Body, list[_Structure]]:
    """Body parameters and the list of structures in painting order."""

    def jitter(v: Sequence[float], sd: float) -> np.ndarray:
        return np.asarray(v, dtype=np.float64) + rng.normal(0, sd, len(v))

    def scale(v: Sequence[float], spread: float = 0.1) -> np.ndarray:
        return np.asarray(v, dtype=np.float64) * rng.uniform(1 - spread, 1 + spread, len(v))

    def rot(angles: Sequence[float], sd: float = 6.0) -> np.ndarray:
        return _rotation(jitter(angles, sd))

    def ellipsoid(centre, radii, angles=(0, 0, 0), sd=5.0) -> _Ellipsoid:
        return _Ellipsoid(jitter(centre, sd), scale(radii), rot(angles))

    def tube(points, radii, sd=4.0, subdivisions=3) -> list[_Capsule]:
        return _tube(np.asarray(points, float) + rng.normal(0, sd, (len(points), 3)), scale(radii, 0.08), subdivisions)

    def deform(parts, size_mm: float, strength: float = 0.12) -> _Deformation:
        lo = np.min([p.bounds()[0] for p in parts], axis=0)
        hi = np.max([p.bounds()[1] for p in parts], axis=0)
        return _Deformation.random(rng, (lo + hi) / 2, strength * size_mm, 2.2 * size_mm)

    def structure(name, label, hu, parts, size_mm, strength=0.12, **kw) -> _Structure:
        return _Structure(name, label, hu, parts, deform(parts, size_mm, strength), **kw)

    s = rng.uniform(0.93, 1.07)
    body = _Body(
        semi_x=165 * s * rng.uniform(0.95, 1.05),
        semi_anterior=122 * s * rng.uniform(0.92, 1.08),
        semi_posterior=108 * s,
        harmonics=rng.normal(0, 0.02, 4),
        texture=[(amp, rng.normal(size=3) / np.linalg.norm(rng.normal(size=3)) * 2 * np.pi / wl, rng.uniform(0, 2 * np.pi))
                 for amp, wl in ((4, 110), (3, 80), (3, 60), (2.5, 25), (2, 17), (1.5, 12))],
        spine_y=rng.uniform(44, 54),
        spine_tilt=rng.normal(0, 0.06),
        vertebra_height=rng.uniform(30, 36),
        vertebra_phase=rng.uniform(0, 36),
    )

    # Unlabelled anatomy first; organs are painted over it.
    structures = [
        structure("right lung base", 0, -860, [ellipsoid((-80, 35, 160), (70, 75, 80))], 70, kind="lung"),
        structure("left lung base", 0, -860, [ellipsoid((80, 35, 165), (70, 75, 80))], 70, kind="lung"),
        structure("colon", 0, 20, tube([(-95, 0, -130), (-98, -5, -70), (-92, -25, -38), (-70, -68, -22), (-30, -88, -28), (30, -88, -22),
                                        (80, -62, 0), (102, -15, 8), (100, 10, -40), (95, 5, -130)], [22] * 10), 25, 0.2, kind="colon"),
    ]
    for _ in range(5):  # small-bowel loops in the lower abdomen
        start = np.array([rng.uniform(-55, 55), rng.uniform(-75, -35), rng.uniform(-110, -30)])
        steps = rng.normal(0, 22, (5, 3)) * (1, 0.6, 1)
        points = np.clip(start + np.cumsum(np.vstack([np.zeros(3), steps]), axis=0), (-70, -90, -140), (70, 10, -10))
        structures.append(structure("small bowel", 0, 25, tube(points, [12] * 6, sd=0, subdivisions=2), 20, 0.2, kind="bowel"))

    liver = [ellipsoid((-72, 5, 48), (72, 82, 62), (0, 0, -8)), ellipsoid((-5, -52, 62), (58, 30, 32), (0, 10, -20))]
    right_kidney = ellipsoid((-68, 52, -25), (26, 24, 55), (-8, -12, 30))
    left_kidney = ellipsoid((68, 52, -8), (26, 24, 55), (-8, 12, -30))
    spleen = ellipsoid((84, 48, 54), (27, 58, 46), (0, 0, -35))
    structures += [
        structure("liver", 1, 60, liver, 80),
        structure("spleen", 3, 50, [spleen], 45, 0.1,
                  cuts=[_Ellipsoid(spleen.centre + (-30, -20, 0), np.array([20, 30, 34.0]), _rotation((0, 0, -35)))]),
        structure("right kidney", 2, 32, [right_kidney], 35, 0.1, kind="kidney",
                  cuts=[_Ellipsoid(right_kidney.centre + (24, -10, 0), np.array([11, 10, 16.0]), np.eye(3))]),
        structure("left kidney", 13, 32, [left_kidney], 35, 0.1, kind="kidney",
                  cuts=[_Ellipsoid(left_kidney.centre + (-24, -10, 0), np.array([11, 10, 16.0]), np.eye(3))]),
        structure("right adrenal", 7, 28, [ellipsoid((-38, 40, 42), (4.5, 15, 18), (0, 0, 40), 3),
                                           ellipsoid((-45, 48, 40), (4.5, 12, 16), (0, 0, -20), 3)], 15, 0.1),
        structure("left adrenal", 8, 28, [ellipsoid((40, 36, 48), (4.5, 15, 18), (0, 0, -40), 3),
                                          ellipsoid((47, 44, 46), (4.5, 12, 16), (0, 0, 20), 3)], 15, 0.1),
        structure("stomach", 11, 30, [ellipsoid((52, -32, 48), (42, 36, 44), (10, 0, 20))]
                  + tube([(45, -48, 25), (15, -68, 16), (-12, -62, 18), (-22, -52, 20)], [26, 20, 15, 12]), 40, kind="stomach"),
        structure("esophagus", 10, 35, tube([(4, 14, 130), (8, 8, 100), (18, -4, 78), (32, -18, 62)], [8, 8, 8.5, 9], sd=2), 20, 0.08),
        structure("pancreas", 4, 45, tube([(-36, -18, -2), (-12, -26, 8), (20, -22, 15), (55, 5, 28), (78, 28, 38)],
                                          [16, 12, 11, 10, 8.5]), 25, 0.15),
        structure("duodenum", 12, 35, tube([(-22, -52, 20), (-42, -40, 17), (-55, -18, 6), (-56, -6, -16), (-44, 0, -36), (-10, -4, -44),
                                            (20, -6, -40), (32, -12, -22), (28, -20, -6)], [12, 13, 12, 12, 12, 11, 11, 11, 10]), 20, 0.15,
                  kind="bowel"),
        structure("gallbladder", 9, 10, [ellipsoid((-58, -58, 12), (17, 20, 30), (35, 0, 15))], 20, 0.1),
        structure("inferior vena cava", 6, 110, tube([(-24, 20, -140), (-25, 18, -60), (-24, 16, 10), (-20, 12, 60), (-15, 8, 95)],
                                                     [11, 12, 13, 14, 14], sd=2), 40, 0.06),
        structure("aorta", 5, 190, tube([(8, 24, -140), (12, 20, -60), (14, 20, 20), (12, 26, 80), (8, 32, 140)], [9, 10, 11, 11.5, 12],
                                        sd=2), 40, 0.06),
    ]
    # Interior patterns that depend on physical direction (gas rises anteriorly: smaller y, patient supine).
    for st in structures:
        st.extra["pattern"] = [(rng.normal(size=3).astype(np.float32), np.float32(rng.uniform(0, 2 * np.pi))) for _ in range(2)]
        if st.kind == "stomach":
            st.extra["gas_y"] = st.parts[0].centre[1] - st.parts[0].radii[1] * rng.uniform(0.35, 0.55)
    return body, structures


# ---------------------------------------------------------------------------------------------
# Painting.


def _wave_sum(x, y, z, waves) -> np.ndarray:
    out = np.zeros(x.shape, np.float32)
    for amp, k, phase in waves:
        k = np.asarray(k, np.float32)
        out += np.float32(amp) * np.sin(k[0] * x + k[1] * y + k[2] * z + np.float32(phase))
    return out


def _body_level(x, y, z, body: _Body) -> np.ndarray:
    """Normalised radius of the body's cross-section (1 at the skin; elliptical, flatter posteriorly)."""
    u = x * np.float32(1 / body.semi_x) * (1 - np.float32(0.0004) * z)  # a little wider inferiorly
    v = y * np.where(y < 0, np.float32(1 / body.semi_anterior), np.float32(1 / body.semi_posterior))
    n2 = u * u + v * v + np.float32(1e-6)
    c, s = u * u - v * v, 2 * u * v  # n^2 cos 2t, n^2 sin 2t
    h = body.harmonics.astype(np.float32)
    wobble = 1 + (h[0] * c + h[1] * s) / n2 + (h[2] * u * (u * u - 3 * v * v) + h[3] * v * (3 * u * u - v * v)) / (n2 * np.sqrt(n2))
    return np.sqrt(n2) / wobble


def _paint_musculoskeletal(ct: np.ndarray, grid: _Grid, box: Box, level: np.ndarray, body: _Body) -> None:
    """Back muscles, psoas and spine into `box` (unlabelled)."""
    x, y, z = grid.points(box)
    yc = np.float32(body.spine_y) + np.float32(body.spine_tilt) * z  # vertebral body centre
    inner = level < _MUSCLE_WALL
    # Back muscles (erector spinae) either side of the spinous process, psoas beside the lower vertebrae.
    back = ((np.abs(x) - 34) / 26) ** 2 + ((y - yc - 40) / 18) ** 2 < 1
    psoas_r = np.clip(6 - 0.16 * z, 0, 24)
    psoas = (np.abs(x) - 36 - 0.05 * np.maximum(-z, 0)) ** 2 + (y - yc + 8) ** 2 < psoas_r**2
    ct[(back | psoas) & inner] = 50
    # Vertebrae with discs between them; the posterior arch only at vertebral levels.
    phase = np.mod(z + np.float32(body.vertebra_phase), np.float32(body.vertebra_height))
    disc = phase < 6.5
    vb = (x / 24) ** 2 + ((y - yc) / 19) ** 2
    ct[(vb < 1) & disc] = 90
    bone = (vb < 1) & ~disc
    ct[bone] = np.where(vb[bone] > 0.7, 650, 260)  # cortex, cancellous
    arch = ((x / 17) ** 2 + ((y - yc - 30) / 14) ** 2 < 1) | ((np.abs(x) < 4.5) & (y > yc + 30) & (y < yc + 55))
    arch |= (np.abs(y - yc - 24) < 3.5) & (np.abs(x) < 40) & (phase > 16) & (phase < 22)  # transverse processes
    ct[arch & ~disc & inner] = 520
    ct[(x / 9) ** 2 + ((y - yc - 30) / 8) ** 2 < 1] = 12  # spinal canal


def _paint_ribs(ct: np.ndarray, x, y, z, level: np.ndarray) -> None:
    """Ribs: oblique bands in the muscle wall of the upper abdomen, reaching lower posteriorly and laterally."""
    ring = (level > 0.835) & (level < 0.885)
    if not ring.any():
        return
    x, y, z = x[ring], y[ring], z[ring]
    cos_t = -y / np.sqrt(x * x + y * y + 1)  # 1 anterior, -1 posterior
    lowest = -40 + 70 * np.clip(cos_t, 0, 1)
    band = np.cos((z + 60 * cos_t) * np.float32(2 * np.pi / 30)) > 0.6  # a rib runs higher posteriorly
    values = ct[ring]
    values[band & (z > lowest) & (np.abs(x) > 25)] = 600
    ct[ring] = values


def _interior(st: _Structure, hu: np.ndarray, lvl: np.ndarray, x, y, z) -> None:
    """Intensity pattern inside a structure (in place); `lvl` is the union level (< 1 inside)."""
    (k1, p1), (k2, p2) = st.extra["pattern"]
    mottle = np.sin(np.float32(0.2) * (k1[0] * x + k1[1] * y + k1[2] * z) + p1) + np.sin(np.float32(0.15) * (k2[0] * x + k2[1] * y + k2[2] * z) + p2)
    if st.kind == "stomach":
        lumen = lvl < 0.7
        hu[lumen] = 15 + 6 * mottle[lumen]
        hu[lumen & (y < st.extra["gas_y"])] = -900
        hu[~lumen] = 42  # wall
    elif st.kind in ("bowel", "colon"):
        lumen = lvl < (0.55 if st.kind == "colon" else 0.35)
        gas = lumen & (mottle > (0.2 if st.kind == "colon" else 1.2))
        hu[lumen] = (-40 if st.kind == "colon" else 15) + 20 * mottle[lumen]
        hu[gas] = -920
    elif st.kind == "kidney":
        hu[lvl < 0.4] = 22  # medulla, a little darker than the cortex
    elif st.kind == "lung":
        hu += 25 * mottle


def _paint_structure(ct, labels, grid: _Grid, st: _Structure, slab: Box, body_level: np.ndarray) -> None:
    box = _intersect(slab, st.box)
    if box is None:
        return
    x, y, z = grid.points(box)
    dx, dy, dz = st.deformation(x, y, z)
    lvl = np.full(x.shape, np.inf, np.float32)
    cut = np.zeros(x.shape, bool)
    for i, (part, pbox) in enumerate(zip(st.parts + st.cuts, st.part_boxes, strict=True)):
        pbox = _intersect(box, pbox)
        if pbox is None:
            continue
        r = _relative(pbox, box)
        value = part.level(dx[r], dy[r], dz[r])
        if i < len(st.parts):
            np.minimum(lvl[r], value, out=lvl[r])
        else:
            cut[r] |= value < 1
    inside = (lvl < 1) & ~cut & (body_level[_relative(box, slab)] < _VISCERA)
    if not inside.any():
        return
    hu = np.full(x.shape, st.hu, np.float32)
    _interior(st, hu, lvl, x, y, z)
    ct[box][inside] = hu[inside]
    if st.label:
        labels[box][inside] = st.label


def make_phantom(
    size: tuple[int, int, int] = (96, 96, 40),
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    direction: Sequence[float] | None = None,
    origin: tuple[float, float, float] | None = None,
    seed: int = 0,
    noise_hu: float = 15.0,
    pixel_type: int = sitk.sitkInt16,
) -> tuple[sitk.Image, sitk.Image]:
    """Render the phantom patient `seed` on a grid: (CT in HU, uint8 FLARE22 labelmap), same geometry.

    size, spacing, direction (9 floats, row-major, like sitk; None = identity) and origin are in
    SimpleITK's (x, y, z) order; with origin None the grid's centre is put at the physical origin,
    around which the body is centred, for any direction. The body spans about 200 mm in z with
    the liver and spleen superior and the kidneys lower. Deterministic given the seed; the noise
    (Gaussian, `noise_hu` standard deviation) is drawn per array element, the rest is a function of
    physical position only. Integer pixel types get rounded HU.
    """
    size = tuple(int(n) for n in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be 3 positive integers, got {size}")
    direction = IDENTITY_DIRECTION if direction is None else tuple(float(v) for v in direction)
    if len(direction) != 9:
        raise ValueError(f"direction must have 9 values, got {len(direction)}")
    spacing = tuple(float(s) for s in spacing)
    if origin is None:  # the grid's centre at the physical origin
        m = np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
        origin = -m @ ((np.asarray(size) - 1) / 2)
    origin = tuple(float(o) for o in origin)

    rng = np.random.default_rng(seed)
    body, structures = _build_patient(rng)
    noise_rng = np.random.default_rng([seed, 1])
    grid = _Grid(size, spacing, origin, direction)
    for st in structures:
        st.locate(grid)

    nx, ny, nz = size
    ct = np.empty((nz, ny, nx), np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    step = max(1, _SLAB_VOXELS // (nx * ny))
    spine_lo = np.array([-75.0, -10.0, -1e6])
    spine_hi = np.array([75.0, 150.0, 1e6])
    for k0 in range(0, nz, step):
        slab = (slice(k0, min(k0 + step, nz)), slice(0, ny), slice(0, nx))
        x, y, z = grid.points(slab)
        level = _body_level(x, y, z, body)
        c = ct[slab]
        c[:] = _AIR
        c[level < 1] = -105  # subcutaneous fat
        c[level < _MUSCLE_WALL] = 45  # abdominal wall muscle
        c[level < _VISCERA] = -90  # visceral fat
        spine = _intersect(slab, grid.box(spine_lo, spine_hi))
        if spine is not None:
            r = _relative(spine, slab)
            _paint_musculoskeletal(c[r], grid, spine, level[r], body)
        _paint_ribs(c, x, y, z, level)
        for st in structures:
            _paint_structure(ct, labels, grid, st, slab, level)
        c += np.where(level < 1, _wave_sum(x, y, z, body.texture), np.float32(0))
        if noise_hu > 0:
            c += noise_rng.standard_normal(c.shape, dtype=np.float32) * np.float32(noise_hu)
        if pixel_type not in (sitk.sitkFloat32, sitk.sitkFloat64):
            np.rint(c, out=c)

    image = sitk.Cast(sitk.GetImageFromArray(ct), pixel_type)
    label_image = sitk.GetImageFromArray(labels)
    for im in (image, label_image):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(direction)
    return image, label_image


def write_dicom_series(ct: sitk.Image, folder: Path) -> list[Path]:
    """Write `ct` as a CT DICOM series, one file per slice, that ImageSeriesReader reads back identically.

    Every slice carries its ImagePositionPatient, the volume's ImageOrientationPatient, PixelSpacing,
    SliceThickness, RescaleIntercept/Slope (0/1: stored values are HU, as int16, rounded) and the
    same fresh Study/Series/FrameOfReference UIDs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = np.clip(np.rint(sitk.GetArrayFromImage(ct)), -32768, 32767).astype(np.int16)
    volume = sitk.GetImageFromArray(array)
    volume.CopyInformation(ct)
    d = volume.GetDirection()
    sx, sy, sz = volume.GetSpacing()
    root = f"2.25.{uuid.uuid4().int}"  # a UUID-derived UID root (DICOM PS3.5 B.2), at most 44 characters
    study_uid, series_uid, frame_uid = root + ".1", root + ".2", root + ".3"
    shared = {
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "0008|0020": "20240101",
        "0008|0030": "120000",
        "0008|0021": "20240101",
        "0008|0031": "120000",
        "0008|0060": "CT",
        "0008|103e": "DiffusionSeg phantom",
        "0010|0010": "Phantom^Abdomen",
        "0010|0020": "PHANTOM",
        "0018|0050": f"{sz:.6f}",  # SliceThickness
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": "1",
        "0020|0052": frame_uid,
        # Direction columns are the index axes in LPS: row direction (x axis) then column direction (y axis).
        "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0028|0030": f"{sy:.6f}\\{sx:.6f}",  # PixelSpacing: between rows, then between columns
        "0028|1050": "40",
        "0028|1051": "400",
        "0028|1052": "0",
        "0028|1053": "1",
        "0028|1054": "HU",
    }
    normal = np.asarray(d).reshape(3, 3)[:, 2]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(volume.GetDepth()):
        image = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in shared.items():
            image.SetMetaData(tag, value)
        image.SetMetaData("0008|0018", f"{root}.4.{k + 1}")  # SOPInstanceUID
        image.SetMetaData("0020|0013", str(k + 1))  # InstanceNumber
        image.SetMetaData("0020|0032", "\\".join(f"{p:.6f}" for p in position))
        image.SetMetaData("0020|1041", f"{float(normal @ position):.6f}")  # SliceLocation
        path = folder / f"slice{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        paths.append(path)
    return paths
