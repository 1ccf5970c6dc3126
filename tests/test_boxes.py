"""Boxes from masks, boxes back to masks, the paper's perturbation, and the boxes file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mixsup.errors import InputError
from mixsup.training.data.boxes import (
    Box,
    boxes_from_labels,
    boxes_to_json,
    boxes_to_mask,
    load_boxes,
    perturb_box,
    perturb_boxes,
    save_boxes,
)
from mixsup.training.data.phantoms import generate_phantom


def constructed_labels() -> np.ndarray:
    labels = np.zeros((3, 20, 30), dtype=np.uint8)
    labels[1, 2:15, 4:25] = 1
    labels[1, 3:5, 5:7] = 2  # lesion A
    labels[1, 5:7, 7:9] = 2  # touches A only at a corner: the same 8-connected component
    labels[1, 10:13, 20:24] = 2  # lesion B
    labels[1, 16, 26] = 2  # a lesion voxel outside the liver still widens the organ box (organ = liver ∪ lesion)
    labels[2, 0:1, 0:3] = 1
    return labels


def test_boxes_are_the_exact_component_extents():
    boxes = boxes_from_labels(constructed_labels())
    assert sorted(boxes, key=lambda b: (b.slice, b.label, b.y0)) == [
        Box(1, 1, 2, 4, 17, 27),
        Box(1, 2, 3, 5, 7, 9),
        Box(1, 2, 10, 20, 13, 24),
        Box(1, 2, 16, 26, 17, 27),
        Box(2, 1, 0, 0, 1, 3),
    ]


def test_an_empty_label_map_has_no_boxes():
    assert boxes_from_labels(np.zeros((4, 8, 8), dtype=np.uint8)) == []


def test_boxes_to_mask_covers_the_labels():
    labels = generate_phantom(3, (10, 48, 48)).labels
    boxes = boxes_from_labels(labels)
    organ = boxes_to_mask(boxes, labels.shape, 1)
    lesion = boxes_to_mask(boxes, labels.shape, 2)
    assert organ.dtype == bool and organ.shape == labels.shape
    assert organ[labels >= 1].all() and lesion[labels == 2].all()
    assert not organ[~(labels >= 1).any(axis=(1, 2))].any()  # no box on slices without organ
    assert boxes_to_mask(boxes, labels.shape, 1).sum() < labels.size


@pytest.mark.parametrize("label, scale, move", [(1, (0.95, 1.1), 1 / 20), (2, (0.9, 1.2), 1 / 10)])
def test_perturbation_respects_the_papers_bounds(label, scale, move):
    rng = np.random.default_rng(0)
    shape = (1, 400, 400)
    changed = 0
    for _ in range(300):
        h, w = rng.integers(10, 80, 2)
        y0, x0 = rng.integers(120, 200, 2)
        box = Box(0, label, int(y0), int(x0), int(y0 + h), int(x0 + w))
        new = perturb_box(box, rng, shape)
        cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
        for lo_new, hi_new, centre, side in ((new.y0, new.y1, cy, h), (new.x0, new.x1, cx, w)):
            # each vertex: scaled about the centre, then moved by less than `move` of the side (+ rounding)
            assert centre - side * scale[1] / 2 - move * side - 0.5 <= lo_new <= centre - side * scale[0] / 2 + move * side + 0.5
            assert centre + side * scale[0] / 2 - move * side - 0.5 <= hi_new <= centre + side * scale[1] / 2 + move * side + 0.5
        changed += new != box
        assert (new.slice, new.label) == (box.slice, box.label)
    assert changed > 250


def test_perturbed_boxes_stay_in_the_image():
    rng = np.random.default_rng(1)
    boxes = [Box(0, 2, 0, 0, 3, 3), Box(1, 1, 0, 0, 40, 50), Box(2, 2, 37, 47, 40, 50)]
    for _ in range(100):
        for box in perturb_boxes(boxes, rng, (3, 40, 50)):
            assert 0 <= box.y0 < box.y1 <= 40 and 0 <= box.x0 < box.x1 <= 50


def test_boxes_file_round_trip(tmp_path):
    boxes = boxes_from_labels(constructed_labels())
    path = save_boxes(tmp_path / "boxes" / "boxes-1.json", boxes, (3, 20, 30))
    document = json.loads(path.read_text())
    assert document == boxes_to_json(boxes, (3, 20, 30))
    assert document["frame"] == "canonical" and document["shape"] == [3, 20, 30]
    assert document["boxes"][0] == [1, 1, 2, 4, 17, 27]
    assert load_boxes(path) == (boxes, (3, 20, 30))


@pytest.mark.parametrize(
    "document",
    [
        {"frame": "stored", "shape": [1, 2, 3], "boxes": []},
        {"frame": "canonical", "shape": [1, 2], "boxes": []},
        {"frame": "canonical", "shape": [2, 10, 10], "boxes": [[0, 1, 0, 0, 11, 5]]},
        {"frame": "canonical", "shape": [2, 10, 10], "boxes": [[0, 1, 5, 0, 5, 5]]},
        {"frame": "canonical", "shape": [2, 10, 10], "boxes": [[0, 1, 0, 0]]},
    ],
)
def test_bad_boxes_files_are_input_errors(tmp_path, document):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InputError):
        load_boxes(path)


def test_missing_boxes_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such boxes file"):
        load_boxes(tmp_path / "nope.json")
