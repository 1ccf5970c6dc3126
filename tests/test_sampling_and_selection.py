"""Lesion crops sampled on purpose, slices without the organ not starved, and checkpoints picked on liver and
lesion together."""
from __future__ import annotations

import numpy as np
import pytest

from mixsup.training.data.dataset import Augmentation, SliceSampler, Volume, produced_ahead
from mixsup.training.recipes.base import LESION_BOX, ORGAN_BOX, STRONG, WEAK
from mixsup.training.trainer import (
    TrainConfig,
    competes_for_best,
    smoothed_scores,
    stage_best_score,
    validation_score,
)

SHAPE = (12, 96, 96)


def strong_volume() -> Volume:
    """A liver on every slice; one small lesion on slice 7 only (0.1% of the voxels, as lesions often are)."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, 20:80, 20:80] = 1
    labels[7, 60:64, 30:34] = 2
    boxes = np.zeros((2, *SHAPE), np.uint8)
    return Volume(hu=np.zeros(SHAPE, np.int16), labels=labels, boxes=boxes, kind=STRONG, case="s")


def weak_volume() -> Volume:
    """Boxes only: the organ box on every slice, a lesion box on slice 3 only."""
    boxes = np.zeros((2, *SHAPE), np.uint8)
    boxes[ORGAN_BOX, :, 20:80, 20:80] = 1
    boxes[LESION_BOX, 3, 50:58, 50:58] = 1
    return Volume(hu=np.zeros(SHAPE, np.int16), labels=None, boxes=boxes, kind=WEAK, case="w")


def centred_on_lesion_fraction(volume: Volume, lesion_at: tuple[int, slice, slice], draws: int = 600) -> float:
    """Share of crops whose centre pixel lies in the lesion (or lesion box), crop 16 px, no augmentation."""
    sampler = SliceSampler([volume], crop=16, augmentation=Augmentation.none())
    rng = np.random.default_rng(0)
    z_lesion, ys, xs = lesion_at
    hits = 0
    for _ in range(draws):
        z, (y, x) = sampler._center(volume, rng)
        hits += z == z_lesion and ys.start - 4 <= y < ys.stop + 4 and xs.start - 4 <= x < xs.stop + 4
    return hits / draws


@pytest.mark.parametrize("make, lesion_at", [(strong_volume, (7, slice(60, 64), slice(30, 34))),
                                             (weak_volume, (3, slice(50, 58), slice(50, 58)))])
def test_a_third_of_crops_are_centred_on_a_lesion(make, lesion_at):
    """Without lesion sampling a crop lands on this lesion about 1 time in 2000 (one slice in 12, 16 of 3600
    liver pixels); with it about a third of them do (minus the jitter that moves a centre off a tiny lesion)."""
    fraction = centred_on_lesion_fraction(make(), lesion_at)
    assert 0.2 < fraction < 0.45


def test_volumes_know_their_lesion_slices():
    assert strong_volume().lesion_slices.tolist() == [7]
    assert weak_volume().lesion_slices.tolist() == [3]
    assert weak_volume().sample_slices.tolist() == list(range(SHAPE[0]))


def test_a_volume_without_lesions_samples_as_before():
    volume = strong_volume()
    volume.labels[volume.labels == 2] = 1
    volume = Volume(hu=volume.hu, labels=volume.labels, boxes=volume.boxes)
    assert not len(volume.lesion_slices)
    crops = SliceSampler([volume], crop=16, augmentation=Augmentation.none()).batch(np.random.default_rng(1), 8)
    assert crops.images.shape == (8, 3, 16, 16)


def small_lesion_share(lesion_instance_fraction: float, draws: int = 1200) -> float:
    """Share of crop centres on the small lesion of a volume that also holds a large one (30x30 px on ten slices),
    every crop centred on a lesion (``lesion_fraction`` 1)."""
    volume = strong_volume()
    volume.labels[1:11, 20:50, 20:50] = 2
    instances = np.zeros(SHAPE, np.uint8)
    instances[volume.labels == 2] = 2
    instances[7, 60:64, 30:34] = 1
    volume = Volume(hu=volume.hu, labels=volume.labels, boxes=volume.boxes, instances=instances)
    sampler = SliceSampler([volume], crop=16, augmentation=Augmentation.none(), lesion_fraction=1.0,
                           lesion_instance_fraction=lesion_instance_fraction)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(draws):
        z, (y, x) = sampler._center(volume, rng)
        hits += z == 7 and 56 <= y < 68 and 26 <= x < 38
    return hits / draws


def test_lesion_crops_can_be_drawn_per_lesion_not_per_slice():
    """Drawing a lesion slice, then a lesion pixel, centres about 1 crop in 600 on a 4x4 px lesion beside a
    30x30 px one spanning ten slices; drawing a lesion instance centres half of them on each. The trainer's
    default keeps the per-slice draw (the bundled model's)."""
    volume = strong_volume()
    assert volume.instance_extents() == []
    assert small_lesion_share(0.0) < 0.02
    assert 0.35 < small_lesion_share(1.0) < 0.65
    assert 0.15 < small_lesion_share(0.5) < 0.35
    assert TrainConfig().lesion_instance_fraction == SliceSampler([volume], crop=16).lesion_instance_fraction == 0


def organ_free_slice_share(foreground_fraction: float, draws: int = 2000) -> float:
    """Share of crop centres on the slices without liver of a volume whose liver fills slices 0-5 of 12."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[:6, 20:80, 20:80] = 1
    volume = Volume(hu=np.zeros(SHAPE, np.int16), labels=labels, boxes=np.zeros((2, *SHAPE), np.uint8))
    sampler = SliceSampler([volume], crop=16, augmentation=Augmentation.none(),
                           foreground_fraction=foreground_fraction)
    rng = np.random.default_rng(0)
    return sum(sampler._center(volume, rng)[0] >= 6 for _ in range(draws)) / draws


def test_foreground_fraction_sets_how_often_slices_without_the_organ_are_seen():
    """The config key reaches the sampler: half the crops anywhere give the liver-free half of this volume a
    quarter of the centres, the default (0.8) a tenth; trainer and sampler share the default."""
    assert TrainConfig().foreground_fraction == SliceSampler([strong_volume()], crop=16).foreground_fraction
    assert 0.2 < organ_free_slice_share(0.5) < 0.3
    assert 0.06 < organ_free_slice_share(TrainConfig().foreground_fraction) < 0.14


def test_checkpoints_are_chosen_on_liver_and_lesion():
    """An epoch that gains 0.02 liver Dice by forgetting lesions must not beat one that finds them."""
    finds_lesions = {"dice_liver": 0.90, "dice_lesion": 0.50}
    forgets_lesions = {"dice_liver": 0.92, "dice_lesion": 0.00}
    assert validation_score(finds_lesions) > validation_score(forgets_lesions)
    history = [{"stage": "teacher", "epoch": 1, "train_loss": 1.0, **finds_lesions},
               {"stage": "teacher", "epoch": 2, "train_loss": 0.9, **forgets_lesions},
               {"stage": "student", "epoch": 1, "train_loss": 0.5, "dice_liver": 1.0, "dice_lesion": 1.0}]
    assert stage_best_score(history, "teacher", epochs=2) == pytest.approx(0.9 * 0.70 + 0.1 * 0.46)
    assert stage_best_score(history, "other", epochs=2) == -float("inf")


def test_a_lucky_epoch_does_not_outrank_steady_gains():
    """The best epoch is chosen on a moving average of the validation score: one epoch whose few validation cases
    happened to score high (0.60 among 0.30-0.52) is not kept over the steadily better epochs after it."""
    scores = [0.30, 0.60, 0.35, 0.45, 0.50, 0.52, 0.52, 0.52]
    history = [{"stage": "train", "epoch": e + 1, "train_loss": 1.0, "dice_liver": s, "dice_lesion": s}
               for e, s in enumerate(scores)]
    smoothed = smoothed_scores(history, "train")
    assert len(smoothed) == len(scores) and smoothed[0] == pytest.approx(0.30)
    assert smoothed[1] == pytest.approx(0.9 * 0.30 + 0.1 * 0.60)
    assert int(np.argmax(smoothed)) == len(scores) - 1
    assert stage_best_score(history, "train", epochs=len(scores)) == pytest.approx(smoothed[-1])


def test_a_fine_tune_does_not_keep_its_starting_weights_as_best():
    """A fine-tune starts at its starting model's score, dips while the learning rate is high and recovers to just
    below it: its best is an epoch of the annealing half, not epoch 1 (which the moving average alone would pick)."""
    scores = [0.80, 0.70, 0.72, 0.74, 0.76, 0.78, 0.79, 0.80]
    history = [{"stage": "train", "epoch": e + 1, "train_loss": 1.0, "dice_liver": s, "dice_lesion": s}
               for e, s in enumerate(scores)]
    smoothed = smoothed_scores(history, "train")
    assert int(np.argmax(smoothed)) == 0
    assert [competes_for_best(e, 8) for e in range(1, 9)] == [False] * 4 + [True] * 4
    assert stage_best_score(history, "train", epochs=8) == pytest.approx(max(smoothed[4:]))
    assert stage_best_score(history[:4], "train", epochs=8) == -float("inf")
    assert competes_for_best(1, 1) and not competes_for_best(1, 2) and competes_for_best(2, 2)


def test_batches_produced_ahead_are_the_plain_loops_and_no_more():
    """The worker thread draws from the shared generator in the loop's order, one call at a time, and stops at
    ``count``: the same batches and, after the epoch, the same generator state as without it."""
    def draws(rng, calls):
        def produce():
            calls.append(1)
            return rng.integers(0, 1000, 4)
        return produce

    plain_rng, ahead_rng, calls = np.random.default_rng(3), np.random.default_rng(3), []
    plain = [draws(plain_rng, [])() for _ in range(5)]
    ahead = list(produced_ahead(draws(ahead_rng, calls), 5))
    assert all(np.array_equal(a, b) for a, b in zip(plain, ahead)) and len(ahead) == 5
    assert len(calls) == 5 and plain_rng.integers(1 << 30) == ahead_rng.integers(1 << 30)
    assert list(produced_ahead(draws(ahead_rng, calls), 0)) == [] and len(calls) == 5

    def failing():
        raise ValueError("a bad crop")

    with pytest.raises(ValueError, match="a bad crop"):
        list(produced_ahead(failing, 3))
