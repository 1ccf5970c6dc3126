"""Sliding-window tiling and Gaussian blending (mixsup.serving.tiling)."""
import numpy as np
import pytest

from mixsup.errors import InputError
from mixsup.serving.tiling import (
    TileAccumulator,
    gaussian_importance_map,
    iter_tile_batches,
    slice_stack_indices,
    slice_stacks,
    sliding_window_predict,
    tile_starts,
)

ROI = (16, 16)
# (D, H, W): smaller than, equal to, and not a multiple of the tile, including a single slice.
VOLUME_SHAPES = [(1, 16, 16), (2, 10, 7), (3, 16, 40), (1, 37, 23), (4, 33, 50), (2, 5, 300)]


def random_volume(shape, seed=0):
    return np.random.default_rng(seed).integers(-300, 300, size=shape).astype(np.int16)


def constant_network(values):
    values = np.asarray(values, dtype=np.float32)

    def predict(tiles):
        return np.broadcast_to(values[None, :, None, None], (tiles.shape[0], len(values), *tiles.shape[2:])).copy()

    return predict


# a per-pixel "network": softmax of affine functions of the 3 channel values of the same pixel
PIXEL_WEIGHT = np.array([[0.010, -0.004, 0.002], [-0.006, 0.008, 0.001], [0.002, 0.003, -0.009]])
PIXEL_BIAS = np.array([0.3, -0.2, 0.1])


def pixel_network(stacks):
    """[N,3,h,w] -> [N,3,h,w] probabilities, in float64 (the reference) or float32 (as a network would)."""
    logits = np.einsum("ck,nkhw->nchw", PIXEL_WEIGHT, stacks.astype(np.float64)) + PIXEL_BIAS[None, :, None, None]
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def test_slice_stacks_replicate_edge_slices():
    volume = np.arange(4)[:, None, None] * np.ones((1, 2, 3))
    stacks = slice_stacks(volume)
    assert stacks.shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(stacks[:, :, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    np.testing.assert_array_equal(slice_stack_indices(1), [[0, 0, 0]])
    np.testing.assert_array_equal(slice_stack_indices(3, context_slices=5)[0], [0, 0, 0, 1, 2])


@pytest.mark.parametrize("size, roi, overlap, expected", [
    (16, 16, 0.25, [0]),
    (10, 16, 0.25, [0]),
    (40, 16, 0.25, [0, 12, 24]),
    (40, 16, 0.5, [0, 8, 16, 24]),
    (17, 16, 0.0, [0, 1]),
    (5, 1, 0.9, [0, 1, 2, 3, 4]),
])
def test_tile_starts(size, roi, overlap, expected):
    starts = tile_starts(size, roi, overlap)
    assert starts == expected
    assert starts[-1] + roi == max(size, roi)


@pytest.mark.parametrize("overlap", [-0.1, 1.0])
def test_tile_starts_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError):
        tile_starts(40, 16, overlap)


def test_gaussian_importance_map():
    importance = gaussian_importance_map((16, 24), 0.125)
    assert importance.dtype == np.float32 and importance.shape == (16, 24)
    assert importance.max() == 1.0 and importance.min() > 0
    np.testing.assert_allclose(importance, importance[::-1, ::-1])  # symmetric about the tile centre
    assert importance[8, 12] > importance[0, 0]
    assert not importance.flags.writeable
    assert gaussian_importance_map((16, 24), 0.125) is importance  # cached
    # a tiny sigma underflows at the borders: zeros are replaced by the smallest non-zero value
    sharp = gaussian_importance_map((64, 64), 0.01)
    assert sharp.min() > 0
    assert np.count_nonzero(sharp == sharp.min()) > 100


@pytest.mark.parametrize("shape", VOLUME_SHAPES)
def test_every_voxel_is_covered(shape):
    accumulator = TileAccumulator(3, shape, ROI, overlap=0.25)
    assert accumulator.weight_map.shape == (max(shape[1], ROI[0]), max(shape[2], ROI[1]))
    assert np.all(accumulator.weight_map[:shape[1], :shape[2]] > 0)
    positions = [p for batch in iter_tile_batches(random_volume(shape), ROI, 0.25, 5) for p in batch.positions]
    assert sorted({d for d, _, _ in positions}) == list(range(shape[0]))
    assert len(positions) == len(set(positions))


@pytest.mark.parametrize("shape", VOLUME_SHAPES)
def test_constant_network_blends_to_the_constant(shape):
    # powers of two make every weighted sum exact, so the blend must be exactly the constant
    probs = sliding_window_predict(random_volume(shape), constant_network([0.5, 0.25, 0.25]), ROI,
                                   overlap=0.25, batch_size=3, num_classes=3)
    assert probs.dtype == np.float16 and probs.shape == (3, *shape)
    np.testing.assert_array_equal(probs[0], np.float16(0.5))
    np.testing.assert_array_equal(probs[1:], np.float16(0.25))
    probs = sliding_window_predict(random_volume(shape), constant_network([0.2, 0.3, 0.5]), ROI, 0.5, 4,
                                   num_classes=3)
    np.testing.assert_allclose(probs.astype(np.float32), np.broadcast_to([[[[0.2]]], [[[0.3]]], [[[0.5]]]],
                                                                         probs.shape), atol=1e-3)


@pytest.mark.parametrize("shape", VOLUME_SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_per_pixel_network_stitches_to_whole_image_output(shape, overlap):
    volume = random_volume(shape, seed=shape[1])
    probs = sliding_window_predict(volume, lambda tiles: pixel_network(tiles).astype(np.float32), ROI, overlap,
                                   batch_size=4, num_classes=3)
    whole = pixel_network(slice_stacks(volume))  # [D,C,H,W]
    np.testing.assert_allclose(probs.astype(np.float32), whole.transpose(1, 0, 2, 3), atol=1e-3, rtol=0)


def test_network_sees_raw_hu_stacks_and_padding():
    volume = random_volume((3, 10, 20))
    seen = []

    def identity(tiles):
        seen.append(tiles)
        return tiles

    probs = sliding_window_predict(volume, identity, ROI, 0.25, batch_size=2, num_classes=3)
    # the channels are the previous, current and next slice (edges replicated), in raw HU
    np.testing.assert_allclose(probs.astype(np.float32), slice_stacks(volume).transpose(1, 0, 2, 3), atol=0.25)
    tiles = np.concatenate(seen)
    assert tiles.dtype == np.float32 and tiles.shape[1:] == (3, *ROI)
    assert np.all(tiles[:, :, 10:, :] == -1024)  # rows below the 10-row volume are padded with air


def test_batches_hold_at_most_batch_size_tiles():
    batches = list(iter_tile_batches(random_volume((3, 40, 40)), ROI, 0.25, batch_size=4))
    assert [len(b.positions) for b in batches] == [4, 4, 4, 4, 4, 4, 3]  # 3 slices x 3 x 3 tiles
    assert all(b.tiles.shape[0] == len(b.positions) for b in batches)


@pytest.mark.parametrize("volume", [np.zeros((40, 50)), np.zeros((0, 40, 50)), np.zeros((2, 3, 4, 5))])
def test_bad_volumes_are_input_errors(volume):
    with pytest.raises(InputError):
        list(iter_tile_batches(volume, ROI, 0.25, 4))


def test_accumulator_checks_prediction_shape():
    accumulator = TileAccumulator(3, (1, 16, 16), ROI, 0.25)
    with pytest.raises(ValueError, match="expected"):
        accumulator.add(np.zeros((1, 2, 16, 16), np.float32), [(0, 0, 0)])
