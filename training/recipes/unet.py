"""Baseline: a 2.5D U-Net trained with CE + Dice on the cases the manifest marks strong."""
from __future__ import annotations

import torch

from mixsup.training.losses import ce_dice_loss
from mixsup.training.models.unet import UNet, UNetConfig

NAME = "unet"


def build_network(config) -> UNet:
    return UNet(UNetConfig(base_channels=config.base_channels, depth=config.depth))


def network_from_checkpoint(payload: dict) -> UNet:
    """The exportable segmentation network stored in a checkpoint of this recipe."""
    network = UNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in payload["network_config"].items()}))
    network.load_state_dict(payload["state_dict"])
    return network.eval()


def loss(network: UNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ce_dice_loss(network(images), labels)
