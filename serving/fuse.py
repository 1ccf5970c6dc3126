"""Fusing the probabilities of several ensemble members into one label map."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mixsup.labels import decide_labels


def normalized_weights(weights: Sequence[float], count: int) -> np.ndarray:
    """Member weights as float64 summing to 1; each must be a positive finite number."""
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.size != count:
        raise ValueError(f"got {weights.size} weights for {count} ensemble members")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"ensemble weights must be positive, got {weights.tolist()}")
    return weights / weights.sum()


def fuse_probabilities(
    member_probs: Sequence[np.ndarray], weights: Sequence[float], lesion_threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted average of the members' [C,D,H,W] probabilities and its labels (:func:`decide_labels`).

    Returns ``(labels uint8 [D,H,W], probabilities float16 [C,D,H,W])``; an empty volume gives empty outputs.
    The average and argmax are taken in float32 so that fp16 members do not tie more often than their
    probabilities do.
    """
    if len(member_probs) == 0:
        raise ValueError("no ensemble member probabilities to fuse")
    shapes = {tuple(np.shape(probs)) for probs in member_probs}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on the probability shape: {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) != 4 or shape[0] < 1:
        raise ValueError(f"expected [C,D,H,W] probabilities, got shape {list(shape)}")
    if shape[0] > 256:
        raise ValueError(f"{shape[0]} classes do not fit uint8 labels")
    member_weights = normalized_weights(weights, len(member_probs))
    if len(member_probs) == 1:
        # One member: its float16 values widen to float32 exactly, so the float32 argmax is the float16 one.
        probs = np.asarray(member_probs[0])
        return decide_labels(probs, lesion_threshold), probs.astype(np.float16, copy=False)
    fused = np.zeros(shape, dtype=np.float32)
    for probs, weight in zip(member_probs, member_weights):
        fused += np.float32(weight) * np.asarray(probs, dtype=np.float32)
    return decide_labels(fused, lesion_threshold), fused.astype(np.float16)
