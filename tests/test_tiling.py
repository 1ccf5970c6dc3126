"""Sliding-window tiling and Gaussian blending (mixsup.serving.tiling)."""
import numpy as np
import pytest

from mixsup.errors import InputError
from mixsup.serving.tiling import (
    SliceAccumulator,
    TileAccumulator,
    body_box,
    fits_whole,
    gaussian_importance_map,
    iter_slice_batches,
    iter_tile_batches,
    padded_size,
    plan_volume_inference,
    predict_volume_probabilities,
    slice_stack_indices,
    slice_stacks,
    sliding_window_predict,
    tile_starts,
)
from mixsup.stacks import AIR_HU, padded_stack_batches

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


def test_padded_stack_batches_pad_images_with_air_and_boxes_with_nothing():
    hu = np.arange(3)[:, None, None] * np.ones((1, 5, 6))
    boxes = np.stack([np.ones((3, 5, 6)), np.arange(3)[:, None, None] * np.ones((1, 5, 6))])
    batches = list(padded_stack_batches(hu, context_slices=3, batch_size=2, size_divisor=4, boxes=boxes))

    assert [batch for batch, _, _ in batches] == [slice(0, 2), slice(2, 3)]
    stacks, box_masks = batches[0][1], batches[0][2]
    assert stacks.shape == box_masks.shape[:1] + (3, 8, 8) and box_masks.shape == (2, 2, 8, 8)
    np.testing.assert_array_equal(stacks[:, :, 0, 0], [[0, 0, 1], [0, 1, 2]])
    assert (stacks[:, :, 5:] == AIR_HU).all() and (stacks[:, :, :, 6:] == AIR_HU).all()
    np.testing.assert_array_equal(box_masks[:, :, 0, 0], [[1, 0], [1, 1]])  # [slice, (organ, lesion)]
    assert not box_masks[:, :, 5:].any() and not box_masks[:, :, :, 6:].any()
    np.testing.assert_array_equal(batches[1][1][0, :, 0, 0], [1, 2, 2])
    assert list(padded_stack_batches(hu, 3, 2))[0][2] is None
    with pytest.raises(ValueError, match="size_divisor"):
        next(padded_stack_batches(hu, 3, 2, size_divisor=0))


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


# -- whole slices -----------------------------------------------------------------------------------------------


def neighbour_network(divisor: int):
    """A network whose output at a pixel depends on its neighbours (a 3x3 mean of the middle channel, wrapping
    at the borders) and that refuses inputs whose sides are not multiples of ``divisor``, as a U-Net does."""

    def predict(stacks):
        assert stacks.shape[2] % divisor == 0 and stacks.shape[3] % divisor == 0, stacks.shape
        middle = stacks[:, 1].astype(np.float64)
        mean = sum(np.roll(middle, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
        return np.stack([mean, -mean, np.zeros_like(mean)], axis=1).astype(np.float32)

    return predict


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 10, 7), (4, 33, 50), (2, 17, 300)])
def test_whole_slices_equal_the_network_on_each_padded_slice(shape):
    """Whole-slice inference is the network applied once to each air-padded slice stack, cropped: the padding,
    the divisor, the batching and the placement of every slice are right."""
    volume = random_volume(shape, seed=shape[2])
    network = neighbour_network(divisor=8)
    probs = predict_volume_probabilities(volume, network, ROI, batch_size=2, num_classes=3, max_slice=512,
                                         size_divisor=8)
    height, width = shape[1:]
    padded = np.full((shape[0], 3, padded_size(height, 8), padded_size(width, 8)), -1024.0, np.float32)
    padded[:, :, :height, :width] = slice_stacks(volume)
    expected = network(padded)[:, :, :height, :width].transpose(1, 0, 2, 3)
    assert probs.dtype == np.float16 and probs.shape == (3, *shape)
    np.testing.assert_allclose(probs.astype(np.float32), expected, rtol=1e-3, atol=0.05)


def test_whole_slices_and_tiles_agree_for_a_per_pixel_network():
    volume = random_volume((4, 33, 50), seed=3)
    network = lambda stacks: pixel_network(stacks).astype(np.float32)  # noqa: E731
    whole = predict_volume_probabilities(volume, network, ROI, num_classes=3, size_divisor=4)
    tiled = predict_volume_probabilities(volume, network, ROI, num_classes=3, max_slice=0)
    np.testing.assert_allclose(whole.astype(np.float32), tiled.astype(np.float32), atol=2e-3, rtol=0)


@pytest.mark.parametrize("slice_shape, max_slice, divisor, whole", [
    ((224, 224), 512, 16, True),
    ((179, 179), 192, 16, True),    # padded to 192
    ((179, 179), 180, 16, False),   # padded to 192 > 180
    ((100, 600), 512, 1, False),    # one side too long
    ((64, 64), 0, 16, False),       # 0: always tile
])
def test_which_slices_go_whole(slice_shape, max_slice, divisor, whole):
    assert fits_whole(slice_shape, max_slice, divisor) is whole
    plan = plan_volume_inference(np.zeros((2, *slice_shape), np.int16), ROI, num_classes=3, max_slice=max_slice,
                                 size_divisor=divisor)
    assert plan.mode == ("whole-slice" if whole else "tiled")


def test_slice_batches_carry_at_most_a_tile_batch_of_pixels_and_slices():
    # 8 tiles of 16x16 = 2048 pixels: 32x32 slices go 2 at a time; 8x8 ones 8 at a time (not 32: the slice cap)
    plan = plan_volume_inference(random_volume((5, 32, 32)), ROI, batch_size=8, num_classes=3)
    assert [inputs.shape[0] for inputs, _ in plan.batches] == [2, 2, 1]
    plan = plan_volume_inference(random_volume((20, 8, 8)), ROI, batch_size=8, num_classes=3)
    assert [(inputs.shape[0], first) for inputs, first in plan.batches] == [(8, 0), (8, 8), (4, 16)]
    # a slice larger than the budget still goes, alone
    assert [b.stacks.shape for b in iter_slice_batches(random_volume((2, 40, 40)), 1, 16)] == [(1, 3, 48, 48)] * 2


def test_slice_accumulator_checks_prediction_shape():
    accumulator = SliceAccumulator(3, (4, 10, 10))
    with pytest.raises(ValueError, match="expected"):
        accumulator.add(np.zeros((2, 2, 16, 16), np.float32), 0)  # wrong class count
    with pytest.raises(ValueError, match="expected"):
        accumulator.add(np.zeros((2, 3, 16, 16), np.float32), 3)  # runs past the last slice


# ------------------------------------------------------------------------------------------ body window


def body_volume(shape=(3, 60, 80), rows=(20, 30), columns=(25, 41), seed=4):
    """Air (about -1000 HU with noise) around a block of soft tissue at ``rows`` x ``columns``."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(-1000, 30, shape).astype(np.int16)
    volume[:, rows[0]:rows[1], columns[0]:columns[1]] = rng.integers(-100, 200, (shape[0], rows[1] - rows[0],
                                                                                  columns[1] - columns[0]))
    return volume


def test_body_box_keeps_a_margin_of_air_and_grows_to_the_size_divisor():
    rows, columns = body_box(body_volume(), margin=4, size_divisor=8)
    assert (rows.start, rows.stop) == (16, 40)      # 20-4 .. 30+4: 18 rows, grown to 24 downwards
    assert (columns.start, columns.stop) == (21, 45)  # 25-4 .. 41+4 = 24 columns, already a multiple of 8
    # at the image's edge the margin is cut and the box grows the other way to reach the divisor
    rows, columns = body_box(body_volume(rows=(0, 10), columns=(70, 80)), margin=4, size_divisor=16)
    assert (rows.start, rows.stop) == (0, 16)
    assert (columns.start, columns.stop) == (64, 80)


def test_body_box_of_air_alone_is_none_and_of_tissue_everywhere_the_whole_slice():
    assert body_box(np.full((2, 20, 20), -1000, np.int16)) is None
    rows, columns = body_box(np.zeros((2, 20, 30), np.int16), margin=4, size_divisor=16)
    assert (rows.start, rows.stop, columns.start, columns.stop) == (0, 20, 0, 30)


@pytest.mark.parametrize("max_slice", [512, 0])
def test_only_the_body_window_is_run_and_the_air_around_it_is_background(max_slice):
    """A per-pixel network gives the same probabilities inside the body window as over the whole slice (whole
    slices and tiles alike), the network sees only the window, and everything outside it is certain background."""
    volume = body_volume()
    seen = []

    def network(stacks):
        seen.append(stacks.shape)
        return pixel_network(stacks).astype(np.float32)

    cropped = predict_volume_probabilities(volume, network, ROI, num_classes=3, size_divisor=8, max_slice=max_slice,
                                           body_margin=4)
    whole = predict_volume_probabilities(volume, pixel_network, ROI, num_classes=3, size_divisor=8,
                                         max_slice=max_slice, body_margin=None)
    rows, columns = body_box(volume, margin=4, size_divisor=8)
    assert cropped.shape == whole.shape == (3, *volume.shape)
    assert all(shape[-2:] == (24, 24) for shape in seen) if max_slice else all(shape[-2:] == ROI for shape in seen)
    np.testing.assert_allclose(cropped[:, :, rows, columns].astype(np.float32),
                               whole[:, :, rows, columns].astype(np.float32), atol=2e-3, rtol=0)
    outside = np.ones(volume.shape[1:], bool)
    outside[rows, columns] = False
    assert (cropped[0][:, outside] == 1).all() and (cropped[1:][:, :, outside] == 0).all()


def test_a_volume_of_air_runs_no_network_and_is_background():
    def network(stacks):
        raise AssertionError("the network ran on air")

    probabilities = predict_volume_probabilities(np.full((2, 20, 20), -1000, np.int16), network, ROI,
                                                 num_classes=3)
    assert probabilities.shape == (3, 2, 20, 20)
    assert (probabilities[0] == 1).all() and (probabilities[1:] == 0).all()


def test_a_body_window_that_fits_goes_whole_where_the_full_slice_would_be_tiled():
    volume = body_volume(shape=(2, 100, 100), rows=(40, 60), columns=(40, 60))
    assert plan_volume_inference(volume, ROI, num_classes=3, max_slice=64, size_divisor=16,
                                 body_margin=8).mode == "whole-slice"
    assert plan_volume_inference(volume, ROI, num_classes=3, max_slice=64, size_divisor=16,
                                 body_margin=None).mode == "tiled"
