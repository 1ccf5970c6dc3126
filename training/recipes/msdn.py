"""MSDN (Mixed-Supervised Dual-Network): strong crops train both nets, weak crops only the detection net.

Each step runs one forward of :class:`~mixsup.training.models.msdn.MSDN` on the strong and weak crops together:
the detection net (encoder, decoder, shared anchor unit) sees all of them, the segmentation net (gated by the
detection encoder) only the strong ones. Loss = segmentation loss on the strong crops + ``detection_weight`` x
(focal + smooth-L1) on all crops. A weak crop therefore never sends gradient into the segmentation encoder, decoder
or head; it still trains the detection encoder that gates segmentation.

The segmentation loss is soft Dice over background, liver and lesion (:data:`DICE_CLASSES`): the paper treats the
background as another class, so the Dice term itself decides background against lesion outside the liver. Option
``ce_weight`` (default 0.0, the paper's loss) adds ``ce_weight`` x per-pixel cross-entropy to it, for runs or
benchmarks that want the usual Dice + CE pairing; the step logs the unweighted ``ce`` either way.

Options ``dropout`` (rate after every stage of both U-Nets, default 0.1) and ``detection_width`` (width of the
detection unit's two towers, 0 = 16 x base_channels) shape the network; see
:class:`~mixsup.training.models.msdn.MSDNConfig`.

Detection ground truth comes from :attr:`Batch.boxes`: each 4-connected component of a box-mask channel is one
box (its bounding rectangle), class 0 for the organ channel and 1 for the lesion channel. Consequences, by design
of the data path rather than of the paper:

* After a rotation augmentation a box mask is a rotated rectangle; its ground-truth box is that rectangle's
  axis-aligned extent (slightly larger than the object's own box). A box cut by the crop becomes its visible part.
* Lesion boxes that overlap or touch on a slice merge into one component and so into one (larger) box.

Anchor matching is RetinaNet's: IoU >= ``positive_iou`` positive, < ``negative_iou`` negative, in between ignored;
as in Detectron2's RetinaNet each ground-truth box also claims its highest-IoU anchors, so a box no anchor covers
at 0.5 (very large organs, tiny lesions) still trains the regression head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from scipy import ndimage
from torch import nn

from mixsup.training.losses import anchor_detection_loss, dice_with_cross_entropy
from mixsup.training.models.msdn import (
    MSDN,
    MSDNConfig,
    box_iou,
    encode_boxes,
    image_anchors,
)
from mixsup.training.recipes.base import STRONG, WEAK, Batch, Recipe, network_size, unwrap

NAME = "msdn"
#: Classes of the segmentation Dice loss: background, liver, lesion (the paper counts background as a class).
DICE_CLASSES = (0, 1, 2)
#: ``anchor_state`` values of :func:`match_anchors`.
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


@dataclass(frozen=True)
class LossSettings:
    """The loss's hyperparameters, read from a run's recipe options by :meth:`MSDNRecipe.settings`."""

    anchor_size: float
    positive_iou: float
    negative_iou: float
    focal_alpha: float
    focal_gamma: float
    smooth_l1_beta: float
    detection_weight: float
    ce_weight: float


def boxes_from_box_masks(box_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``[G, 4]`` ``(x0, y0, x1, y1)`` (half-open pixels) and classes ``[G]`` of one crop's box masks
    ``[K, h, w]``: one box per connected component of each channel, the channel being the class."""
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    for channel, mask in enumerate(box_masks.detach().cpu().numpy() > 0.5):
        components, count = ndimage.label(mask)
        for rows, cols in ndimage.find_objects(components)[:count]:
            boxes.append((cols.start, rows.start, cols.stop, rows.stop))
            classes.append(channel)
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).to(box_masks.device),
            torch.tensor(classes, dtype=torch.long).to(box_masks.device))


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, positive_iou: float = 0.5,
                  negative_iou: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """For every anchor ``[M, 4]``: the index of its best ground-truth box ``[M]`` and its state ``[M]``
    (:data:`POSITIVE`, :data:`NEGATIVE`, :data:`IGNORED`); with no boxes every anchor is negative."""
    count = anchors.shape[0]
    if boxes.shape[0] == 0:
        return (torch.zeros(count, dtype=torch.long, device=anchors.device),
                torch.full((count,), NEGATIVE, dtype=torch.long, device=anchors.device))
    iou = box_iou(anchors, boxes)
    best_iou, best_box = iou.max(dim=1)
    state = torch.full((count,), IGNORED, dtype=torch.long, device=anchors.device)
    state[best_iou < negative_iou] = NEGATIVE
    state[best_iou >= positive_iou] = POSITIVE
    best_per_box = iou.max(dim=0).values
    claimed = ((iou == best_per_box[None]) & (best_per_box[None] > 0)).any(dim=1)
    state[claimed] = POSITIVE
    return best_box, state


@torch.no_grad()
def detection_targets(anchors: torch.Tensor, box_masks: torch.Tensor, num_classes: int, positive_iou: float,
                      negative_iou: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class targets ``[N, M, K]`` (one-hot on positive anchors), box-delta targets ``[N, M, 4]`` (zero except on
    positive anchors) and anchor states ``[N, M]`` for a batch of box masks ``[N, K, h, w]``."""
    count = box_masks.shape[0]
    class_targets = torch.zeros(count, anchors.shape[0], num_classes, device=anchors.device)
    box_targets = torch.zeros(count, *anchors.shape, device=anchors.device)
    states = torch.empty(count, anchors.shape[0], dtype=torch.long, device=anchors.device)
    for index, masks in enumerate(box_masks):
        boxes, classes = boxes_from_box_masks(masks)
        matched, states[index] = match_anchors(anchors, boxes, positive_iou, negative_iou)
        positive = torch.nonzero(states[index] == POSITIVE).squeeze(1)
        class_targets[index, positive, classes[matched[positive]]] = 1.0
        box_targets[index, positive] = encode_boxes(boxes[matched[positive]], anchors[positive])
    return class_targets, box_targets, states


class MSDNRecipe(Recipe):
    NAME = NAME
    DEFAULTS: dict[str, float | int] = {
        "detection_weight": 1.0,  # weight of the detection loss next to the Dice loss
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
        "smooth_l1_beta": 1.0 / 9.0,  # Detectron's RetinaNet value
        "positive_iou": 0.5,
        "negative_iou": 0.4,
        # Anchor base side at stride 1, in pixels; a scale with stride s uses anchor_size * s. RetinaNet's 4 x
        # stride is for strides 8-128; our decoder scales have strides 1-8 (1-4 at depth 3), so 8 x stride lets
        # the coarsest scale cover organ-sized boxes (~100 px at stride 8 and the largest anchor scale).
        "anchor_size": 8.0,
        # Width of both towers of the shared detection unit; 0: 16 x base_channels (see MSDNConfig).
        "detection_width": MSDNConfig.detection_width,
        "dropout": MSDNConfig.dropout,  # after every stage of both U-Nets (see MSDNConfig)
        "ce_weight": 0.0,  # weight of a cross-entropy term added to the Dice loss; 0 is the paper's loss
    }

    def settings(self, config) -> LossSettings:
        """The loss's hyperparameters of a run."""
        names = [f.name for f in dataclasses.fields(LossSettings)]
        return LossSettings(**{key: float(self.option(config, key)) for key in names})

    def build(self, config) -> nn.ModuleDict:
        network = MSDN(MSDNConfig(**network_size(config),
                                  detection_width=int(self.option(config, "detection_width")),
                                  dropout=float(self.option(config, "dropout"))))
        return nn.ModuleDict({"msdn": network})

    def batch_sizes(self, stage: str, config) -> dict[str, int]:
        """Strong and weak crops in equal numbers; the trainer drops the weak ones when there are no weak cases."""
        return {STRONG: config.batch_size, WEAK: config.batch_size}

    def train_step(self, stage: str, modules: Mapping[str, nn.Module], batches: Mapping[str, Batch],
                   optimizers: Mapping[str, torch.optim.Optimizer], config) -> dict[str, float]:
        network = modules["msdn"]
        core: MSDN = unwrap(network)
        settings = self.settings(config)
        strong, weak = batches.get(STRONG), batches.get(WEAK)
        present = [batch for batch in (strong, weak) if batch is not None]
        if not present:
            raise ValueError(f"MSDN needs a {STRONG} or a {WEAK} batch, got {sorted(batches)}")
        outputs = network(None if strong is None else strong.images, None if weak is None else weak.images)

        height, width = present[0].images.shape[-2:]
        anchors = image_anchors(height, width, core.detection_strides, settings.anchor_size)
        targets = detection_targets(anchors.to(present[0].images.device), torch.cat([b.boxes for b in present]),
                                    core.config.detection_classes, settings.positive_iou, settings.negative_iou)
        detection = anchor_detection_loss(outputs["class_logits"], outputs["box_deltas"], *targets,
                                          alpha=settings.focal_alpha, gamma=settings.focal_gamma,
                                          beta=settings.smooth_l1_beta)
        loss = settings.detection_weight * detection["loss"]
        logged = {"dice": float("nan"), "ce": float("nan"), "focal": detection["classification"].item(),
                  "smooth_l1": detection["regression"].item()}
        if strong is not None:
            segmentation = dice_with_cross_entropy(outputs["segmentation"], strong.labels, DICE_CLASSES,
                                                   settings.ce_weight)
            loss = loss + segmentation["loss"]
            logged.update(dice=segmentation["dice"].item(), ce=segmentation["ce"].item())

        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        return {"loss": loss.item(), **logged}

    def segmentation_network(self, modules: nn.ModuleDict) -> nn.Module:
        """The segmentation path: HU window, both encoders, sSE gates, segmentation decoder and head."""
        return unwrap(modules["msdn"]).segmentation


RECIPE = MSDNRecipe()
