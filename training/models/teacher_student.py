"""Networks of the teacher-student method (Sun et al., mixed supervision from masks and boxes).

* :class:`TeacherUNet` — a box-prompted annotator: the 2.5D U-Net of :mod:`mixsup.training.models.unet` on the
  windowed slices, with hierarchical organ-to-lesion (O2L) attention (:class:`O2LAttention`) after every encoder
  scale but the bottleneck. The boxes reach it only through that attention, as in the paper; ``box_input=True``
  also stacks the box masks onto the input channels (the paper's separate SCN ablation).
* :class:`StudentUNet` — a plain :class:`~mixsup.training.models.unet.UNet` (the exported network) plus a
  :class:`LocalizationBranch` that aggregates every decoder scale by pixel shuffle and predicts box-derived maps
  (background / organ box / lesion box). Only ``StudentUNet.segmentation`` leaves training.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixsup.training.models.unet import (
    Decoder,
    Encoder,
    HUWindow,
    UNet,
    UNetConfig,
    stage_channels,
)

#: Classes of the localization maps, in channel order.
LOCALIZATION_CLASSES = ("background", "organ_box", "lesion_box")
#: Box-mask channels the teacher reads (the same order as ``Batch.boxes``).
BOX_CHANNELS = 2


class BoxGate(nn.Module):
    """``f + sigmoid(BN(conv(mask))) * f``: residual re-weighting of features by one box mask.

    The conv is 3x3, one mask channel in, one gate per feature channel out, without bias (the BatchNorm that
    follows has its own shift). Without bias an all-zero mask gives ``conv = 0`` everywhere, borders included,
    so the gate is the BatchNorm's per-channel constant and the block multiplies each channel by ``1 + sigmoid(c_k)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return features + torch.sigmoid(self.norm(self.conv(mask))) * features


class O2LAttention(nn.Module):
    """Hierarchical organ-to-lesion attention on one encoder scale: the organ-box gate, then the lesion-box gate.

    ``boxes`` [N, 2, H, W] (channels organ, lesion) are resized bilinearly to the feature grid, so a box edge
    becomes a soft ramp at coarse scales. The lesion gate acts on organ-gated features: organ context first,
    lesion focus inside it, as in the paper's hierarchy.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.organ = BoxGate(channels)
        self.lesion = BoxGate(channels)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        masks = resize_masks(boxes, features.shape[-2:])
        features = self.organ(features, masks[:, 0:1])
        return self.lesion(features, masks[:, 1:2])


def resize_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of box masks [N, K, H, W] to ``size`` (a 2x2 average per halving, no align-corners shift)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)


class TeacherUNet(nn.Module):
    """U-Net on ``window(hu)`` with O2L attention after each encoder scale.

    The attention sits after every encoder block that feeds a skip connection (``depth`` scales: the paper's 4 with
    the default depth 4), before pooling, so it re-weights both the skip and everything coarser. With
    ``box_input`` the box masks are also input channels (``[window(hu), organ box, lesion box]``), the paper's SCN
    variant; without it (the paper's O2L teacher) the attention is the boxes' only way in. ``forward(hu, boxes)``
    returns logits [N, C, h, w]; ``h, w`` must be multiples of :attr:`size_divisor`.
    """

    def __init__(self, config: UNetConfig = UNetConfig(), box_input: bool = False) -> None:
        super().__init__()
        self.config = config
        self.box_input = box_input
        channels = stage_channels(config.base_channels, config.depth)
        self.window = HUWindow(config.hu_window)
        self.encoder = Encoder(config.in_slices + (BOX_CHANNELS if box_input else 0), channels)
        self.attention = nn.ModuleList(O2LAttention(c) for c in channels[:-1])
        self.decoder = Decoder(channels)
        self.head = nn.Conv2d(channels[0], config.num_classes, 1)

    @property
    def size_divisor(self) -> int:
        return 2**self.config.depth

    def encode(self, hu: torch.Tensor, boxes: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of every scale (finest first), attention applied."""
        x = self.window(hu)
        if self.box_input:
            x = torch.cat([x, boxes.to(x.dtype)], dim=1)
        features = []
        for level, block in enumerate(self.encoder.blocks):
            x = block(x if level == 0 else self.encoder.pool(x))
            if level < len(self.attention):
                x = self.attention[level](x, boxes.to(x.dtype))
            features.append(x)
        return features

    def forward(self, hu: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encode(hu, boxes))[-1])


class LocalizationBranch(nn.Module):
    """Pixel-shuffle aggregation of decoder features into full-resolution localization logits.

    Decoder scale ``s`` (downsampled by ``r = 2**s``) goes through a 1x1 conv to ``r*r*k`` channels and
    ``PixelShuffle(r)``, which rearranges them into ``k`` maps at full resolution without interpolation; the
    maps of all scales are summed (a sum rather than concat + conv: the same receptive-field mix, fewer
    parameters). ``channels`` are the decoder's output channels, coarsest first, as :class:`Decoder` returns them.
    """

    def __init__(self, channels: Sequence[int], num_classes: int = len(LOCALIZATION_CLASSES)) -> None:
        super().__init__()
        scales = [2 ** (len(channels) - 1 - index) for index in range(len(channels))]
        self.num_classes = num_classes
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, r * r * num_classes, 1), nn.PixelShuffle(r)) for c, r in zip(channels, scales)
        )

    def forward(self, decoder_features: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = [projection(f) for projection, f in zip(self.projections, decoder_features)]
        return torch.stack(maps).sum(dim=0)


class StudentUNet(nn.Module):
    """The exported :class:`UNet` (``segmentation``) plus the training-only :class:`LocalizationBranch`.

    ``forward(hu)`` returns ``(segmentation logits, localization logits)``; the segmentation logits are exactly
    ``self.segmentation(hu)``, so stripping the branch changes nothing the exported net computes. The loss
    settings (class weights, localization weight) are the recipe's options, not part of the network.
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.segmentation = UNet(config)
        decoder_channels = list(reversed(stage_channels(config.base_channels, config.depth)[:-1]))
        self.localization = LocalizationBranch(decoder_channels)

    def forward(self, hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.segmentation
        decoded = net.decoder(net.encoder(net.window(hu)))
        return net.head(decoded[-1]), self.localization(decoded)
