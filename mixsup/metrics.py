"""Overlap metrics and volumes of label maps, as the LiTS challenge reports them.

* :func:`dice` -- Dice of one label in one case ("Dice per case" when averaged over cases).
* :func:`dice_from_counts` -- the same from true-positive, false-positive and false-negative voxel counts.
* :class:`GlobalDice` -- one Dice over all voxels of all cases ("Dice global": summed intersections over summed
  sizes), which weighs large livers and lesions more than a per-case mean does.

A label absent from both prediction and truth scores 1.0 (nothing to find, nothing found), so no metric is NaN.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def _overlap(pred: np.ndarray, truth: np.ndarray, label: int) -> tuple[int, int]:
    """``(|P ∩ T|, |P| + |T|)`` for the voxels equal to ``label``."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    pred_mask = pred == label
    truth_mask = truth == label
    intersection = int(np.count_nonzero(pred_mask & truth_mask))
    return intersection, int(np.count_nonzero(pred_mask)) + int(np.count_nonzero(truth_mask))


def _dice_from(intersection: int, total: int) -> float:
    return 1.0 if total == 0 else 2.0 * intersection / total


def dice_from_counts(true_positive: int, false_positive: int, false_negative: int) -> float:
    """Dice ``2TP / (2TP + FP + FN)`` from voxel counts (summed over cases, it is the global Dice); 1.0 when all
    three are 0."""
    return _dice_from(true_positive, 2 * true_positive + false_positive + false_negative)


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice coefficient ``2|P ∩ T| / (|P| + |T|)`` of ``label``; 1.0 when the label is in neither map."""
    return _dice_from(*_overlap(pred, truth, label))


def dice_per_class(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """:func:`dice` for each of ``labels``."""
    return {int(label): dice(pred, truth, label) for label in labels}


class GlobalDice:
    """Accumulates intersections and sizes over cases and reports LiTS's "Dice global" per label."""

    def __init__(self, labels: Iterable[int]):
        self.labels = tuple(int(label) for label in labels)
        self._intersection = {label: 0 for label in self.labels}
        self._total = {label: 0 for label in self.labels}

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Add one case."""
        for label in self.labels:
            intersection, total = _overlap(pred, truth, label)
            self._intersection[label] += intersection
            self._total[label] += total

    def result(self) -> dict[int, float]:
        """Global Dice per label over every case added so far (1.0 for a label never seen)."""
        return {label: _dice_from(self._intersection[label], self._total[label]) for label in self.labels}


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in millilitres, from a voxel-to-world affine in mm."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def label_volumes_ml(labels: np.ndarray, affine: np.ndarray, label_values: Iterable[int]) -> dict[int, float]:
    """Volume in mL of each of ``label_values`` in ``labels`` (each label on its own: liver excludes lesions)."""
    per_voxel = voxel_volume_ml(affine)
    labels = np.asarray(labels)
    return {int(label): int(np.count_nonzero(labels == label)) * per_voxel for label in label_values}
