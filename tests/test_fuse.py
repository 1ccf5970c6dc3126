"""Fusing ensemble members (mixsup.serving.fuse)."""
import numpy as np
import pytest

from mixsup.labels import first_max_index
from mixsup.serving.fuse import fuse_probabilities, normalized_weights


def random_probs(shape, seed):
    logits = np.random.default_rng(seed).normal(size=shape)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=0, keepdims=True)).astype(np.float16)


def test_weighted_average_and_argmax():
    members = [random_probs((3, 2, 5, 6), seed) for seed in range(3)]
    labels, probs = fuse_probabilities(members, [1.0, 2.0, 5.0])
    expected = sum(w * m.astype(np.float64) for w, m in zip([1 / 8, 2 / 8, 5 / 8], members))
    assert labels.dtype == np.uint8 and labels.shape == (2, 5, 6)
    assert probs.dtype == np.float16 and probs.shape == (3, 2, 5, 6)
    np.testing.assert_allclose(probs.astype(np.float64), expected, atol=1e-3)
    np.testing.assert_array_equal(labels, np.argmax(expected, axis=0))


def test_weights_change_the_winner():
    background = np.zeros((2, 1, 1, 1), np.float16)
    background[0] = 1
    foreground = 1 - background
    assert fuse_probabilities([background, foreground], [3, 1])[0].item() == 0
    assert fuse_probabilities([background, foreground], [1, 3])[0].item() == 1


def test_single_member_is_its_own_argmax():
    member = random_probs((3, 4, 4, 4), 7)
    labels, probs = fuse_probabilities([member], [0.3])
    np.testing.assert_array_equal(probs, member)
    np.testing.assert_array_equal(labels, np.argmax(member.astype(np.float32), axis=0))


def test_empty_volume_gives_empty_outputs():
    labels, probs = fuse_probabilities([np.zeros((3, 0, 4, 5), np.float16)] * 2, [1, 1])
    assert labels.shape == (0, 4, 5) and probs.shape == (3, 0, 4, 5)


@pytest.mark.parametrize("members, weights", [
    ([np.zeros((3, 2, 4, 4)), np.zeros((3, 2, 4, 5))], [1, 1]),  # shapes differ
    ([np.zeros((3, 2, 4, 4))] * 2, [1]),  # one weight for two members
    ([np.zeros((3, 2, 4, 4))] * 2, [1, 0]),  # non-positive weight
    ([np.zeros((3, 2, 4, 4))] * 2, [1, -2]),
    ([np.zeros((3, 2, 4, 4))] * 2, [1, np.nan]),
    ([np.zeros((2, 4, 4))], [1]),  # not [C,D,H,W]
    ([], []),
])
def test_bad_members_or_weights(members, weights):
    with pytest.raises(ValueError):
        fuse_probabilities(members, weights)


def test_normalized_weights_sum_to_one():
    np.testing.assert_allclose(normalized_weights([2, 6], 2), [0.25, 0.75])


def test_first_max_index_is_argmax_with_ties_to_the_lower_class():
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 3, (4, 20, 30)).astype(np.float32)  # many exact ties
    assert np.array_equal(first_max_index(ties), np.argmax(ties, axis=0))
    half = rng.random((3, 5, 40, 40)).astype(np.float16)
    labels = first_max_index(half)
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.argmax(half.astype(np.float32), axis=0))
    # float16 with ties, zeros, subnormals and infinity (compared as bit patterns), then with negative values
    # and NaN-free signs mixed in (compared in float32): both must be numpy's argmax.
    special = np.array([0.0, 6e-8, 1e-5, 0.25, 0.5, 1.0, np.inf], dtype=np.float16)
    coded = special[rng.integers(0, len(special), (3, 6, 50))]
    assert np.array_equal(first_max_index(coded), np.argmax(coded.astype(np.float32), axis=0))
    signed = (coded.astype(np.float32) * rng.choice([-1, 1], coded.shape)).astype(np.float16)
    assert np.array_equal(first_max_index(signed), np.argmax(signed.astype(np.float32), axis=0))
