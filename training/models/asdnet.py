"""ASDNet's networks (Nie et al., MICCAI 2018): the U-Net segmenter and a fully-convolutional confidence network.

The segmentation network is the plain :class:`~mixsup.training.models.unet.UNet`; only it is exported. The
confidence network is the adversary: it sees the 2.5D image stack together with a per-class probability map
(the segmenter's softmax or the one-hot ground truth) and answers, per pixel, how much that map looks like a
ground-truth map (logits; sigmoid gives the confidence in [0, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixsup.training.models.unet import HUWindow, stage_channels


@dataclass(frozen=True)
class ConfidenceNetworkConfig:
    in_slices: int = 3
    num_classes: int = 3
    base_channels: int = 16
    depth: int = 4
    hu_window: tuple[float, float] = (-200.0, 250.0)
    negative_slope: float = 0.2


def downsampling_layer(in_channels: int, out_channels: int, negative_slope: float) -> nn.Sequential:
    """3x3 stride-2 conv + LeakyReLU. No BatchNorm: a forward pass of the confidence net in the segmentation
    step must not change any of its state, and adversaries train more stably without batch statistics."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
                         nn.LeakyReLU(negative_slope, inplace=True))


def upsampling_layer(in_channels: int, out_channels: int, negative_slope: float) -> nn.Sequential:
    """2x2 stride-2 transposed conv ("deconvolution", as in the paper's confidence net) + LeakyReLU."""
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2),
                         nn.LeakyReLU(negative_slope, inplace=True))


class ConfidenceNetwork(nn.Module):
    """FCN: (raw HU stack [N,S,h,w], probability map [N,C,h,w]) -> confidence logits [N,1,h,w].

    ``depth`` strided convolutions bring the concatenated input down by ``2**depth`` with the U-Net's channel
    progression, as many transposed convolutions bring it back, and a 1x1 conv gives one logit per pixel. It has
    no skip connections on purpose: a per-pixel judgement of the map must rest on context, not on copying the
    input. Sizes not divisible by ``2**depth`` are resized to the input grid at the end.
    """

    def __init__(self, config: ConfidenceNetworkConfig = ConfidenceNetworkConfig()) -> None:
        super().__init__()
        self.config = config
        channels = stage_channels(config.base_channels, config.depth)
        self.window = HUWindow(config.hu_window)
        self.down = nn.ModuleList()
        previous = config.in_slices + config.num_classes
        for level in range(1, config.depth + 1):
            self.down.append(downsampling_layer(previous, channels[level], config.negative_slope))
            previous = channels[level]
        self.up = nn.ModuleList(upsampling_layer(channels[level], channels[level - 1], config.negative_slope)
                                for level in reversed(range(1, config.depth + 1)))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, hu: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.window(hu), probabilities], dim=1)
        for layer in self.down:
            x = layer(x)
        for layer in self.up:
            x = layer(x)
        logits = self.head(x)
        if logits.shape[-2:] != hu.shape[-2:]:
            logits = F.interpolate(logits, size=hu.shape[-2:], mode="bilinear", align_corners=False)
        return logits
