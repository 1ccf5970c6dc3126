"""The 2.5D input: which slices form each slice's stack. Training and serving must agree on this exactly."""
from __future__ import annotations

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
