"""MSDN's detection unit as a graph: raw HU -> probabilities plus per-slice boxes, scores and classes.

What ``mixsup-export --keep-detection`` writes beside the segmentation network. The graph runs the detection net
(encoder, decoder, the anchor unit shared over every decoder scale), decodes the box deltas on the anchors the
recipe trained with (:func:`~mixsup.training.models.msdn.image_anchors`, base size from the checkpoint's
``anchor_size``), clips the boxes to the slice, drops the ones that clipping left thinner than
:data:`MIN_BOX_SIZE` (decoded off the slice; torchvision's RetinaNet drops them too) and keeps the best ones per
slice:

1. the ``pre_nms_top_n`` highest (anchor, class) scores of the slice (sigmoid of the class logits);
2. greedy non-max suppression per class among those (ONNX ``NonMaxSuppression``: a candidate needs a score above
   ``score_threshold`` and is dropped when its IoU with a kept box of its class exceeds ``iou_threshold``);
3. the ``max_detections`` best kept boxes over both classes, by score, padded to exactly ``max_detections``.

Every step has a fixed size whatever the slice size (the candidate lists are padded with score -1 entries
before each top-k), so the outputs are ``[N, max_detections, ...]`` for any input, and a batch of slices is one
graph call. Padding rows: box 0, score 0, class -1. Boxes are ``(x0, y0, x1, y1)`` in pixels of the input slice,
half-open like the training boxes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mixsup.contract import TensorSpec
from mixsup.errors import InputError
from mixsup.training.models.msdn import MSDN, decode_boxes, image_anchors

BOXES, SCORES, CLASSES = "detection_boxes", "detection_scores", "detection_classes"
#: What a padding row holds in each output.
PAD_SCORE, PAD_CLASS = 0.0, -1
#: Candidates below every real score (sigmoids are >= 0), so padding is never chosen over a real candidate.
_NO_SCORE = -1.0
#: Least width and height, in pixels, of a box that counts (torchvision's ``remove_small_boxes`` default).
MIN_BOX_SIZE = 1e-2


@dataclass(frozen=True)
class DetectionSettings:
    """How the detection unit's raw outputs become boxes; RetinaNet's inference values by default."""

    max_detections: int = 100
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    pre_nms_top_n: int = 1000

    def check(self) -> None:
        """An InputError for settings that make no sense."""
        if not 1 <= self.max_detections <= self.pre_nms_top_n:
            raise InputError(f"--max-detections must be between 1 and {self.pre_nms_top_n}, got {self.max_detections}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise InputError(f"--score-threshold must be in [0, 1), got {self.score_threshold}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise InputError(f"--nms-iou must be in (0, 1], got {self.iou_threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


def output_specs(settings: DetectionSettings, class_names: tuple[str, ...]) -> tuple[TensorSpec, ...]:
    """The detection outputs as the model contract documents them."""
    count = settings.max_detections
    classes = ", ".join(f"{index} {name}" for index, name in enumerate(class_names))
    return (
        TensorSpec(BOXES, "float32", ("N", count, 4),
                   "boxes (x0, y0, x1, y1) in input pixels, half-open, best first; padding rows 0"),
        TensorSpec(SCORES, "float32", ("N", count),
                   f"score (sigmoid) of each box, descending; above {settings.score_threshold} for a box, "
                   f"{PAD_SCORE} for padding"),
        TensorSpec(CLASSES, "int64", ("N", count), f"class of each box ({classes}); {PAD_CLASS} for padding"),
    )


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
               score_threshold: float) -> torch.Tensor:
    """ONNX ``NonMaxSuppression`` (corner boxes) in eager PyTorch, with ONNX Runtime's rules.

    ``boxes`` [N, P, 4], ``scores`` [N, K, P]; returns ``[S, 3]`` int64 rows (slice, class, box), per slice and
    class in the order chosen. Per slice and class: candidates with score > ``score_threshold``, highest first
    (ties: lower index first); one is kept unless its IoU with a kept box exceeds ``iou_threshold`` (boxes of
    zero area suppress nothing); at most ``max_per_class`` kept.
    """
    selected: list[torch.Tensor] = []
    for slice_index in range(boxes.shape[0]):
        corners = boxes[slice_index]
        low, high = torch.minimum(corners[:, :2], corners[:, 2:]), torch.maximum(corners[:, :2], corners[:, 2:])
        areas = (high - low).prod(dim=1)
        for class_index in range(scores.shape[1]):
            class_scores = scores[slice_index, class_index]
            candidates = torch.nonzero(class_scores > score_threshold).squeeze(1)
            order = candidates[torch.sort(class_scores[candidates], descending=True, stable=True).indices]
            kept: list[int] = []
            for index in order.tolist():
                if len(kept) == max_per_class:
                    break
                if kept:
                    other = torch.tensor(kept)
                    sides = (torch.minimum(high[index], high[other]) - torch.maximum(low[index], low[other]))
                    intersection = sides.clamp(min=0).prod(dim=1)
                    union = areas[index] + areas[other] - intersection
                    overlapping = (intersection > 0) & (areas[index] > 0) & (areas[other] > 0) & (union > 0)
                    if bool((overlapping & (intersection / union > iou_threshold)).any()):
                        continue
                kept.append(index)
            selected += [torch.tensor([slice_index, class_index, index]) for index in kept]
    if not selected:
        return torch.zeros((0, 3), dtype=torch.int64)
    return torch.stack(selected).to(torch.int64)


class NonMaxSuppression(torch.autograd.Function):
    """:func:`greedy_nms` in PyTorch, the ONNX ``NonMaxSuppression`` operator in an exported graph.

    torchvision (whose ``nms`` exports the same way) is not a dependency, so the operator is declared here: the
    legacy exporter writes a Function's ``symbolic`` in place of its forward.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
                score_threshold: float) -> torch.Tensor:
        return greedy_nms(boxes, scores, max_per_class, iou_threshold, score_threshold)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        constant = lambda value, dtype: g.op("Constant", value_t=torch.tensor([value], dtype=dtype))  # noqa: E731
        return g.op("NonMaxSuppression", boxes, scores, constant(max_per_class, torch.int64),
                    constant(iou_threshold, torch.float32), constant(score_threshold, torch.float32),
                    center_point_box_i=0)


def pad_candidates(values: torch.Tensor, count: int, fill: float) -> torch.Tensor:
    """``values`` [N, L, ...] with ``count`` rows of ``fill`` appended along dim 1 (built from ``values`` itself,
    so the batch size stays dynamic in a traced graph)."""
    padding = torch.full_like(values[:, :1], fill).expand(-1, count, *values.shape[2:])
    return torch.cat([values, padding], dim=1)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor,
                      settings: DetectionSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes ``[N, M, 4]`` and scores ``[N, M, K]`` of every anchor -> the padded per-slice detections
    ``[N, D, 4]``, ``[N, D]``, ``[N, D]`` (module docstring, steps 1-3)."""
    num_classes = scores.shape[2]
    top_n, count = settings.pre_nms_top_n, settings.max_detections
    # 1. top (anchor, class) pairs; flat index = anchor * K + class
    flat = pad_candidates(scores.reshape(scores.shape[0], -1), top_n, _NO_SCORE)
    top_scores, top_index = flat.topk(top_n, dim=1)
    anchor, label = top_index // num_classes, top_index % num_classes
    padded_boxes = pad_candidates(boxes, top_n, 0.0)  # so a padding pair's anchor index is in range
    candidates = torch.gather(padded_boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
    # 2. per-class NMS: a candidate scores only in its own class's row
    own_class = label.unsqueeze(1) == torch.arange(num_classes).view(1, -1, 1)
    class_scores = torch.where(own_class, top_scores.unsqueeze(1), torch.full_like(own_class, _NO_SCORE,
                                                                                   dtype=scores.dtype))
    selected = NonMaxSuppression.apply(candidates, class_scores, count, settings.iou_threshold,
                                       settings.score_threshold)
    # which (slice, candidate) pairs survived, via one scatter: flat position slice * P + candidate
    kept = torch.zeros_like(top_scores).reshape(-1).scatter(
        0, selected[:, 0] * top_n + selected[:, 2], torch.ones_like(selected[:, 0], dtype=top_scores.dtype))
    kept_scores = torch.where(kept.reshape(top_scores.shape) > 0, top_scores, torch.full_like(top_scores, _NO_SCORE))
    # 3. the best kept ones over all classes, padded to ``count``
    best_scores, best = pad_candidates(kept_scores, count, _NO_SCORE).topk(count, dim=1)
    valid = best_scores > _NO_SCORE / 2
    best = torch.where(valid, best, torch.zeros_like(best))  # a padding position points at candidate 0
    best_boxes = torch.gather(candidates, 1, best.unsqueeze(-1).expand(-1, -1, 4))
    return (torch.where(valid.unsqueeze(-1), best_boxes, torch.zeros_like(best_boxes)),
            torch.where(valid, best_scores, torch.full_like(best_scores, PAD_SCORE)),
            torch.where(valid, torch.gather(label, 1, best), torch.full_like(best, PAD_CLASS)))


def clip_boxes(boxes: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
    """Boxes ``[N, M, 4]`` clipped to the slice of ``hu`` [N, S, h, w]; the limits come from ``hu``'s shape at
    run time (``Shape`` in the graph), not from the export's example."""
    height_width = torch._shape_as_tensor(hu)[2:].to(boxes.dtype)
    upper = height_width.flip(0).repeat(2)  # (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), upper)


class SegmentationAndDetection(nn.Module):
    """Raw HU [N, S, h, w] -> (probabilities [N, C, h, w], boxes [N, D, 4], scores [N, D], classes [N, D]).

    One pass of the detection encoder feeds both the sSE gates of the segmentation path and the detection
    decoder, as in training.
    """

    def __init__(self, network: MSDN, anchor_size: float, settings: DetectionSettings) -> None:
        super().__init__()
        self.network = network
        self.anchor_size = float(anchor_size)
        self.settings = settings

    @property
    def size_divisor(self) -> int:
        return self.network.segmentation.size_divisor

    def forward(self, hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        segmentation = self.network.segmentation
        windowed = segmentation.window(hu)
        features = segmentation.detection_encoder(windowed)
        probabilities = torch.softmax(segmentation.segment(windowed, features), dim=1)
        raw = self.network.detect(features)
        anchors = image_anchors(hu.shape[-2], hu.shape[-1], self.network.detection_strides, self.anchor_size)
        boxes = clip_boxes(decode_boxes(raw["box_deltas"], anchors), hu)
        sides = boxes[..., 2:] - boxes[..., :2]
        usable = torch.minimum(sides[..., :1], sides[..., 1:]) >= MIN_BOX_SIZE  # [N, M, 1]
        scores = torch.where(usable, torch.sigmoid(raw["class_logits"]), torch.full_like(raw["class_logits"],
                                                                                         _NO_SCORE))
        return (probabilities, *select_detections(boxes, scores, self.settings))
