"""Synthetic liver lesions pasted into training stacks, in the spirit of Hu et al. (CVPR 2023, "Label-free liver
tumor segmentation"): tumours drawn into healthy liver train a segmenter nearly as well as annotated ones.

Why here: every recipe fits its strong cases' lesions (0.82-0.85 Dice at 100 epochs) and finds few held out
(0.12-0.15; ``benchmarks/results/schedule_100_epochs``). Two dozen phantoms carry about a hundred lesions, few
enough to be told apart by where they sit rather than by what they look like. A lesion drawn anew for a crop
can't be memorised: only its appearance against the liver around it marks it.

A lesion here is a change *added* to the scan, so the liver's own texture, noise and blur stay inside it, as they
do in real CT: an ellipsoid of 3-30 mm radius (log-uniform) with a wobbled surface and a soft edge, hypo- or
hyperdense by 15-100 HU (a few nearly isodense), some with an enhancing or dark rim, cut to the liver's label.
Its voxels on the stack's centre slice become lesion in the labels (the centre slice is the training target),
its in-plane bounding box joins the lesion-box mask, and it gets a fresh instance id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from mixsup.training.data.phantoms import LESION, LIVER, rotated_ellipsoid_level
from mixsup.training.recipes.base import LESION_BOX

#: Darkest a hypodense lesion is drawn (a cyst, water), whatever the liver's HU.
FLOOR_HU = -10.0
#: A lesion's centre lies at least this share of its radius deep in the liver (in-plane), so most of it is liver
#: rather than a liver sliver turned wholly into lesion; subcapsular lesions still bulge to the edge.
DEPTH_SHARE = 0.6


@dataclass(frozen=True)
class LesionSynthesis:
    """How often and what kind of lesions :func:`paste_lesions` draws; ``probability`` 0 turns it off."""

    probability: float = 0.0  # of a strong crop with liver on its centre slice
    max_count: int = 3
    radius_mm: tuple[float, float] = (3.0, 30.0)  # log-uniform, so small lesions are common
    hypo_delta_hu: tuple[float, float] = (15.0, 100.0)
    hyper_delta_hu: tuple[float, float] = (15.0, 80.0)
    hyper_share: float = 0.3
    iso_share: float = 0.1  # 5-15 HU either way: real lesions can be nearly invisible, and must not be guessed
    edge_mm: tuple[float, float] = (0.3, 2.0)
    rim_share: float = 0.3


class Stack(NamedTuple):
    """A 2.5D training sample before the crop warp: ``hu`` float32 [K,H,W] (K context slices), ``labels`` uint8
    [K,H,W] (the centre slice is the target; the others give the liver's extent), ``boxes`` uint8 [2,H,W] (organ
    and lesion boxes of the centre slice), ``instances`` integer ids [H,W] of the centre slice or None."""

    hu: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    instances: np.ndarray | None


def lesion_level(offsets_mm: tuple[np.ndarray, np.ndarray, np.ndarray], radii_mm: Sequence[float], angle: float,
                 wobble: np.ndarray) -> np.ndarray:
    """Normalised radius (``1`` on the surface) of an ellipsoid turned by ``angle`` in-plane, its surface pushed
    in and out by ``wobble`` (a smooth field, fraction of the radius)."""
    cos, sin = np.cos(angle), np.sin(angle)
    in_plane = np.array([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]])
    return np.sqrt(rotated_ellipsoid_level(offsets_mm, tuple(radii_mm), in_plane)) * (1.0 + wobble)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: int) -> np.ndarray:
    """A smooth field of unit-std control points: a ``control`` x ``control`` grid per slice, linearly zoomed."""
    coarse = rng.standard_normal((shape[0], control, control)).astype(np.float32)
    zoom = (1.0, shape[1] / control, shape[2] / control)
    return ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)[:, : shape[1], : shape[2]]


def paste_lesions(stack: Stack, centre_yx: Sequence[float], reach_px: float, offsets_mm: np.ndarray,
                  pixel_mm: Sequence[float], rng: np.random.Generator, synthesis: LesionSynthesis) -> Stack:
    """``stack`` with 1 to ``synthesis.max_count`` new lesions centred on liver pixels of the centre slice within
    ``reach_px`` of ``centre_yx`` (so the crop shows them), each no larger than its centre's depth in the liver
    allows. ``offsets_mm`` are the context slices' z distances
    from the centre slice; ``pixel_mm`` the in-plane pixel size. Returns new arrays; ``stack`` is not modified."""
    centre = len(offsets_mm) // 2
    liver = (stack.labels == LIVER) | (stack.labels == LESION)
    depth_mm = ndimage.distance_transform_edt(liver[centre], sampling=pixel_mm)
    ys, xs = np.nonzero(depth_mm >= synthesis.radius_mm[0] * DEPTH_SHARE)
    near = (ys - centre_yx[0]) ** 2 + (xs - centre_yx[1]) ** 2 <= reach_px ** 2
    ys, xs = ys[near], xs[near]
    if not len(ys):
        return stack
    hu, labels, boxes = stack.hu.copy(), stack.labels.copy(), stack.boxes.copy()
    # int32: the stored ids may be as narrow as uint8, and a new id is one more than the largest
    instances = None if stack.instances is None else stack.instances.astype(np.int32)
    liver_hu = float(np.median(hu[centre][liver[centre]]))
    for _ in range(int(rng.integers(1, synthesis.max_count + 1))):
        pick = int(rng.integers(len(ys)))
        radius = float(np.exp(rng.uniform(*np.log(synthesis.radius_mm))))
        radius = min(radius, depth_mm[ys[pick], xs[pick]] / DEPTH_SHARE)  # mostly inside the liver, as real ones are
        radii = radius * rng.uniform(0.7, 1.3, 3)
        reach = max(radii) * 1.4
        half = [int(np.ceil(reach / p)) + 1 for p in pixel_mm]
        y0, y1 = max(ys[pick] - half[0], 0), min(ys[pick] + half[0] + 1, hu.shape[1])
        x0, x1 = max(xs[pick] - half[1], 0), min(xs[pick] + half[1] + 1, hu.shape[2])
        dz = (np.asarray(offsets_mm, np.float32) - rng.uniform(-0.6, 0.6) * radii[0])[:, None, None]
        dy = ((np.arange(y0, y1) - ys[pick]) * pixel_mm[0]).astype(np.float32)[None, :, None]
        dx = ((np.arange(x0, x1) - xs[pick]) * pixel_mm[1]).astype(np.float32)[None, None, :]
        box_shape = (len(offsets_mm), y1 - y0, x1 - x0)
        wobble = rng.uniform(0.0, 0.25) * _smooth_field(rng, box_shape, 4)
        level = lesion_level((dz, dy, dx), radii, rng.uniform(0, np.pi), wobble)
        edge = rng.uniform(*synthesis.edge_mm)
        soft = 1.0 / (1.0 + np.exp(np.clip((level - 1.0) * radius / edge, -30, 30)))  # ~1 inside, 0.5 on the surface
        inside = liver[:, y0:y1, x0:x1]
        delta = _lesion_delta(rng, synthesis, liver_hu)
        change = delta * soft * (1.0 + rng.uniform(0.0, 0.3) * _smooth_field(rng, box_shape, 6))
        if rng.random() < synthesis.rim_share:
            rim = np.exp(-((level - 0.85) / 0.12) ** 2)
            change = change + rng.uniform(20.0, 60.0) * (1 if rng.random() < 0.7 else -1) * rim
        hu[:, y0:y1, x0:x1] += np.where(inside, change, 0.0).astype(np.float32)
        lesion = (level[centre] < 1.0) & inside[centre]
        if not lesion.any():
            continue
        labels[centre, y0:y1, x0:x1][lesion] = LESION
        rows, cols = np.nonzero(lesion)
        boxes[LESION_BOX, y0 + rows.min(): y0 + rows.max() + 1, x0 + cols.min(): x0 + cols.max() + 1] = 1
        if instances is not None:
            instances[y0:y1, x0:x1][lesion] = int(instances.max()) + 1
    return Stack(hu, labels, boxes, instances)


def _lesion_delta(rng: np.random.Generator, synthesis: LesionSynthesis, liver_hu: float) -> float:
    """A lesion's HU difference to the liver: hypo-, hyper- or nearly isodense, never darker than water."""
    kind = rng.random()
    if kind < synthesis.iso_share:
        return float(rng.uniform(5.0, 15.0) * (1 if rng.random() < 0.5 else -1))
    if kind < synthesis.iso_share + synthesis.hyper_share:
        return float(rng.uniform(*synthesis.hyper_delta_hu))
    return float(min(max(-rng.uniform(*synthesis.hypo_delta_hu), FLOOR_HU - liver_hu), -5.0))
