"""Teacher-student with organ-to-lesion attention (Sun et al.): learn from a few masks plus many boxes.

Stage ``teacher``: a box-prompted U-Net (:class:`~mixsup.training.models.teacher_student.TeacherUNet`) learns on
strong crops, its box masks entering only through the O2L attention (the paper; ``teacher_box_input=true`` also
stacks them onto the input, the paper's SCN ablation), with plain cross-entropy (the paper's teacher loss). The
trainer ends the stage with the teacher of its best validation epoch (moving average of liver + lesion Dice with
boxes), not the last. That teacher annotates every weak case: :func:`pseudo_labels` runs it on whole slices with
the case's boxes and keeps the softmax probabilities as **soft** pseudo-labels (not argmax: the teacher's
uncertainty at box edges stays in the targets). Where a weak case's mask is kept aside (``hidden/`` of a phantom
split), the pseudo-labels' Dice against it is logged to ``pseudo_labels/quality.json``: it is the method's key
signal, since the student can only be as good as its targets.

Stage ``student``: a plain U-Net with a training-only localization branch learns on strong crops (hard labels)
and pseudo-labelled weak crops (soft labels) with ``CE_seg + alpha * CE_loc`` (Eq. 4); the localization target is
the box-derived map (background / organ box / lesion box) that both kinds of crops carry. ``CE_seg`` is
unweighted; only ``CE_loc`` carries class weights (background, liver, lesion) = (0.1, 0.1, 1.0): the paper gives
lesion 1.0 and liver 0.1 "in the localization loss"; background, the most frequent class in a crop, gets the
liver's 0.1 rather than more (our choice; the paper is silent). ``student_dice_weight`` > 0 adds the baseline
U-Net's batch soft Dice (liver, lesion) to ``CE_seg``, against the same hard or soft targets: not in the paper,
it lets a benchmark compare supervision with the loss held equal to the baseline's (plain CE leaves the rare
lesion class to few gradients). Only the student's U-Net is exported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixsup.metrics import GlobalDice
from mixsup.stacks import padded_stack_batches
from mixsup.training.losses import one_hot_targets, segmentation_localization_loss
from mixsup.training.models.teacher_student import StudentUNet, TeacherUNet
from mixsup.training.models.unet import UNetConfig
from mixsup.training.recipes.base import (
    LESION_BOX,
    ORGAN_BOX,
    STRONG,
    WEAK,
    Batch,
    Recipe,
    mixed_batch_sizes,
    network_size,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from mixsup.training.trainer import StageContext, TrainConfig

NAME = "teacher-student"


def network_config(config: "TrainConfig") -> UNetConfig:
    """Teacher and student share the baseline's size (``context_slices``, ``base_channels``, ``depth``)."""
    return UNetConfig(**network_size(config))


def localization_targets(boxes: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Box masks [N, 2, h, w] -> classes [N, h, w]: 2 inside a lesion box, else 1 inside an organ box, else 0.

    Warped box masks are interpolated, hence the ``threshold``; a lesion box wins where it pokes out of the
    organ box, since lesion localization is what the branch is there for.
    """
    organ = boxes[:, ORGAN_BOX] >= threshold
    lesion = boxes[:, LESION_BOX] >= threshold
    targets = organ.long()
    return targets.masked_fill(lesion, 2)


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, hu: np.ndarray, boxes: np.ndarray, batch_slices: int = 8) -> np.ndarray:
    """Soft pseudo-labels of one case: the teacher's softmax, float16 [C, D, H, W], slice by slice.

    ``hu`` int16 [D, H, W] and ``boxes`` [2, D, H, W] (organ, lesion) are on the training grid. Each slice is
    padded to a multiple of the teacher's ``size_divisor`` (air for HU, no box) and gets the stack of neighbours
    the teacher takes (``config.in_slices``), edge slices replicated, as in training and serving. The teacher
    runs in eval mode on its own device and its mode is restored afterwards.
    """
    if hu.ndim != 3 or boxes.shape != (2, *hu.shape):
        raise ValueError(f"need hu [D, H, W] and boxes [2, D, H, W], got {hu.shape} and {boxes.shape}")
    height, width = hu.shape[1:]
    divisor = int(getattr(teacher, "size_divisor", 1))
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        chunks = []
        for _, stacks, box_masks in padded_stack_batches(hu, teacher.config.in_slices, batch_slices, divisor, boxes):
            logits = teacher(torch.from_numpy(stacks).to(device), torch.from_numpy(box_masks).to(device))
            probabilities = torch.softmax(logits.float(), dim=1)[:, :, :height, :width]
            chunks.append(probabilities.cpu().numpy())
    finally:
        teacher.train(was_training)
    return np.concatenate(chunks).transpose(1, 0, 2, 3).astype(np.float16)


class TeacherStudentRecipe(Recipe):
    """Stages ``teacher`` (box-prompted annotator, strong crops) then ``student`` (strong + pseudo-labelled weak)."""

    NAME = NAME
    STAGES = ("teacher", "student")
    DEFAULTS: dict[str, Any] = {
        "alpha": 1.0,                       # weight of the localization CE
        "localization_weight_background": 0.1,  # class weights of the localization CE only (module docstring)
        "localization_weight_liver": 0.1,
        "localization_weight_lesion": 1.0,
        "teacher_box_input": False,         # boxes also as teacher input channels (the paper's SCN ablation)
        "student_dice_weight": 0.0,         # the baseline's soft Dice beside CE_seg (not the paper's; docstring)
        "weak_fraction": 0.5,               # share of each student batch drawn from pseudo-labelled weak cases
        "teacher_epochs": 0,                # 0: config.epochs
        "student_epochs": 0,
    }

    def localization_weights(self, config: "TrainConfig") -> torch.Tensor:
        """Weights of background, organ box and lesion box in the localization CE."""
        return torch.tensor([float(self.option(config, f"localization_weight_{name}"))
                             for name in ("background", "liver", "lesion")])

    def build(self, config: "TrainConfig") -> nn.ModuleDict:
        network = network_config(config)
        student = StudentUNet(network)  # built first: the seeded initialisation depends on the order
        teacher = TeacherUNet(network, box_input=bool(self.option(config, "teacher_box_input")))
        return nn.ModuleDict({"teacher": teacher, "student": student})

    def optimizers(self, stage: str, modules: nn.ModuleDict, config: "TrainConfig") -> dict[str, torch.optim.Optimizer]:
        network = "teacher" if stage == "teacher" else "student"
        return {network: torch.optim.AdamW(modules[network].parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)}

    def batch_sizes(self, stage: str, config: "TrainConfig") -> dict[str, int]:
        if stage == "teacher":
            return {STRONG: config.batch_size}
        return mixed_batch_sizes(config.batch_size, float(self.option(config, "weak_fraction")))

    def train_step(self, stage: str, modules: Mapping[str, nn.Module], batches: Mapping[str, Batch],
                   optimizers: Mapping[str, torch.optim.Optimizer], config: "TrainConfig") -> dict[str, float]:
        if stage == "teacher":
            network, losses = "teacher", self.teacher_losses(modules["teacher"], batches[STRONG])
        else:
            network, losses = "student", self.student_losses(modules["student"], batches,
                                                             self.localization_weights(config),
                                                             float(self.option(config, "alpha")),
                                                             float(self.option(config, "student_dice_weight")))
        optimizer = optimizers[network]
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {name: float(value.detach()) for name, value in losses.items()}

    @staticmethod
    def teacher_losses(teacher: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Plain cross-entropy of the box-prompted teacher on strong crops."""
        if batch.labels is None:
            raise ValueError("the teacher trains on strong batches (with labels) only")
        return {"loss": F.cross_entropy(teacher(batch.images, batch.boxes), batch.labels)}

    @staticmethod
    def student_losses(student: nn.Module, batches: Mapping[str, Batch], localization_weights: torch.Tensor,
                       alpha: float, dice_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """``CE_seg + alpha * CE_loc`` (+ ``dice_weight`` * soft Dice) on strong (hard labels) and weak (soft
        labels) crops in one forward pass; ``localization_weights`` (background, organ box, lesion box) weigh the
        localization term only.

        One forward over the concatenation keeps BatchNorm statistics over the mixed batch, as the paper trains
        on the mixed dataset. Weak crops must carry ``soft_labels`` (written by the teacher stage).
        """
        num_classes = unwrap(student).config.num_classes
        images, targets, boxes = [], [], []
        for kind, batch in batches.items():
            if len(batch) == 0:
                continue
            if kind == STRONG:
                targets.append(one_hot_targets(batch.labels, num_classes))
            elif kind == WEAK:
                if batch.soft_labels is None:
                    raise ValueError("weak batch without soft_labels: the teacher stage writes them")
                targets.append(batch.soft_labels)
            else:
                raise ValueError(f"the student trains on strong and weak batches, got {kind!r}")
            images.append(batch.images)
            boxes.append(batch.boxes)
        segmentation, localization = student(torch.cat(images))
        return segmentation_localization_loss(segmentation, torch.cat(targets).to(segmentation),
                                              localization, localization_targets(torch.cat(boxes)),
                                              localization_weights, alpha, dice_weight)

    def segmentation_network(self, modules: nn.ModuleDict) -> nn.Module:
        """The student's U-Net, without the localization branch."""
        return unwrap(modules["student"]).segmentation

    def validation_network(self, stage: str, modules: nn.ModuleDict) -> nn.Module | None:
        """The teacher is scored with the validation cases' boxes; the student as exported."""
        return unwrap(modules["teacher"]) if stage == "teacher" else None

    def end_stage(self, stage: str, modules: nn.ModuleDict, context: "StageContext") -> None:
        """After the teacher: write soft pseudo-labels of every weak case for the student stage, and their Dice
        against the weak cases' hidden masks where the dataset keeps them."""
        if stage != "teacher":
            return
        teacher = unwrap(modules["teacher"])
        liver, lesion, scored = GlobalDice([1]), GlobalDice([2]), 0
        for volume in context.volumes(WEAK):
            probabilities = pseudo_labels(teacher, volume.hu, volume.boxes)
            context.save_soft_labels(volume.case, probabilities)
            truth = context.hidden_labels(volume.case, volume.hu.shape)
            if truth is not None:
                predicted = probabilities.argmax(axis=0).astype(np.uint8)
                liver.update(np.minimum(predicted, 1), np.minimum(truth, 1))
                lesion.update(predicted, truth)
                scored += 1
        if scored:
            context.log_stage_result("pseudo_label_quality", {
                "weak_cases_scored": scored, "dice_liver": liver.result()[1],
                "dice_lesion": lesion.result()[2]})


RECIPE = TeacherStudentRecipe()
