"""Independent evaluation phantoms: abdominal CT cases drawn apart from the training generators.

Used ONLY to evaluate models (never to train or tune them), so that a score on these cases says something about
generalization to anatomy, scanners and contrast timing the training phantoms never showed. They were written
without reading the project's own generators, and differ from a "per-organ constant + texture" model on purpose:

* anatomy is a patient in a scanner: a superellipse body (fat, muscle wall, ribs, spine, paraspinal/psoas
  muscles), a diaphragm with two domes, lungs and a heart above it, and below it a liver made of anisotropic
  Gaussian lobes (right lobe, segment IV, a left lobe that may cross the midline, caudate, sometimes a Riedel
  lobe), gallbladder, spleen, kidneys with cortex/medulla/sinus, pancreas, stomach (air-fluid level), colon and
  small-bowel loops (some gas-filled), aorta, IVC, portal vein into the hilum with intrahepatic portal and hepatic
  veins; organs may be missing (splenectomy, nephrectomy, cholecystectomy with clips), and some abdomens are
  mostly homogeneous soft tissue or ascites within tens of HU of the liver (the failure the project saw);
* intensities follow a contrast phase (non-contrast, arterial, portal-venous, delayed) with physiologic relations
  between tissues (arterial: bright aorta and renal cortex, dim liver; portal: bright portal vein and liver;
  delayed: excreted contrast in the renal pelvis), steatosis, and lesions whose look depends on phase (cysts,
  rim-enhancing or hypervascular metastases, HCC with arterial wash-in and washout/capsule);
* partial volume comes from the signed distance of every surface measured in voxel units (thick slices blur
  oblique surfaces the way a slice profile does); the scanner adds an in-plane point-spread function, noise with
  a CT-like (ramp x apodization) power spectrum that may be correlated across thin slices, cupping and smooth
  bias, streaks from clips/arms, a table and sometimes padding outside the reconstruction circle;
* cases are stored in varied orientations (LPS-like, RAS, flipped slice order, transposed in-plane axes) with
  truthful affines, varied fields of view and slice thicknesses.

``python benchmarks/independent_phantoms.py OUT --n N --seed S [--shape D H W]`` writes LiTS-style
``volume-i.nii.gz`` / ``segmentation-i.nii.gz`` pairs (labels 0 background, 1 liver, 2 lesion).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from nibabel import orientations
from scipy import fft as sp_fft
from scipy import ndimage

from mixsup.scan import to_int16_hu, write_nifti

PHASES = ("non-contrast", "arterial", "portal", "delayed")
LESION_TYPES = ("cyst", "met-hypo", "met-hyper", "hcc")
MIMICS = ("none", "homogeneous", "splenomegaly", "ascites")

#: Stored voxel orders (nibabel axis codes) a case may be written in; the first is DICOM-like LPS.
STORAGE_AXCODES = (
    ("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("R", "P", "I"), ("L", "P", "I"), ("P", "L", "S"),
    ("A", "R", "S"), ("S", "P", "L"),
)

#: Unenhanced HU range and the enhancement range (HU added) per phase, before the case's dose factor.
TISSUES: dict[str, tuple[tuple[float, float], dict[str, tuple[float, float]]]] = {
    "fat": ((-120, -85), {}),
    "muscle": ((40, 58), {"arterial": (4, 12), "portal": (8, 20), "delayed": (6, 14)}),
    "liver": ((50, 68), {"arterial": (6, 20), "portal": (45, 75), "delayed": (28, 45)}),
    "spleen": ((40, 54), {"arterial": (50, 90), "portal": (60, 85), "delayed": (35, 55)}),
    "cortex": ((28, 40), {"arterial": (130, 200), "portal": (120, 170), "delayed": (70, 110)}),
    "medulla": ((25, 35), {"arterial": (15, 45), "portal": (110, 160), "delayed": (90, 140)}),
    "urine": ((0, 15), {"delayed": (250, 700)}),
    "pancreas": ((35, 50), {"arterial": (60, 100), "portal": (50, 80), "delayed": (30, 50)}),
    "artery": ((35, 50), {"arterial": (220, 420), "portal": (110, 170), "delayed": (70, 100)}),
    "ivc": ((32, 45), {"arterial": (10, 60), "portal": (100, 150), "delayed": (70, 100)}),
    "portal_vein": ((35, 48), {"arterial": (40, 100), "portal": (130, 190), "delayed": (70, 100)}),
    "hepatic_vein": ((32, 45), {"arterial": (0, 20), "portal": (110, 160), "delayed": (70, 100)}),
    "bowel_wall": ((35, 50), {"arterial": (40, 80), "portal": (50, 80), "delayed": (30, 50)}),
    "myocardium": ((35, 50), {"arterial": (80, 120), "portal": (60, 90), "delayed": (40, 60)}),
    "bile": ((0, 20), {}),
    "fluid": ((0, 25), {}),
    "cancellous": ((140, 280), {}),
    "cortical": ((600, 1100), {}),
    "disc": ((60, 100), {}),
    "lung": ((-880, -760), {}),
    "csf": ((0, 15), {}),
    "mesentery": ((15, 40), {"arterial": (5, 20), "portal": (10, 30), "delayed": (5, 20)}),
}

AIR = -1000.0


# ---------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """The canonical generation grid ``[D, H, W]`` (inferior->superior, anterior->posterior, right->left).

    World (scanner RAS) coordinates are axis aligned with the grid; the patient may be shifted and rolled inside
    it, so organ shapes are written in *patient* coordinates ``u`` (towards the patient's right), ``v``
    (anterior) and ``z`` (superior, 0 at the top of the right diaphragm dome).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    z0: float  # patient z of slice 0
    centre: tuple[float, float]  # scanner (x, y) of the patient's axis, relative to the grid centre
    roll: float  # radians

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scanner coordinates of the grid: z (D,), y (H,) decreasing, x (W,) decreasing, centred in-plane."""
        d, h, w = self.shape
        sz, sy, sx = self.spacing
        return (self.z0 + sz * np.arange(d), sy * ((h - 1) / 2 - np.arange(h)), sx * ((w - 1) / 2 - np.arange(w)))

    def patient(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient coordinates on a box of the grid: u, v of shape (1, h, w) and z of shape (d, 1, 1)."""
        z, y, x = self.axes()
        dx = x[sl[2]][None, :] - self.centre[0]
        dy = y[sl[1]][:, None] - self.centre[1]
        c, s = np.cos(self.roll), np.sin(self.roll)
        u = (c * dx - s * dy).astype(np.float32)[None]
        v = (s * dx + c * dy).astype(np.float32)[None]
        return u, v, z[sl[0]].astype(np.float32)[:, None, None]

    def box(self, lo: Sequence[float], hi: Sequence[float], margin_vox: int = 3) -> tuple[slice, ...] | None:
        """Index slices covering the patient-space box [lo, hi] (u, v, z) plus a margin; None when outside."""
        z, y, x = self.axes()
        c, s = np.cos(self.roll), np.sin(self.roll)
        corners = np.array([(u, v) for u in (lo[0], hi[0]) for v in (lo[1], hi[1])])
        xs = c * corners[:, 0] + s * corners[:, 1] + self.centre[0]
        ys = -s * corners[:, 0] + c * corners[:, 1] + self.centre[1]
        out = []
        for axis, (coords, a, b) in enumerate(((z, lo[2], hi[2]), (y, ys.min(), ys.max()), (x, xs.min(), xs.max()))):
            step = self.spacing[axis]
            first = coords[0]
            sign = 1.0 if axis == 0 else -1.0
            i0, i1 = sorted(((a - first) * sign / step, (b - first) * sign / step))
            start = max(int(np.floor(i0)) - margin_vox, 0)
            stop = min(int(np.ceil(i1)) + margin_vox + 1, self.shape[axis])
            if stop - start < 1:
                return None
            out.append(slice(start, stop))
        return tuple(out)

    def affine(self) -> np.ndarray:
        """Voxel -> scanner RAS mm for the canonical array (d, h, w)."""
        sz, sy, sx = self.spacing
        z, y, x = self.axes()
        aff = np.zeros((4, 4))
        aff[:3, :3] = [[0, 0, -sx], [0, -sy, 0], [sz, 0, 0]]
        aff[:3, 3] = (x[0], y[0], z[0])
        aff[3, 3] = 1
        return aff


@dataclass
class Local:
    """What a shape's signed-distance function sees: patient coordinates of one grid box."""

    grid: Grid
    sl: tuple[slice, slice, slice]
    u: np.ndarray
    v: np.ndarray
    z: np.ndarray


SdfFn = Callable[[Local], np.ndarray]


@dataclass(frozen=True)
class Shape:
    """A solid: a patient-space bounding box and a signed distance in mm (positive inside)."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    sdf: SdfFn

    def __and__(self, other: Shape) -> Shape:
        lo = tuple(max(a, b) for a, b in zip(self.lo, other.lo))
        hi = tuple(min(a, b) for a, b in zip(self.hi, other.hi))
        return Shape(lo, hi, lambda loc: np.minimum(self.sdf(loc), other.sdf(loc)))

    def __sub__(self, other: Shape) -> Shape:
        return Shape(self.lo, self.hi, lambda loc: np.minimum(self.sdf(loc), -other.sdf(loc)))

    def grow(self, mm: float) -> Shape:
        """The solid offset outwards by ``mm`` (inwards when negative)."""
        lo = tuple(a - max(mm, 0) for a in self.lo)
        hi = tuple(a + max(mm, 0) for a in self.hi)
        return Shape(lo, hi, lambda loc: self.sdf(loc) + mm)


EVERYWHERE = ((-1e4, -1e4, -1e4), (1e4, 1e4, 1e4))


def rotation(yaw: float = 0.0, pitch: float = 0.0, tilt: float = 0.0) -> np.ndarray:
    """A rotation about z (yaw), then about u (pitch), then about v (tilt), as a 3x3 matrix."""
    cz, sz_ = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(tilt), np.sin(tilt)
    rz = np.array([[cz, -sz_, 0], [sz_, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx @ rz


def ellipsoid(centre: Sequence[float], radii: Sequence[float], rot: np.ndarray | None = None) -> Shape:
    """An ellipsoid with the Quilez distance approximation (close to exact near the surface)."""
    c = np.asarray(centre, dtype=np.float32)
    r = np.asarray(radii, dtype=np.float32)
    m = np.eye(3, dtype=np.float32) if rot is None else np.asarray(rot, dtype=np.float32)
    ext = float(r.max())

    def sdf(loc: Local) -> np.ndarray:
        d = (loc.u - c[0], loc.v - c[1], loc.z - c[2])
        p = [m[0, i] * d[0] + m[1, i] * d[1] + m[2, i] * d[2] for i in range(3)]  # m.T @ d
        k0 = np.sqrt(sum((p[i] / r[i]) ** 2 for i in range(3)))
        k1 = np.sqrt(sum((p[i] / r[i] ** 2) ** 2 for i in range(3)))
        return -(k0 * (k0 - 1) / np.maximum(k1, 1e-6))

    return Shape(tuple(c - ext), tuple(c + ext), sdf)


def tube(points: np.ndarray, radii: Sequence[float] | float) -> Shape:
    """A tube along a polyline whose radius varies linearly per segment; each segment is evaluated in its own box.

    Outside every segment's box the distance is clamped at a few voxels outside, which keeps partial volume
    exact near the surface and the cost proportional to the tube's volume rather than its bounding box.
    """
    pts = np.asarray(points, dtype=np.float32)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float32), (len(pts),))
    lo = tuple(pts.min(axis=0) - rad.max())
    hi = tuple(pts.max(axis=0) + rad.max())

    def sdf(loc: Local) -> np.ndarray:
        floor = -3.0 * max(loc.grid.spacing)
        shape = np.broadcast_shapes(loc.u.shape, loc.v.shape, loc.z.shape)
        out = np.full(shape, floor, dtype=np.float32)
        for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            r = max(ra, rb)
            sub = loc.grid.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            rel = _relative(sub, loc.sl)
            if rel is None:
                continue
            u, v, z = loc.u[:, rel[1], rel[2]], loc.v[:, rel[1], rel[2]], loc.z[rel[0]]
            ab = b - a
            t = np.clip(((u - a[0]) * ab[0] + (v - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(ab @ ab, 1e-6), 0, 1)
            dist = np.sqrt((u - a[0] - t * ab[0]) ** 2 + (v - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)
            np.maximum(out[rel], ra + (rb - ra) * t - dist, out=out[rel])
        return out

    return Shape(lo, hi, sdf)


def _relative(sub: tuple[slice, ...] | None, outer: tuple[slice, ...]) -> tuple[slice, ...] | None:
    """``sub`` (grid indices) intersected with ``outer`` and expressed relative to ``outer``; None if disjoint."""
    if sub is None:
        return None
    rel = []
    for s, o in zip(sub, outer):
        start, stop = max(s.start, o.start), min(s.stop, o.stop)
        if stop <= start:
            return None
        rel.append(slice(start - o.start, stop - o.start))
    return tuple(rel)


def gaussian_lobes(centres: np.ndarray, sigmas: np.ndarray, rots: list[np.ndarray], weights: np.ndarray,
                   wobble: Callable[[Local], np.ndarray]) -> Shape:
    """The solid ``sum_i w_i exp(-q_i/2) > 1/2`` of anisotropic Gaussians, distance by its log-gradient.

    A sum of blobs gives the smooth, bulging, tapering outline of a liver (and a thin inferior tip where the
    last lobe fades) that no union of ellipsoids or lofted contour would; ``wobble`` perturbs its log (mm-free).
    """
    lo = tuple((centres - 2.6 * sigmas.max(axis=1, keepdims=True)).min(axis=0))
    hi = tuple((centres + 2.6 * sigmas.max(axis=1, keepdims=True)).max(axis=0))

    def sdf(loc: Local) -> np.ndarray:
        total = 0.0
        for c, s, m, w in zip(centres, sigmas, rots, weights):
            d = (loc.u - c[0], loc.v - c[1], loc.z - c[2])
            q = sum(((m[0, i] * d[0] + m[1, i] * d[1] + m[2, i] * d[2]) / s[i]) ** 2 for i in range(3))
            total = total + w * np.exp(-0.5 * q)
        g = (np.log(np.maximum(total, 1e-12)) + np.log(2.0) + wobble(loc)).astype(np.float32)
        grads = np.gradient(g, *loc.grid.spacing) if min(g.shape) > 1 else [np.zeros_like(g)]
        norm = np.sqrt(sum(gr**2 for gr in grads))
        return g / np.maximum(norm, 0.01)

    return Shape(lo, hi, sdf)


def prism(field2d: np.ndarray) -> Shape:
    """A solid constant along z, given its in-plane signed distance on the grid (body outlines)."""
    return Shape(*EVERYWHERE, lambda loc: np.broadcast_to(field2d[loc.sl[1], loc.sl[2]][None], _shape(loc)))


def _shape(loc: Local) -> tuple[int, ...]:
    return np.broadcast_shapes(loc.u.shape, loc.v.shape, loc.z.shape)


# ---------------------------------------------------------------------------------------------------- canvas


Value = float | Callable[[Local, np.ndarray], np.ndarray]


@dataclass
class Canvas:
    """The HU image and labels being painted; every paint blends by partial-volume occupancy."""

    grid: Grid
    hu: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls, grid: Grid) -> Canvas:
        return cls(grid, np.full(grid.shape, AIR, dtype=np.float32), np.zeros(grid.shape, dtype=np.uint8))

    def local(self, shape: Shape) -> Local | None:
        sl = self.grid.box(shape.lo, shape.hi)
        if sl is None:
            return None
        return Local(self.grid, sl, *self.grid.patient(sl))

    def field(self, shape: Shape) -> tuple[Local, np.ndarray] | None:
        """The shape's signed distance on its box of the grid (None when the shape misses the grid)."""
        loc = self.local(shape)
        if loc is None:
            return None
        return loc, np.ascontiguousarray(np.broadcast_to(shape.sdf(loc), _shape(loc)), dtype=np.float32)

    def paint(self, shape: Shape, value: Value, label: int | None = 0,
              got: tuple[Local, np.ndarray] | None = None) -> None:
        """Blend ``value`` in by occupancy; set ``label`` where the shape holds most of a voxel (None: keep).

        ``got`` is the shape's field when the caller already computed it (the liver's is costly and reused).
        """
        got = got or self.field(shape)
        if got is None:
            return
        loc, dist = got
        occ = occupancy(dist)
        val = value(loc, dist) if callable(value) else value
        view = self.hu[loc.sl]
        view += occ * (val - view)
        if label is not None:
            self.labels[loc.sl][occ > 0.5] = label


def occupancy(dist: np.ndarray) -> np.ndarray:
    """Fraction of each voxel inside a surface, from its signed distance in voxel units.

    Dividing by the distance's index-space gradient measures it across one voxel along the surface normal, so a
    5 mm slice blurs an oblique surface over its thickness while in-plane edges stay sharp: the partial volume
    a box slice profile gives, without supersampling.
    """
    if min(dist.shape) < 2:
        return (dist > 0).astype(np.float32)
    gz, gy, gx = np.gradient(dist)
    width = np.sqrt(gz * gz + gy * gy + gx * gx)
    with np.errstate(divide="ignore", invalid="ignore"):
        occ = 0.5 + dist / np.maximum(width, 1e-3)
    return np.clip(occ, 0.0, 1.0).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """A smooth unit-variance random field: coarse Gaussian noise, blurred, linearly upsampled to ``shape``."""
    coarse = ndimage.gaussian_filter(rng.standard_normal([c + 2 for c in cells]), 0.8)
    coarse /= coarse.std() + 1e-6
    zoom = [s / c for s, c in zip(shape, coarse.shape)]
    out = ndimage.zoom(coarse.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
    return out[tuple(slice(0, s) for s in shape)]


# ---------------------------------------------------------------------------------------------------- case plan


@dataclass
class Tissues:
    """This case's HU per tissue: unenhanced value plus phase enhancement scaled by the case's dose/timing."""

    phase: str
    hu: dict[str, float] = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: np.random.Generator, phase: str, steatosis: float) -> Tissues:
        dose = rng.uniform(0.7, 1.3)
        hu = {}
        for name, (base, enhancement) in TISSUES.items():
            lo, hi = enhancement.get(phase, (0.0, 0.0))
            hu[name] = float(rng.uniform(*base) + dose * rng.uniform(lo, hi))
        hu["liver"] -= steatosis
        return cls(phase, hu)

    def __getitem__(self, name: str) -> float:
        return self.hu[name]


@dataclass
class Body:
    """Outline and layers: half-width/depth of the trunk, fat and muscle thickness, the spine's position."""

    a: float
    b: float
    power: float
    fat: float
    muscle: float
    spine_r: float

    @property
    def inner_a(self) -> float:
        return self.a - self.fat - self.muscle

    @property
    def inner_b(self) -> float:
        return self.b - self.fat - self.muscle

    @property
    def spine_v(self) -> float:
        return -self.inner_b + self.spine_r + 38

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Body:
        a = rng.uniform(130, 195)
        return cls(a=a, b=a * rng.uniform(0.62, 0.85), power=rng.uniform(2.0, 2.8), fat=rng.uniform(4, 42),
                   muscle=rng.uniform(6, 14), spine_r=rng.uniform(15, 22))


@dataclass
class Diaphragm:
    """Two domes: ``z_d(u, v)`` is the diaphragm height; the right dome peaks at z = 0, the left lower."""

    left_top: float
    reach: float  # how far laterally/posteriorly the domes fall (mm)

    def height(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Domes fall steeply into the posterior and lateral recesses, gently towards the anterior attachment."""
        depth = ((v + 10) / np.where(v > -10, 2.2 * self.reach, 1.1 * self.reach)) ** 2
        right = -80 * (((u - 60) / self.reach) ** 2 + depth)
        left = self.left_top - 80 * (((u + 60) / self.reach) ** 2 + depth)
        return np.maximum(right, left)

    def below(self, gap: float = 0.0) -> Shape:
        """The abdomen: everything at least ``gap`` mm under the diaphragm."""
        return Shape(*EVERYWHERE, lambda loc: self.height(loc.u, loc.v) - gap - loc.z)


@dataclass
class Case:
    """One generated case: stored voxels, labels, affine, and what was drawn (for tests and reports)."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    info: dict


# ---------------------------------------------------------------------------------------------------- anatomy


def body_fields(grid: Grid, body: Body, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """In-plane signed distances (mm) of the skin and of the inner abdominal wall, by distance transform.

    The fat thickness varies around the body (thicker over the belly and flanks), which a scaled outline cannot do.
    """
    u, v, _ = grid.patient((slice(0, 1), slice(None), slice(None)))
    u, v = u[0], v[0]
    belly = 1 + rng.uniform(0, 0.12) * np.clip(v / body.b, 0, 1) ** 2
    rho = (np.abs(u / body.a) ** body.power + np.abs(v / (body.b * belly)) ** body.power) ** (1 / body.power)
    skin = _signed_distance(rho < 1, grid.spacing[1:])
    angle = np.arctan2(v, u)
    fat = body.fat * (0.8 + 0.35 * np.sin(angle) ** 2 + 0.15 * np.cos(3 * angle + rng.uniform(0, 6)))
    return skin, skin - fat - body.muscle


def _signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance in mm (positive inside) of a 2D mask."""
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (inside - outside).astype(np.float32)


def paint_wall(canvas: Canvas, t: Tissues, skin: np.ndarray, inner: np.ndarray, body: Body,
               rng: np.random.Generator) -> None:
    """Subcutaneous fat, the muscle wall, and ribs within it down to the costal margin."""
    canvas.paint(prism(skin), t["fat"])
    canvas.paint(prism(inner + body.muscle), t["muscle"])
    period, height, slope = rng.uniform(28, 38), rng.uniform(8, 12), rng.uniform(0.6, 1.0)
    floor, phase = rng.uniform(-190, -140), rng.uniform(0, period)
    depth = inner + body.muscle / 2

    def rib_sdf(loc: Local) -> np.ndarray:
        band = 3.5 - np.abs(depth[loc.sl[1], loc.sl[2]][None] + 2)
        zz = np.mod(loc.z + slope * loc.v + phase, period)
        along = height / 2 - np.abs(zz - height / 2)
        gap = np.maximum(30 - np.abs(loc.u), 0) * (loc.v > 0) + np.maximum(45 - np.abs(loc.u), 0) * (loc.v < 0)
        return np.minimum(np.minimum(band, along), np.minimum(loc.z - floor - 0.3 * loc.v, 50 - 10 * gap))

    ribs = Shape(*EVERYWHERE, rib_sdf)
    canvas.paint(ribs, t["cortical"] * 0.6)
    canvas.paint(ribs.grow(-2.0), t["cancellous"])


def paint_spine(canvas: Canvas, t: Tissues, body: Body, rng: np.random.Generator) -> None:
    """Vertebral bodies with cortex and discs, the posterior arch and canal, paraspinal and psoas muscles."""
    r, v0 = body.spine_r, body.spine_v
    for side in (-1, 1):
        canvas.paint(ellipsoid((side * (r + 12), v0 - r - 22, -300), (22, 20, 800), rotation(side * 0.3)),
                     t["muscle"])
        psoas = ellipsoid((side * (r + 10), v0 + 2, -330), (20, 18, 210), rotation(tilt=side * 0.12))
        canvas.paint(psoas, t["muscle"])
    column = Shape((-r, v0 - r, -1e4), (r, v0 + r, 1e4), lambda loc: r - np.sqrt(loc.u**2 + (loc.v - v0) ** 2))
    canvas.paint(column, t["cortical"])
    disc_period, disc_h, disc_phase = rng.uniform(30, 38), rng.uniform(6, 10), rng.uniform(0, 40)

    def disc_sdf(loc: Local) -> np.ndarray:
        zz = np.mod(loc.z + disc_phase, disc_period)
        return np.minimum(column.sdf(loc) - 1.5, disc_h / 2 - np.abs(zz - disc_h / 2))

    canvas.paint(column.grow(-2.0), t["cancellous"])
    canvas.paint(Shape(column.lo, column.hi, disc_sdf), t["disc"])
    canal_v = v0 - r - 9
    def arch_sdf(loc: Local) -> np.ndarray:
        ring = 15 - np.sqrt(loc.u**2 + (loc.v - canal_v) ** 2)
        spinous = np.minimum(4 - np.abs(loc.u), np.minimum(loc.v - canal_v + 32, canal_v - loc.v))
        return np.maximum(ring, spinous)

    arch = Shape((-25, canal_v - 35, -1e4), (25, canal_v + 12, 1e4), arch_sdf)
    canvas.paint(arch, t["cortical"] * 0.8)
    canal = Shape((-9, canal_v - 9, -1e4), (9, canal_v + 9, 1e4),
                  lambda loc: 9 - np.sqrt(loc.u**2 + (loc.v - canal_v) ** 2))
    canvas.paint(canal, t["csf"])


def paint_thorax(canvas: Canvas, t: Tissues, inner: np.ndarray, body: Body, dia: Diaphragm,
                 rng: np.random.Generator) -> None:
    """Lungs above the diaphragm inside the ribs, with vessels, and the heart resting on the central tendon."""
    above = Shape(*EVERYWHERE, lambda loc: loc.z - dia.height(loc.u, loc.v) - 5)
    canvas.paint(prism(inner) & above, t["fat"])
    mediastinum = Shape(*EVERYWHERE, lambda loc: 35 - np.abs(loc.u + 0.2 * loc.v) + 0 * loc.z)
    lungs = (prism(inner - 4) & above) - mediastinum

    def lung_value(loc: Local, dist: np.ndarray) -> np.ndarray:
        veins = smooth_noise(rng, dist.shape, tuple(max(2, s // 6) for s in dist.shape))
        return t["lung"] + 500 * np.clip(veins - 1.8, 0, None)

    canvas.paint(lungs, lung_value)
    heart_c = (-25 + rng.uniform(-10, 10), 0.25 * body.inner_b, dia.left_top / 2 + rng.uniform(45, 60))
    heart_r = (rng.uniform(55, 70), rng.uniform(42, 55), rng.uniform(50, 62))
    heart = ellipsoid(heart_c, heart_r, rotation(rng.uniform(0.3, 0.7))) & above.grow(8)
    canvas.paint(heart.grow(4), t["fat"])
    canvas.paint(heart, t["myocardium"])
    canvas.paint(heart.grow(-rng.uniform(8, 12)), t["artery"])


def liver_shape(body: Body, dia: Diaphragm, inner: np.ndarray, rng: np.random.Generator,
                noise: np.ndarray, wall_gap: float) -> tuple[Shape, dict]:
    """Right lobe, posterior segment, segment IV, left lobe (may cross far left), caudate, optional Riedel lobe.

    ``wall_gap`` keeps the liver off the inner abdominal wall (ascites displaces it medially).
    """
    ia, ib = body.inner_a, body.inner_b
    left_reach = rng.uniform(20, 85)
    lobes = [  # centre (u, v, z), sigmas, weight
        ((0.52 * ia, -0.05 * ib, -65), (rng.uniform(38, 52), rng.uniform(45, 62), rng.uniform(42, 58)), 1.0),
        ((0.55 * ia, -0.4 * ib, -105), (rng.uniform(26, 36), rng.uniform(26, 36), rng.uniform(28, 40)), 0.8),
        ((0.12 * ia, 0.35 * ib, -62), (rng.uniform(26, 36), rng.uniform(22, 30), rng.uniform(28, 38)), 0.75),
        ((-left_reach, 0.4 * ib, -45), (rng.uniform(30, 55), rng.uniform(16, 26), rng.uniform(20, 30)), 0.65),
        ((0.08 * ia, -0.2 * ib, -72), (rng.uniform(12, 18), rng.uniform(12, 18), rng.uniform(18, 28)), 0.7),
    ]
    riedel = rng.random() < 0.25
    if riedel:
        lobes.append(((0.62 * ia, 0.0, -150), (rng.uniform(18, 26), rng.uniform(22, 30), rng.uniform(40, 55)), 0.7))
    jitter = rng.normal(0, 6, (len(lobes), 3))
    centres = np.array([c for c, _, _ in lobes]) + jitter
    sigmas = np.array([s for _, s, _ in lobes]) * rng.uniform(0.85, 1.2)
    rots = [rotation(rng.normal(0, 0.25), rng.normal(0, 0.15), rng.normal(0, 0.15)) for _ in lobes]
    weights = np.array([w for _, _, w in lobes]) * rng.uniform(0.9, 1.1, len(lobes))
    nodular = rng.uniform(0.05, 0.35)

    def wobble(loc: Local) -> np.ndarray:
        return nodular * noise[loc.sl]

    lobes_shape = gaussian_lobes(centres, sigmas, rots, weights, wobble)
    envelope = lobes_shape & prism(inner - wall_gap) & dia.below(gap=6)
    hilum = centres[0] * 0.4 + centres[2] * 0.6
    return envelope, {"riedel": riedel, "left_reach_mm": float(left_reach), "hilum": hilum}


def liver_vessels(hilum: np.ndarray, ivc_top: np.ndarray, rng: np.random.Generator) -> tuple[Shape, list[Shape]]:
    """Main portal vein to the hilum, its right/left branches, and three hepatic veins fanning from the IVC."""
    h = hilum + rng.normal(0, 4, 3)
    main = tube(np.array([h + (-25, 10, -45), h + (-10, 5, -20), h]), [rng.uniform(6, 8)] * 3)
    branches = [
        tube(np.array([h, h + (35, -10, 12), h + (60, -25, 25)]), [6, 4, 2]),
        tube(np.array([h, h + (30, 15, 15), h + (55, 30, 10)]), [5, 3.5, 2]),
        tube(np.array([h, h + (-35, 20, 10), h + (-70, 25, 15)]), [5, 3.5, 2]),
    ]
    top = ivc_top
    hepatic = [tube(np.array([top, top + np.multiply(d, 0.5), top + np.asarray(d)]), [6, 4, 2])
               for d in ((80, 5, -35), (35, 50, -30), (-40, 55, -25))]
    return main, branches + hepatic


def paint_abdomen(canvas: Canvas, t: Tissues, body: Body, dia: Diaphragm, inner: np.ndarray,
                  rng: np.random.Generator, plan: dict) -> tuple[Shape, np.ndarray]:
    """Abdominal organs in the order that lets later, firmer organs displace softer ones; returns the IVC."""
    abdomen = prism(inner) & dia.below(gap=3)
    ia, ib, v0 = body.inner_a, body.inner_b, body.spine_v
    mimic = plan["mimic"]
    if mimic == "ascites":
        band = Shape(*EVERYWHERE, lambda loc: np.minimum(abdomen.sdf(loc), plan["ascites_mm"] - abdomen.sdf(loc)))
        canvas.paint(band, t["fluid"])

    # kidneys (unless removed), cortex / medulla / sinus fat / pelvis
    for side, z in ((1, rng.uniform(-175, -140)), (-1, rng.uniform(-160, -125))):
        if side in plan["nephrectomy"]:
            continue
        c = np.array((side * (body.spine_r + rng.uniform(40, 52)), v0 + 5, z))
        rot = rotation(side * rng.uniform(0.2, 0.5), 0.0, side * rng.uniform(0.1, 0.3))
        kidney = ellipsoid(c, (rng.uniform(24, 30), rng.uniform(26, 33), rng.uniform(48, 60)), rot)
        canvas.paint(kidney, t["cortex"])
        canvas.paint(kidney.grow(-7), t["medulla"])
        sinus = ellipsoid(c - (side * 14, -4, 0), (10, 12, 28), rot)
        canvas.paint(sinus, t["fat"])
        canvas.paint(ellipsoid(c - (side * 16, -4, 0), (6, 8, 14), rot), t["urine"])

    # aorta and IVC
    aorta_c = (-body.spine_r * 0.6, v0 + body.spine_r + 15)
    aorta = tube(np.array([(aorta_c[0], aorta_c[1], -400), (aorta_c[0], aorta_c[1], 300)]), rng.uniform(9, 14))
    canvas.paint(aorta, t["artery"])
    ivc_low = np.array((body.spine_r + 8, v0 + body.spine_r + 14, -400))
    ivc_top = np.array((body.spine_r + 2, v0 + body.spine_r + 32, -10))
    ivc = tube(np.array([ivc_low, ivc_low + (0, 0, 280), ivc_top, ivc_top + (-5, 10, 80)]), rng.uniform(10, 13))
    canvas.paint(ivc, t["ivc"])

    # pancreas: head by the duodenum to tail at the splenic hilum, fat interdigitation in older patients
    pan = tube(np.array([(35, v0 + 45, -125), (5, v0 + 60, -108), (-35, v0 + 50, -98), (-0.6 * ia, v0 + 20, -88)])
               + rng.normal(0, 5, (4, 3)), [rng.uniform(12, 18), 11, 10, 8])
    fatty = rng.uniform(0, 0.5)

    def pancreas_value(loc: Local, dist: np.ndarray) -> np.ndarray:
        lob = smooth_noise(rng, dist.shape, tuple(max(2, s // 3) for s in dist.shape))
        return t["pancreas"] + (t["fat"] - t["pancreas"]) * fatty * np.clip(lob, 0, 1)

    canvas.paint(pan, pancreas_value)

    # spleen: crescent from an ellipsoid minus an offset one; splenomegaly sweeps it anterior-inferior
    if not plan["splenectomy"]:
        big = plan["mimic"] == "splenomegaly"
        scale = rng.uniform(1.5, 1.9) if big else rng.uniform(0.85, 1.15)
        c = np.array((-(ia - 38 * scale), -0.35 * ib + (25 if big else 0), -60 - (30 if big else 0)))
        radii = np.array((rng.uniform(22, 30), rng.uniform(42, 55), rng.uniform(45, 60))) * scale
        rot = rotation(rng.uniform(-0.9, -0.4))
        spleen = (ellipsoid(c, radii, rot) - ellipsoid(c + (radii[0] * 0.9, 0, 0), radii * (0.9, 0.8, 0.9), rot))
        canvas.paint(spleen & abdomen, plan.get("spleen_hu", t["spleen"]))

    paint_stomach(canvas, t, body, dia, rng, plan)
    if plan["bowel"]:
        paint_bowel(canvas, t, body, rng, abdomen)
    return ivc, ivc_top


def paint_stomach(canvas: Canvas, t: Tissues, body: Body, dia: Diaphragm, rng: np.random.Generator,
                  plan: dict) -> None:
    """A J-shaped stomach under the left dome: collapsed (soft tissue), fluid, food, positive contrast or gas,
    with an air-fluid level (air rises anteriorly in a supine patient)."""
    ia, ib = body.inner_a, body.inner_b
    fundus_z = dia.left_top - rng.uniform(25, 40)
    path = np.array([(-0.45 * ia, -0.05 * ib, fundus_z), (-0.4 * ia, 0.3 * ib, fundus_z - 45),
                     (-0.05 * ia, 0.5 * ib, fundus_z - 75), (0.12 * ia, 0.35 * ib, fundus_z - 80)])
    path += rng.normal(0, 6, path.shape)
    content = rng.choice(["collapsed", "fluid", "food", "contrast", "air-fluid"], p=[0.25, 0.2, 0.15, 0.15, 0.25])
    if plan["mimic"] == "homogeneous":
        content = "collapsed"
    scale = rng.uniform(0.45, 0.6) if content == "collapsed" else rng.uniform(0.8, 1.2)
    radii = np.array([42, 36, 25, 15]) * scale
    wall = tube(path, radii) & dia.below(gap=3)
    canvas.paint(wall, t["bowel_wall"])
    fill = {"collapsed": t["bowel_wall"] - 5, "fluid": t["fluid"], "food": 35.0, "contrast": rng.uniform(180, 450),
            "air-fluid": t["fluid"]}[content]
    level = path[:, 1].mean() + rng.uniform(-10, 20)

    def stomach_value(loc: Local, dist: np.ndarray) -> np.ndarray:
        base = np.full(dist.shape, fill, dtype=np.float32)
        if content == "food":
            base += 40 * smooth_noise(rng, dist.shape, tuple(max(2, s // 4) for s in dist.shape))
        if content == "air-fluid":
            base = np.where(np.broadcast_to(loc.v, dist.shape) > level, AIR, base)
        return base

    canvas.paint(tube(path, radii - 4) & dia.below(gap=6), stomach_value)
    plan["stomach"] = str(content)


def paint_bowel(canvas: Canvas, t: Tissues, body: Body, rng: np.random.Generator, abdomen: Shape) -> None:
    """Colon framing the abdomen (hepatic flexure under the liver tip) and random small-bowel loops."""
    ia, ib = body.inner_a, body.inner_b
    flex_z = rng.uniform(-185, -140)
    colon = np.array([(0.6 * ia, -0.1 * ib, -380), (0.62 * ia, 0.0, flex_z - 40), (0.5 * ia, 0.25 * ib, flex_z),
                      (0.0, 0.55 * ib, flex_z + rng.uniform(-20, 30)), (-0.55 * ia, 0.2 * ib, flex_z + 40),
                      (-0.62 * ia, -0.05 * ib, flex_z - 30), (-0.6 * ia, -0.1 * ib, -380)])
    colon += rng.normal(0, 7, colon.shape)
    loops = [(colon, rng.uniform(17, 28), "colon")]
    for _ in range(rng.integers(3, 9)):
        start = np.array((rng.uniform(-0.5, 0.5) * ia, rng.uniform(0.0, 0.5) * ib, rng.uniform(-320, -130)))
        steps = rng.normal(0, 22, (rng.integers(4, 8), 3))
        loops.append((start + np.cumsum(steps, axis=0), rng.uniform(9, 15), "small"))
    for path, radius, kind in loops:
        content = rng.choice(["gas", "fluid", "contrast", "feces"] if kind == "colon" else ["gas", "fluid", "contrast",
                                                                                            "collapsed"])
        outer = tube(path, radius) & abdomen
        canvas.paint(outer, t["bowel_wall"])
        inner = tube(path, radius - rng.uniform(2, 4)) & abdomen
        canvas.paint(inner, _bowel_content(t, str(content), rng))


def _bowel_content(t: Tissues, content: str, rng: np.random.Generator) -> Value:
    """Bowel lumen: gas, water, positive oral contrast, collapsed wall, or feces (soft tissue with gas bubbles)."""
    if content == "feces":
        def feces(loc: Local, dist: np.ndarray) -> np.ndarray:
            bubbles = smooth_noise(rng, dist.shape, tuple(max(2, s // 2) for s in dist.shape))
            return np.where(bubbles > 0.6, AIR + 50, 30 + 20 * bubbles).astype(np.float32)
        return feces
    return {"gas": AIR + 30, "fluid": t["fluid"], "contrast": rng.uniform(150, 400),
            "collapsed": t["bowel_wall"]}[content]


def paint_mesentery(canvas: Canvas, t: Tissues, inner: np.ndarray, dia: Diaphragm, rng: np.random.Generator,
                    plan: dict) -> None:
    """The space between organs: visceral fat streaked with mesentery, or (mimic) homogeneous soft tissue."""
    abdomen = prism(inner) & dia.below(gap=3)
    fat_share = plan["visceral_fat"]
    homogeneous = plan["mimic"] == "homogeneous"

    def value(loc: Local, dist: np.ndarray) -> np.ndarray:
        streaks = smooth_noise(rng, dist.shape, tuple(max(2, s // 5) for s in dist.shape))
        threshold = np.quantile(streaks, 1 - fat_share)
        soft = np.clip((threshold - streaks) * 2.5 + 0.5, 0, 1)
        tissue = plan["mimic_hu"] if homogeneous else t["mesentery"]
        mix = t["fat"] + (tissue - t["fat"]) * soft
        return (np.where(loc.z + 0 * loc.u > -260, tissue, mix) if homogeneous else mix).astype(np.float32)

    canvas.paint(abdomen, value)


def paint_gallbladder(canvas: Canvas, t: Tissues, gb: Shape | None, rng: np.random.Generator) -> None:
    """Bile with a thin enhancing wall and, sometimes, dependent (posterior) calcified stones."""
    if gb is None:
        return
    canvas.paint(gb, t["bowel_wall"])
    canvas.paint(gb.grow(-2), t["bile"])
    if rng.random() < 0.3:
        c = np.array((gb.lo[0] + gb.hi[0], gb.lo[1] + gb.hi[1], gb.lo[2] + gb.hi[2])) / 2
        for _ in range(rng.integers(1, 4)):
            stone = ellipsoid(c + rng.normal(0, 4, 3) - (0, 6, 0), [rng.uniform(2, 6)] * 3)
            canvas.paint(stone & gb.grow(-2), rng.uniform(150, 700), label=None)


# ---------------------------------------------------------------------------------------------------- lesions


def lesion_value(kind: str, t: Tissues, size: float, rng: np.random.Generator) -> Value:
    """The lesion's HU as a function of depth below its surface, by type and contrast phase."""
    liver, phase = t["liver"], t.phase
    if kind == "cyst":
        return float(rng.uniform(0, 20))
    if kind == "met-hypo":
        drop = {"non-contrast": (5, 25), "arterial": (15, 45), "portal": (30, 70), "delayed": (20, 45)}[phase]
        core = liver - rng.uniform(*drop)
        rim = liver + {"non-contrast": 0.0, "arterial": rng.uniform(20, 60), "portal": rng.uniform(-5, 15),
                       "delayed": rng.uniform(-5, 10)}[phase]
        rim_w, necrosis = rng.uniform(1.5, 4), rng.uniform(0, 25) if size > 25 else 0.0

        def met(loc: Local, dist: np.ndarray) -> np.ndarray:
            depth = np.maximum(dist, 0)
            centre = np.clip((depth - 0.3 * size) / (0.1 * size + 1), 0, 1)
            return (core + (rim - core) * np.exp(-depth / rim_w) - necrosis * centre).astype(np.float32)
        return met
    if kind == "met-hyper":
        gain = {"non-contrast": (-10, 5), "arterial": (40, 90), "portal": (5, 30), "delayed": (-5, 10)}[phase]
        return float(liver + rng.uniform(*gain))
    wash = {"non-contrast": (-15, -5), "arterial": (30, 80), "portal": (-25, -8), "delayed": (-30, -10)}[phase]
    base, capsule = liver + rng.uniform(*wash), rng.uniform(15, 40) if phase in ("portal", "delayed") else 0.0

    def hcc(loc: Local, dist: np.ndarray) -> np.ndarray:
        mosaic = smooth_noise(rng, dist.shape, tuple(max(2, s // 3) for s in dist.shape))
        return (base + 12 * mosaic + capsule * np.exp(-np.maximum(dist, 0) / 1.5)).astype(np.float32)
    return hcc


def lesion_shapes(liver_field: tuple[Local, np.ndarray], grid: Grid, count: int,
                  rng: np.random.Generator) -> list[tuple[str, float, Shape]]:
    """Lesions seeded at liver voxels: lobulated ellipsoids 3-80 mm, some at the surface, some touching others."""
    loc, dist = liver_field
    inside = np.argwhere(dist > 0)
    if len(inside) == 0:
        return []
    z, y, x = grid.axes()
    out: list[tuple[str, float, Shape]] = []
    for _ in range(count):
        kind = str(rng.choice(LESION_TYPES, p=[0.3, 0.35, 0.15, 0.2]))
        diameter = float(np.exp(rng.uniform(np.log(3), np.log(80)) if rng.random() < 0.6 else rng.uniform(1.1, 2.8)))
        if out and rng.random() < 0.25:  # a satellite touching a previous lesion
            prev = out[-1][2]
            c_prev = (np.array(prev.lo) + np.array(prev.hi)) / 2
            direction = rng.normal(size=3)
            centre = c_prev + direction / np.linalg.norm(direction) * ((prev.hi[0] - prev.lo[0]) / 2 + diameter * 0.35)
        else:
            k, j, i = inside[rng.integers(len(inside))]
            gz, gy, gx = k + loc.sl[0].start, j + loc.sl[1].start, i + loc.sl[2].start
            uu, vv, zz = grid.patient((slice(gz, gz + 1), slice(gy, gy + 1), slice(gx, gx + 1)))
            centre = np.array((uu.item(), vv.item(), zz.item()))
        radii = diameter / 2 * rng.uniform(0.75, 1.25, 3)
        out.append((kind, diameter, lobulated(centre, radii, 0.0 if kind == "cyst" else rng.uniform(0, 0.15), rng)))
    return out


def lobulated(centre: np.ndarray, radii: np.ndarray, amount: float, rng: np.random.Generator) -> Shape:
    """An ellipsoid whose radius is modulated by a few random cosine lobes of the direction (mets are lobulated)."""
    base = ellipsoid(centre, radii, rotation(*rng.uniform(0, np.pi, 3)))
    dirs = rng.normal(size=(3, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freq, phase = rng.integers(2, 5, 3), rng.uniform(0, 2 * np.pi, 3)
    scale = float(radii.mean()) * amount

    def sdf(loc: Local) -> np.ndarray:
        d = [loc.u - centre[0], loc.v - centre[1], loc.z - centre[2]]
        norm = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-3
        bumps = sum(np.cos(f * (dv[0] * d[0] + dv[1] * d[1] + dv[2] * d[2]) / norm * np.pi + p)
                    for dv, f, p in zip(dirs, freq, phase))
        return base.sdf(loc) + scale * bumps / 3

    return Shape(tuple(np.array(base.lo) - scale), tuple(np.array(base.hi) + scale), sdf)


# ---------------------------------------------------------------------------------------------------- scanner


def scanner(canvas: Canvas, body_skin: np.ndarray, rng: np.random.Generator, plan: dict) -> np.ndarray:
    """Point-spread blur, CT-like correlated noise, cupping/bias, streaks, table and reconstruction circle."""
    grid, hu = canvas.grid, canvas.hu
    d, h, w = grid.shape
    sz, sy, sx = grid.spacing
    fy = np.fft.fftfreq(h, d=sy)[:, None]
    fx = np.fft.rfftfreq(w, d=sx)[None, :]
    f = np.sqrt(fy**2 + fx**2).astype(np.float32)  # cycles / mm
    psf_mm, cutoff = plan["psf_mm"], plan["noise_cutoff"]
    mtf = np.exp(-2 * (np.pi * psf_mm * f) ** 2)
    nps = f * np.exp(-((f / cutoff) ** 2))
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    if sz < 2.0:  # overlapping slice profiles correlate thin-slice noise along z
        white = ndimage.convolve1d(white, np.array([0.35, 1.0, 0.35], dtype=np.float32), axis=0, mode="nearest")
    noise = sp_fft.irfft2(sp_fft.rfft2(white) * nps, s=(h, w)).astype(np.float32)
    noise *= plan["noise_hu"] / (noise.std() + 1e-6)
    u, v, _ = grid.patient((slice(0, 1), slice(None), slice(None)))
    radial = np.clip(1 - (u[0] ** 2 + v[0] ** 2) / (1.2 * plan["body_a"]) ** 2, 0, 1)
    noise *= (1 + plan["central_noise"] * radial)[None]
    image = sp_fft.irfft2(sp_fft.rfft2(hu) * mtf, s=(h, w)).astype(np.float32)
    bias = plan["bias"] * smooth_noise(rng, (1, h, w), (1, 3, 3)) - plan["cupping"] * radial[None]
    image += noise + bias + rng.normal(0, 1.5, (d, 1, 1)).astype(np.float32)
    for source, amplitude in plan["streaks"]:
        image += streaks(grid, source, amplitude, rng)
    inside = body_skin > -20
    table_v = -plan["body_b"] - rng.uniform(5, 30)
    table = (np.abs(v[0] - table_v) < 4) & (np.abs(u[0]) < 230) & ~inside
    image[:, table] = rng.uniform(-300, 100) + rng.normal(0, 10, (d, int(table.sum())))
    if plan["pad_value"] is not None:
        _, yy, xx = grid.axes()
        circle = (yy[:, None] ** 2 + xx[None, :] ** 2) > (min(h * sy, w * sx) / 2) ** 2
        image[:, circle] = plan["pad_value"]
    return image


def streaks(grid: Grid, source: tuple[float, float, float, float], amplitude: float,
            rng: np.random.Generator) -> np.ndarray:
    """Alternating dark/bright radial streaks from a dense object at (u, v) spanning [z0, z1] (clips, arms)."""
    u0, v0, z0, z1 = source
    u, v, z = grid.patient((slice(None), slice(None), slice(None)))
    angle = np.arctan2(v[0] - v0, u[0] - u0)
    radius = np.sqrt((u[0] - u0) ** 2 + (v[0] - v0) ** 2)
    pattern = np.zeros_like(angle)
    for _ in range(rng.integers(3, 9)):
        theta, width = rng.uniform(0, np.pi), rng.uniform(0.01, 0.04)
        diff = np.angle(np.exp(2j * (angle - theta))) / 2
        pattern += rng.choice([-1.0, 0.6]) * np.exp(-0.5 * (diff / width) ** 2)
    pattern *= amplitude * np.exp(-radius / 150) * (radius > 5)
    span = ((z[:, 0, 0] >= z0) & (z[:, 0, 0] <= z1)).astype(np.float32)
    return span[:, None, None] * pattern[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------------- case


def draw_plan(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[dict, Body, Diaphragm, Grid]:
    """Everything about a case that is a choice rather than a computation: patient, scanner, phase, pathology."""
    body = Body.draw(rng)
    dia = Diaphragm(left_top=rng.uniform(-30, -5), reach=rng.uniform(75, 100))
    mimic = str(rng.choice(MIMICS, p=[0.55, 0.2, 0.12, 0.13]))
    steatosis = rng.uniform(15, 60) if rng.random() < 0.2 else 0.0
    plan = {
        "phase": str(rng.choice(PHASES, p=[0.2, 0.25, 0.4, 0.15])),
        "steatosis": float(steatosis), "mimic": mimic, "ascites_mm": float(rng.uniform(8, 25)),
        "visceral_fat": float(rng.uniform(0.05, 0.4) if mimic == "homogeneous" else rng.uniform(0.2, 0.9)),
        "splenectomy": bool(mimic != "splenomegaly" and rng.random() < (0.5 if mimic == "homogeneous" else 0.1)),
        "nephrectomy": [s for s in (1, -1) if rng.random() < (0.3 if mimic == "homogeneous" else 0.08)],
        "cholecystectomy": bool(rng.random() < 0.15), "lesions": int(rng.choice(9, p=_lesion_count_p())),
        "noise_hu": float(rng.uniform(6, 40)), "noise_cutoff": float(rng.uniform(0.25, 0.7)),
        "psf_mm": float(rng.uniform(0.3, 1.0)), "central_noise": float(rng.uniform(0, 0.8)),
        "bias": float(rng.uniform(0, 12)), "cupping": float(rng.uniform(0, 25)),
        "pad_value": rng.choice([None, -1024.0, -2048.0, -3024.0], p=[0.6, 0.2, 0.1, 0.1]),
        "arms_down": bool(rng.random() < 0.2), "streaks": [],
        "bowel": bool(mimic != "homogeneous" or rng.random() < 0.4),
        "table_offset": [float(o) for o in rng.uniform(-60, 60, 3)], "body_a": body.a, "body_b": body.b,
        "axcodes": STORAGE_AXCODES[int(rng.integers(len(STORAGE_AXCODES)))],
    }
    d, h, w = shape
    # Scanners reconstruct a field of view onto the matrix: 282-486 mm (0.55-0.95 mm on 512, 1.1-1.9 on 256);
    # a wide patient or arms down may be truncated at the edge, as happens clinically.
    fov = max(2 * body.a * rng.uniform(1.02, 1.4), 2 * body.b * 1.25 * w / h)
    if plan["arms_down"]:
        fov = max(fov, 2 * (body.a + 80))
    sx = float(np.clip(fov, 282, 486)) / w
    sz = float(np.exp(rng.uniform(np.log(0.8), np.log(6.0))))
    coverage = d * sz
    liver_top, liver_bottom = 5.0, -200.0
    if coverage >= liver_top - liver_bottom:
        z_centre = (liver_top + liver_bottom) / 2 + rng.uniform(-0.3, 0.3) * (coverage - (liver_top - liver_bottom))
    else:
        z_centre = rng.uniform(liver_bottom + 0.3 * coverage + 40, liver_top - 0.3 * coverage - 10)
    grid = Grid(shape=shape, spacing=(sz, sx, sx), z0=float(z_centre - coverage / 2),
                centre=(float(rng.uniform(-0.08, 0.08) * fov), float(rng.uniform(-0.05, 0.08) * fov)),
                roll=float(rng.normal(0, 0.06)))
    plan["spacing_mm"] = grid.spacing
    return plan, body, dia, grid


def _lesion_count_p() -> np.ndarray:
    """P(no lesion) = 0.25; 1..8 lesions with decreasing odds."""
    p = np.array([0.25] + [1 / k for k in range(1, 9)])
    p[1:] *= 0.75 / p[1:].sum()
    return p


def generate(seed: int, shape: tuple[int, int, int] = (48, 256, 256)) -> Case:
    """Draw and render one case: anatomy -> partial-volume HU and labels -> scanner -> stored orientation."""
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, got {shape}")
    rng = np.random.default_rng(seed)
    plan, body, dia, grid = draw_plan(rng, tuple(int(s) for s in shape))
    t = Tissues.draw(rng, plan["phase"], plan["steatosis"])
    if plan["mimic"] == "homogeneous":
        plan["mimic_hu"] = float(t["liver"] + rng.choice([-1, 1]) * rng.uniform(8, 38))
    if plan["mimic"] == "splenomegaly":
        plan["spleen_hu"] = float(t["liver"] + rng.uniform(-15, 15))
    canvas = Canvas.empty(grid)
    skin, inner = body_fields(grid, body, rng)
    noise = smooth_noise(rng, grid.shape, (max(2, grid.shape[0] // 6), 10, 10))

    paint_wall(canvas, t, skin, inner, body, rng)
    paint_mesentery(canvas, t, inner, dia, rng, plan)
    paint_thorax(canvas, t, inner, body, dia, rng)
    paint_spine(canvas, t, body, rng)
    if plan["arms_down"]:
        paint_arms(canvas, t, body, plan)
    ivc, ivc_top = paint_abdomen(canvas, t, body, dia, inner, rng, plan)

    wall_gap = 1.5 + (0.7 * plan["ascites_mm"] if plan["mimic"] == "ascites" else 0.0)
    liver, meta = liver_shape(body, dia, inner, rng, noise, wall_gap)
    gb = None
    if not plan["cholecystectomy"]:
        h = meta["hilum"]
        gb = ellipsoid(h + (rng.uniform(-5, 10), rng.uniform(15, 30), rng.uniform(-40, -25)),
                       (rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(28, 42)), rotation(0.3, 0.5, 0.2))
        liver = liver - gb.grow(2)
    else:
        h = meta["hilum"]
        plan["streaks"].append(((h[0], h[1] + 20, h[2] - 40, h[2] - 25), rng.uniform(100, 300)))
        plan["clips"] = [ellipsoid(h + (rng.uniform(-10, 10), 20, rng.uniform(-40, -25)), (1.5, 1.5, 4))
                         for _ in range(rng.integers(2, 5))]
    liver = liver - ivc.grow(1)
    paint_liver(canvas, t, liver, meta["hilum"], ivc_top, noise, rng, plan)
    paint_gallbladder(canvas, t, gb, rng)
    for clip in plan.pop("clips", []):
        canvas.paint(clip, 3000.0, label=None)

    image = scanner(canvas, skin, rng, plan)
    plan.update(meta)
    plan.pop("hilum")
    return store(image, canvas.labels, grid, plan)


def paint_arms(canvas: Canvas, t: Tissues, body: Body, plan: dict) -> None:
    """Arms down beside the trunk: soft tissue with a humerus, and the lateral streak band they cause."""
    for side in (-1, 1):
        c = (side * (body.a + 45), -0.1 * body.b, 0)
        canvas.paint(ellipsoid(c, (40, 45, 600)), t["muscle"])
        canvas.paint(ellipsoid(c, (12, 12, 600)), t["cortical"])
    plan["streaks"].append(((0.0, -0.1 * body.b, -1e4, 1e4), -40.0))


def paint_liver(canvas: Canvas, t: Tissues, liver: Shape, hilum: np.ndarray, ivc_top: np.ndarray,
                noise: np.ndarray, rng: np.random.Generator, plan: dict) -> None:
    """Parenchyma (with patchy steatosis or perfusion), intrahepatic vessels kept as liver, then lesions."""
    patchy = rng.uniform(0, 8) + (rng.uniform(5, 20) if plan["steatosis"] else 0)
    main, intrahepatic = liver_vessels(hilum, ivc_top, rng)
    canvas.paint(main, t["portal_vein"])
    got = canvas.field(liver)
    if got is None:
        plan["lesions"] = 0
        return
    canvas.paint(liver, lambda loc, dist: t["liver"] + patchy * noise[loc.sl] * 0.5, label=1, got=got)
    for i, vessel in enumerate(intrahepatic):
        canvas.paint(vessel & liver, t["portal_vein"] if i < 3 else t["hepatic_vein"], label=None)
    lesions = lesion_shapes(got, canvas.grid, plan["lesions"], rng)
    for kind, diameter, shape in lesions:
        canvas.paint(shape & liver, lesion_value(kind, t, diameter, rng), label=2)
    plan["lesion_kinds"] = [k for k, _, _ in lesions]
    plan["lesion_mm"] = [round(dm, 1) for _, dm, _ in lesions]
    plan["liver_hu"] = t["liver"]


def store(image: np.ndarray, labels: np.ndarray, grid: Grid, plan: dict) -> Case:
    """Reorient the canonical arrays to the case's storage axis codes; the affine follows, so it stays truthful."""
    aff = grid.affine()
    start = orientations.io_orientation(aff)
    ornt = orientations.ornt_transform(start, orientations.axcodes2ornt(plan["axcodes"]))
    stored_aff = aff @ orientations.inv_ornt_aff(ornt, image.shape)
    stored_aff[:3, 3] += plan["table_offset"]
    hu = to_int16_hu(orientations.apply_orientation(image, ornt))
    lab = np.ascontiguousarray(orientations.apply_orientation(labels, ornt)).astype(np.uint8)
    info = {k: v for k, v in plan.items() if k != "streaks"}
    return Case(hu, lab, stored_aff, info)


def make_case(seed: int, shape: tuple[int, int, int] = (48, 256, 256)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU int16 as stored, labels uint8 0/1/2 as stored, 4x4 voxel->RAS affine), deterministic per seed.

    ``shape`` is the canonical (slices, rows, columns) size; the stored array is a permutation of it.
    """
    case = generate(seed, shape)
    return case.hu, case.labels, case.affine


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="independent_phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--n", type=int, default=10, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of case 0; case i uses seed + i")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 256, 256), metavar=("D", "H", "W"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if min(args.shape) < 4:
        parser.error(f"--shape sizes must be at least 4, got {' '.join(map(str, args.shape))}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} exists and is not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        case = generate(args.seed + i, tuple(args.shape))
        write_nifti(args.out / f"volume-{i}.nii.gz", case.hu, case.affine)
        write_nifti(args.out / f"segmentation-{i}.nii.gz", case.labels, case.affine)
        info = case.info
        print(f"case {i}: seed {args.seed + i}, {info['phase']}, mimic {info['mimic']}, "
              f"{len(info.get('lesion_kinds', []))} lesions, spacing {tuple(round(s, 2) for s in info['spacing_mm'])}"
              f" mm, stored {''.join(info['axcodes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
