"""A 2.5D U-Net built from small parts: HU window, encoder, decoder, segmentation head.

The intensity window and normalisation are the first layer (:class:`HUWindow`), so the exported graph takes raw
Hounsfield units and no consumer can preprocess differently from training. The recipes of issue 3 reuse the
encoder/decoder/head parts and attach their auxiliary heads; export keeps only what :meth:`UNet.forward` uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


class HUWindow(nn.Module):
    """Clip raw HU to ``window`` and map it linearly to [-1, 1]."""

    def __init__(self, window: Sequence[float] = (-200.0, 250.0)) -> None:
        super().__init__()
        low, high = float(window[0]), float(window[1])
        self.register_buffer("low", torch.tensor(low), persistent=False)
        self.register_buffer("high", torch.tensor(high), persistent=False)
        self.center = (low + high) / 2.0
        self.half_width = (high - low) / 2.0

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(hu, self.low, self.high) - self.center) / self.half_width


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU layers (dilation keeps the size: padding = dilation)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        layers: list[nn.Module] = []
        for index in range(2):
            layers += [
                nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3,
                          padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


def stage_channels(base_channels: int, depth: int, max_channels: int = 320) -> list[int]:
    """Channels per resolution: ``base * 2**level`` capped like nnU-Net, ``depth + 1`` entries."""
    return [min(base_channels * 2**level, max_channels) for level in range(depth + 1)]


def stage_dilations(stages: int, dilations: Sequence[int] | None) -> list[int]:
    """``dilations`` as a list of one per stage (None: all 1); a wrong count is a ValueError."""
    if dilations is None:
        return [1] * stages
    if len(dilations) != stages:
        raise ValueError(f"{stages} stages need as many dilations, got {list(dilations)}")
    return [int(d) for d in dilations]


class Encoder(nn.Module):
    """Conv blocks separated by 2x2 max pooling; returns the features of every scale, finest first.

    Stage ``i`` (finest first) uses dilation ``dilations[i]``; None means 1 everywhere. Dilation changes no
    parameter shape or name, so a checkpoint loads whatever the dilations.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], dilations: Sequence[int] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        previous = in_channels
        for out, dilation in zip(channels, stage_dilations(len(channels), dilations)):
            self.blocks.append(ConvBlock(previous, out, dilation))
            previous = out
        self.pool = nn.MaxPool2d(2)

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` on the previous stage's output (the input image for stage 0), so a caller can act
        between stages."""
        return self.blocks[index](x if index == 0 else self.pool(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index in range(len(self.blocks)):
            x = self.stage(index, x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, conv block; returns every decoder scale.

    Block ``i`` (coarsest first, ``len(channels) - 1`` of them) uses dilation ``dilations[i]``; None means 1.
    """

    def __init__(self, channels: Sequence[int], dilations: Sequence[int] | None = None) -> None:
        super().__init__()
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        levels = list(reversed(range(len(channels) - 1)))
        for level, dilation in zip(levels, stage_dilations(len(levels), dilations)):
            self.up.append(nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2))
            self.blocks.append(ConvBlock(2 * channels[level], channels[level], dilation))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = features[-1]
        outputs = []
        for up, block, skip in zip(self.up, self.blocks, reversed(features[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
            outputs.append(x)
        return outputs  # coarsest first, the last one at full resolution


@dataclass(frozen=True)
class UNetConfig:
    in_slices: int = 3
    num_classes: int = 3
    base_channels: int = 16
    depth: int = 4
    hu_window: tuple[float, float] = (-200.0, 250.0)


class UNet(nn.Module):
    """HU window -> encoder -> decoder -> 1x1 segmentation head. ``forward`` returns logits."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        channels = stage_channels(config.base_channels, config.depth)
        self.window = HUWindow(config.hu_window)
        self.encoder = Encoder(config.in_slices, channels)
        self.decoder = Decoder(channels)
        self.head = nn.Conv2d(channels[0], config.num_classes, 1)

    @property
    def size_divisor(self) -> int:
        return 2**self.config.depth

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(self.window(hu)))[-1])


class Probabilities(nn.Module):
    """What export writes: a segmentation network followed by a softmax over classes (the model contract)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(hu), dim=1)
