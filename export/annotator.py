"""The teacher-student teacher as a box-prompted annotator: raw HU stacks and box masks -> probabilities.

What ``mixsup-export --teacher`` writes: the teacher U-Net with its organ-to-lesion attention, softmax on top,
the HU window its first op as in every export. It answers for whole slices (any height and width that are
multiples of its ``size_divisor``), the way it wrote the student's soft pseudo-labels in training
(:func:`~mixsup.training.recipes.teacher_student.pseudo_labels`).
"""
from __future__ import annotations

import torch
from torch import nn

from mixsup.contract import TensorSpec
from mixsup.training.models.teacher_student import BOX_CHANNELS

IMAGE, BOXES = "image", "boxes"


def input_specs() -> tuple[TensorSpec, ...]:
    """The box-mask input as the model contract documents it (the image is the contract's main input)."""
    return (TensorSpec(BOXES, "float32", ("N", BOX_CHANNELS, "h", "w"),
                       "box masks of the centre slice on the image's grid: channel 0 organ box, channel 1 lesion "
                       "box(es); 1 inside a box, 0 outside"),)


class Annotator(nn.Module):
    """(raw HU [N, S, h, w], box masks [N, 2, h, w]) -> probabilities [N, C, h, w]."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    @property
    def size_divisor(self) -> int:
        return self.teacher.size_divisor

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.teacher(image, boxes), dim=1)
