"""Baseline: a 2.5D U-Net trained with CE + Dice on the cases the manifest marks strong (strong-only, or fully
supervised when every case is strong).

Option ``region_dice``: the Dice term on LiTS's regions (liver ∪ lesion, lesion) instead of the classes (liver,
lesion); see :data:`mixsup.training.losses.LITS_REGIONS`. Measured for the bundled model and not kept: against the
same 60 epochs from v8 without it, it lost liver Dice on both selection styles (more false liver) and lesion Dice
on the classic one (model_repository/MODEL_CARD.md), so it is off by default.

Option ``blob_weight``: adds that weight times :func:`mixsup.training.losses.blob_dice_loss` (a Dice per lesion
instance, so small lesions count as much as large ones; the paper weighs main and blob loss 2:1, i.e. 0.5 here).
Measured for the bundled model and not kept: 60 epochs from v9 with 0.5 found more lesions under 2 mL on the
selection set (15 of 37 against 9) but lost liver Dice on both styles (false liver up) and lesion Dice, so it is
off by default (MODEL_CARD.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from mixsup.training.losses import LITS_REGIONS, blob_dice_loss, ce_dice_loss
from mixsup.training.models.unet import UNet, UNetConfig
from mixsup.training.recipes.base import STRONG, Batch, Recipe, network_size

if TYPE_CHECKING:  # pragma: no cover
    from mixsup.training.trainer import TrainConfig

NAME = "unet"


class UNetRecipe(Recipe):
    NAME = NAME
    DEFAULTS: dict[str, Any] = {"region_dice": False, "blob_weight": 0.0}

    def build(self, config) -> nn.ModuleDict:
        return nn.ModuleDict({"segmentation": UNet(UNetConfig(**network_size(config)))})

    def train_step(self, stage: str, modules: Mapping[str, nn.Module], batches: Mapping[str, Batch],
                   optimizers: Mapping[str, torch.optim.Optimizer], config: "TrainConfig") -> dict[str, float]:
        batch = batches[STRONG]
        regions = LITS_REGIONS if self.option(config, "region_dice") else (1, 2)
        logits = modules["segmentation"](batch.images)
        loss = ce_dice_loss(logits, batch.labels, regions)
        blob_weight = float(self.option(config, "blob_weight"))
        if blob_weight:
            if batch.instances is None:
                raise ValueError("blob_weight needs lesion instance ids, and this batch has none")
            loss = loss + blob_weight * blob_dice_loss(logits, batch.labels, batch.instances)
        optimizers["all"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["all"].step()
        return {"loss": loss.item()}

    def segmentation_network(self, modules: nn.ModuleDict) -> nn.Module:
        return modules["segmentation"]


RECIPE = UNetRecipe()
