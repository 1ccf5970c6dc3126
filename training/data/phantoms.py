"""Deterministic synthetic abdominal CT phantoms with liver (1) and liver-lesion (2) labels.

No public CT data is reachable from here, so training and the tests run on phantoms. They are meant to be hard
enough that a network has to learn *shape and context*, not a HU threshold: the spleen, kidneys, pancreas,
muscles and bowel wall share the liver's intensity range, and every case draws its own anatomy size and position,
contrast phase, lesion load, partial-volume blur and noise.

Geometry is implicit on the millimetre grid of the canonical array of :mod:`mixsup.scan` (``D`` inferior ->
superior, ``H`` anterior -> posterior, ``W`` patient right -> left). In the coordinates used below ``x`` grows
toward the patient's left, ``y`` toward the back and ``z`` toward the head, all in mm from the body's centre.
Labels are taken from the sharp geometry at voxel centres, before the blur that mimics partial volume.

Everything random comes from one ``numpy.random.Generator(PCG64(seed))``: the same seed gives bit-identical
phantoms on every platform numpy supports.

This is the ``classic`` style. Its anatomy is sized to the field of view and its contrasts are realistic, which a
model can learn as a style rather than as the liver; ``generate_phantom(..., style="randomized")`` draws the
domain-randomized style of :mod:`mixsup.training.data.randomized` (and ``"mixed"`` one of the two per case). The
drawing primitives both styles use live here (:class:`_Sketch` and the functions above it), so neither copies them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

BACKGROUND, LIVER, LESION = 0, 1, 2
HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0
#: A typical adult abdomen's half width in mm; organ sizes scale with the drawn body size relative to it.
ADULT_HALF_WIDTH_MM = 160.0

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]
Box = tuple[slice, slice, slice]
#: A liver lobe: centre (z, y, x) mm, radii (z, y, x) mm, in-plane angle (radians).
Lobe = tuple[tuple[float, float, float], tuple[float, float, float], float]


@dataclass
class Phantom:
    """A synthetic CT: ``volume`` int16 HU and ``labels`` uint8 on the canonical ``[D, H, W]`` grid.

    ``instances`` uint16 on the same grid: one id (1, 2, ...) per drawn lesion, 0 elsewhere, so that lesions which
    overlap or touch stay apart (the label map merges them into one connected component). Where two lesions
    overlap, the one painted later (whose intensity the image shows there) owns the voxels; its id is nonzero
    exactly where ``labels`` is 2.

    ``style`` names the generator that drew the case (:data:`STYLES`). ``tissues`` (randomized style only) says which
    structure each voxel belongs to, as an index into :data:`mixsup.training.data.randomized.TISSUES`, so that a
    failure can be traced to the structure it mistook for liver.
    """

    volume: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    instances: np.ndarray | None = None
    style: str = "classic"
    tissues: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------- the grid
class _Grid:
    """Voxel-centre coordinates in mm (relative to the body centre) along the canonical axes."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        centre_yx: tuple[float, float],
        centre_z: float = 0.0,
    ):
        """``centre_yx`` / ``centre_z``: where the body centre (the coordinate origin) lies, in mm from the array's
        centre; the classic style keeps z centred on the field, the randomized one moves the field along the body."""
        depth, height, width = shape
        s_d, s_h, s_w = spacing
        self.shape = shape
        self.z = ((np.arange(depth) - (depth - 1) / 2) * s_d - centre_z).astype(np.float32)
        self.y = ((np.arange(height) - (height - 1) / 2) * s_h - centre_yx[0]).astype(np.float32)
        self.x = ((np.arange(width) - (width - 1) / 2) * s_w - centre_yx[1]).astype(np.float32)

    def box(self, centre: tuple[float, float, float], half_extent: tuple[float, float, float]) -> tuple[Box, Coords] | None:
        """The voxels within ``centre ± half_extent`` mm and their offsets from ``centre``, shaped to broadcast."""
        slices = []
        for coords, c, h in zip((self.z, self.y, self.x), centre, half_extent):
            lo = int(np.searchsorted(coords, c - h, side="left"))
            hi = int(np.searchsorted(coords, c + h, side="right"))
            if hi <= lo:
                return None
            slices.append(slice(lo, hi))
        dz = (self.z[slices[0]] - np.float32(centre[0]))[:, None, None]
        dy = (self.y[slices[1]] - np.float32(centre[1]))[None, :, None]
        dx = (self.x[slices[2]] - np.float32(centre[2]))[None, None, :]
        return tuple(slices), (dz, dy, dx)

    def voxel_mm(self, index: tuple[int, int, int]) -> tuple[float, float, float]:
        return float(self.z[index[0]]), float(self.y[index[1]]), float(self.x[index[2]])


# ------------------------------------------------------------------------------------------- random fields
def _smoothing_matrix(n_out: int, n_coarse: int) -> np.ndarray:
    """Rows of Gaussian weights that spread ``n_coarse`` control values smoothly over ``n_out`` samples."""
    position = np.linspace(0.0, n_coarse - 1.0, n_out)[:, None]
    weights = np.exp(-0.5 * ((position - np.arange(n_coarse)[None, :]) / 0.75) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_random_field(rng: np.random.Generator, shape: tuple[int, int, int], control_points: tuple[int, int, int]) -> np.ndarray:
    """A smooth zero-mean, unit-std random field: a tiny random grid spread separably over ``shape``.

    Separable matrix products instead of ``ndimage.zoom`` keep a 3M-voxel field at a few milliseconds.
    """
    control = rng.standard_normal(tuple(max(1, n) for n in control_points)).astype(np.float32)
    m_d, m_h, m_w = (_smoothing_matrix(n, c) for n, c in zip(shape, control.shape))
    field = control @ m_w.T  # [cd, ch, W]
    field = np.einsum("hb,abw->ahw", m_h, field, optimize=True)  # [cd, H, W]
    field = np.tensordot(m_d, field, axes=(1, 0))  # [D, H, W]
    sample = field[:: max(1, shape[0] // 8), :: max(1, shape[1] // 32), :: max(1, shape[2] // 32)]
    field -= sample.mean()
    field /= max(float(sample.std()), 1e-6)
    return np.ascontiguousarray(field, dtype=np.float32)


def _control_points(shape: tuple[int, ...], spacing: tuple[float, ...], feature_mm: float) -> tuple[int, int, int]:
    """How many control points give features of about ``feature_mm`` along each axis."""
    return tuple(max(2, int(round(n * s / feature_mm)) + 1) for n, s in zip(shape, spacing))


# ------------------------------------------------------------------------------------------ implicit shapes
def ellipsoid_level(offsets: Coords, radii: tuple[float, float, float], angle: float = 0.0, z_power: float = 2.0) -> np.ndarray:
    """Normalised level ``< 1`` inside an ellipsoid rotated by ``angle`` (radians) in the axial plane.

    The in-plane part is computed on the 2D slice grid and only the final sum is 3D, which keeps big organs cheap.
    ``z_power > 2`` flattens the superior and inferior caps (an organ cut by a plane looks less like a lens).
    """
    dz, dy, dx = offsets
    r_z, r_y, r_x = radii
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / np.float32(r_x)
    v = (-s * dx + c * dy) / np.float32(r_y)
    return (u * u + v * v) + np.abs(dz / np.float32(r_z)) ** np.float32(z_power)


WOBBLE_CLIP = 1.5


def wobble_reach(wobble: float) -> float:
    """How far (as a factor of the radius) a level offset bounded by ``wobble * WOBBLE_CLIP`` can push a surface."""
    return 1.0 / math.sqrt(max(1.0 - WOBBLE_CLIP * wobble, 0.05))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def rotated_ellipsoid_level(offsets: Coords, radii: tuple[float, float, float], rotation: np.ndarray) -> np.ndarray:
    """Normalised level ``< 1`` inside an arbitrarily oriented ellipsoid (for small structures only)."""
    dz, dy, dx = offsets
    level = None
    for row, radius in zip(rotation, radii):
        axis = (row[0] * dz + row[1] * dy + row[2] * dx) / np.float32(radius)
        level = axis * axis if level is None else level + axis * axis
    return level


def segment_distance(offsets: Coords, direction: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from each voxel to the segment from the box origin to ``direction`` (mm)."""
    dz, dy, dx = offsets
    ez, ey, ex = (np.float32(v) for v in direction)
    length2 = max(float(ez * ez + ey * ey + ex * ex), 1e-6)
    t = np.clip((dz * ez + dy * ey + dx * ex) / np.float32(length2), 0.0, 1.0)
    return np.sqrt((dz - t * ez) ** 2 + (dy - t * ey) ** 2 + (dx - t * ex) ** 2)


def tube_mask(grid: _Grid, start: np.ndarray, end: np.ndarray, radius: float) -> tuple[Box, np.ndarray] | None:
    """Box and mask of the voxels within ``radius`` mm of the segment ``start`` -> ``end`` (mm, ``z, y, x``)."""
    lo, hi = np.minimum(start, end) - radius, np.maximum(start, end) + radius
    found = grid.box(tuple((lo + hi) / 2), tuple((hi - lo) / 2))
    if found is None:
        return None
    box, (dz, dy, dx) = found
    origin = start - (lo + hi) / 2
    offsets = (dz - np.float32(origin[0]), dy - np.float32(origin[1]), dx - np.float32(origin[2]))
    return box, segment_distance(offsets, tuple(end - start)) < radius


def body_rays(grid: _Grid, a: float, b: float, power: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """In-plane polar geometry of a superellipse body with semi-axes ``a`` (x) and ``b`` (y) mm.

    Returns each pixel's distance from the centre, the body radius along its ray, and the ray's cosine and sine;
    layers (skin, fat, muscle) are then depths along the ray, so they follow the outline at any aspect ratio.
    """
    y2, x2 = grid.y[:, None], grid.x[None, :]
    r = np.sqrt(y2 * y2 + x2 * x2)
    rho0 = ((np.abs(x2) / a) ** power + (np.abs(y2) / b) ** power) ** (1.0 / power)
    radius0 = (r / np.maximum(rho0, 1e-6)).astype(np.float32)
    cos_t = np.where(r > 0, x2 / np.maximum(r, 1e-6), 1.0).astype(np.float32)
    sin_t = np.where(r > 0, y2 / np.maximum(r, 1e-6), 0.0).astype(np.float32)
    return r, radius0, cos_t, sin_t


def retroperitoneum_mask(
    grid: _Grid, box: Box, spine_yx: tuple[float, float], spine_ry: float, depth: float, half_width: float
) -> np.ndarray:
    """Spine, aorta and the space around them (``depth`` mm in front of the spine, ``half_width`` mm to either
    side, everything behind), where no liver can grow; shaped ``[1, h, w]`` to broadcast over the box."""
    dy = grid.y[box[1]][:, None] - spine_yx[0]
    dx = np.abs(grid.x[box[2]][None, :] - spine_yx[1]) / half_width
    front = (dy / (spine_ry + depth)) ** 2 + dx**2 < 1.0
    return (front | ((dy > 0) & (dx < 1.0)))[None]


def correlated_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], correlation: tuple[float, float]
) -> np.ndarray:
    """Unit-std noise, half the time correlated in-plane over ``correlation`` voxels (reconstruction kernels)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(*correlation))
        noise = ndimage.gaussian_filter(noise, (0.0, sigma, sigma), mode="nearest")
        noise /= max(float(noise[:: max(1, shape[0] // 8)].std()), 1e-6)
    return noise


def quantize_hu(hu: np.ndarray) -> np.ndarray:
    """Round to whole HU and clip to the int16 range scanners store (in place on ``hu``)."""
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16)


# ---------------------------------------------------------------------------------------------- the canvas
class _Canvas:
    """The HU image being composed, painted structure by structure (later structures cover earlier ones)."""

    def __init__(self, grid: _Grid, texture: np.ndarray):
        self.grid = grid
        self.hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
        self.texture = texture

    def paint(self, box: Box, mask: np.ndarray, hu: float, texture_hu: float = 0.0) -> None:
        """Set ``hu`` (plus ``texture_hu`` times the shared texture field) where ``mask`` is true in ``box``."""
        view = self.hu[box]
        if texture_hu:
            view[mask] = np.float32(hu) + np.float32(texture_hu) * self.texture[box][mask]
        else:
            view[mask] = np.float32(hu)


def _full_box(shape: tuple[int, int, int]) -> Box:
    return tuple(slice(0, n) for n in shape)


# ------------------------------------------------------------------------------------------ the generator
#: The grid the drawn voxel sizes are meant for; other matrix sizes scale them so the field of view is the same.
REFERENCE_SHAPE = (48, 256, 256)
#: ``classic``: the original generator (anatomy fitted to the field of view, realistic contrasts);
#: ``randomized``: domain-randomized anatomy and appearance (:mod:`mixsup.training.data.randomized`);
#: ``mixed``: each case draws one of the two from its seed (:func:`draw_style`).
STYLES = ("classic", "randomized", "mixed")
#: How often ``mixed`` draws ``classic``: enough realistic cases to anchor the appearance of real scans, most
#: randomized so that no contrast, size or coverage convention of one generator can be learned as "the liver".
MIXED_CLASSIC_FRACTION = 0.3


def draw_spacing(rng: np.random.Generator, shape: tuple[int, int, int] = REFERENCE_SHAPE) -> tuple[float, float, float]:
    """A scanner-like voxel size: on the 48x256x256 reference grid in-plane 0.6–2.0 mm (square pixels) and slices
    1.0–5.0 mm; a smaller matrix gets proportionally larger voxels, so it images the same anatomy more coarsely
    (a 64-pixel test phantom still holds a whole abdomen)."""
    in_plane = float(rng.uniform(0.6, 2.0)) * REFERENCE_SHAPE[2] / shape[2]
    slices = float(rng.uniform(1.0, 5.0)) * REFERENCE_SHAPE[0] / shape[0]
    return round(slices, 4), round(in_plane, 4), round(in_plane, 4)


def draw_style(seed: int, classic_fraction: float = MIXED_CLASSIC_FRACTION) -> str:
    """The style a ``mixed`` case ``seed`` uses, from its own stream so the case's phantom draws are untouched."""
    return "classic" if np.random.Generator(np.random.PCG64([seed, 2])).random() < classic_fraction else "randomized"


def generate_phantom(
    seed: int,
    shape: tuple[int, int, int] = (48, 256, 256),
    spacing: tuple[float, float, float] | None = None,
    style: str = "classic",
) -> Phantom:
    """A deterministic synthetic abdominal CT (HU) and its liver / lesion labels on the canonical grid.

    Args:
        seed: the only source of randomness (``PCG64(seed)``); the same seed gives bit-identical output.
        shape: ``(D, H, W)`` of the canonical array.
        spacing: voxel size ``(sD, sH, sW)`` in mm; drawn per case if None (by :func:`draw_spacing`, or for the
            randomized style by :func:`mixsup.training.data.randomized.draw_randomized_spacing`).
        style: one of :data:`STYLES`; ``classic`` output is unchanged from before the randomized style existed.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes >= 2, got {shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    if style == "mixed":
        style = draw_style(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    if style == "randomized":
        from mixsup.training.data.randomized import compose_randomized  # it builds on this module's helpers

        return compose_randomized(rng, shape, spacing)
    return _Composer(rng, shape, draw_spacing(rng, shape) if spacing is None else spacing).compose()


class _Sketch:
    """Drawing primitives both styles share. A subclass sets ``rng``, ``shape``, ``spacing``, ``grid``, the body's
    semi-axes ``a`` (x) and ``b`` (y) in mm and ``s`` (the anatomy scale: ``a`` over :data:`ADULT_HALF_WIDTH_MM`)
    before using them.

    Every method draws from ``rng`` in a fixed order, so a style that calls them in a fixed order stays
    deterministic per seed.
    """

    rng: np.random.Generator
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    grid: _Grid
    a: float
    b: float
    s: float

    def u(self, lo: float, hi: float) -> float:
        """One uniform draw (every random choice goes through the case's single generator)."""
        return float(self.rng.uniform(lo, hi))

    def scaled(self, lo: float, hi: float, minimum: float = 0.8) -> float:
        """A size drawn in adult mm and scaled to this body, never below ``minimum`` mm."""
        return max(self.u(lo, hi) * self.s, minimum)

    def blob(
        self,
        centre: tuple[float, float, float],
        radii: tuple[float, float, float],
        angle: float = 0.0,
        z_power: float = 2.0,
        wobble: float = 0.0,
    ) -> tuple[Box, np.ndarray] | tuple[None, None]:
        """Box and mask of an in-plane-rotated ellipsoid, its surface pushed by a smooth field of ``wobble``."""
        grow = wobble_reach(wobble)
        reach = max(radii[1], radii[2]) * grow
        found = self.grid.box(centre, (radii[0] * grow, reach, reach))
        if found is None:
            return None, None
        box, offsets = found
        level = ellipsoid_level(offsets, radii, angle, z_power)
        if wobble:
            level = level + self.surface_noise(level.shape, max(radii[1], radii[2]) * 0.8, wobble)
        return box, level < 1.0

    def local_field(self, shape: tuple[int, int, int], feature_mm: float) -> np.ndarray:
        return smooth_random_field(self.rng, shape, _control_points(shape, self.spacing, max(feature_mm, 1.0)))

    def surface_noise(self, shape: tuple[int, int, int], feature_mm: float, wobble: float) -> np.ndarray:
        """A bounded smooth level offset: the surface moves, but never beyond :func:`wobble_reach`."""
        return np.float32(wobble) * np.clip(self.local_field(shape, feature_mm), -WOBBLE_CLIP, WOBBLE_CLIP)

    def body_depth(self, a: float, b: float, z_extent: float) -> np.ndarray:
        """Depth in mm inside the skin along each pixel's ray, for a superellipse body of semi-axes ``a`` x ``b``
        whose radii shrink by up to a few % over ``z_extent`` mm (never grow, so a fitted body stays in view).
        Also keeps the rays' ``cos_t`` / ``sin_t`` for layers and ribs that depend on the direction."""
        power = self.u(2.0, 3.2)
        r, radius0, self.cos_t, self.sin_t = body_rays(self.grid, a, b, power)
        phase = self.rng.uniform(0, 2 * np.pi, 2)
        freq = self.rng.uniform(0.5, 1.5, 2) * 2 * np.pi / z_extent
        z = self.grid.z
        overall = 1.0 - self.u(0.0, 0.06) * 0.5 * (1 + np.sin(freq[0] * z + phase[0]))
        ap_only = -self.u(0.0, 0.08) * 0.5 * (1 + np.sin(freq[1] * z + phase[1]))
        depth = radius0[None] * (overall[:, None, None] + ap_only[:, None, None] * (self.sin_t**2)[None]) - r[None]
        return depth.astype(np.float32)

    def body_layers(self, fat_mm: tuple[float, float], muscle_mm: tuple[float, float]) -> float:
        """Draw skin, subcutaneous fat and abdominal-wall muscle thicknesses (fat thicker in front and at the
        sides, thinner over the back; muscle varying around the body); sets ``fat_depth`` and ``cavity_depth``
        (mm along each ray) and returns the skin thickness."""
        cos_t, sin_t = self.cos_t, self.sin_t
        skin = self.u(1.0, 3.0)
        fat = self.u(*fat_mm) * min(1.0, self.s * 1.2)
        fat_angle = fat * (1 + self.u(-0.3, 0.3) * cos_t + self.u(0.0, 0.4) * np.maximum(-sin_t, 0)
                           - self.u(0.2, 0.6) * np.maximum(sin_t, 0))
        muscle = self.u(*muscle_mm) * min(1.0, max(self.s, 0.35))
        muscle_angle = muscle * (1 + self.u(-0.3, 0.3) * np.cos(2 * np.arctan2(sin_t, cos_t) + self.u(0, 6.3)))
        self.fat_depth = (skin + fat_angle).astype(np.float32)
        self.cavity_depth = (self.fat_depth + muscle_angle).astype(np.float32)
        return skin

    def lobed_level(
        self, lobes: list[Lobe], bend: float,
        wobble: float, length: float,
    ) -> tuple[Box, np.ndarray] | None:
        """Level (``< 1`` inside) of a union of ellipsoid lobes ``(centre, radii, angle)``, bent by a smooth
        z-dependent in-plane displacement of up to ``bend`` mm (period ~ ``length``) and its surface wobbled."""
        grow = wobble_reach(wobble)
        lo = np.min([[c[i] - r[i] * grow for i in range(3)] for c, r, _ in lobes], axis=0) - bend
        hi = np.max([[c[i] + r[i] * grow for i in range(3)] for c, r, _ in lobes], axis=0) + bend
        found = self.grid.box(tuple((lo + hi) / 2), tuple((hi - lo) / 2))
        if found is None:
            return None
        box, (dz, dy, dx) = found
        zs = self.grid.z[box[0]]
        phase = self.u(0, 2 * np.pi)
        shift_x = (bend * np.sin(2 * np.pi * zs / (self.u(1.0, 2.5) * length) + phase)).astype(np.float32)
        shift_y = (0.5 * bend * np.cos(2 * np.pi * zs / (self.u(1.0, 2.5) * length) + phase)).astype(np.float32)
        shift_x, shift_y = shift_x[:, None, None], shift_y[:, None, None]
        box_centre = (lo + hi) / 2
        level = None
        for centre, radii, angle in lobes:
            offsets = (dz + np.float32(box_centre[0] - centre[0]),
                       dy + np.float32(box_centre[1] - centre[1]) + shift_y,
                       dx + np.float32(box_centre[2] - centre[2]) + shift_x)
            lobe = ellipsoid_level(offsets, radii, angle, z_power=self.u(2.0, 3.5))
            level = lobe if level is None else np.minimum(level, lobe)
        level += self.surface_noise(level.shape, self.u(25.0, 50.0) * max(self.s, 0.3), wobble)
        return box, level

    def liver_lobes(self, mid: float, half: float) -> list[Lobe]:
        """The liver's lobes ``(centre, radii, angle)`` for :meth:`lobed_level`, centred at z ``mid`` with half
        length ``half`` mm: the big right lobe, the left lobe reaching across the midline, sometimes the caudate
        lobe and a Riedel-like inferior extension; in-plane sizes follow the body's semi-axes ``a`` and ``b``."""
        lobes = [  # (centre z, y, x), (radii z, y, x), angle: the big right lobe first
            ((mid, self.u(-0.1, 0.15) * self.b, self.u(-0.5, -0.25) * self.a),
             (half * self.u(0.95, 1.05), self.u(0.6, 0.9) * self.b, self.u(0.45, 0.65) * self.a), self.u(-0.5, 0.3)),
            ((mid + half * self.u(0.0, 0.35), self.u(-0.55, -0.3) * self.b, self.u(-0.1, 0.2) * self.a),
             (half * self.u(0.35, 0.65), self.u(0.15, 0.3) * self.b, self.u(0.25, 0.45) * self.a), self.u(-0.35, 0.15)),
        ]
        if self.rng.random() < 0.5:  # caudate lobe, medial and posterior
            lobes.append(((mid + half * self.u(0.0, 0.3), self.u(0.0, 0.25) * self.b, self.u(-0.2, 0.0) * self.a),
                          (half * self.u(0.3, 0.5), self.u(0.12, 0.2) * self.b, self.u(0.1, 0.18) * self.a), 0.0))
        if self.rng.random() < 0.35:  # Riedel-like inferior extension of the right lobe
            lobes.append(((mid - half * self.u(0.4, 0.7), self.u(-0.1, 0.2) * self.b, self.u(-0.55, -0.4) * self.a),
                          (half * self.u(0.3, 0.5), self.u(0.2, 0.35) * self.b, self.u(0.12, 0.25) * self.a), 0.0))
        return lobes

    def lesion_shape(self, liver_idx: np.ndarray) -> tuple[Box, np.ndarray, np.ndarray, float]:
        """An irregular ellipsoid (log-uniform 2–35 mm radius, so tiny lesions are common) centred on a random
        liver voxel: its box, level (``< 1`` inside), mask (never empty: it keeps its centre voxel) and radius."""
        centre_idx = np.unravel_index(int(self.rng.choice(liver_idx)), self.shape)
        centre = self.grid.voxel_mm(centre_idx)
        radius = float(np.exp(self.rng.uniform(np.log(2.0), np.log(35.0))))
        radii = tuple(radius * self.rng.uniform(0.7, 1.3, 3))
        rotation = _random_rotation(self.rng)
        wobble = self.u(0.0, 0.35)
        reach = max(radii) * wobble_reach(wobble)
        box, offsets = self.grid.box(centre, (reach, reach, reach))
        level = rotated_ellipsoid_level(offsets, radii, rotation)
        level = level + self.surface_noise(level.shape, radius * 0.8, wobble)
        shape_mask = level < 1.0
        shape_mask[tuple(c - s.start for c, s in zip(centre_idx, box))] = True
        return box, level, shape_mask, radius

    def rib_mask(self, lo: int, depth: np.ndarray, thickness: float) -> np.ndarray:
        """Ribs from slice ``lo`` up: intermittent oblique arcs ``thickness`` mm thick at the inner edge of the body
        wall (``depth`` is :meth:`body_depth` from ``lo`` on), none at the anterior midline (cartilage) or
        straight behind (spine)."""
        inner = self.cavity_depth[None] + np.float32(thickness * self.u(0.2, 0.6))
        band = (depth > inner - thickness) & (depth <= inner)
        theta = np.arctan2(self.sin_t, self.cos_t)
        lateral = np.abs(self.cos_t) > self.u(0.25, 0.4)
        band &= lateral[None]
        idx = np.nonzero(band)
        period = self.scaled(25.0, 38.0, 4.0)
        phase = (2 * np.pi * self.grid.z[lo:][idx[0]] / period + self.u(4.0, 8.0) * np.abs(theta[idx[1], idx[2]])
                 + self.u(0, 6.3))
        keep = np.cos(phase) > self.u(0.3, 0.6)
        rib = np.zeros(band.shape, dtype=bool)
        rib[idx[0][keep], idx[1][keep], idx[2][keep]] = True
        return rib


class _Composer(_Sketch):
    """The classic style: draws one case's anatomy and composes it; the order of the ``_add_*`` calls is the
    painting order."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.rng = rng
        self.shape = shape
        self.spacing = spacing
        depth, height, width = shape
        half_w = width * spacing[2] / 2
        half_h = height * spacing[1] / 2
        # The body must fit the field of view: semi-axes are a fraction of it, the centre moves only in the slack.
        self.a = float(rng.uniform(0.55, 0.95) * half_w)
        self.b = float(min(rng.uniform(0.6, 0.85) * self.a, 0.93 * half_h))
        slack_x = max(half_w - self.a, 0.0) * 0.4
        slack_y = max(half_h - self.b, 0.0) * 0.4
        # a shift toward the patient's left stays small so the liver stays in the image's right half
        centre = (float(rng.uniform(-slack_y, slack_y)), float(rng.uniform(-slack_x, min(slack_x, 0.08 * self.a))))
        self.grid = _Grid(shape, spacing, centre)
        self.s = self.a / ADULT_HALF_WIDTH_MM  # anatomy scale
        self.z_lo, self.z_hi = float(self.grid.z[0]), float(self.grid.z[-1])
        self.z_len = max(self.z_hi - self.z_lo, spacing[0])
        texture = smooth_random_field(rng, shape, _control_points(shape, spacing, 12.0 * max(self.s, 0.3)))
        self.canvas = _Canvas(self.grid, texture)
        self.liver = np.zeros(shape, dtype=bool)
        self.lesion = np.zeros(shape, dtype=bool)
        self.instances = np.zeros(shape, dtype=np.uint16)
        self.contrast = bool(rng.random() < 0.75)
        self.liver_hu = float(rng.uniform(60.0, 150.0) if self.contrast else rng.uniform(30.0, 70.0))

    # -- helpers ------------------------------------------------------------------------------------------
    def z_at(self, fraction: float) -> float:
        """The z (mm) at ``fraction`` of the field's inferior -> superior extent."""
        return self.z_lo + fraction * self.z_len

    # -- composition --------------------------------------------------------------------------------------
    def compose(self) -> Phantom:
        self._add_table()
        self._add_body_wall()
        self._add_abdominal_contents()
        self._add_bowel()
        self._add_back_muscles()
        self._add_solid_organs()
        self._add_vessels()
        self._add_liver()
        self._add_lungs()
        self._add_spine()
        self._add_kidneys()
        self._add_ribs()
        self._add_hepatic_vessels()
        self._add_lesions()
        labels = np.zeros(self.shape, dtype=np.uint8)
        labels[self.liver] = LIVER
        labels[self.lesion] = LESION
        return Phantom(self._acquire(), labels, self.spacing, self.instances)

    def _add_table(self) -> None:
        """The patient table: a posterior strip some scans include."""
        if self.rng.random() < 0.4:
            return
        gap, thick = self.u(2.0, 25.0), self.u(5.0, 20.0)
        y0 = self.b + gap
        rows = (self.grid.y >= y0) & (self.grid.y < y0 + thick)
        cols = np.abs(self.grid.x) < self.u(1.0, 1.6) * self.a
        mask = np.broadcast_to(rows[None, :, None] & cols[None, None, :], self.shape)
        self.canvas.paint(_full_box(self.shape), mask, self.u(-400.0, 250.0))

    def _add_body_wall(self) -> None:
        """Superellipse body with skin, subcutaneous fat and muscle wall; radii vary smoothly with z."""
        self.depth = self.body_depth(self.a, self.b, self.z_len)  # mm inside the skin along the ray from the centre
        skin = self.body_layers(fat_mm=(5.0, 35.0), muscle_mm=(6.0, 15.0))
        full = _full_box(self.shape)
        self.canvas.paint(full, self.depth > 0, self.u(20.0, 60.0))
        self.canvas.paint(full, self.depth > skin, self.u(-120.0, -70.0), self.u(3.0, 8.0))
        self.muscle_region = self.depth > self.fat_depth[None]
        self.canvas.paint(full, self.muscle_region, self.u(35.0, 65.0), self.u(2.0, 6.0))
        self.cavity = self.depth > self.cavity_depth[None]

    def _add_abdominal_contents(self) -> None:
        """Soft tissue / bowel mix with pockets of visceral fat filling the cavity."""
        full = _full_box(self.shape)
        self.canvas.paint(full, self.cavity, self.u(15.0, 45.0), self.u(6.0, 15.0))
        fat_field = smooth_random_field(self.rng, self.shape, _control_points(self.shape, self.spacing, self.u(15, 35) * max(self.s, 0.3)))
        fat_fraction = self.u(0.1, 0.5)
        self.canvas.paint(full, self.cavity & (fat_field > ndtri(1 - fat_fraction)), self.u(-110.0, -60.0), self.u(3.0, 8.0))

    def _cavity_point(self, x_frac: tuple[float, float], y_frac: tuple[float, float], z_frac: tuple[float, float]):
        return self.z_at(self.u(*z_frac)), self.u(*y_frac) * self.b, self.u(*x_frac) * self.a

    def _add_bowel(self) -> None:
        """Bowel loops: walled blobs holding gas (with an air-fluid level), fluid or mottled stool."""
        for _ in range(int(self.rng.integers(6, 22))):
            centre = self._cavity_point((-0.7, 0.7), (-0.7, 0.3), (-0.05, 0.65))
            radius = self.scaled(10.0, 24.0, 2.0)
            radii = (self.u(0.6, 2.0) * radius, radius, radius * self.u(0.6, 1.5))
            box, mask = self.blob(centre, radii, self.u(0, np.pi), wobble=0.2)
            if box is None:
                continue
            mask &= self.cavity[box]
            self.canvas.paint(box, mask, self.u(30.0, 70.0), 5.0)
            inner_box, inner = self.blob(centre, tuple(r * 0.75 for r in radii), 0.0)
            if inner_box is None:
                continue
            inner &= self.cavity[inner_box]
            kind = self.rng.random()
            if kind < 0.35:  # gas rises anterior (supine): everything above the level is air
                level = centre[1] + self.u(-0.6, 0.5) * radii[1]
                yy = self.grid.y[inner_box[1]][None, :, None]
                self.canvas.paint(inner_box, inner, self.u(0.0, 25.0), 3.0)
                self.canvas.paint(inner_box, inner & (yy < level), self.u(-1000.0, -900.0))
            elif kind < 0.7:
                self.canvas.paint(inner_box, inner, self.u(0.0, 25.0), 3.0)
            else:
                self.canvas.paint(inner_box, inner, self.u(20.0, 60.0), 25.0)
                bubbles = self.canvas.texture[inner_box] > self.u(1.2, 2.2)
                self.canvas.paint(inner_box, inner & bubbles, self.u(-950.0, -500.0))

    def _add_back_muscles(self) -> None:
        """Paraspinal muscles behind the spine and psoas muscles beside it (growing toward the pelvis)."""
        self.spine_ry = self.scaled(14.0, 19.0, 1.5)
        self.spine_rx = self.spine_ry * self.u(1.1, 1.35)
        posterior_wall = self.b - float(self.fat_depth[np.argmin(np.abs(self.grid.y - self.b)), np.argmin(np.abs(self.grid.x))])
        self.canal_r = self.scaled(6.0, 9.0, 1.0)
        self.canal_y = max(posterior_wall - self.scaled(20.0, 35.0, 2.0), 0.15 * self.b)
        self.spine_y = self.canal_y - self.canal_r - self.scaled(3.0, 6.0, 0.5) - self.spine_ry
        self.spine_x = self.u(-0.03, 0.03) * self.a
        muscle_hu = self.u(40.0, 60.0)
        z_mid, z_half = self.z_at(0.5), self.z_len * 0.6
        for side in (-1, 1):
            centre = (z_mid, self.canal_y + self.scaled(8.0, 14.0), self.spine_x + side * self.scaled(28.0, 38.0))
            box, mask = self.blob(centre, (z_half, self.scaled(22.0, 30.0), self.scaled(20.0, 30.0)), wobble=0.1)
            if box is not None:
                self.canvas.paint(box, mask & self.muscle_region[box], muscle_hu, 3.0)
        # psoas: radius grows inferiorly from nothing at ~60% of the field to its full size at the bottom
        top = self.u(0.45, 0.8)
        full_r = self.scaled(15.0, 25.0, 1.5)
        frac = np.clip((self.z_at(top) - self.grid.z) / (top * self.z_len + 1e-6), 0, 1).astype(np.float32)
        radius_z = (full_r * np.sqrt(frac))[:, None, None]
        for side in (-1, 1):
            cx = self.spine_x + side * (self.spine_rx + full_r * self.u(0.6, 1.0))
            cy = self.spine_y + self.u(-0.3, 0.3) * self.spine_ry
            found = self.grid.box((self.z_at(0.5), cy, cx), (self.z_len, full_r * 1.2, full_r * 1.2))
            if found is None:
                continue
            box, (dz, dy, dx) = found
            mask = (dy * dy / 1.2 + dx * dx) < radius_z[box[0]] ** 2
            self.canvas.paint(box, mask & self.muscle_region[box], muscle_hu + self.u(-5, 5), 3.0)

    def _add_solid_organs(self) -> None:
        """Liver look-alikes: spleen, pancreas and the stomach (gas bubble, fluid or collapsed)."""
        # spleen: posterolateral left, upper abdomen, HU within ±25 of the liver
        centre = self._cavity_point((0.45, 0.7), (0.0, 0.45), (0.55, 0.85))
        radii = (self.u(0.12, 0.3) * self.z_len, self.scaled(40.0, 65.0, 3.0), self.scaled(22.0, 35.0, 2.0))
        box, mask = self.blob(centre, radii, self.u(0.6, 1.3), z_power=self.u(2, 3), wobble=0.25)
        if box is not None:
            self.canvas.paint(box, mask & self.cavity[box], self.liver_hu + self.u(-25.0, 25.0), self.u(2.0, 8.0))
        # pancreas: an elongated blob across the midline in front of the aorta
        centre = (self.z_at(self.u(0.4, 0.65)), self.spine_y - self.spine_ry - self.scaled(20.0, 40.0), self.u(-0.05, 0.25) * self.a)
        radii = (self.u(0.05, 0.12) * self.z_len, self.scaled(9.0, 16.0, 1.0), self.scaled(45.0, 70.0, 3.0))
        box, mask = self.blob(centre, radii, self.u(-0.4, 0.1), wobble=0.35)
        if box is not None:
            hu = self.u(60.0, 130.0) if self.contrast else self.u(30.0, 50.0)
            self.canvas.paint(box, mask & self.cavity[box], hu, self.u(4.0, 10.0))
        # stomach: left anterior upper, muscular wall around gas / fluid / food
        if self.rng.random() < 0.9:
            centre = self._cavity_point((0.15, 0.45), (-0.45, -0.05), (0.55, 0.9))
            radii = (self.u(0.1, 0.25) * self.z_len, self.scaled(30.0, 50.0, 3.0), self.scaled(35.0, 60.0, 3.0))
            angle = self.u(-0.6, 0.6)
            box, mask = self.blob(centre, radii, angle, wobble=0.15)
            if box is not None:
                mask &= self.cavity[box]
                self.canvas.paint(box, mask, self.u(35.0, 70.0), 4.0)
                wall = self.scaled(3.0, 6.0, 1.0)
                inner_box, inner = self.blob(centre, (radii[0] - wall, radii[1] - wall, radii[2] - wall), angle)
                if inner_box is not None:
                    inner &= self.cavity[inner_box]
                    content = self.rng.random()
                    if content < 0.25:  # collapsed: a thick soft-tissue wall only
                        self.canvas.paint(inner_box, inner, self.u(30.0, 55.0), 6.0)
                    else:
                        self.canvas.paint(inner_box, inner, self.u(0.0, 20.0) if content < 0.75 else self.u(15.0, 60.0), 8.0)
                        level = centre[1] + self.u(-1.0, 0.2) * radii[1]
                        yy = self.grid.y[inner_box[1]][None, :, None]
                        self.canvas.paint(inner_box, inner & (yy < level), self.u(-1000.0, -900.0))

    def _add_vessels(self) -> None:
        """Aorta (left-anterior of the spine) and IVC (right), tubes along z with a slight drift."""
        self.great_vessels = np.zeros(self.shape, dtype=bool)
        aorta_r = self.scaled(9.0, 14.0, 1.0)
        aorta_hu = self.u(120.0, 350.0) if self.contrast else self.u(35.0, 50.0)
        ivc_hu = self.u(80.0, 200.0) if self.contrast else self.u(35.0, 55.0)
        ivc_r = self.scaled(9.0, 14.0, 1.0)
        tubes = [
            (self.spine_y - self.spine_ry - aorta_r - self.scaled(0.0, 6.0), self.spine_x + self.scaled(5.0, 22.0), aorta_r, 1.0, aorta_hu),
            (self.spine_y - self.spine_ry - self.scaled(5.0, 20.0), self.spine_x - self.scaled(20.0, 32.0), ivc_r, self.u(0.55, 0.9), ivc_hu),
        ]
        self.retro_depth = 2.2 * aorta_r
        self.retro_half_width = max(self.spine_rx * 1.3, tubes[0][1] - self.spine_x + aorta_r * 1.2)
        for cy, cx, radius, flat, hu in tubes:
            drift = self.u(-0.1, 0.1) * radius * (self.grid.z / self.z_len)
            found = self.grid.box((0.0, cy, cx), (self.z_len, radius * 1.5, radius * 1.5))
            if found is None:
                continue
            box, (dz, dy, dx) = found
            ddx = dx - drift[box[0]][:, None, None]
            mask = (dy / np.float32(flat)) ** 2 + ddx * ddx < np.float32(radius * radius)
            mask = mask & self.cavity[box]
            self.canvas.paint(box, mask, hu, 2.0)
            self.great_vessels[box] |= mask

    def _add_liver(self) -> None:
        """Union of 2–4 lobes in the right upper abdomen, bent and wobbled, clipped to the cavity."""
        length = self.u(0.5, 1.0) * self.z_len
        top = self.z_hi + self.u(-0.1, 0.2) * self.z_len
        mid = top - length / 2
        half = length / 2
        lobes = self.liver_lobes(mid, half)
        found = self.lobed_level(lobes, bend=self.u(0.0, 0.12) * self.a, wobble=self.u(0.1, 0.3), length=length)
        if found is None:
            return
        box, level = found
        # the IVC runs past (or through) the liver but is not liver
        mask = (level < 1.0) & self.cavity[box] & ~self.great_vessels[box] & ~self._retroperitoneum(box)
        self.liver[box] = mask
        variation = self.local_field(mask.shape, self.u(20.0, 60.0) * max(self.s, 0.3)) * np.float32(self.u(5.0, 15.0))
        view = self.canvas.hu[box]
        view[mask] = np.float32(self.liver_hu) + variation[mask] + np.float32(self.u(1.0, 4.0)) * self.canvas.texture[box][mask]
        self.liver_box = box

    def _retroperitoneum(self, box: Box) -> np.ndarray:
        """Spine, aorta and the space around them, where no liver can grow."""
        return retroperitoneum_mask(self.grid, box, (self.spine_y, self.spine_x), self.spine_ry, self.retro_depth,
                                    self.retro_half_width)

    def _carve_liver(self, box: Box, mask: np.ndarray) -> None:
        """Structures painted after the liver take their voxels out of its label."""
        self.liver[box] &= ~mask

    def _add_spine(self) -> None:
        """Vertebral body (cortical rim, cancellous core, discs), spinal canal and posterior elements."""
        rim = self.scaled(1.5, 3.0, 0.6)
        cortical, cancellous = self.u(600.0, 1200.0), self.u(150.0, 400.0)
        z_c = self.z_at(0.5)
        centre = (z_c, self.spine_y, self.spine_x)
        found = self.grid.box(centre, (self.z_len, self.canal_y - self.spine_y + self.scaled(45.0, 55.0, 4.0) + self.spine_ry,
                                       self.spine_rx * 2.2))
        if found is None:
            return
        box, (dz, dy, dx) = found
        body = (dy / np.float32(self.spine_ry)) ** 2 + (dx / np.float32(self.spine_rx)) ** 2
        inner = (dy / np.float32(self.spine_ry - rim)) ** 2 + (dx / np.float32(self.spine_rx - rim)) ** 2
        vert_body = np.broadcast_to(body < 1.0, (dz.shape[0],) + body.shape[1:])
        # discs: periodic along z, lower HU, no cortical rim
        period = self.scaled(28.0, 36.0, 6.0)
        disc = (np.mod(self.grid.z[box[0]] + self.u(0, period), period) < period * self.u(0.2, 0.3))[:, None, None]
        cy = np.float32(self.canal_y - self.spine_y)
        canal = (dy - cy) ** 2 + dx * dx < np.float32(self.canal_r**2)
        arch = ((dy - cy) ** 2 + dx * dx < np.float32((self.canal_r + rim * 2.5) ** 2)) & ~canal
        spinous = (np.abs(dx) < np.float32(self.scaled(3.0, 5.0, 0.6))) & (dy > cy) & (dy < cy + np.float32(self.scaled(30.0, 45.0, 3.0)))
        elements = (arch | spinous | ((np.abs(dy - cy) < rim * 1.5) & (np.abs(dx) < self.spine_rx * 1.6)))
        inside = self.muscle_region[box]
        values = np.where(inner < 1.0, np.float32(cancellous), np.float32(cortical))
        bone_mask = vert_body & inside
        view = self.canvas.hu[box]
        view[bone_mask] = np.broadcast_to(values, bone_mask.shape)[bone_mask]
        disc_mask = vert_body & disc & inside
        view[disc_mask] = np.float32(self.u(70.0, 110.0))
        elem_mask = np.broadcast_to(elements, bone_mask.shape) & ~disc & inside
        view[elem_mask] = np.float32((cortical + cancellous) / 2)
        canal_mask = np.broadcast_to(canal, bone_mask.shape) & inside
        view[canal_mask] = np.float32(self.u(10.0, 30.0))
        self._carve_liver(box, bone_mask | elem_mask | canal_mask)

    def _add_kidneys(self) -> None:
        """Both kidneys beside the spine in the lower field (right lower than left); cortex and medulla."""
        if self.contrast:
            cortex = self.u(130.0, 220.0)
            medulla = cortex - self.u(40.0, 100.0)
        else:
            cortex = self.u(25.0, 45.0)
            medulla = cortex - self.u(0.0, 10.0)
        for side, z_range in ((-1, (0.1, 0.4)), (1, (0.2, 0.5))):
            if self.rng.random() < 0.08:  # nephrectomy
                continue
            centre = (self.z_at(self.u(*z_range)), self.spine_y + self.u(-0.2, 0.6) * self.spine_ry,
                      self.spine_x + side * (self.spine_rx + self.scaled(35.0, 55.0)))
            radii = (self.u(0.12, 0.22) * self.z_len, self.scaled(22.0, 30.0, 1.5), self.scaled(25.0, 32.0, 1.5))
            angle = side * self.u(0.3, 0.7)
            box, mask = self.blob(centre, radii, angle, wobble=0.1)
            if box is None:
                continue
            mask &= self.cavity[box]
            self.canvas.paint(box, mask, cortex, 4.0)
            self._carve_liver(box, mask)
            inner_box, inner = self.blob(centre, tuple(r * self.u(0.55, 0.7) for r in radii), angle)
            if inner_box is not None:
                self.canvas.paint(inner_box, inner & self.cavity[inner_box], medulla, 4.0)

    def _add_lungs(self) -> None:
        """Lung bases at the top around the liver dome, lower posteriorly (costophrenic recesses); the heart
        sits on the diaphragm in front. The liver keeps its voxels: its dome pushes the diaphragm up."""
        if self.rng.random() < 0.25:
            return
        floor_centre = self.z_hi - self.u(-0.05, 0.25) * self.z_len
        drop = self.u(0.05, 0.25) * self.z_len
        y_rel = np.clip(self.grid.y / self.b, -1, 1)
        x_rel = self.grid.x / self.a
        # floor (mm) per in-plane position: a dome, lower posteriorly and laterally
        floor = (floor_centre - drop * np.clip(y_rel[:, None] + 0.3, 0, None) - 0.3 * drop * x_rel[None, :] ** 2).astype(np.float32)
        lo = int(np.searchsorted(self.grid.z, float(floor.min()), side="left"))
        if lo >= self.shape[0]:
            return
        box = (slice(lo, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))
        above = (self.grid.z[lo:, None, None] > floor[None]) & self.cavity[box] & ~self.liver[box] & ~self.great_vessels[box]
        heart_x, heart_y = self.u(0.0, 0.25), self.u(-0.35, -0.1)
        heart = ((x_rel[None, :] - heart_x) / self.u(0.25, 0.4)) ** 2 + ((y_rel[:, None] - heart_y) / self.u(0.35, 0.55)) ** 2 < 1.0
        heart_hu = self.u(100.0, 250.0) if self.contrast else self.u(30.0, 55.0)
        self.canvas.paint(box, above & heart[None], heart_hu, 4.0)
        self.canvas.paint(box, above & ~heart[None], self.u(-900.0, -750.0), self.u(5.0, 20.0))

    def _add_ribs(self) -> None:
        """Ribs: intermittent oblique bright arcs at the inner edge of the body wall in the upper slices."""
        start = self.u(0.25, 0.5)
        lo = int(np.searchsorted(self.grid.z, self.z_at(start), side="left"))
        if lo >= self.shape[0]:
            return
        box = (slice(lo, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))
        rib = self.rib_mask(lo, self.depth[box], self.scaled(5.0, 9.0, 1.0))
        self.canvas.paint(box, rib, self.u(300.0, 900.0), 30.0)
        self._carve_liver(box, rib)

    def _add_hepatic_vessels(self) -> None:
        """Branching tubes inside the liver, brighter (contrast) or darker than parenchyma; still label 1."""
        liver_idx = np.flatnonzero(self.liver)
        if liver_idx.size < 50:
            return
        delta = self.u(20.0, 60.0) * (1 if self.contrast else -1)
        if self.contrast and self.rng.random() < 0.2:  # late arterial: vessels darker than an enhancing liver
            delta = -delta

        def point(i: int) -> tuple[float, float, float]:
            return self.grid.voxel_mm(np.unravel_index(int(i), self.shape))

        root = np.array(point(self.rng.choice(liver_idx)))
        for _ in range(int(self.rng.integers(2, 5))):
            end = np.array(point(self.rng.choice(liver_idx)))
            self._tube(root, end, self.u(2.0, 5.0) * max(self.s, 0.4), delta)
            for _ in range(int(self.rng.integers(1, 3))):
                start = root + (end - root) * self.u(0.3, 0.9)
                tip = np.array(point(self.rng.choice(liver_idx)))
                self._tube(start, start + (tip - start) * self.u(0.4, 0.8), self.u(1.2, 3.0) * max(self.s, 0.4), delta * 0.8)

    def _tube(self, start: np.ndarray, end: np.ndarray, radius: float, delta_hu: float) -> None:
        found = tube_mask(self.grid, start, end, radius)
        if found is None:
            return
        box, mask = found
        mask &= self.liver[box]
        self.canvas.paint(box, mask, self.liver_hu + delta_hu, 3.0)

    def _add_lesions(self) -> None:
        """0–8 irregular lesions (2–35 mm radius), hypo- or hyperdense, some rimmed, clipped to the liver."""
        liver_idx = np.flatnonzero(self.liver)
        count = 0 if self.rng.random() < 0.2 else int(self.rng.integers(1, 9))
        if liver_idx.size < 20:
            return
        for lesion_id in range(1, count + 1):
            box, level, shape_mask, radius = self.lesion_shape(liver_idx)
            mask = shape_mask & self.liver[box]
            hyper = self.rng.random() < 0.25
            lesion_hu = self.liver_hu + (self.u(20.0, 70.0) if hyper else -self.u(20.0, 90.0))
            self.canvas.paint(box, mask, lesion_hu, self.u(2.0, 10.0))
            if self.rng.random() < 0.3:  # enhancing (or dark) rim
                rim = mask & (level > self.u(0.5, 0.75))
                self.canvas.paint(box, rim, lesion_hu + self.u(20.0, 60.0) * (1 if self.rng.random() < 0.7 else -1), 3.0)
            if radius > 12.0 and self.rng.random() < 0.3:  # necrotic core
                self.canvas.paint(box, mask & (level < self.u(0.1, 0.3)), self.u(0.0, 25.0), 3.0)
            self.lesion[box] |= mask
            self.instances[box][mask] = lesion_id

    def _acquire(self) -> np.ndarray:
        """Partial-volume blur, then (optionally correlated) noise, rounded and clipped to int16 HU."""
        s_d, s_h, _ = self.spacing
        sigma = self.u(0.4, 1.0)
        sigma_z = sigma * s_h / s_d
        hu = ndimage.gaussian_filter(self.canvas.hu, (sigma_z if sigma_z > 0.2 else 0.0, sigma, sigma), mode="nearest")
        hu = hu * np.float32(self.u(0.97, 1.03)) + np.float32(self.u(-8.0, 8.0))  # scanner calibration
        noise_std = self.u(4.0, 30.0)
        hu += correlated_noise(self.rng, self.shape, (0.5, 1.5)) * np.float32(noise_std)
        return quantize_hu(hu)
