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


# ------------------------------------------------------------------------------------------ teacher-student
def weighted_soft_cross_entropy(logits: torch.Tensor, target_probabilities: torch.Tensor,
                                class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy against per-pixel class probabilities (soft or one-hot targets).

    ``sum_i sum_c w_c t_ic (-log p_ic) / sum_i sum_c w_c t_ic`` over pixels ``i``: the weighted mean. With one-hot
    targets this is exactly ``F.cross_entropy(logits, labels, weight=w)``; PyTorch's own soft-target mode divides
    by the pixel count instead, which would weigh hard (strong) and soft (pseudo-labelled) crops differently in
    one batch. ``logits`` and ``target_probabilities`` are [N, C, ...]; ``class_weights`` [C] (None: all 1).
    """
    log_probabilities = torch.log_softmax(logits, dim=1)
    weighted = target_probabilities.to(log_probabilities.dtype)
    if class_weights is not None:
        shape = (1, -1) + (1,) * (logits.dim() - 2)
        weighted = weighted * class_weights.to(weighted).reshape(shape)
    return -(weighted * log_probabilities).sum() / weighted.sum().clamp_min(torch.finfo(weighted.dtype).tiny)


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels [N, ...] -> float one-hot targets [N, C, ...] for :func:`weighted_soft_cross_entropy`."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def segmentation_localization_loss(segmentation_logits: torch.Tensor, segmentation_targets: torch.Tensor,
                                   localization_logits: torch.Tensor, localization_labels: torch.Tensor,
                                   class_weights: torch.Tensor, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """The student's ``CE_seg + alpha * CE_loc``; both terms class-weighted with the same ``class_weights``.

    ``segmentation_targets`` [N, C, h, w] are probabilities (one-hot for masks, soft for pseudo-labels);
    ``localization_labels`` [N, h, w] are box-derived classes (background / organ box / lesion box).
    Returns ``{"loss", "segmentation", "localization"}``.
    """
    segmentation = weighted_soft_cross_entropy(segmentation_logits, segmentation_targets, class_weights)
    localization = weighted_soft_cross_entropy(
        localization_logits, one_hot_targets(localization_labels, localization_logits.shape[1]), class_weights)
    return {"loss": segmentation + alpha * localization, "segmentation": segmentation,
            "localization": localization}


# ------------------------------------------------------------------------------------------ asdnet
def per_sample_soft_dice(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int] = (1, 2),
                         eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice of each sample [N], averaged over ``classes``; a class absent from both the target and the
    prediction of a sample scores 1 there (``eps / eps``). ``logits`` [N, C, ...], ``target`` [N, ...]."""
    probabilities = torch.softmax(logits, dim=1)
    scores = []
    for label in classes:
        p = probabilities[:, label].flatten(1)
        t = (target == label).flatten(1).to(p.dtype)
        scores.append((2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps))
    return torch.stack(scores, dim=1).mean(dim=1)


def sample_attention_weights(sample_dice: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """ASDNet's per-sample attention ``(1 - dsc)^beta``, detached: hard samples (low Dice) weigh more, and the
    weight is a constant of the step, never a path for gradients (the paper does not back-propagate dsc)."""
    return (1.0 - sample_dice.detach()).clamp_min(0.0) ** beta


def sample_attention_dice_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0,
                               classes: Sequence[int] = (1, 2), eps: float = 1e-5) -> torch.Tensor:
    """``mean_n (1 - dsc_n)^beta * (1 - dsc_n)``: each sample's soft Dice loss times its detached attention
    weight (:func:`sample_attention_weights`). The mean over samples (the paper writes a sum) keeps the scale
    independent of the batch size."""
    dice = per_sample_soft_dice(logits, target, classes, eps)
    return (sample_attention_weights(dice, beta) * (1.0 - dice)).mean()


def confidence_mask(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels the confidence network trusts: strictly above ``threshold`` (a pixel at it is not trusted)."""
    return confidence > threshold


def confident_self_training_loss(logits: torch.Tensor, confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """ASDNet's semi-supervised term on unlabeled crops: cross-entropy against the network's own argmax,
    only where the confidence map [N, h, w] is above ``threshold``; averaged over those pixels (0 when none).

    The targets and the mask carry no gradient: only the prediction is pulled towards its trusted labels.
    """
    target = logits.detach().argmax(dim=1)
    mask = confidence_mask(confidence.detach(), threshold).to(logits.dtype)
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1.0)


def confidence_bce(confidence_logits: torch.Tensor, is_ground_truth: bool) -> torch.Tensor:
    """Per-pixel BCE of confidence logits against all-ones (a ground-truth map) or all-zeros (a prediction)."""
    target = torch.full_like(confidence_logits, 1.0 if is_ground_truth else 0.0)
    return F.binary_cross_entropy_with_logits(confidence_logits, target)


# ------------------------------------------------------------------------------------------ msdn
def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss ``-a_t (1 - p_t)^gamma log(p_t)`` of independent sigmoid classes (Lin et al.).

    ``p_t`` is the probability of the true outcome; ``a_t`` is ``alpha`` for positives and ``1 - alpha`` for
    negatives. ``targets`` are 0/1 like ``logits``. Unreduced, so callers choose what to sum and how to normalise.
    """
    targets = targets.to(logits.dtype)
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probability * targets + (1 - probability) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * cross_entropy


def anchor_detection_loss(class_logits: torch.Tensor, box_deltas: torch.Tensor, class_targets: torch.Tensor,
                          box_targets: torch.Tensor, anchor_state: torch.Tensor, alpha: float = 0.25,
                          gamma: float = 2.0, beta: float = 1.0 / 9.0) -> dict[str, torch.Tensor]:
    """RetinaNet's loss: focal loss over positive and negative anchors plus smooth-L1 on the deltas of positive
    ones, both summed and divided by the number of positive anchors (at least 1).

    ``class_logits`` / ``class_targets`` [..., M, K] (targets one-hot on positives, zero elsewhere),
    ``box_deltas`` / ``box_targets`` [..., M, 4], ``anchor_state`` [..., M]: 1 positive, 0 negative, -1 ignored.
    Returns ``{"loss", "classification", "regression"}``.
    """
    positive = anchor_state == 1
    counted = anchor_state >= 0
    normaliser = positive.sum().clamp_min(1).to(class_logits.dtype)
    focal = sigmoid_focal_loss(class_logits[counted], class_targets[counted], alpha, gamma).sum() / normaliser
    regression = F.smooth_l1_loss(box_deltas[positive], box_targets[positive], beta=beta,
                                  reduction="sum") / normaliser
    return {"loss": focal + regression, "classification": focal, "regression": regression}


# ------------------------------------------------------------------------------------------ lazy
#: Target value of pixels a task does not label (the "unknown" ring of rough regions).
IGNORE_INDEX = -1


def indicated_weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor,
                                     has_label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Class-weighted cross-entropy of one task with a per-sample missing-label indicator (Ke et al.).

    ``sum_n sum_i d_n w(y_ni) CE_ni / sum_n sum_i d_n w(y_ni)`` over samples ``n`` and pixels ``i`` with
    ``y_ni != ignore_index``; ``d_n`` = ``has_label[n]`` (1: sample ``n`` carries this task's label, 0: it does
    not). With ``d = 1`` everywhere this is ``F.cross_entropy(logits, target, weight=w, ignore_index=...)``.
    Absent labels and ignored pixels enter with weight exactly 0, so they contribute nothing to the value and no
    gradient; when nothing is labelled the term is an exact 0 (still in the graph).
    ``logits`` [N, C, ...], ``target`` int [N, ...], ``class_weights`` [C], ``has_label`` [N] (bool or 0/1).
    """
    labelled = target != ignore_index
    safe_target = torch.where(labelled, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(logits, safe_target, reduction="none")
    indicator = has_label.to(per_pixel.dtype).reshape((-1,) + (1,) * (target.dim() - 1))
    weights = class_weights.to(per_pixel)[safe_target] * labelled.to(per_pixel.dtype) * indicator
    return (weights * per_pixel).sum() / weights.sum().clamp_min(torch.finfo(per_pixel.dtype).tiny)
