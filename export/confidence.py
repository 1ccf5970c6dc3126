"""ASDNet's confidence map as a graph: raw HU -> probabilities and the confidence network's per-pixel confidence.

What ``mixsup-export --keep-confidence`` writes beside the segmentation network. The confidence network judges
the segmenter's own softmax against the image under it, as in training; its sigmoid says, per pixel, how much the
map looks like ground truth (ASDNet's semi-supervised loss trusts the pixels above ``gamma``).
"""
from __future__ import annotations

import torch
from torch import nn

from mixsup.contract import TensorSpec

CONFIDENCE = "confidence"


def output_specs() -> tuple[TensorSpec, ...]:
    """The confidence output as the model contract documents it."""
    return (TensorSpec(CONFIDENCE, "float32", ("N", 1, "h", "w"),
                       "per-pixel confidence in [0, 1] (sigmoid of the confidence network) that the probabilities "
                       "look like a ground-truth map"),)


class SegmentationAndConfidence(nn.Module):
    """Raw HU [N, S, h, w] -> (probabilities [N, C, h, w], confidence [N, 1, h, w])."""

    def __init__(self, segmentation: nn.Module, confidence: nn.Module) -> None:
        super().__init__()
        self.segmentation = segmentation
        self.confidence = confidence

    @property
    def size_divisor(self) -> int:
        return self.segmentation.size_divisor

    def forward(self, hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.segmentation(hu), dim=1)
        return probabilities, torch.sigmoid(self.confidence(hu, probabilities))
