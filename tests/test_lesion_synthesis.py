"""Synthetic lesions: drawn only into the liver, labelled where they change the image, boxed and given their own
instance, and off by default without touching the sampler's random stream."""
from __future__ import annotations

import numpy as np
import pytest

from mixsup.stacks import slice_stack_indices
from mixsup.training.data.dataset import Augmentation, SliceSampler, Volume
from mixsup.training.data.lesion_synthesis import LesionSynthesis, Stack, paste_lesions
from mixsup.training.data.phantoms import LESION, LIVER
from mixsup.training.recipes.base import LESION_BOX, STRONG
from mixsup.training.trainer import TrainConfig

SHAPE = (3, 80, 80)
LIVER_HU = 60.0


def liver_stack(instances: bool = True) -> Stack:
    """A 60x60 px square of 60 HU liver on three slices, background at 0 HU; no lesion yet."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, 10:70, 10:70] = LIVER
    hu = np.where(labels == LIVER, LIVER_HU, 0.0).astype(np.float32)
    return Stack(hu, labels, np.zeros((2, *SHAPE[1:]), np.uint8),
                 np.zeros(SHAPE[1:], np.int32) if instances else None)


def paste(stack: Stack, seed: int, **synthesis) -> Stack:
    return paste_lesions(stack, (40.0, 40.0), 30.0, np.array([-2.0, 0.0, 2.0]), (1.0, 1.0),
                         np.random.default_rng(seed), LesionSynthesis(probability=1.0, **synthesis))


@pytest.mark.parametrize("seed", range(6))
def test_lesions_change_the_liver_only_and_are_labelled_boxed_and_numbered(seed):
    before = liver_stack()
    after = paste(before, seed)
    new = after.labels[1] == LESION
    assert new.any()
    assert (before.labels[1][new] == LIVER).all()  # only liver turns into lesion
    changed = np.abs(after.hu - before.hu) > 0.5
    assert not (changed & (before.labels != LIVER)).any()  # the image outside the liver is untouched
    assert np.abs(after.hu - before.hu)[1][new].mean() >= 4.0  # a labelled lesion shows (iso ones by >= 5 HU)
    assert after.boxes[LESION_BOX][new].all()  # the lesion box covers it
    assert set(np.unique(after.instances[new])) <= set(range(1, 4)) and 0 not in after.instances[new]
    assert (before.hu == liver_stack().hu).all() and not (before.labels == LESION).any()  # input not modified


def test_hypodense_lesions_are_darker_than_the_liver_and_never_below_water():
    for seed in range(4):
        after = paste(liver_stack(), seed, hyper_share=0.0, iso_share=0.0, rim_share=0.0, max_count=1)
        lesion = after.hu[1][after.labels[1] == LESION]
        assert lesion.mean() < LIVER_HU - 10
        assert np.median(lesion) >= -10.0 - 1e-3  # its texture may dip below, its body not


def test_no_liver_near_the_crop_means_no_lesion():
    stack = liver_stack()
    with_liver = paste_lesions(stack, (40.0, 40.0), 30.0, np.array([-2.0, 0.0, 2.0]), (1.0, 1.0),
                        np.random.default_rng(0), LesionSynthesis(probability=1.0))
    empty = Stack(stack.hu, np.zeros_like(stack.labels), stack.boxes, stack.instances)
    assert paste_lesions(empty, (40.0, 40.0), 30.0, np.array([-2.0, 0.0, 2.0]), (1.0, 1.0),
                         np.random.default_rng(0), LesionSynthesis(probability=1.0)) is empty
    assert (with_liver.labels == LESION).any()


def strong_volume() -> Volume:
    labels = np.zeros((8, 80, 80), np.uint8)
    labels[:, 10:70, 10:70] = LIVER
    hu = np.where(labels == LIVER, 60, -1000).astype(np.int16)
    return Volume(hu=hu, labels=labels, boxes=np.zeros((2, 8, 80, 80), np.uint8), kind=STRONG, case="s",
                  spacing=(2.0, 1.0, 1.0))


def crops(probability: float, seed: int = 0, n: int = 12) -> list[dict[str, np.ndarray]]:
    sampler = SliceSampler([strong_volume()], crop=48, augmentation=Augmentation.none(),
                           lesion_synthesis=LesionSynthesis(probability=probability))
    rng = np.random.default_rng(seed)
    return [sampler.sample(rng) for _ in range(n)]


def test_the_sampler_pastes_lesions_at_its_probability():
    with_lesions = sum(bool((c["labels"] == LESION).any()) for c in crops(1.0))
    assert with_lesions >= 10  # every crop draws; a few may find no liver deep enough near their centre
    assert not any((c["labels"] == LESION).any() for c in crops(0.0))


def test_a_pasted_lesion_gets_a_fresh_id_above_a_compactly_stored_volume_s_last():
    """Volumes keep instances in the smallest type (uint8 here); a pasted lesion's id is one more than the
    slice's largest, which must not wrap to 0 (unlabelled lesion) at 255."""
    from mixsup.training.data.dataset import compact_ids

    volume = strong_volume()
    ids = np.zeros(volume.labels.shape, np.int32)
    ids[:, 12:14, 12:14] = 255
    volume.labels[ids > 0] = LESION
    volume.instances = compact_ids(ids)
    assert volume.instances.dtype == np.uint8
    sampler = SliceSampler([volume], crop=80, augmentation=Augmentation.none(),
                           lesion_synthesis=LesionSynthesis(probability=1.0))
    rng = np.random.default_rng(0)
    samples = [sampler.sample(rng) for _ in range(8)]
    assert all(s["instances"].dtype == np.int32 for s in samples)
    pasted = [s for s in samples if (s["instances"] > 255).any()]
    assert pasted
    for s in pasted:
        assert np.array_equal(s["instances"] > 0, s["labels"] == LESION)


def test_compact_ids_keep_values_in_the_smallest_unsigned_type():
    from mixsup.training.data.dataset import compact_ids

    for largest, dtype in ((0, np.uint8), (10, np.uint8), (255, np.uint8), (256, np.uint16), (70000, np.uint32)):
        ids = np.array([[0, largest], [1, 0]], np.int32)
        compact = compact_ids(ids)
        assert compact.dtype == dtype and np.array_equal(compact, ids)


def test_off_by_default_and_the_random_stream_is_unchanged():
    """Runs without synthesis reproduce runs from before it existed: probability 0 draws nothing."""
    assert TrainConfig().synthetic_lesions == 0.0
    plain = SliceSampler([strong_volume()], crop=48, augmentation=Augmentation())
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    zero = SliceSampler([strong_volume()], crop=48, augmentation=Augmentation(),
                        lesion_synthesis=LesionSynthesis(probability=0.0))
    for _ in range(4):
        a, b = plain.sample(rng_a), zero.sample(rng_b)
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert rng_a.random() == rng_b.random()


def test_the_config_key_reaches_the_trainer():
    assert TrainConfig().updated({"synthetic_lesions": 0.5}).synthetic_lesions == 0.5


def test_stack_indices_put_the_target_slice_in_the_middle_even_reversed():
    """The sampler labels the stack's middle slice; reversing a stack must keep the target there."""
    for row in slice_stack_indices(8, 3):
        assert row[1] == row[::-1][1]
