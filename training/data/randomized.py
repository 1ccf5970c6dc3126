"""Domain-randomized synthetic abdominal CT, in the spirit of SynthSeg (Billot et al.).

Why: a model trained on the classic generator learned its *style* (which organs are always painted, how bright
each is relative to the liver, the liver always filling the upper field), not the liver: on phantoms from an
unseen generator it labelled homogeneous upper-abdominal tissue near liver HU as liver, and on real CT it missed
the inferior liver. So here the geometry is drawn first as a map of *tissues* (:data:`TISSUES`) and the
appearance of every tissue is drawn independently afterwards, widely enough that no intensity relation holds
across cases and only shape and context identify the liver:

* **Intensities** per case: a contrast phase (non-contrast, arterial, portal venous: vessels, kidneys, spleen and
  liver enhance coherently) or, for a fifth of cases, ``free`` contrast where every soft tissue, vessel and fluid
  is drawn independently over wide ranges. Liver 20–180 HU. Half the cases then pull the surrounding soft tissue
  (muscle, spleen, kidneys, pancreas, bowel / stomach wall, mesentery) *darker than*, *equal to* or *brighter
  than* the liver. Large homogeneous look-alike masses sit within ±40 HU of the liver. Lesions are hypo-, iso-ish
  or hyperdense, some with a rim or a necrotic core.
* **Texture** per tissue (its own mix of fine, medium and coarse smooth fields), a smooth additive and
  multiplicative (on attenuation, i.e. HU + 1000) **bias field**, Gaussian **partial-volume blur**, and noise of
  std 5–40 HU, half the time correlated in-plane.
* **Resolution and coverage**: in-plane spacing 0.5–3.5 mm (log-uniform), slices 0.6–7 mm (uniform), on the
  48x256x256 reference grid. Unlike the classic style the anatomy has *physical* sizes (body half width
  125–200 mm, liver 130–210 mm craniocaudal, scaled with the body), so the voxel size sets the field of view:
  at the reference grid 128–896 mm in-plane and 29–336 mm along z. A small field cuts the body (it moves toward
  the liver so the liver stays in view); a thin stack covers a slab of the liver; a third of cases are shifted to
  cut the liver at the top or the bottom. A matrix other than the reference scales the drawn voxel size by
  ``REFERENCE_SHAPE / shape`` (as the classic style does), so the field of view, hence what anatomy is in view,
  does not depend on the matrix: a 64-pixel test phantom shows the same patient more coarsely. An explicit
  ``spacing`` is taken as is, and the field of view is then ``shape * spacing``.
* **Anatomy**: bodies from few organs (kidneys, spleen, stomach, pancreas each sometimes missing, few bowel loops:
  the abdomen a large homogeneous soft-tissue region) to crowded ones; and what real scans carry at the liver's
  edges: the diaphragm with lungs and the heart above the dome, ribs, gas-filled bowel (hepatic flexure,
  duodenum) at the inferior edge, the gallbladder, the IVC running through the liver's bare area, the portal vein
  entering the hilum and branching inside, hepatic veins draining to the IVC.

Labels: 0 background, 1 liver (parenchyma plus the intrahepatic portal branches and hepatic veins), 2 lesion;
the IVC, portal vein trunk and gallbladder are not liver. Labels are read off the final tissue map, so whatever
is painted over the liver leaves its label. Everything random comes from the one generator passed in.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from mixsup.training.data.phantoms import (
    ADULT_HALF_WIDTH_MM,
    LESION,
    LIVER,
    REFERENCE_SHAPE,
    Box,
    Phantom,
    _Grid,
    _Sketch,
    correlated_noise,
    quantize_hu,
    retroperitoneum_mask,
    smooth_random_field,
    tube_mask,
)

#: Every structure the randomized style draws; ``Phantom.tissues`` holds indices into this tuple.
TISSUES = (
    "air", "table", "skin", "subcutaneous_fat", "body_wall_muscle", "visceral_fat", "visceral_soft_tissue",
    "back_muscle", "psoas", "bowel_wall", "bowel_fluid", "bowel_gas", "stool", "lookalike", "stomach_wall",
    "stomach_content", "spleen", "pancreas", "kidney_cortex", "kidney_medulla", "aorta", "ivc", "portal_vein",
    "liver", "hepatic_vein", "portal_branch", "gallbladder_wall", "bile", "gallstone", "diaphragm", "lung", "heart",
    "cortical_bone", "cancellous_bone", "disc", "spinal_canal", "rib", "lesion", "lesion_rim", "lesion_core",
)
TISSUE_ID = {name: index for index, name in enumerate(TISSUES)}
#: Tissues labelled liver: vessels inside the parenchyma belong to it, as in LiTS-style annotations.
LIVER_TISSUES = ("liver", "hepatic_vein", "portal_branch")
LESION_TISSUES = ("lesion", "lesion_rim", "lesion_core")
#: Soft tissues a case may pull darker than, equal to or brighter than the liver.
RELATIVE_TISSUES = (
    "body_wall_muscle", "back_muscle", "psoas", "diaphragm", "visceral_soft_tissue", "bowel_wall", "stomach_wall",
    "spleen", "pancreas", "kidney_cortex", "kidney_medulla",
)
PHASES = ("non-contrast", "arterial", "portal venous", "free")
PHASE_WEIGHTS = (0.25, 0.2, 0.35, 0.2)
#: Reference-grid voxel sizes (mm); in-plane is drawn log-uniformly so that each doubling is equally common.
IN_PLANE_MM = (0.5, 3.5)
SLICE_MM = (0.6, 7.0)
NOISE_STD_HU = (5.0, 40.0)
LIVER_HU = (20.0, 180.0)
#: How far a look-alike mass (or a pulled soft tissue) may sit from the liver's HU.
LOOKALIKE_DELTA_HU = 40.0

Range = tuple[float, float]
_SOFT, _BLOOD, _FLUID = (-20.0, 250.0), (-20.0, 400.0), (-20.0, 60.0)


class _Look(NamedTuple):
    """A tissue's HU ranges per phase (non-contrast, arterial, portal venous, free) and its largest texture
    amplitude (HU). Air, gas, fat, lung and bone keep physical ranges in ``free`` cases: they are what makes a
    body look like a body, and a CT's HU scale is calibrated."""

    non_contrast: Range
    arterial: Range
    portal: Range
    free: Range
    texture: float


def _fixed(hu: Range, free: Range | None = None, texture: float = 10.0) -> _Look:
    """A tissue contrast agents do not change."""
    return _Look(hu, hu, hu, free or hu, texture)


LOOKS: dict[str, _Look] = {
    "air": _fixed((-1005.0, -995.0), texture=0.0),
    "table": _fixed((-500.0, 200.0), texture=10.0),
    "skin": _fixed((10.0, 60.0), (-20.0, 120.0)),
    "subcutaneous_fat": _fixed((-130.0, -70.0), (-150.0, 20.0), texture=8.0),
    "visceral_fat": _fixed((-120.0, -60.0), (-150.0, 20.0), texture=10.0),
    "body_wall_muscle": _Look((35.0, 65.0), (45.0, 75.0), (50.0, 85.0), _SOFT, 10.0),
    "back_muscle": _Look((35.0, 65.0), (45.0, 75.0), (50.0, 85.0), _SOFT, 10.0),
    "psoas": _Look((35.0, 65.0), (45.0, 75.0), (50.0, 85.0), _SOFT, 10.0),
    "diaphragm": _Look((35.0, 65.0), (45.0, 75.0), (50.0, 85.0), _SOFT, 8.0),
    "visceral_soft_tissue": _Look((10.0, 50.0), (20.0, 70.0), (25.0, 80.0), _SOFT, 15.0),
    "bowel_wall": _Look((25.0, 50.0), (60.0, 140.0), (60.0, 130.0), _SOFT, 10.0),
    "bowel_fluid": _fixed((-5.0, 30.0), _FLUID, texture=5.0),
    "bowel_gas": _fixed((-1000.0, -850.0), texture=15.0),
    "stool": _fixed((0.0, 60.0), (-50.0, 80.0), texture=40.0),
    "lookalike": _fixed((0.0, 0.0), texture=15.0),  # drawn relative to the liver
    "stomach_wall": _Look((25.0, 50.0), (60.0, 140.0), (60.0, 130.0), _SOFT, 10.0),
    "stomach_content": _fixed((-5.0, 40.0), _FLUID, texture=15.0),
    "spleen": _Look((35.0, 60.0), (80.0, 200.0), (100.0, 160.0), _SOFT, 25.0),
    "pancreas": _Look((30.0, 55.0), (90.0, 160.0), (80.0, 130.0), _SOFT, 15.0),
    "kidney_cortex": _Look((25.0, 45.0), (140.0, 280.0), (130.0, 220.0), _SOFT, 10.0),
    "kidney_medulla": _Look((20.0, 40.0), (50.0, 110.0), (120.0, 200.0), _SOFT, 10.0),
    "aorta": _Look((30.0, 55.0), (200.0, 450.0), (130.0, 220.0), _BLOOD, 5.0),
    "ivc": _Look((30.0, 55.0), (50.0, 110.0), (100.0, 180.0), _BLOOD, 15.0),
    "portal_vein": _Look((30.0, 55.0), (60.0, 140.0), (140.0, 230.0), _BLOOD, 8.0),
    "liver": _Look((20.0, 80.0), (50.0, 120.0), (80.0, 180.0), LIVER_HU, 20.0),
    "hepatic_vein": _Look((20.0, 50.0), (25.0, 80.0), (120.0, 220.0), _BLOOD, 5.0),
    "portal_branch": _Look((25.0, 55.0), (50.0, 130.0), (130.0, 220.0), _BLOOD, 5.0),
    "gallbladder_wall": _Look((20.0, 50.0), (50.0, 110.0), (50.0, 100.0), _SOFT, 5.0),
    "bile": _fixed((-5.0, 30.0), _FLUID, texture=4.0),
    "gallstone": _fixed((60.0, 800.0), texture=20.0),
    "lung": _fixed((-920.0, -700.0), texture=40.0),
    "heart": _Look((30.0, 55.0), (200.0, 400.0), (120.0, 200.0), _BLOOD, 10.0),
    "cortical_bone": _fixed((500.0, 1300.0), texture=80.0),
    "cancellous_bone": _fixed((120.0, 350.0), texture=60.0),
    "disc": _fixed((60.0, 110.0), texture=8.0),
    "spinal_canal": _fixed((0.0, 30.0), texture=5.0),
    "rib": _fixed((250.0, 900.0), texture=60.0),
    "lesion": _fixed((0.0, 0.0), texture=12.0),  # lesions are drawn per lesion, relative to the liver
    "lesion_rim": _fixed((0.0, 0.0), texture=5.0),
    "lesion_core": _fixed((0.0, 25.0), texture=5.0),
}


def draw_randomized_spacing(
    rng: np.random.Generator, shape: tuple[int, int, int] = REFERENCE_SHAPE
) -> tuple[float, float, float]:
    """Voxel size on the reference grid (in-plane log-uniform over :data:`IN_PLANE_MM`, slices uniform over
    :data:`SLICE_MM`), scaled by ``REFERENCE_SHAPE / shape`` so the field of view does not depend on the matrix."""
    in_plane = math.exp(rng.uniform(math.log(IN_PLANE_MM[0]), math.log(IN_PLANE_MM[1]))) * REFERENCE_SHAPE[2] / shape[2]
    slices = float(rng.uniform(*SLICE_MM)) * REFERENCE_SHAPE[0] / shape[0]
    return round(slices, 4), round(in_plane, 4), round(in_plane, 4)


def compose_randomized(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float] | None
) -> Phantom:
    """One randomized case from ``rng`` (see the module docstring); called by ``generate_phantom``."""
    return _RandomizedComposer(rng, shape, spacing).compose()


def _capped_control_points(shape: tuple[int, ...], spacing: tuple[float, ...], feature_mm: float) -> tuple[int, ...]:
    """Control points for features of ``feature_mm``, at most one per two voxels: finer detail than that is the
    noise's job, and the cap keeps a full-volume texture field cheap at coarse voxel sizes."""
    return tuple(min(max(2, int(round(n * s / feature_mm)) + 1), max(2, n // 2)) for n, s in zip(shape, spacing))


class _RandomizedComposer(_Sketch):
    """Draws one case's tissue map (the ``_add_*`` calls, in painting order), then its appearance."""

    def __init__(
        self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float] | None
    ):
        self.rng = rng
        self.shape = shape
        self.spacing = draw_randomized_spacing(rng, shape) if spacing is None else spacing
        self.a = self.u(125.0, 200.0)  # body half width, mm: small to large adults
        self.b = self.a * self.u(0.6, 0.85)
        self.s = self.a / ADULT_HALF_WIDTH_MM
        #: 0: few organs, little fat, a large homogeneous abdomen; 1: every organ and many bowel loops
        self.crowding = self.u(0.0, 1.0)
        #: craniocaudal liver extent; z = 0 is the liver dome, the liver's tip is near z = -liver_length
        self.liver_length = self.u(130.0, 210.0) * self.s
        self.grid = self._place_field()
        self.window_mm = self.shape[0] * self.spacing[0]
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.instances = np.zeros(shape, dtype=np.uint16)
        self.lesion_looks: list[tuple[bool, bool]] = []  # per lesion: has a rim, has a necrotic core

    def _place_field(self) -> _Grid:
        """Where the field of view lies on the body. In-plane, a field narrower than the body is pulled toward the
        liver (right of centre) so the liver stays in view; along z, the field covers the liver wholly, a slab of
        it, or (a third of cases) is shifted so the liver is cut at the top or bottom, always overlapping it."""
        half_z, half_y, half_x = (n * s / 2 for n, s in zip(self.shape, self.spacing))
        pull = min(max(1.0 - half_x / self.a, 0.0), 1.0)
        view_x = pull * (-0.375 * self.a) + self.u(-0.25, 0.25) * half_x
        view_y = self.u(-0.25, 0.25) * half_y
        length = self.liver_length
        view_z = -length / 2 + self.u(-1.0, 1.0) * abs(half_z - length / 2)
        if self.rng.random() < 0.35:
            view_z += (1 if self.rng.random() < 0.5 else -1) * self.u(0.15, 0.5) * length
        overlap = 0.35 * min(2 * half_z, length)
        view_z = min(max(view_z, -length - half_z + overlap), half_z - overlap)
        return _Grid(self.shape, self.spacing, centre_yx=(-view_y, -view_x), centre_z=-view_z)

    # -- helpers ------------------------------------------------------------------------------------------
    def paint(self, box: Box, mask: np.ndarray, tissue: str) -> None:
        """Set ``tissue`` where ``mask`` is true in ``box`` (later structures cover earlier ones, liver included)."""
        self.tissue[box][mask] = TISSUE_ID[tissue]

    def is_tissue(self, box: Box, names: tuple[str, ...]) -> np.ndarray:
        return np.isin(self.tissue[box], [TISSUE_ID[n] for n in names])

    def present(self, base_probability: float) -> bool:
        """Whether an optional organ is drawn: always likely in a crowded body, often missing in a sparse one."""
        return bool(self.rng.random() < base_probability + (1.0 - base_probability) * self.crowding)

    def cavity_point(self, z_mm: Range, y_frac: Range, x_frac: Range) -> tuple[float, float, float]:
        """A point with z in mm (dome = 0) and in-plane position as fractions of the body's semi-axes."""
        return self.u(*z_mm), self.u(*y_frac) * self.b, self.u(*x_frac) * self.a

    def column(self, centre_yx: tuple[float, float], radii_yx: tuple[float, float]) -> tuple[Box, np.ndarray] | None:
        """An elliptic cylinder through the whole field (spine, muscles along it)."""
        found = self.grid.box((float(self.grid.z.mean()), *centre_yx), (self.window_mm, *radii_yx))
        if found is None:
            return None
        box, (dz, dy, dx) = found
        inside = (dy / np.float32(radii_yx[0])) ** 2 + (dx / np.float32(radii_yx[1])) ** 2 < 1.0
        return box, np.broadcast_to(inside, (dz.shape[0],) + inside.shape[1:])

    def walled_blob(
        self, centre: tuple[float, float, float], radii: tuple[float, float, float], angle: float, wall_mm: float,
        wall: str, lumen: str, wobble: float,
    ) -> tuple[Box, np.ndarray] | None:
        """A hollow organ (bowel loop, stomach, gallbladder): ``wall`` tissue around a ``lumen``; returns the
        lumen's box and mask (clipped to the cavity) for its contents."""
        box, mask = self.blob(centre, radii, angle, wobble=wobble)
        if box is None:
            return None
        self.paint(box, mask & self.cavity[box], wall)
        inner_radii = tuple(max(r - wall_mm, 0.5 * r) for r in radii)
        inner_box, inner = self.blob(centre, inner_radii, angle)
        if inner_box is None:
            return None
        inner &= self.cavity[inner_box]
        self.paint(inner_box, inner, lumen)
        return inner_box, inner

    def gas_above(self, box: Box, mask: np.ndarray, level_y: float) -> None:
        """Gas rises anterior in a supine patient: everything in front of the air-fluid level is gas."""
        self.paint(box, mask & (self.grid.y[box[1]][None, :, None] < level_y), "bowel_gas")

    def liver_voxels(self) -> np.ndarray:
        return np.flatnonzero(np.isin(self.tissue, [TISSUE_ID[n] for n in LIVER_TISSUES + LESION_TISSUES]))

    # -- composition --------------------------------------------------------------------------------------
    def compose(self) -> Phantom:
        self._add_table()
        self._add_body()
        self._add_back_muscles()
        for _ in range(int(self.rng.integers(0, 1 + round(24 * self.crowding)))):
            self._add_bowel_loop(self.cavity_point((-self.liver_length - 150 * self.s, -0.4 * self.liver_length),
                                                   (-0.7, 0.3), (-0.7, 0.7)), gas_probability=0.35)
        self._add_lookalikes()
        self._add_stomach()
        self._add_spleen()
        self._add_pancreas()
        self._add_great_vessels()
        self._add_liver()
        self._add_gallbladder()
        self._add_portal_vein()
        self._add_hepatic_veins()
        self._add_kidneys()
        for _ in range(int(self.rng.integers(0, 4)) + int(self.crowding > 0.3)):  # hepatic flexure, duodenum
            self._add_bowel_loop(self.cavity_point((-1.05 * self.liver_length, -0.6 * self.liver_length),
                                                   (-0.5, 0.3), (-0.65, -0.15)), gas_probability=0.5)
        self._add_thorax()
        self._add_spine()
        self._add_ribs()
        self._add_lesions()
        labels = np.zeros(self.shape, dtype=np.uint8)
        labels[self.is_tissue(np.s_[:, :, :], LIVER_TISSUES)] = LIVER
        labels[self.is_tissue(np.s_[:, :, :], LESION_TISSUES)] = LESION
        return Phantom(self._render(), labels, self.spacing, self.instances, style="randomized", tissues=self.tissue)

    def _add_table(self) -> None:
        """The patient table: a posterior strip some scans include."""
        if self.rng.random() < 0.4:
            return
        y0 = self.b + self.u(2.0, 25.0)
        rows = (self.grid.y >= y0) & (self.grid.y < y0 + self.u(5.0, 20.0))
        cols = np.abs(self.grid.x) < self.u(1.0, 1.6) * self.a
        self.paint(np.s_[:, :, :], np.broadcast_to(rows[None, :, None] & cols[None, None, :], self.shape), "table")

    def _add_body(self) -> None:
        """Skin, subcutaneous fat (thin to thick), wall muscle; the cavity is mesenteric soft tissue with pockets of
        visceral fat, from none (a large homogeneous soft-tissue abdomen) to half of it."""
        self.depth = self.body_depth(self.a, self.b, self.window_mm)
        skin = self.body_layers(fat_mm=(2.0, 45.0), muscle_mm=(5.0, 15.0))
        full = np.s_[:, :, :]
        self.paint(full, self.depth > 0, "skin")
        self.paint(full, self.depth > skin, "subcutaneous_fat")
        self.muscle_region = self.depth > self.fat_depth[None]
        self.paint(full, self.muscle_region, "body_wall_muscle")
        self.cavity = self.depth > self.cavity_depth[None]
        self.paint(full, self.cavity, "visceral_soft_tissue")
        fat_fraction = self.u(0.0, 0.55)
        if fat_fraction > 0.02:
            field = smooth_random_field(self.rng, self.shape, _capped_control_points(
                self.shape, self.spacing, self.u(15.0, 35.0) * self.s))
            self.paint(full, self.cavity & (field > ndtri(1 - fat_fraction)), "visceral_fat")

    def _add_back_muscles(self) -> None:
        """Spine position; paraspinal muscles behind it and psoas muscles beside it, growing toward the pelvis."""
        self.spine_ry = self.scaled(14.0, 19.0, 1.5)
        self.spine_rx = self.spine_ry * self.u(1.1, 1.35)
        self.canal_r = self.scaled(6.0, 9.0, 1.0)
        back_fat = float(self.fat_depth[np.argmax(self.sin_t[:, self.shape[2] // 2]), self.shape[2] // 2])
        self.canal_y = max(self.b - min(back_fat, 0.3 * self.b) - self.scaled(30.0, 45.0, 2.0), 0.15 * self.b)
        self.spine_y = self.canal_y - self.canal_r - self.scaled(3.0, 6.0, 0.5) - self.spine_ry
        self.spine_x = self.u(-0.03, 0.03) * self.a
        for side in (-1, 1):
            found = self.column((self.canal_y + self.scaled(8.0, 14.0), self.spine_x + side * self.scaled(28.0, 38.0)),
                                (self.scaled(22.0, 30.0), self.scaled(20.0, 30.0)))
            if found is not None:
                self.paint(found[0], found[1] & self.muscle_region[found[0]], "back_muscle")
        top = -self.liver_length * self.u(0.5, 0.8)
        full_r = self.scaled(15.0, 25.0, 1.5)
        radius_z = (full_r * np.sqrt(np.clip((top - self.grid.z) / (80.0 * self.s), 0, 1)))[:, None, None]
        for side in (-1, 1):
            centre_yx = (self.spine_y + self.u(-0.3, 0.3) * self.spine_ry,
                         self.spine_x + side * (self.spine_rx + full_r * self.u(0.6, 1.0)))
            found = self.grid.box((float(self.grid.z.mean()), *centre_yx), (self.window_mm, full_r * 1.2, full_r * 1.2))
            if found is not None:
                box, (_, dy, dx) = found
                self.paint(box, ((dy * dy / 1.2 + dx * dx) < radius_z ** 2) & self.muscle_region[box], "psoas")

    def _add_bowel_loop(self, centre: tuple[float, float, float], gas_probability: float) -> None:
        """A walled loop holding gas over fluid (air-fluid level), fluid, or mottled stool with gas bubbles."""
        radius = self.scaled(10.0, 24.0, 2.0)
        radii = (self.u(0.6, 2.0) * radius, radius, radius * self.u(0.6, 1.5))
        found = self.walled_blob(centre, radii, self.u(0, np.pi), self.scaled(2.0, 5.0, 0.8), "bowel_wall",
                                 "bowel_fluid", wobble=0.2)
        if found is None:
            return
        box, lumen = found
        kind = self.rng.random()
        if kind < gas_probability:
            self.gas_above(box, lumen, centre[1] + self.u(-0.6, 0.5) * radii[1])
        elif kind < gas_probability + (1 - gas_probability) * 0.5:
            self.paint(box, lumen, "stool")
            bubbles = self.local_field(lumen.shape, self.u(3.0, 8.0)) > self.u(1.0, 2.0)
            self.paint(box, lumen & bubbles, "bowel_gas")

    def _add_lookalikes(self) -> None:
        """Large smooth masses of homogeneous soft tissue within ±40 HU of the liver (the issue's failure: such
        tissue was called liver), anywhere below the dome; more of them in sparse bodies."""
        for _ in range(int(self.rng.integers(0, 3)) + int(self.crowding < 0.35)):
            centre = self.cavity_point((-self.liver_length - 100 * self.s, -0.1 * self.liver_length),
                                       (-0.6, 0.4), (-0.6, 0.7))
            radius = self.scaled(30.0, 80.0, 3.0)
            radii = (radius * self.u(0.6, 1.4), radius * self.u(0.6, 1.0), radius * self.u(0.6, 1.0))
            box, mask = self.blob(centre, radii, self.u(0, np.pi), z_power=self.u(2.0, 3.0), wobble=0.3)
            if box is not None:
                self.paint(box, mask & self.cavity[box], "lookalike")

    def _add_stomach(self) -> None:
        """Left anterior under the left dome: collapsed, fluid- or food-filled, or with a gas cap."""
        if not self.present(0.4):
            return
        centre = self.cavity_point((-70.0 * self.s, -15.0 * self.s), (-0.45, -0.05), (0.15, 0.45))
        radii = (self.scaled(35.0, 70.0, 3.0), self.scaled(30.0, 50.0, 3.0), self.scaled(35.0, 60.0, 3.0))
        collapsed = self.rng.random() < 0.25
        lumen_tissue = "stomach_wall" if collapsed else "stomach_content"
        found = self.walled_blob(centre, radii, self.u(-0.6, 0.6), self.scaled(3.0, 6.0, 1.0), "stomach_wall",
                                 lumen_tissue, wobble=0.15)
        if found is not None and not collapsed and self.rng.random() < 0.6:
            self.gas_above(*found, centre[1] + self.u(-1.0, 0.2) * radii[1])

    def _add_spleen(self) -> None:
        """Posterolateral left, upper abdomen; sometimes enlarged (a big liver look-alike)."""
        if not self.present(0.6):
            return
        grow = self.u(1.0, 1.6) if self.rng.random() < 0.15 else 1.0
        centre = self.cavity_point((-70.0 * self.s, -20.0 * self.s), (0.0, 0.45), (0.45, 0.7))
        radii = (self.scaled(40.0, 70.0, 3.0) * grow, self.scaled(40.0, 65.0, 3.0) * grow, self.scaled(22.0, 35.0, 2.0))
        box, mask = self.blob(centre, radii, self.u(0.6, 1.3), z_power=self.u(2.0, 3.0), wobble=0.25)
        if box is not None:
            self.paint(box, mask & self.cavity[box], "spleen")

    def _add_pancreas(self) -> None:
        """An elongated lobulated blob across the midline in front of the aorta, below the hilum."""
        if not self.present(0.4):
            return
        centre = (-self.liver_length * self.u(0.55, 0.8), self.spine_y - self.spine_ry - self.scaled(20.0, 40.0),
                  self.u(-0.05, 0.25) * self.a)
        radii = (self.scaled(10.0, 25.0, 1.0), self.scaled(9.0, 16.0, 1.0), self.scaled(45.0, 70.0, 3.0))
        box, mask = self.blob(centre, radii, self.u(-0.4, 0.1), wobble=0.35)
        if box is not None:
            self.paint(box, mask & self.cavity[box], "pancreas")

    def _add_great_vessels(self) -> None:
        """Aorta left-anterior of the spine; the IVC right of it, moving forward into the liver's bare area and up
        into the heart. Neither is liver; the liver and thorax keep out of them."""
        self.vessels = np.zeros(self.shape, dtype=bool)
        z_lo, z_hi = float(self.grid.z[0]) - 10.0, float(self.grid.z[-1]) + 10.0
        aorta_r = self.scaled(9.0, 14.0, 1.0)
        aorta_y = self.spine_y - self.spine_ry - aorta_r - self.scaled(0.0, 6.0)
        self.aorta_x = self.spine_x + self.scaled(5.0, 22.0)
        drift = self.u(-0.1, 0.1) * aorta_r
        aorta_path = [(z_lo, aorta_y, self.aorta_x - drift), (z_hi, aorta_y, self.aorta_x + drift)]
        self._vessel_path(aorta_path, aorta_r, "aorta")
        ivc_r = self.scaled(9.0, 14.0, 1.0)
        y0, x0 = self.spine_y - self.spine_ry - self.scaled(5.0, 20.0), self.spine_x - self.scaled(20.0, 32.0)
        forward = self.scaled(10.0, 30.0)
        length = self.liver_length
        hepatic = (-0.1 * length, y0 - forward, x0 - self.scaled(0.0, 10.0))  # in the liver's bare area
        atrial = (max(z_hi, 40.0 * self.s), hepatic[1] - self.scaled(10.0, 30.0), x0 + self.scaled(0.0, 15.0))
        self.ivc_path = [(min(z_lo, -length), y0, x0), (-0.75 * length, y0, x0), hepatic, atrial]
        self._vessel_path(self.ivc_path, ivc_r, "ivc")
        self.retro_depth = 2.2 * aorta_r
        self.retro_half_width = max(self.spine_rx * 1.3, self.aorta_x - self.spine_x + aorta_r * 1.2)

    def _vessel_path(self, points: list[tuple[float, float, float]], radius: float, tissue: str) -> None:
        """A great vessel along a polyline, clipped to the cavity and remembered as vessel."""
        for start, end in zip(points[:-1], points[1:]):
            found = tube_mask(self.grid, np.array(start), np.array(end), radius)
            if found is not None:
                box, mask = found
                mask &= self.cavity[box]
                self.paint(box, mask, tissue)
                self.vessels[box] |= mask

    def _add_liver(self) -> None:
        """The classic style's lobes (right, left, sometimes caudate and a Riedel extension) at physical size with
        the dome at z = 0; clipped to the cavity, out of the great vessels and the retroperitoneum."""
        length = self.liver_length
        found = self.lobed_level(self.liver_lobes(-length / 2, length / 2), bend=self.u(0.0, 0.12) * self.a,
                                 wobble=self.u(0.1, 0.35), length=length)
        if found is None:
            return
        box, level = found
        retro = retroperitoneum_mask(self.grid, box, (self.spine_y, self.spine_x), self.spine_ry, self.retro_depth,
                                     self.retro_half_width)
        self.paint(box, (level < 1.0) & self.cavity[box] & ~self.vessels[box] & ~retro, "liver")

    def _add_gallbladder(self) -> None:
        """A fluid-filled pear under the liver between its lobes (carving its fossa), sometimes with stones."""
        if self.rng.random() < 0.15:  # cholecystectomy
            return
        centre = (-self.liver_length * self.u(0.55, 0.85), -self.u(0.05, 0.4) * self.b, -self.scaled(20.0, 60.0))
        radii = (self.scaled(30.0, 50.0, 2.0), self.scaled(10.0, 20.0, 1.5), self.scaled(10.0, 20.0, 1.5))
        found = self.walled_blob(centre, radii, self.u(-0.8, 0.8), self.scaled(1.5, 4.0, 0.6), "gallbladder_wall",
                                 "bile", wobble=0.1)
        if found is None or self.rng.random() < 0.7:
            return
        lumen_idx = np.flatnonzero(found[1])
        for _ in range(int(self.rng.integers(1, 4))):
            if lumen_idx.size == 0:
                return
            local = np.unravel_index(int(self.rng.choice(lumen_idx)), found[1].shape)
            voxel = tuple(s.start + i for s, i in zip(found[0], local))
            box, mask = self.blob(self.grid.voxel_mm(voxel), (self.scaled(2.0, 8.0, 1.0),) * 3)
            if box is not None:
                self.paint(box, mask & self.is_tissue(box, ("bile",)), "gallstone")

    def _liver_tube(self, start: np.ndarray, end: np.ndarray, radius: float, tissue: str) -> None:
        """A vessel inside the liver: it stays liver-labelled tissue and never leaves the parenchyma."""
        found = tube_mask(self.grid, start, end, radius)
        if found is not None:
            box, mask = found
            self.paint(box, mask & self.is_tissue(box, LIVER_TISSUES), tissue)

    def _liver_point(self, liver_idx: np.ndarray) -> np.ndarray:
        return np.array(self.grid.voxel_mm(np.unravel_index(int(self.rng.choice(liver_idx)), self.shape)))

    def _add_portal_vein(self) -> None:
        """The trunk from behind the pancreas to the hilum (not liver), then branches fanning into the lobes."""
        liver_idx = self.liver_voxels()
        if liver_idx.size < 50:
            return
        length = self.liver_length
        confluence = np.array((-length * self.u(0.6, 0.85), self.spine_y - self.spine_ry - self.scaled(25.0, 45.0),
                               self.spine_x + self.scaled(0.0, 20.0)))
        hilum = np.array((-length * self.u(0.35, 0.5), self.u(-0.15, 0.1) * self.b, -self.scaled(25.0, 50.0)))
        found = tube_mask(self.grid, confluence, hilum, self.scaled(6.0, 9.0, 1.0))
        if found is not None:
            self.paint(found[0], found[1] & self.cavity[found[0]], "portal_vein")
        for _ in range(int(self.rng.integers(2, 4))):
            end = self._liver_point(liver_idx)
            self._liver_tube(hilum, end, self.scaled(3.0, 6.0, 0.8), "portal_branch")
            start = hilum + (end - hilum) * self.u(0.3, 0.8)
            self._liver_tube(start, self._liver_point(liver_idx), self.scaled(1.5, 3.5, 0.6), "portal_branch")

    def _add_hepatic_veins(self) -> None:
        """Right, middle and left hepatic veins converging on the IVC just below the dome."""
        liver_idx = self.liver_voxels()
        if liver_idx.size < 50:
            return
        (_, y0, x0), (z1, y1, x1) = self.ivc_path[2], self.ivc_path[3]
        z_join = -self.scaled(10.0, 30.0)
        t = (z_join - self.ivc_path[2][0]) / max(z1 - self.ivc_path[2][0], 1e-6)
        join = np.array((z_join, y0 + t * (y1 - y0), x0 + t * (x1 - x0)))
        length = self.liver_length
        targets = [(-length * self.u(0.35, 0.6), self.u(-0.1, 0.3) * self.b, -self.u(0.5, 0.75) * self.a),
                   (-length * self.u(0.3, 0.55), -self.u(0.1, 0.4) * self.b, -self.u(0.1, 0.3) * self.a),
                   (-length * self.u(0.15, 0.4), -self.u(0.3, 0.5) * self.b, self.u(-0.05, 0.15) * self.a)]
        for target in targets:
            end = np.array(target)
            self._liver_tube(join, end, self.scaled(3.0, 7.0, 0.8), "hepatic_vein")
            start = join + (end - join) * self.u(0.3, 0.8)
            self._liver_tube(start, self._liver_point(liver_idx), self.scaled(1.5, 3.0, 0.6), "hepatic_vein")

    def _add_kidneys(self) -> None:
        """Both kidneys beside the spine behind the inferior liver (right lower than left); cortex and medulla."""
        right_z = -self.scaled(100.0, 150.0)
        for side, z in ((-1, right_z), (1, right_z + self.scaled(0.0, 30.0))):
            if not self.present(0.5):
                continue
            centre = (z, self.spine_y + self.u(-0.2, 0.6) * self.spine_ry,
                      self.spine_x + side * (self.spine_rx + self.scaled(35.0, 55.0)))
            radii = (self.scaled(45.0, 60.0, 2.0), self.scaled(22.0, 30.0, 1.5), self.scaled(25.0, 32.0, 1.5))
            self.walled_blob(centre, radii, side * self.u(0.3, 0.7), radii[1] * self.u(0.3, 0.45), "kidney_cortex",
                             "kidney_medulla", wobble=0.1)

    def _add_thorax(self) -> None:
        """Above the diaphragm's dome (right dome just over the liver, the left lower, both falling toward the
        back and the sides into the costophrenic recesses): the diaphragm muscle, then the heart in front on the
        central tendon and lungs around it. Whatever lies above it (the top of the liver included) is covered."""
        y_rel = np.clip(self.grid.y / self.b, -1, 1)[:, None]
        x_rel = (self.grid.x / self.a)[None, :]
        dome = self.scaled(0.0, 15.0, 0.0)
        floor = (dome - self.scaled(40.0, 90.0) * np.clip(y_rel + 0.2, 0, None) ** 1.5
                 - self.scaled(20.0, 50.0) * x_rel**2 - self.scaled(5.0, 30.0) / (1 + np.exp(-8 * x_rel)))
        floor = floor.astype(np.float32)[None]
        z = self.grid.z[:, None, None]
        room = self.cavity & ~self.vessels
        thickness = self.scaled(3.0, 7.0, 1.0)
        full = np.s_[:, :, :]
        self.paint(full, room & (z > floor - thickness) & (z <= floor), "diaphragm")
        above = room & (z > floor)
        heart = (((x_rel - self.u(0.0, 0.25)) / self.u(0.25, 0.4)) ** 2
                 + ((y_rel + self.u(0.1, 0.35)) / self.u(0.3, 0.5)) ** 2)
        heart_top = floor + np.float32(self.scaled(80.0, 130.0))
        self.paint(full, above & (heart < 1.0)[None] & (z < heart_top), "heart")
        self.paint(full, above & ~((heart < 1.0)[None] & (z < heart_top)), "lung")

    def _add_spine(self) -> None:
        """Vertebral bodies (cortical rim, cancellous core) with discs between them, the spinal canal and the
        posterior elements, the whole length of the field."""
        rim = self.scaled(1.5, 3.0, 0.6)
        found = self.column((self.spine_y, self.spine_x), (self.spine_ry, self.spine_rx))
        if found is not None:
            box, body = found
            self.paint(box, body & self.muscle_region[box], "cortical_bone")
            core = self.column((self.spine_y, self.spine_x), (self.spine_ry - rim, self.spine_rx - rim))
            if core is not None:
                self.paint(core[0], core[1] & self.muscle_region[core[0]], "cancellous_bone")
            period = self.scaled(28.0, 36.0, 6.0)
            disc = (np.mod(self.grid.z[box[0]] + self.u(0, period), period) < period * self.u(0.2, 0.3))[:, None, None]
            self.paint(box, body & disc & self.muscle_region[box], "disc")
        arch = self.column((self.canal_y, self.spine_x), (self.canal_r + 2.5 * rim, self.canal_r + 2.5 * rim))
        spinous = self.column((self.canal_y + self.scaled(15.0, 22.0), self.spine_x),
                              (self.scaled(15.0, 22.0), self.scaled(3.0, 5.0, 0.6)))
        for found, tissue in ((arch, "cortical_bone"), (spinous, "cortical_bone")):
            if found is not None:
                self.paint(found[0], found[1] & self.muscle_region[found[0]], tissue)
        canal = self.column((self.canal_y, self.spine_x), (self.canal_r, self.canal_r))
        if canal is not None:
            self.paint(canal[0], canal[1] & self.muscle_region[canal[0]], "spinal_canal")

    def _add_ribs(self) -> None:
        """Ribs around the thorax and the upper abdomen, covering the liver laterally down to its lower part."""
        lo = int(np.searchsorted(self.grid.z, -self.liver_length * self.u(0.6, 0.95), side="left"))
        if lo >= self.shape[0]:
            return
        box = (slice(lo, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))
        self.paint(box, self.rib_mask(lo, self.depth[box], self.scaled(5.0, 9.0, 1.0)), "rib")

    def _add_lesions(self) -> None:
        """0–10 irregular lesions inside the liver (vessels included), some with a rim or a necrotic core; their
        intensities are drawn with the rest of the appearance."""
        count = 0 if self.rng.random() < 0.2 else int(self.rng.integers(1, 11))
        liver_idx = self.liver_voxels()
        if liver_idx.size < 20:
            return
        full = np.s_[:, :, :]
        inside = self.is_tissue(full, LIVER_TISSUES)
        for lesion_id in range(1, count + 1):
            box, level, shape_mask, radius = self.lesion_shape(liver_idx)
            mask = shape_mask & (inside[box] | (self.instances[box] > 0))
            self.paint(box, mask, "lesion")
            rim = self.rng.random() < 0.3
            if rim:
                self.paint(box, mask & (level > self.u(0.5, 0.75)), "lesion_rim")
            core = radius > 12.0 and self.rng.random() < 0.3
            if core:
                self.paint(box, mask & (level < self.u(0.1, 0.3)), "lesion_core")
            self.instances[box][mask] = lesion_id
            self.lesion_looks.append((rim, core))

    # -- appearance ---------------------------------------------------------------------------------------
    def _tissue_hu(self) -> np.ndarray:
        """Mean HU per tissue for this case: a coherent contrast phase or free contrast, then (half the cases) the
        soft tissue pulled darker than, equal to or brighter than the liver."""
        phase = int(self.rng.choice(len(PHASES), p=PHASE_WEIGHTS))
        hu = np.array([self.u(*LOOKS[name][phase]) for name in TISSUES], dtype=np.float32)
        liver = float(hu[TISSUE_ID["liver"]])
        if self.rng.random() < 0.5:
            relation = int(self.rng.integers(3))  # 0 darker, 1 equal, 2 brighter
            for name in RELATIVE_TISSUES:
                if self.rng.random() < 0.75:
                    offset = (-self.u(10.0, 80.0), self.u(-10.0, 10.0), self.u(10.0, 80.0))[relation]
                    hu[TISSUE_ID[name]] = np.clip(liver + offset, *_SOFT)
        hu[TISSUE_ID["lookalike"]] = liver + self.u(-LOOKALIKE_DELTA_HU, LOOKALIKE_DELTA_HU)
        if self.rng.random() < 0.2:  # positive oral contrast
            hu[TISSUE_ID["bowel_fluid"]] = hu[TISSUE_ID["stomach_content"]] = self.u(150.0, 400.0)
        return hu

    def _lesion_hu(self, liver_hu: float) -> tuple[np.ndarray, np.ndarray]:
        """Per lesion id: its HU (hypo-, iso-ish or hyperdense to the liver) and its rim's (mostly enhancing)."""
        body, rim = np.zeros(len(self.lesion_looks) + 1, np.float32), np.zeros(len(self.lesion_looks) + 1, np.float32)
        for lesion_id in range(1, len(self.lesion_looks) + 1):
            kind = self.rng.random()
            if kind < 0.55:
                delta = -self.u(15.0, 100.0)
            elif kind < 0.7:
                delta = self.u(4.0, 15.0) * (1 if self.rng.random() < 0.5 else -1)
            else:
                delta = self.u(15.0, 90.0)
            body[lesion_id] = max(liver_hu + delta, -10.0)
            rim[lesion_id] = body[lesion_id] + self.u(20.0, 70.0) * (1 if self.rng.random() < 0.7 else -1)
        return body, rim

    def _texture(self, mean_hu: np.ndarray) -> np.ndarray:
        """Mean plus each tissue's own signed mix of a fine, a medium and a coarse smooth field (up to its
        :class:`_Look` texture amplitude), so neighbouring tissues differ in grain as well as in level."""
        features = (self.u(2.5, 6.0), self.u(8.0, 20.0), self.u(25.0, 60.0))
        directions = self.rng.standard_normal((len(TISSUES), len(features)))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        amplitude = np.array([self.u(0.0, LOOKS[name].texture) for name in TISSUES])
        coefficients = (directions * amplitude[:, None]).astype(np.float32)
        hu = mean_hu.copy()
        for k, feature_mm in enumerate(features):
            control = _capped_control_points(self.shape, self.spacing, feature_mm)
            field = smooth_random_field(self.rng, self.shape, control)
            hu += coefficients[:, k][self.tissue] * field
        return hu

    def _render(self) -> np.ndarray:
        """The tissue map's appearance: intensities, texture, blur, bias field, noise; int16 HU."""
        tissue_hu = self._tissue_hu()
        mean = tissue_hu[self.tissue]
        lesion_hu, rim_hu = self._lesion_hu(float(tissue_hu[TISSUE_ID["liver"]]))
        for name, per_lesion in (("lesion", lesion_hu), ("lesion_rim", rim_hu)):
            where = self.tissue == TISSUE_ID[name]
            mean[where] = per_lesion[self.instances[where]]
        hu = self._texture(mean)
        sigma = self.u(0.3, 1.2)
        hu = ndimage.gaussian_filter(hu, (self.u(0.2, 0.8), sigma, sigma), mode="nearest")
        bias_points = tuple(int(self.rng.integers(2, 5)) for _ in range(3))
        hu += np.float32(self.u(0.0, 20.0)) * smooth_random_field(self.rng, self.shape, bias_points)
        gain = 1.0 + np.float32(self.u(0.0, 0.04)) * smooth_random_field(self.rng, self.shape, bias_points)
        hu = (hu + np.float32(1000.0)) * gain - np.float32(1000.0) + np.float32(self.u(-8.0, 8.0))
        self.noise_std = self.u(*NOISE_STD_HU)
        hu += correlated_noise(self.rng, self.shape, (0.5, 1.8)) * np.float32(self.noise_std)
        return quantize_hu(hu)
