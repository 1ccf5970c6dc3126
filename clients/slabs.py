"""Long scans in slabs along z: bounded server memory for any scan length, the same answer as one request.

A 2.5D network sees each slice with ``context_slices // 2`` neighbours on either side (edge slices replicated),
and whole-slice or tiled inference handles every slice on its own. So a volume cut into slabs of at most
``slab_slices`` slices, each sent with that many extra slices (the halo) on the sides that have neighbours, gives
for every kept slice exactly the stack it has in the whole volume; at the volume's true ends the server
replicates edge slices as it would for one request. :func:`slab_plan` cuts; :class:`SlabAnswers` puts the
answers together.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Slices per request before a scan is cut into slabs. The server holds a request's probabilities as float16
#: [C, D, H, W] beside its input: 128 slices of 512 x 512 model-grid pixels are ~200 MB for three classes.
DEFAULT_SLAB_SLICES = 128


class Slab(NamedTuple):
    """Send slices ``send``, keep the answers for ``keep`` (both in volume coordinates)."""

    send: slice
    keep: slice

    @property
    def kept_in_answer(self) -> slice:
        """Where the kept slices lie in this slab's answer."""
        return slice(self.keep.start - self.send.start, self.keep.stop - self.send.start)


def slab_plan(depth: int, slab_slices: int = DEFAULT_SLAB_SLICES, halo: int = 1) -> list[Slab]:
    """Slabs covering ``depth`` slices, each keeping at most ``slab_slices`` and sending ``halo`` more slices on
    each side that has neighbours. One slab (the whole volume) when it fits."""
    if slab_slices < 1:
        raise ValueError(f"slab_slices must be at least 1, got {slab_slices}")
    if halo < 0:
        raise ValueError(f"halo must be 0 or more, got {halo}")
    slabs = []
    for start in range(0, depth, slab_slices):
        stop = min(depth, start + slab_slices)
        slabs.append(Slab(send=slice(max(0, start - halo), min(depth, stop + halo)), keep=slice(start, stop)))
    return slabs


class SlabAnswers:
    """The labels (and probabilities) of a whole volume, filled slab by slab."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.labels: np.ndarray | None = None
        self.probabilities: np.ndarray | None = None

    def add(self, slab: Slab, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Keep ``slab``'s answer: labels ``[d, H, W]``, probabilities ``[C, d, H, W]`` (or None)."""
        inner = slab.kept_in_answer
        if self.labels is None:
            self.labels = np.empty((self.depth, *labels.shape[1:]), dtype=labels.dtype)
        self.labels[slab.keep] = labels[inner]
        if probabilities is not None:
            if self.probabilities is None:
                self.probabilities = np.empty((probabilities.shape[0], self.depth, *probabilities.shape[2:]),
                                              dtype=probabilities.dtype)
            self.probabilities[:, slab.keep] = probabilities[:, inner]
