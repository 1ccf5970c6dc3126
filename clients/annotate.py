"""``mixsup-client annotate``: "draw a box, get a mask" with the teacher-student teacher served as an annotator.

The annotator (``mixsup-export CKPT --teacher``, :mod:`mixsup.export.annotator`) takes, per axial slice,

* ``image`` FP32 ``[N, 3, H, W]``: raw HU of slices ``z-1, z, z+1`` (edges repeated, :func:`mixsup.stacks.
  slice_stack_indices`) on the canonical grid at the contract's ``spacing_mm`` -- the same volume the ``segment``
  pipeline sends (:func:`mixsup.clients.pipeline.prepare_volume`);
* ``boxes`` FP32 ``[N, 2, H, W]``: box masks of the centre slice, channel 0 the organ box, channel 1 the lesion
  box(es) combined, 1 inside and 0 outside;

and answers ``probabilities`` FP32 ``[N, 3, H, W]`` (background, liver, lesion). ``H`` and ``W`` must be multiples
of the contract's ``size_divisor``: the slices are padded at the bottom and right with air (-1024 HU) and empty
boxes, and the answer is cropped back. Requests hold at most :data:`MAX_BATCH` slices (the model's
``max_batch_size``). Only slices with at least one box are sent; every other slice gets label 0.

The boxes come in the project's boxes-file format, as ``mixsup-data phantoms`` writes ``boxes/boxes-N.json``
(:mod:`mixsup.boxes`): ``{"frame": "canonical", "shape": [D, H, W], "boxes": [[slice, label, y0, x0, y1, x1],
...]}``, half-open pixel ranges on the *canonical* ``[D, H, W]`` array of the stored scan
(:meth:`mixsup.scan.Scan.canonical`, before any resampling), label 1 organ and 2 lesion. The client reads them with
the core reader that training uses too (it never imports ``mixsup.training``, nor torch), and accepts only those
two labels.

The labels are *not* post-processed like ``segment``'s: the annotator's argmax is kept inside the boxes only -- the
organ label (1) only within the organ boxes, the lesion label (2) only within the lesion boxes; anything else
(including a lesion answer outside every lesion box) becomes 0. The boxes are applied exactly on the scan's grid
after the labels are brought back to it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mixsup.boxes import BOXES_FORMAT_FRAME, Box  # noqa: F401  (BOXES_FORMAT_FRAME: re-exported)
from mixsup.boxes import boxes_from_json as _boxes_from_json
from mixsup.boxes import load_boxes as _load_boxes
from mixsup.clients.client import SegmentationClient
from mixsup.clients.pipeline import Restore, prepare_volume, restore_labels
from mixsup.clients.protocol import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    LESION_LABEL,
    ORGAN_LABEL,
    describe_shape,
)
from mixsup.contract import ModelContract
from mixsup.errors import InputError, MixsupError
from mixsup.scan import Scan
from mixsup.stacks import AIR_HU, slice_stack_indices

DEFAULT_ANNOTATOR_MODEL = "annotator"
ANNOTATOR_KIND = "annotator"
IMAGE_INPUT = "image"
BOXES_INPUT = "boxes"
PROBABILITIES_OUTPUT = "probabilities"
#: The annotator's ``max_batch_size``: slices per request.
MAX_BATCH = 16


# -- the boxes file -----------------------------------------------------------------------------------------------


def boxes_from_json(document: object, source: str = "boxes") -> tuple[list[Box], tuple[int, int, int]]:
    """:func:`mixsup.boxes.boxes_from_json`, accepting only organ (1) and lesion (2) boxes."""
    return _boxes_from_json(document, source, known_labels_only=True)


def load_boxes(path: str | os.PathLike) -> tuple[list[Box], tuple[int, int, int]]:
    """:func:`mixsup.boxes.load_boxes`, accepting only organ (1) and lesion (2) boxes."""
    return _load_boxes(path, known_labels_only=True)


# -- boxes between grids ------------------------------------------------------------------------------------------


def _map_range(start: int, stop: int, scale: float, size: int) -> tuple[int, int]:
    # Model pixel j (centre at (j + 0.5) * scale in canonical pixel edges, the convention of mixsup.resample) is
    # inside when its centre is: j in [ceil(start / scale - 0.5), ceil(stop / scale - 0.5)).
    lo = max(math.ceil(start / scale - 0.5), 0)
    hi = min(math.ceil(stop / scale - 0.5), size)
    if hi <= lo:  # a box thinner than a model pixel: the pixel holding its centre
        lo = min(max(math.floor((start + stop) / 2 / scale), 0), size - 1)
        hi = lo + 1
    return lo, hi


def map_boxes(boxes: Iterable[Box], canonical_hw: Sequence[int], model_hw: Sequence[int]) -> list[Box]:
    """Boxes on the canonical grid (in-plane ``canonical_hw``) -> the same boxes on the model grid (``model_hw``).

    Only the in-plane axes are resampled (the slices stay as they are, as in :func:`prepare_volume`). A model pixel
    belongs to a box when its centre lies inside the box, with the pixel-centre convention of
    :mod:`mixsup.resample` (model pixel ``j`` is centred at ``(j + 0.5) * scale - 0.5`` canonical pixels,
    ``scale = canonical / model``); a box thinner than a model pixel keeps the one pixel holding its centre.
    Same grid: the boxes come back as they are.
    """
    scale_y = canonical_hw[0] / model_hw[0]
    scale_x = canonical_hw[1] / model_hw[1]
    mapped = []
    for box in boxes:
        y0, y1 = _map_range(box.y0, box.y1, scale_y, int(model_hw[0]))
        x0, x1 = _map_range(box.x0, box.x1, scale_x, int(model_hw[1]))
        mapped.append(Box(box.slice, box.label, y0, x0, y1, x1))
    return mapped


def box_masks(boxes: Iterable[Box], shape: Sequence[int]) -> np.ndarray:
    """Boolean ``[2, D, H, W]``: the organ boxes filled in channel 0, the lesion boxes in channel 1."""
    masks = np.zeros((2,) + tuple(int(n) for n in shape), dtype=bool)
    for box in boxes:
        channel = 0 if box.label == ORGAN_LABEL else 1
        masks[channel, box.slice, box.y0:box.y1, box.x0:box.x1] = True
    return masks


# -- the request and the answer -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AnnotationInputs:
    """The annotator's inputs for one scan, and what is needed to bring its answer back to the scan's grid.

    ``image`` FP32 ``[N, 3, Hp, Wp]`` and ``boxes`` FP32 ``[N, 2, Hp, Wp]`` are padded to ``size_divisor``;
    ``slices`` are the canonical slice indices of the ``N`` rows; ``canonical_boxes`` ``[2, D, H, W]`` bool are
    the boxes on the canonical (not resampled) grid.
    """

    image: np.ndarray
    boxes: np.ndarray
    slices: np.ndarray
    restore: Restore
    canonical_boxes: np.ndarray

    @property
    def model_hw(self) -> tuple[int, int]:
        return self.restore.model_shape[1], self.restore.model_shape[2]


def _padded(size: int, divisor: int) -> int:
    return -(-size // divisor) * divisor


def check_annotator_contract(contract: ModelContract, model: str) -> None:
    """:class:`InputError` unless ``contract`` is a box-prompted annotator with the inputs this client sends."""
    if contract.kind != ANNOTATOR_KIND or contract.input_name != IMAGE_INPUT:
        raise InputError(f"model {model!r} is not a box-prompted annotator (its contract's kind is "
                         f"{contract.kind!r}); export one with mixsup-export CKPT --teacher")
    if contract.context_slices != 3 or contract.num_classes != 3:
        raise InputError(f"model {model!r}: expected 3 context slices and 3 classes, its contract has "
                         f"{contract.context_slices} and {contract.num_classes}")


def check_boxes_shape(scan: Scan, boxes_shape: Sequence[int]) -> None:
    """:class:`InputError` unless ``boxes_shape`` is the canonical ``[D, H, W]`` of ``scan`` (checked before the
    server is contacted)."""
    canonical_shape = tuple(int(n) for n in scan.canonical()[0].shape)
    if tuple(boxes_shape) != canonical_shape:
        raise InputError(f"the boxes are for a volume of shape {list(boxes_shape)}, the scan's canonical shape is "
                         f"{list(canonical_shape)}")


def prepare_annotation(
    scan: Scan, boxes: Sequence[Box], boxes_shape: Sequence[int], contract: ModelContract
) -> AnnotationInputs:
    """The annotator's padded inputs for the slices of ``scan`` that carry a box.

    ``boxes`` lie on the canonical grid of ``scan`` (``boxes_shape`` must be that grid's ``[D, H, W]``); they are
    mapped onto the model grid with :func:`map_boxes`. :class:`InputError` when the shapes disagree.
    """
    volume, restore = prepare_volume(scan, contract)
    if tuple(boxes_shape) != restore.canonical_shape:
        raise InputError(f"the boxes are for a volume of shape {list(boxes_shape)}, the scan's canonical shape is "
                         f"{list(restore.canonical_shape)}")
    depth, height, width = restore.model_shape
    divisor = max(1, int(contract.size_divisor))
    padded_hw = (_padded(height, divisor), _padded(width, divisor))
    slices = np.array(sorted({box.slice for box in boxes}), dtype=np.int64)
    stacks = slice_stack_indices(depth, contract.context_slices)[slices]
    image = np.full((len(slices), contract.context_slices) + padded_hw, AIR_HU, dtype=np.float32)
    image[:, :, :height, :width] = volume[stacks]
    model_boxes = box_masks(map_boxes(boxes, restore.canonical_shape[1:], (height, width)), restore.model_shape)
    box_input = np.zeros((len(slices), 2) + padded_hw, dtype=np.float32)
    box_input[:, :, :height, :width] = model_boxes[:, slices].transpose(1, 0, 2, 3)
    return AnnotationInputs(
        image=image, boxes=box_input, slices=slices, restore=restore,
        canonical_boxes=box_masks(boxes, restore.canonical_shape),
    )


def labels_from_probabilities(probabilities: np.ndarray, inputs: AnnotationInputs, num_classes: int = 3) -> np.ndarray:
    """The annotator's probabilities ``[N, C, Hp, Wp]`` -> uint8 labels on the scan's stored grid, kept inside the
    boxes only (organ label within organ boxes, lesion label within lesion boxes, 0 elsewhere and on every slice
    without a box)."""
    probabilities = np.asarray(probabilities)
    expected = (len(inputs.slices), num_classes) + tuple(inputs.image.shape[-2:])
    if probabilities.shape != expected:
        raise MixsupError(f"the annotator returned probabilities of shape {probabilities.shape}, expected {expected}")
    height, width = inputs.model_hw
    labels_model = np.zeros(inputs.restore.model_shape, dtype=np.uint8)
    labels_model[inputs.slices] = np.argmax(probabilities[:, :, :height, :width], axis=1)
    labels = restore_labels(labels_model, inputs.restore, num_classes)
    organ_box, lesion_box = inputs.restore.to_stored(inputs.canonical_boxes)
    keep = ((labels == ORGAN_LABEL) & organ_box) | ((labels == LESION_LABEL) & lesion_box)
    return np.where(keep, labels, 0).astype(np.uint8)


# -- the server ---------------------------------------------------------------------------------------------------


class AnnotatorClient(SegmentationClient):
    """A :class:`SegmentationClient` for the box-prompted annotator (default model ``annotator``)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_ANNOTATOR_MODEL,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(url, model, timeout_s, connect_timeout_s)

    def annotator_contract(self) -> ModelContract:
        """The model's contract, checked to be an annotator's (:func:`check_annotator_contract`)."""
        contract = self.contract()
        check_annotator_contract(contract, self.model)
        return contract

    def infer_probabilities(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """FP32 probabilities ``[N, C, H, W]`` for padded ``image`` and ``boxes``, :data:`MAX_BATCH` per request."""
        answers = []
        for start in range(0, len(image), MAX_BATCH):
            feeds = {IMAGE_INPUT: image[start:start + MAX_BATCH], BOXES_INPUT: boxes[start:start + MAX_BATCH]}
            requests = []
            for name, value in feeds.items():
                requests.append(grpcclient.InferInput(name, list(value.shape), "FP32"))
                requests[-1].set_data_from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            try:
                answer = self._client.infer(
                    self.model, inputs=requests, outputs=[grpcclient.InferRequestedOutput(PROBABILITIES_OUTPUT)],
                    client_timeout=self.timeout_s,
                )
            except InferenceServerException as exc:
                action = f"annotating {describe_shape(feeds[IMAGE_INPUT].shape)} slice stacks"
                raise self._endpoint.translate(exc, action, during_inference=True) from None
            probabilities = answer.as_numpy(PROBABILITIES_OUTPUT)
            if probabilities is None:
                raise MixsupError(f"Triton at {self.url} returned no {PROBABILITIES_OUTPUT!r}")
            answers.append(probabilities)
        if not answers:
            return np.zeros((0, 3) + tuple(image.shape[-2:]), dtype=np.float32)
        return np.concatenate(answers)

    def annotate_scan(self, scan: Scan, boxes: Sequence[Box], boxes_shape: Sequence[int]) -> np.ndarray:
        """uint8 labels on ``scan``'s stored grid from the boxes (see the module's docstring for the rules)."""
        contract = self.annotator_contract()
        inputs = prepare_annotation(scan, boxes, boxes_shape, contract)
        probabilities = self.infer_probabilities(inputs.image, inputs.boxes)
        return labels_from_probabilities(probabilities, inputs, contract.num_classes)
