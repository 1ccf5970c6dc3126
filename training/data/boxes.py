"""Per-slice bounding boxes: derived from masks, drawn back as masks, and perturbed.

The :class:`Box` model and the boxes file (JSON) are :mod:`mixsup.boxes`'s, re-exported here.

Weakly supervised scans carry only boxes; strong scans get theirs from the mask. Boxes live on the canonical
``[D, H, W]`` grid of :mod:`mixsup.scan` and are half-open pixel ranges ``[y0, y1) x [x0, x1)`` of one axial
slice. The organ (label 1) gets one circumscribed rectangle per slice around organ ∪ lesion; each lesion (label 2)
gets one rectangle per 2D connected component (8-connectivity), as in the teacher-student paper.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

# The box model and the boxes file live in the core (the client reads boxes files too); re-exported here.
from mixsup.boxes import (  # noqa: F401
    BOXES_FORMAT_FRAME,
    LESION,
    ORGAN,
    Box,
    boxes_from_json,
    boxes_to_json,
    load_boxes,
    save_boxes,
)

#: (scale range, largest vertex move as a fraction of the side) per label, from the paper's robustness study.
PERTURBATION = {ORGAN: ((0.95, 1.1), 1 / 20), LESION: ((0.9, 1.2), 1 / 10)}

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def boxes_from_labels(labels: np.ndarray) -> list[Box]:
    """Organ boxes (one per slice around labels >= 1) and lesion boxes (one per 2D component of label 2)."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be [D, H, W], got shape {labels.shape}")
    boxes: list[Box] = []
    organ_slices = np.flatnonzero((labels >= ORGAN).any(axis=(1, 2)))
    for z in organ_slices:
        plane = labels[z]
        rows = np.flatnonzero((plane >= ORGAN).any(axis=1))
        cols = np.flatnonzero((plane >= ORGAN).any(axis=0))
        boxes.append(Box(int(z), ORGAN, int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1))
        lesion = plane == LESION
        if not lesion.any():
            continue
        components, _ = ndimage.label(lesion, structure=_EIGHT_CONNECTED)
        for found in ndimage.find_objects(components):
            rows_sl, cols_sl = found
            boxes.append(Box(int(z), LESION, rows_sl.start, cols_sl.start, rows_sl.stop, cols_sl.stop))
    return boxes


def boxes_to_mask(boxes: Iterable[Box], shape: Sequence[int], label: int) -> np.ndarray:
    """A boolean ``[D, H, W]`` mask with the rectangles of class ``label`` filled."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for box in boxes:
        if box.label == label:
            mask[box.slice, box.y0 : box.y1, box.x0 : box.x1] = True
    return mask


def perturb_box(box: Box, rng: np.random.Generator, shape: Sequence[int]) -> Box:
    """Scale a box about its centre and move each vertex by less than a fraction of its side, within the image.

    The ranges are the teacher-student paper's: organ scale 0.95–1.1 and moves < 1/20 side, lesion 0.9–1.2 and
    < 1/10 side. A box always keeps at least one pixel.
    """
    (scale_lo, scale_hi), move = PERTURBATION.get(box.label, PERTURBATION[LESION])
    height, width = shape[-2], shape[-1]
    scale = rng.uniform(scale_lo, scale_hi)
    cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
    half_h, half_w = box.height * scale / 2, box.width * scale / 2
    dy0, dy1 = rng.uniform(-move, move, 2) * box.height
    dx0, dx1 = rng.uniform(-move, move, 2) * box.width
    y0 = int(np.clip(np.rint(cy - half_h + dy0), 0, height - 1))
    x0 = int(np.clip(np.rint(cx - half_w + dx0), 0, width - 1))
    y1 = int(np.clip(np.rint(cy + half_h + dy1), y0 + 1, height))
    x1 = int(np.clip(np.rint(cx + half_w + dx1), x0 + 1, width))
    return Box(box.slice, box.label, y0, x0, y1, x1)


def perturb_boxes(boxes: Iterable[Box], rng: np.random.Generator, shape: Sequence[int]) -> list[Box]:
    """:func:`perturb_box` applied to every box (``shape`` is ``[D, H, W]`` or ``[H, W]``)."""
    return [perturb_box(box, rng, shape) for box in boxes]
