"""The 2.5D input: which slices form each slice's stack. Training and serving must agree on this exactly."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from mixsup.errors import InputError

#: What a network sees beyond the scan's edge, in training crops and serving tiles alike: air.
AIR_HU = -1024.0

#: The largest padded slice (model-grid pixels a side) a served network takes whole by default, tiles beyond: a
#: 512-pixel model slice at 1.6 mm is an 819 mm field of view, more than any CT; TensorRT engines are built to
#: take it (mixsup-export).
DEFAULT_MAX_SLICE = 512


def slice_stack_indices(depth: int, context_slices: int = 3) -> np.ndarray:
    """Slice indices [depth, context_slices] of each slice's stack: d-k..d+k, clipped so edges replicate."""
    if depth < 1:
        raise InputError(f"a volume needs at least one slice, got depth {depth}")
    if context_slices < 1 or context_slices % 2 != 1:
        raise ValueError(f"context_slices must be a positive odd number, got {context_slices}")
    half = context_slices // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)


def padded_size(size: int, size_divisor: int) -> int:
    """``size`` rounded up to a multiple of ``size_divisor``."""
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be positive, got {size_divisor}")
    return -(-int(size) // size_divisor) * size_divisor


def padded_stack_batches(hu: np.ndarray, context_slices: int, batch_size: int, size_divisor: int = 1,
                         boxes: np.ndarray | None = None,
                         pad_value: float = AIR_HU) -> Iterator[tuple[slice, np.ndarray, np.ndarray | None]]:
    """A whole volume's slices in batches, as a network on full slices takes them (training's validation, the
    teacher's pseudo-labels and whole-slice serving alike).

    ``hu`` [D, H, W] and ``boxes`` ([2, D, H, W] organ / lesion box masks, optional) are on the model grid. Yields
    ``(slices, stacks, box_masks)``: the batch's centre slices (a ``slice`` of D), their stacks float32
    [n, context_slices, Hp, Wp] (edge slices replicated) and their box masks float32 [n, 2, Hp, Wp] or None, each
    slice padded at the bottom and right to a multiple of ``size_divisor`` (with ``pad_value``, no box): crop
    outputs back to ``[:H, :W]``. Only one batch is padded at a time, so a large scan is never copied whole.
    """
    depth, height, width = hu.shape
    padded_hw = (padded_size(height, size_divisor), padded_size(width, size_divisor))
    stacks_of = slice_stack_indices(depth, context_slices)
    for start in range(0, depth, batch_size):
        batch = slice(start, min(depth, start + batch_size))
        indices = stacks_of[batch]
        stacks = np.full((len(indices), context_slices, *padded_hw), pad_value, dtype=np.float32)
        stacks[:, :, :height, :width] = hu[indices]
        box_masks = None
        if boxes is not None:
            box_masks = np.zeros((len(indices), 2, *padded_hw), dtype=np.float32)
            box_masks[:, :, :height, :width] = boxes[:, batch].transpose(1, 0, 2, 3)
        yield batch, stacks, box_masks
