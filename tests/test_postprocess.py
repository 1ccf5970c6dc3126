"""One constructed case per post-processing rule (mixsup.postprocess)."""
import numpy as np
import pytest

from mixsup.postprocess import (
    bounding_box,
    fill_holes,
    largest_component,
    lesions_inside_organ,
    postprocess_labels,
)

BG, LIVER, LESION = 0, 1, 2


def box(labels, lo, hi, value):
    labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return labels


def liver_block(shape=(12, 24, 24), lo=(2, 4, 4), hi=(10, 20, 20)):
    return box(np.zeros(shape, np.uint8), lo, hi, LIVER)


def test_two_liver_blobs_keep_only_the_larger():
    labels = liver_block()
    box(labels, (2, 21, 21), (5, 24, 24), LIVER)  # a small separate blob in the corner
    out = postprocess_labels(labels)
    assert out[3, 22, 22] == BG
    assert np.array_equal(out, liver_block())


def test_components_connect_through_corners():
    # 26-connectivity: two blocks touching only at one corner voxel are one organ.
    labels = np.zeros((8, 8, 8), np.uint8)
    box(labels, (0, 0, 0), (4, 4, 4), LIVER)
    box(labels, (4, 4, 4), (6, 6, 6), LIVER)
    assert np.array_equal(postprocess_labels(labels), labels)


def test_lesion_enclosed_by_liver_survives():
    # MONAI's FillHoles([1]) relabels this lesion as liver; organ ∪ lesion must be used instead.
    labels = liver_block()
    box(labels, (4, 8, 8), (8, 14, 14), LESION)
    out = postprocess_labels(labels)
    assert np.array_equal(out, labels)
    assert np.count_nonzero(out == LESION) == 4 * 6 * 6


def test_background_cavity_inside_liver_becomes_liver():
    labels = liver_block()
    box(labels, (4, 8, 8), (7, 12, 12), BG)
    out = postprocess_labels(labels)
    assert np.array_equal(out, liver_block())


def test_cavity_open_to_the_volume_border_is_not_a_hole():
    labels = liver_block(lo=(0, 4, 4), hi=(12, 20, 20))
    box(labels, (0, 8, 8), (4, 12, 12), BG)  # a notch reaching the first slice
    assert np.array_equal(postprocess_labels(labels), labels)


def test_lesion_outside_the_liver_is_removed():
    labels = liver_block()
    box(labels, (2, 21, 0), (5, 24, 3), LESION)  # far from the liver
    out = postprocess_labels(labels)
    assert np.count_nonzero(out == LESION) == 0
    assert np.array_equal(out, liver_block())


def test_lesion_on_the_liver_boundary_stays():
    labels = liver_block()
    box(labels, (4, 16, 8), (7, 23, 12), LESION)  # straddles the liver's edge at row 20
    out = postprocess_labels(labels)
    assert np.array_equal(out, labels)


def test_lesion_with_enclosed_core_is_filled_but_an_open_ring_is_not():
    labels = liver_block()
    box(labels, (3, 6, 6), (8, 13, 13), LESION)
    box(labels, (4, 8, 8), (7, 11, 11), LIVER)  # a core sealed by lesion on every side in 3D
    box(labels, (3, 14, 14), (5, 19, 19), LESION)
    box(labels, (3, 15, 15), (5, 18, 18), LIVER)  # a ring open above and below: its centre stays liver
    out = postprocess_labels(labels)
    assert np.all(out[4:7, 8:11, 8:11] == LESION)
    assert np.all(out[3:5, 15:18, 15:18] == LIVER)
    # The only lesion voxels created are the sealed core.
    created = (out == LESION) & (labels != LESION)
    assert np.count_nonzero(created) == 3 * 3 * 3


def test_no_lesion_is_invented_without_an_enclosing_lesion():
    rng = np.random.default_rng(0)
    labels = liver_block()
    noise = rng.random(labels.shape)
    labels[(noise < 0.05) & (labels == LIVER)] = LESION
    labels[(noise > 0.97) & (labels == LIVER)] = BG
    out = postprocess_labels(labels)
    assert np.all(labels[out == LESION] == LESION)
    assert set(np.unique(out)) <= {BG, LIVER, LESION}


def test_empty_input_gives_empty_output():
    out = postprocess_labels(np.zeros((4, 5, 6), np.uint8))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 6) and not out.any()


def test_other_labels_are_background_and_input_is_untouched():
    labels = liver_block()
    box(labels, (0, 0, 0), (2, 2, 2), 7)
    before = labels.copy()
    out = postprocess_labels(labels)
    assert np.array_equal(labels, before)
    assert out.dtype == np.uint8
    assert np.array_equal(out, liver_block())


def test_custom_label_values():
    labels = np.where(liver_block() == LIVER, 5, 0).astype(np.uint8)
    box(labels, (4, 8, 8), (8, 14, 14), 9)
    out = postprocess_labels(labels, organ_label=5, lesion_label=9)
    assert np.array_equal(out, labels)


def test_rejects_non_3d_input():
    with pytest.raises(ValueError):
        postprocess_labels(np.zeros((4, 4), np.uint8))


def test_building_blocks():
    mask = np.zeros((6, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True
    mask[3:6, 3:6, 3:6] = True
    assert np.count_nonzero(largest_component(mask)) == 27
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()

    shell = np.ones((5, 5, 5), bool)
    shell[2, 2, 2] = False
    assert fill_holes(shell).all()

    lesion = np.zeros((3, 3, 3), bool)
    lesion[0, 0, 0] = lesion[1, 1, 1] = True
    organ = np.zeros((3, 3, 3), bool)
    organ[1:, 1:, 1:] = True
    inside = lesions_inside_organ(lesion, organ)
    assert inside[1, 1, 1] and not inside[0, 0, 0]

    assert bounding_box(mask) == (slice(0, 6), slice(0, 6), slice(0, 6))
    assert bounding_box(lesion & organ) == (slice(1, 2), slice(1, 2), slice(1, 2))


def test_fill_holes_in_the_bounding_box_matches_a_whole_volume_fill():
    import fill_voids

    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = np.zeros((16, 20, 20), bool)
        mask[3:12, 4:15, 5:17] = rng.random((9, 11, 12)) < 0.7  # porous: many holes, some reaching the box edge
        assert np.array_equal(fill_holes(mask), fill_voids.fill(mask))
