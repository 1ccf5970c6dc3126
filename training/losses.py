"""Segmentation losses shared by the recipes."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int], eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over ``classes``, computed over the whole batch (nnU-Net's "batch Dice").

    Batch Dice keeps the loss defined on crops where a small class is absent.
    """
    probabilities = torch.softmax(logits, dim=1)
    losses = []
    for label in classes:
        p = probabilities[:, label]
        t = (target == label).to(p.dtype)
        intersection = (p * t).sum()
        losses.append(1.0 - (2.0 * intersection + eps) / (p.sum() + t.sum() + eps))
    return torch.stack(losses).mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int] = (1, 2)) -> torch.Tensor:
    """Cross-entropy plus soft Dice, the usual pairing for organ + small-lesion segmentation."""
    return F.cross_entropy(logits, target) + soft_dice_loss(logits, target, classes)
