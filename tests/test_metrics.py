"""Dice and volumes on hand-computed cases (mixsup.metrics)."""
import math

import numpy as np
import pytest

from mixsup.metrics import (
    GlobalDice,
    dice,
    dice_from_counts,
    dice_per_class,
    label_volumes_ml,
    voxel_volume_ml,
)


def test_dice_hand_computed():
    pred = np.array([1, 1, 0, 0, 2])
    truth = np.array([1, 0, 1, 0, 2])
    assert dice(pred, truth, 1) == pytest.approx(2 * 1 / (2 + 2))
    assert dice(pred, truth, 2) == 1.0
    pred = np.array([1, 1, 1, 0])
    truth = np.array([1, 0, 0, 0])
    assert dice(pred, truth, 1) == pytest.approx(2 * 1 / (3 + 1))


def test_dice_empty_cases_are_not_nan():
    zeros = np.zeros((2, 3, 4), np.uint8)
    ones = np.ones((2, 3, 4), np.uint8)
    assert dice(zeros, zeros, 1) == 1.0
    assert dice(ones, zeros, 1) == 0.0
    assert dice(zeros, ones, 1) == 0.0
    assert not any(math.isnan(v) for v in dice_per_class(zeros, ones, [0, 1, 2]).values())


def test_dice_per_class():
    pred = np.array([[0, 1], [2, 2]])
    truth = np.array([[0, 1], [1, 2]])
    scores = dice_per_class(pred, truth, [0, 1, 2])
    assert scores == pytest.approx({0: 1.0, 1: 2 * 1 / 3, 2: 2 * 1 / 3})


def test_dice_shape_mismatch():
    with pytest.raises(ValueError):
        dice(np.zeros(3), np.zeros(4), 1)


def test_global_dice_sums_over_cases():
    accumulator = GlobalDice([1, 2])
    accumulator.update(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))  # label 1: |P∩T|=1, |P|+|T|=4
    accumulator.update(np.array([1, 1, 1]), np.array([1, 1, 1]))  # label 1: |P∩T|=3, |P|+|T|=6
    result = accumulator.result()
    assert result[1] == pytest.approx(2 * (1 + 3) / (4 + 6))  # 0.8, not the per-case mean 0.75
    assert result[2] == 1.0  # never present


def test_dice_from_counts_agrees_with_dice_on_the_maps():
    pred, truth = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 0, 1])
    tp, fp, fn = 2, 1, 1
    assert dice_from_counts(tp, fp, fn) == pytest.approx(dice(pred, truth, 1)) == pytest.approx(4 / 6)
    assert dice_from_counts(0, 0, 0) == 1.0 and dice_from_counts(0, 3, 0) == 0.0


def test_volumes_in_ml():
    affine = np.diag([2.0, 2.0, 2.5, 1.0])  # 10 mm^3 per voxel
    assert voxel_volume_ml(affine) == pytest.approx(0.01)
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5] = 1  # 500 voxels
    labels[0, 0, :3] = 2  # 3 voxels
    volumes = label_volumes_ml(labels, affine, (1, 2))
    assert volumes[1] == pytest.approx(4.97)
    assert volumes[2] == pytest.approx(0.03)


def test_voxel_volume_of_a_flipped_permuted_affine():
    affine = np.array([[0, 0, -1.5, 0], [0, -0.5, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    assert voxel_volume_ml(affine) == pytest.approx(1.5 * 0.5 * 2.0 / 1000)
