"""Per-slice bounding boxes: derived from masks, drawn back as masks, perturbed, and saved as JSON.

Weakly supervised scans carry only boxes; strong scans get theirs from the mask. Boxes live on the canonical
``[D, H, W]`` grid of :mod:`mixsup.scan` and are half-open pixel ranges ``[y0, y1) x [x0, x1)`` of one axial
slice. The organ (label 1) gets one circumscribed rectangle per slice around organ ∪ lesion; each lesion (label 2)
gets one rectangle per 2D connected component (8-connectivity), as in the teacher-student paper.
"""
from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from mixsup.errors import InputError
from mixsup.files import atomic_path

ORGAN, LESION = 1, 2
BOXES_FORMAT_FRAME = "canonical"

#: (scale range, largest vertex move as a fraction of the side) per label, from the paper's robustness study.
PERTURBATION = {ORGAN: ((0.95, 1.1), 1 / 20), LESION: ((0.9, 1.2), 1 / 10)}

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Box:
    """A rectangle ``[y0, y1) x [x0, x1)`` on axial slice ``slice`` of the canonical grid, for class ``label``."""

    slice: int
    label: int
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


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


# --------------------------------------------------------------------------------------------------- JSON
def boxes_to_json(boxes: Iterable[Box], shape: Sequence[int]) -> dict:
    """The boxes-file document: ``{"frame": "canonical", "shape": [D, H, W], "boxes": [[slice, label, y0, x0, y1, x1], ...]}``."""
    return {
        "frame": BOXES_FORMAT_FRAME,
        "shape": [int(n) for n in shape],
        "boxes": [list(astuple(box)) for box in boxes],
    }


def boxes_from_json(document: dict, source: str = "boxes") -> tuple[list[Box], tuple[int, int, int]]:
    """Parse and check a boxes-file document; returns the boxes and the canonical shape they belong to."""
    if not isinstance(document, dict) or document.get("frame") != BOXES_FORMAT_FRAME:
        raise InputError(f"{source}: not a boxes file (expected \"frame\": \"{BOXES_FORMAT_FRAME}\")")
    shape = document.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise InputError(f"{source}: \"shape\" must be [D, H, W], got {shape!r}")
    depth, height, width = shape
    boxes = []
    for entry in document.get("boxes", []):
        if not (isinstance(entry, list) and len(entry) == 6 and all(isinstance(v, int) for v in entry)):
            raise InputError(f"{source}: a box must be [slice, label, y0, x0, y1, x1] integers, got {entry!r}")
        box = Box(*entry)
        if not (0 <= box.slice < depth and 0 <= box.y0 < box.y1 <= height and 0 <= box.x0 < box.x1 <= width):
            raise InputError(f"{source}: box {entry} lies outside the image of shape {shape}")
        boxes.append(box)
    return boxes, (depth, height, width)


def save_boxes(path: str | os.PathLike, boxes: Iterable[Box], shape: Sequence[int]) -> Path:
    """Write a boxes file atomically."""
    path = Path(path)
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(boxes_to_json(boxes, shape), separators=(",", ":")))
    return path


def load_boxes(path: str | os.PathLike) -> tuple[list[Box], tuple[int, int, int]]:
    """Read a boxes file; InputError if it is missing or malformed."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such boxes file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable boxes file ({exc})") from None
    return boxes_from_json(document, str(path))
