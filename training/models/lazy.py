"""Multi-task U-net for lazy labels (Ke et al.): one encoder, per-scale multi-task decoder blocks, three heads.

Tasks (all per pixel): **detection** of rough inner regions (background / organ / lesion, from boxes),
**segmentation** (the exact mask, same classes) and **separation** (interface between touching lesions / rest).
At every decoder scale ``l`` (coarsest first) the multi-task block computes

* ``shared_l = ConvBlock(cat(up(shared_{l+1}), encoder_l))`` — the path detection and segmentation share (the
  baseline's :class:`~mixsup.training.models.unet.Decoder`, reused as is);
* ``segmentation_l = ReLU(shared_l + R_l(cat(shared_l, up(segmentation_{l+1}))))`` — segmentation's residual
  sub-block ``R_l`` (conv+BN+ReLU, conv+BN) refines the shared features;
* ``separation_l = ConvBlock(cat(up(separation_{l+1}), segmentation_l))`` — the separation path, built on top
  with skips from the segmentation path (a second :class:`Decoder` fed the segmentation features).

All three paths start from the encoder's bottleneck. The segmentation path reads the shared path and never writes
back into it (the paper is silent on this): the detection output therefore depends on no segmentation-only
parameter, so a sample that carries only detection labels gives the residual sub-blocks, the segmentation head and
the whole separation branch exactly zero gradient — the per-sample missing-label indicator means what it says.

Export keeps :class:`LazySegmenter` (window, encoder, shared path, segmentation path, segmentation head); the
detection head and the separation branch stay in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from mixsup.training.models.unet import Decoder, Encoder, HUWindow, stage_channels

DETECTION, SEGMENTATION, SEPARATION = "detection", "segmentation", "separation"


@dataclass(frozen=True)
class MultiTaskUNetConfig:
    in_slices: int = 3
    num_classes: int = 3
    separation_classes: int = 2
    base_channels: int = 16
    depth: int = 4
    hu_window: tuple[float, float] = (-200.0, 250.0)


class ResidualSubBlock(nn.Module):
    """``ReLU(shared + body(cat(shared, carried)))``: segmentation's refinement of the shared features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, shared: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        return self.relu(shared + self.body(torch.cat([shared, carried], dim=1)))


class SegmentationPath(nn.Module):
    """Residual sub-blocks on every decoder scale; each carries the previous scale's segmentation features up."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(channels) - 1)):
            self.up.append(nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2))
            self.blocks.append(ResidualSubBlock(channels[level]))

    def forward(self, bottleneck: torch.Tensor, shared: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = bottleneck
        outputs = []
        for up, block, shared_features in zip(self.up, self.blocks, shared):
            x = block(shared_features, up(x))
            outputs.append(x)
        return outputs  # coarsest first, like Decoder


class MultiTaskFeatures(NamedTuple):
    """Features of every scale: ``encoder`` finest first; ``shared`` and ``segmentation`` coarsest first."""

    encoder: list[torch.Tensor]
    shared: list[torch.Tensor]
    segmentation: list[torch.Tensor]


class LazySegmenter(nn.Module):
    """The exported part: raw HU [N, in_slices, h, w] -> segmentation logits [N, num_classes, h, w]."""

    def __init__(self, config: MultiTaskUNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = stage_channels(config.base_channels, config.depth)
        self.window = HUWindow(config.hu_window)
        self.encoder = Encoder(config.in_slices, channels)
        self.shared = Decoder(channels)
        self.segmentation_path = SegmentationPath(channels)
        self.head = nn.Conv2d(channels[0], config.num_classes, 1)

    @property
    def size_divisor(self) -> int:
        return 2**self.config.depth

    def features(self, hu: torch.Tensor) -> MultiTaskFeatures:
        encoder = self.encoder(self.window(hu))
        shared = self.shared(encoder)
        return MultiTaskFeatures(encoder, shared, self.segmentation_path(encoder[-1], shared))

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(hu).segmentation[-1])


class MultiTaskUNet(nn.Module):
    """:class:`LazySegmenter` plus the detection head (on the shared path) and the separation branch.

    ``forward`` returns logits by task: ``{"detection": [N, C, h, w], "segmentation": [N, C, h, w],
    "separation": [N, separation_classes, h, w]}``.
    """

    def __init__(self, config: MultiTaskUNetConfig = MultiTaskUNetConfig()) -> None:
        super().__init__()
        self.config = config
        channels = stage_channels(config.base_channels, config.depth)
        self.segmenter = LazySegmenter(config)
        self.detection_head = nn.Conv2d(channels[0], config.num_classes, 1)
        self.separation_path = Decoder(channels)
        self.separation_head = nn.Conv2d(channels[0], config.separation_classes, 1)

    def forward(self, hu: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.segmenter.features(hu)
        # Decoder wants its inputs finest first with the start (here the bottleneck) last.
        separation = self.separation_path([*reversed(features.segmentation), features.encoder[-1]])
        return {
            DETECTION: self.detection_head(features.shared[-1]),
            SEGMENTATION: self.segmenter.head(features.segmentation[-1]),
            SEPARATION: self.separation_head(separation[-1]),
        }
