"""In-plane resampling between a scan's grid and a model's training spacing.

Both directions use the same pixel-centre convention (``in = (out + 0.5) * scale - 0.5``), so a round trip
lands on the original grid exactly and the client's output keeps the input's shape.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def inplane_shape(shape_hw: Sequence[int], spacing_hw: Sequence[float], target_spacing_hw: Sequence[float]) -> tuple[int, int]:
    """The in-plane shape a ``shape_hw`` image with ``spacing_hw`` has at ``target_spacing_hw`` (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_hw, spacing_hw, target_spacing_hw))


def resample_inplane(volume: np.ndarray, out_hw: Sequence[int], order: int = 1) -> np.ndarray:
    """Resample the last two axes of ``volume`` (``[..., H, W]``) to ``out_hw``; leading axes are untouched.

    ``order`` is the spline order: 1 (linear) for intensities and probabilities, 0 for labels.
    """
    out_hw = tuple(int(n) for n in out_hw)
    if tuple(volume.shape[-2:]) == out_hw:
        return volume
    scale = np.array([volume.shape[-2] / out_hw[0], volume.shape[-1] / out_hw[1]])
    lead = volume.shape[:-2]
    flat = volume.reshape((-1,) + volume.shape[-2:])
    out = np.empty((flat.shape[0],) + out_hw, dtype=volume.dtype)
    for index in range(flat.shape[0]):
        ndimage.affine_transform(
            flat[index],
            matrix=scale,
            offset=0.5 * scale - 0.5,
            output_shape=out_hw,
            output=out[index],
            order=order,
            mode="nearest",
            prefilter=False,
        )
    return out.reshape(lead + out_hw)
