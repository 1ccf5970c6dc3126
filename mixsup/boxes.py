"""The boxes file: per-slice bounding boxes on the canonical grid, as JSON.

Boxes live on the canonical ``[D, H, W]`` grid of :mod:`mixsup.scan` (the stored scan's array, before any
resampling) and are half-open pixel ranges ``[y0, y1) x [x0, x1)`` of one axial slice, label 1 the organ and 2 a
lesion. A boxes file is ``{"frame": "canonical", "shape": [D, H, W], "boxes": [[slice, label, y0, x0, y1, x1],
...]}``.

This is the part shared by training (:mod:`mixsup.training.data.boxes`, which derives, draws and perturbs boxes)
and the annotation client (:mod:`mixsup.clients.annotate`); it needs neither scipy nor torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mixsup.errors import InputError
from mixsup.files import atomic_path

ORGAN, LESION = 1, 2
BOXES_FORMAT_FRAME = "canonical"


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


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, a subclass of int: not a coordinate.
    return isinstance(value, int) and not isinstance(value, bool)


def boxes_to_json(boxes: Iterable[Box], shape: Sequence[int]) -> dict:
    """The boxes-file document: ``{"frame": "canonical", "shape": [D, H, W], "boxes": [[slice, label, y0, x0, y1,
    x1], ...]}``."""
    return {
        "frame": BOXES_FORMAT_FRAME,
        "shape": [int(n) for n in shape],
        "boxes": [list(astuple(box)) for box in boxes],
    }


def boxes_from_json(
    document: object, source: str = "boxes", known_labels_only: bool = False
) -> tuple[list[Box], tuple[int, int, int]]:
    """Parse and check a boxes-file document; returns the boxes and the canonical ``[D, H, W]`` they belong to.

    With ``known_labels_only`` every label must be the organ's (1) or the lesion's (2). Raises
    :class:`InputError`.
    """
    if not isinstance(document, dict) or document.get("frame") != BOXES_FORMAT_FRAME:
        raise InputError(f"{source}: not a boxes file (expected \"frame\": \"{BOXES_FORMAT_FRAME}\")")
    shape = document.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(n) and n > 0 for n in shape)):
        raise InputError(f"{source}: \"shape\" must be [D, H, W], got {shape!r}")
    depth, height, width = shape
    entries = document.get("boxes", [])
    if not isinstance(entries, list):
        raise InputError(f"{source}: \"boxes\" must be a list of [slice, label, y0, x0, y1, x1]")
    boxes = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 6 and all(_is_int(v) for v in entry)):
            raise InputError(f"{source}: a box must be [slice, label, y0, x0, y1, x1] integers, got {entry!r}")
        box = Box(*entry)
        if known_labels_only and box.label not in (ORGAN, LESION):
            raise InputError(f"{source}: box {entry} has label {box.label}; expected {ORGAN} (organ) or "
                             f"{LESION} (lesion)")
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


def load_boxes(
    path: str | os.PathLike, known_labels_only: bool = False
) -> tuple[list[Box], tuple[int, int, int]]:
    """Read a boxes file (:func:`boxes_from_json`); :class:`InputError` if it is missing or malformed."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such boxes file") from None
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{path}: not a readable boxes file ({first_line})") from None
    return boxes_from_json(document, str(path), known_labels_only)
