"""MSDN, the Mixed-Supervised Dual-Network: a segmentation U-Net steered by a detection U-Net.

Two U-Nets of ``2 * depth + 1`` stages (the paper's 9 for ``depth=4``), each stage two dilated 3x3
conv+BN+ReLU layers (:class:`~mixsup.training.models.unet.ConvBlock`) followed by dropout, as the paper puts
dropout after each stage (:func:`add_stage_dropout`; identity in eval mode). After every encoder stage and the
bottleneck a binary sSE gate squeezes the *detection* feature to a sigmoid spatial map that re-weights the
*segmentation* feature of the same scale, so what the detector learns from boxes reaches the segmenter. A
single-stage anchor detection unit (RetinaNet's: a classification tower and a box tower, each 4 x conv3x3+ReLU, 256
wide at the default width) is applied with the same weights to every decoder scale of the detection net.

Export keeps :class:`SegmentationPath` only: HU window, both encoders (the gates need the detection encoder), the
gates, the segmentation decoder and head. The detection decoder and unit never leave training.

Boxes in this module are ``(x0, y0, x1, y1)`` in pixels of the network input, half-open like
:class:`mixsup.training.data.boxes.Box` (``x1 = last column + 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mixsup.training.models.unet import (
    Decoder,
    Encoder,
    HUWindow,
    stage_channels,
)

#: Anchor sides relative to a scale's base size, and height/width ratios (RetinaNet's 3 x 3 = 9 per position).
ANCHOR_SCALES = (1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0))
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHORS_PER_POSITION = len(ANCHOR_SCALES) * len(ANCHOR_RATIOS)
#: Largest log size change a decoded box may have (torchvision's bound), so an untrained head cannot overflow exp.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def dilation_pattern(depth: int) -> list[int]:
    """Dilation of each of the ``2 * depth + 1`` stages: encoder stages, bottleneck, decoder stages.

    The paper's 9-stage net (``depth=4``) uses ``[1, 2, 2, 2, 4, 2, 2, 2, 1]``. Other depths keep its shape: 1 at
    full resolution on both ends, 4 at the bottleneck, 2 everywhere else (``depth=3`` -> ``[1, 2, 2, 4, 2, 2, 1]``,
    ``depth=1`` -> ``[1, 4, 1]``).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    side = [1] + [2] * (depth - 1)
    return side + [4] + side[::-1]


@dataclass(frozen=True)
class MSDNConfig:
    in_slices: int = 3
    num_classes: int = 3
    base_channels: int = 16
    depth: int = 4
    hu_window: tuple[float, float] = (-200.0, 250.0)
    #: Classes of the detection unit: organ and lesion boxes.
    detection_classes: int = 2
    #: Width of both towers of the detection unit; every decoder scale is projected to it so one unit serves them
    #: all. 0 means ``16 * base_channels``: the paper's (RetinaNet's) 256 at the default 16 base channels, and only
    #: 64 at the tiny preset's 4, so CPU tests stay fast. The unit also runs at full resolution, so this width
    #: dominates the cost of a training step.
    detection_width: int = 0
    #: Dropout rate after every stage of both U-Nets. The paper puts dropout after each stage but states no rate
    #: that we could find, so 0.1 (a common light rate) is our choice, not the paper's figure.
    dropout: float = 0.1

    @property
    def channels(self) -> list[int]:
        return stage_channels(self.base_channels, self.depth)

    @property
    def tower_channels(self) -> int:
        """The resolved width of the detection towers (:attr:`detection_width`, 0 -> ``16 * base_channels``)."""
        return self.detection_width or 16 * self.base_channels


def add_stage_dropout(blocks: nn.ModuleList, rate: float) -> None:
    """Append dropout to every stage's conv block: the paper's dropout after each stage.

    Appending to the block (a Sequential) rather than wrapping it keeps the stage one module, so hooks on a stage
    see its output after dropout, and adds no parameters or state-dict keys. Dropout is the identity in eval mode,
    so validation and export are deterministic.
    """
    for block in blocks:
        block.append(nn.Dropout(rate))


def msdn_encoder(config: MSDNConfig) -> Encoder:
    """One U-Net's encoder stages and bottleneck: the first ``depth + 1`` dilations, dropout after each stage."""
    encoder = Encoder(config.in_slices, config.channels, dilation_pattern(config.depth)[: config.depth + 1])
    add_stage_dropout(encoder.blocks, config.dropout)
    return encoder


def msdn_decoder(config: MSDNConfig) -> Decoder:
    """One U-Net's decoder stages: the last ``depth`` dilations, dropout after each stage."""
    decoder = Decoder(config.channels, dilation_pattern(config.depth)[config.depth + 1:])
    add_stage_dropout(decoder.blocks, config.dropout)
    return decoder


class DetectionGate(nn.Module):
    """Binary sSE: ``segmentation * sigmoid(conv1x1(detection))``, one spatial weight per pixel.

    Roy et al.'s spatial squeeze-and-excitation, with the squeeze taken from the other network: where the detector
    sees an object, segmentation features pass; elsewhere they are damped.
    """

    def __init__(self, detection_channels: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(detection_channels, 1, 1)

    def forward(self, segmentation: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
        return segmentation * torch.sigmoid(self.squeeze(detection))


def detection_tower(channels: int, layers: int = 4) -> nn.Sequential:
    """``layers`` x (3x3 conv + ReLU) at constant width: one of RetinaNet's two subnet towers.

    RetinaNet draws every layer from N(0, 0.01); that shrinks activations at every layer (~3x at 256 wide, more at
    the tiny preset's 64), so the towers get He init, which keeps the scale at any width, and only the heads 0.01.
    No normalisation, because the same weights see every scale.
    """
    modules: list[nn.Module] = []
    for _ in range(layers):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        modules += [conv, nn.ReLU(inplace=True)]
    return nn.Sequential(*modules)


class DetectionUnit(nn.Module):
    """Single-stage anchor head, RetinaNet's: a classification tower and a separate box-regression tower, each
    4 x (3x3 conv + ReLU), then a class head on the first and a box head on the second.

    Returns per-anchor class logits ``[N, H*W*A, K]`` and box deltas ``[N, H*W*A, 4]``, anchors ordered
    position-major (row, column) then anchor, the order of :func:`grid_anchors`.
    """

    def __init__(self, channels: int, num_classes: int, num_anchors: int = ANCHORS_PER_POSITION,
                 prior_probability: float = 0.01) -> None:
        super().__init__()
        self.class_tower = detection_tower(channels)
        self.box_tower = detection_tower(channels)
        self.classify = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.regress = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        self.num_classes, self.num_anchors = num_classes, num_anchors
        for head in (self.classify, self.regress):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        # RetinaNet's prior: every anchor starts as background with probability 1 - prior, so the many easy
        # negatives do not swamp the first steps.
        nn.init.constant_(self.classify.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (per_anchor(self.classify(self.class_tower(feature)), self.num_classes),
                per_anchor(self.regress(self.box_tower(feature)), 4))


def per_anchor(head_output: torch.Tensor, values: int) -> torch.Tensor:
    """``[N, A*values, H, W]`` -> ``[N, H*W*A, values]`` (position-major, then anchor)."""
    n = head_output.shape[0]
    return head_output.permute(0, 2, 3, 1).reshape(n, -1, values)


class SegmentationPath(nn.Module):
    """What export writes: raw HU -> segmentation logits, gated by the detection encoder.

    It owns the detection encoder because the exported network needs it; :class:`MSDN` reaches it from here.
    """

    def __init__(self, config: MSDNConfig) -> None:
        super().__init__()
        self.config = config
        self.window = HUWindow(config.hu_window)
        self.segmentation_encoder = msdn_encoder(config)
        self.detection_encoder = msdn_encoder(config)
        self.gates = nn.ModuleList(DetectionGate(c) for c in config.channels)
        self.decoder = msdn_decoder(config)
        self.head = nn.Conv2d(config.channels[0], config.num_classes, 1)

    @property
    def size_divisor(self) -> int:
        return 2**self.config.depth

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        x = self.window(hu)
        return self.segment(x, self.detection_encoder(x))

    def segment(self, windowed: torch.Tensor, detection_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Segmentation logits of windowed images, given the detection encoder's features of the same images."""
        x, features = windowed, []
        for index, gate in enumerate(self.gates):
            x = gate(self.segmentation_encoder.stage(index, x), detection_features[index])
            features.append(x)  # the gated feature feeds both the next stage and the skip
        return self.head(self.decoder(features)[-1])


class MSDN(nn.Module):
    """Both networks. ``forward(strong_hu, weak_hu)`` runs the detection net on all images and the segmentation
    net on the strong ones only, in one call (one DistributedDataParallel forward per step).

    Returns ``{"class_logits": [N, M, K], "box_deltas": [N, M, 4]}`` for the strong then weak images, anchors of
    every decoder scale concatenated coarsest first (:func:`image_anchors`), plus ``"segmentation"`` logits
    ``[N_strong, C, h, w]`` when strong images are given.
    """

    def __init__(self, config: MSDNConfig = MSDNConfig()) -> None:
        super().__init__()
        self.config = config
        self.segmentation = SegmentationPath(config)
        self.detection_decoder = msdn_decoder(config)
        # Decoder scales have different widths; a 1x1 projection per scale lets one unit serve them all (as FPN
        # lateral convs do for RetinaNet).
        self.detection_projections = nn.ModuleList(nn.Conv2d(config.channels[level], config.tower_channels, 1)
                                                   for level in reversed(range(config.depth)))
        self.detection_unit = DetectionUnit(config.tower_channels, config.detection_classes)

    @property
    def detection_encoder(self) -> Encoder:
        return self.segmentation.detection_encoder

    @property
    def detection_strides(self) -> list[int]:
        """Input pixels per feature pixel of each decoder scale the unit sees, coarsest first."""
        return [2**level for level in reversed(range(self.config.depth))]

    def detect(self, detection_features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared unit on every decoder scale of the detection net."""
        outputs = [self.detection_unit(projection(feature)) for projection, feature
                   in zip(self.detection_projections, self.detection_decoder(detection_features))]
        return {"class_logits": torch.cat([c for c, _ in outputs], dim=1),
                "box_deltas": torch.cat([b for _, b in outputs], dim=1)}

    def forward(self, strong_hu: torch.Tensor | None, weak_hu: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images = [hu for hu in (strong_hu, weak_hu) if hu is not None]
        if not images:
            raise ValueError("MSDN needs strong or weak images")
        windowed = self.segmentation.window(torch.cat(images))
        detection_features = self.detection_encoder(windowed)
        outputs = self.detect(detection_features)
        if strong_hu is not None:
            n = strong_hu.shape[0]
            outputs["segmentation"] = self.segmentation.segment(windowed[:n], [f[:n] for f in detection_features])
        return outputs


# ------------------------------------------------------------------------------------------- anchor geometry
def anchor_shapes(base_size: float) -> torch.Tensor:
    """``[A, 2]`` (width, height) of the anchors of one scale: sides ``base_size * scale``, height/width ``ratio``,
    equal area per scale."""
    shapes = []
    for scale in ANCHOR_SCALES:
        side = base_size * scale
        for ratio in ANCHOR_RATIOS:
            shapes.append((side / math.sqrt(ratio), side * math.sqrt(ratio)))
    return torch.tensor(shapes, dtype=torch.float32)


def grid_anchors(height: int, width: int, stride: int, base_size: float) -> torch.Tensor:
    """``[height * width * A, 4]`` anchors ``(x0, y0, x1, y1)`` in input pixels, centred on the feature pixels of
    a ``height x width`` map with ``stride``; position-major (row, column), then anchor, like :class:`DetectionUnit`."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)
    half = anchor_shapes(base_size).reshape(1, -1, 2) / 2
    return torch.cat([centers - half, centers + half], dim=-1).reshape(-1, 4)


def image_anchors(height: int, width: int, strides: Sequence[int], anchor_size: float) -> torch.Tensor:
    """Anchors of every scale of a ``height x width`` input, concatenated in ``strides`` order; a scale's base
    size is ``anchor_size * stride``, so coarser scales hold larger anchors."""
    return torch.cat([grid_anchors(height // s, width // s, s, anchor_size * s) for s in strides])


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Standard box deltas ``(dx, dy, dw, dh)``: centre offset in anchor sides, log size ratio."""
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_center = anchors[..., :2] + anchor_wh / 2
    box_wh = boxes[..., 2:] - boxes[..., :2]
    box_center = boxes[..., :2] + box_wh / 2
    return torch.cat([(box_center - anchor_center) / anchor_wh, torch.log(box_wh / anchor_wh)], dim=-1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes` (log sizes clamped so a wild prediction stays finite)."""
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_center = anchors[..., :2] + anchor_wh / 2
    center = anchor_center + deltas[..., :2] * anchor_wh
    wh = anchor_wh * torch.exp(deltas[..., 2:].clamp(max=MAX_LOG_SCALE))
    return torch.cat([center - wh / 2, center + wh / 2], dim=-1)


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[M, G]`` intersection over union of ``(x0, y0, x1, y1)`` boxes ``first [M, 4]`` and ``second [G, 4]``."""
    top_left = torch.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = torch.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=-1)  # noqa: E731
    return intersection / (area(first)[:, None] + area(second)[None, :] - intersection).clamp(min=1e-9)
