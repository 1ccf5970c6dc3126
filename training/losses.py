"""Segmentation losses shared by the recipes."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: A class, or a region: classes whose probabilities add up (nnU-Net's region-based training for nested labels).
ClassOrRegion = int | Sequence[int]

#: The regions LiTS scores: the liver as organ ∪ lesion, and the lesion. With Dice on the classes (liver, lesion)
#: a lesion taken for liver costs both terms (false liver) and one taken for background only the lesion's: the
#: reverse of the metric, where a lesion taken for background is missed liver as well. On these regions it is not.
LITS_REGIONS: tuple[tuple[int, ...], ...] = ((1, 2), (2,))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[ClassOrRegion],
                   eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over ``classes`` (each a class or a region), computed over the whole batch (nnU-Net's
    "batch Dice").

    Batch Dice keeps the loss defined on crops where a small class is absent.
    """
    return soft_dice_loss_to_probabilities(logits, one_hot_targets(target, logits.shape[1]), classes, eps)


def soft_dice_loss_to_probabilities(logits: torch.Tensor, target_probabilities: torch.Tensor,
                                    classes: Sequence[ClassOrRegion], eps: float = 1e-5) -> torch.Tensor:
    """:func:`soft_dice_loss` against per-pixel class probabilities [N, C, ...] (one-hot or soft pseudo-labels)."""
    probabilities = torch.softmax(logits, dim=1)
    target_probabilities = target_probabilities.to(probabilities.dtype)
    losses = []
    for label in classes:
        if isinstance(label, Sequence):
            p, t = probabilities[:, list(label)].sum(dim=1), target_probabilities[:, list(label)].sum(dim=1)
        else:  # one class: a view, as before regions existed
            p, t = probabilities[:, label], target_probabilities[:, label]
        intersection = (p * t).sum()
        losses.append(1.0 - (2.0 * intersection + eps) / (p.sum() + t.sum() + eps))
    return torch.stack(losses).mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[ClassOrRegion] = (1, 2)) -> torch.Tensor:
    """Cross-entropy plus soft Dice, the usual pairing for organ + small-lesion segmentation."""
    return F.cross_entropy(logits, target) + soft_dice_loss(logits, target, classes)


def blob_dice_loss(logits: torch.Tensor, labels: torch.Tensor, instances: torch.Tensor, lesion_class: int = 2,
                   eps: float = 1e-5) -> torch.Tensor:
    """1 - the mean soft Dice of each lesion instance on its own: blob loss (Kofler et al., "blob loss: instance
    imbalance aware loss functions for semantic segmentation", IPMI 2023), its Dice term.

    For instance k of crop n the other instances' pixels are masked out of the prediction, so a neighbouring lesion
    found is not a false positive for k; everything else predicted lesion is. The Dice of each instance is averaged
    per crop, then over the crops that hold one. A 10-pixel lesion weighs as much as a 1,000-pixel one, where the
    batch Dice of :func:`soft_dice_loss` lets the large lesions decide. 0 when no crop holds a lesion.

    ``labels`` int [N, H, W]; ``instances`` int [N, H, W] lesion ids (0 elsewhere; only pixels labelled
    ``lesion_class`` count).
    """
    probability = torch.softmax(logits.float(), dim=1)[:, lesion_class]
    ids = torch.where(labels == lesion_class, instances, torch.zeros_like(instances))
    crops, slots = ids.shape[0], int(ids.max()) + 1
    if slots == 1:
        return probability.sum() * 0.0
    # per (crop, id) sums in one pass: id 0 collects the pixels outside every instance
    flat = (torch.arange(crops, device=ids.device).view(-1, *[1] * (ids.dim() - 1)) * slots + ids).reshape(-1)
    found = torch.zeros(crops * slots, dtype=probability.dtype, device=probability.device)
    found = found.index_add(0, flat, probability.reshape(-1)).view(crops, slots)
    size = torch.bincount(flat, minlength=crops * slots).view(crops, slots).to(probability.dtype)
    outside_instances = found[:, :1]  # predicted lesion where no instance is: false positive for every instance
    dice = (2.0 * found[:, 1:] + eps) / (outside_instances + found[:, 1:] + size[:, 1:] + eps)
    present = size[:, 1:] > 0
    counts = present.sum(dim=1)
    per_crop = (dice * present).sum(dim=1)[counts > 0] / counts[counts > 0]
    return 1.0 - per_crop.mean()


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
                                   localization_weights: torch.Tensor, alpha: float = 1.0,
                                   dice_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The student's ``CE_seg + alpha * CE_loc`` (the paper's Eq. 4), plus ``dice_weight`` times the baseline's
    batch soft Dice of liver and lesion against the same targets when ``dice_weight`` > 0.

    ``CE_seg`` is the plain (unweighted) cross-entropy against ``segmentation_targets`` [N, C, h, w]
    (one-hot for masks, soft for pseudo-labels). Only ``CE_loc`` is class-weighted, with
    ``localization_weights`` (background / organ box / lesion box): the paper weighs lesion 1.0 and liver 0.1 "in
    the localization loss". Weighing the segmentation term too would pull a soft target of (0, 0.8, 0.2) towards
    p(lesion) ~ 0.7. ``localization_labels`` [N, h, w] are box-derived classes.
    Returns ``{"loss", "segmentation", "localization"}``, and ``"dice"`` when it is used.
    """
    segmentation = weighted_soft_cross_entropy(segmentation_logits, segmentation_targets)
    localization = weighted_soft_cross_entropy(
        localization_logits, one_hot_targets(localization_labels, localization_logits.shape[1]), localization_weights)
    losses = {"loss": segmentation + alpha * localization, "segmentation": segmentation,
              "localization": localization}
    if dice_weight > 0:
        losses["dice"] = soft_dice_loss_to_probabilities(segmentation_logits, segmentation_targets, (1, 2))
        losses["loss"] = losses["loss"] + dice_weight * losses["dice"]
    return losses


# ------------------------------------------------------------------------------------------ asdnet
#: Label of the background class, which every crop's target is scored against when it holds no foreground.
BACKGROUND = 0


def class_soft_dice(probabilities: torch.Tensor, target: torch.Tensor, classes: Sequence[int],
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice of each sample and each of ``classes`` [N, K], and whether the class is in the sample's target
    [N, K] (bool). ``probabilities`` [N, C, ...] (a softmax), ``target`` [N, ...]."""
    p = probabilities[:, list(classes)].flatten(2)
    t = torch.stack([target == label for label in classes], dim=1).flatten(2).to(p.dtype)
    volume = t.sum(2)
    return (2.0 * (p * t).sum(2) + eps) / (p.sum(2) + volume + eps), volume > 0


def per_sample_soft_dice(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int] = (1, 2),
                         eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice of each sample [N]: the mean over those of ``classes`` present in the sample's target; a sample
    with none of them present is scored by its background Dice. ``logits`` [N, C, ...], ``target`` [N, ...].

    Not the mean over all of ``classes``: a softmax is never exactly 0, so a class absent from the target scores
    ``eps / (sum p + eps)`` ~ 0 however empty its prediction, and every lesion-free crop would look like a failure
    to the sample attention. Here a perfect lesion-free crop scores ~1, and a crop without foreground still loses
    Dice as foreground is predicted on it (its background Dice drops). False positives of an absent class beside
    a present one are not counted here; the generalized Dice (:func:`per_sample_generalized_dice`) counts them.
    """
    probabilities = torch.softmax(logits, dim=1)
    dice, present = class_soft_dice(probabilities, target, classes, eps)
    counted = present.to(dice.dtype)
    present_mean = (dice * counted).sum(1) / counted.sum(1).clamp_min(1.0)
    background = class_soft_dice(probabilities, target, (BACKGROUND,), eps)[0][:, 0]
    return torch.where(present.any(1), present_mean, background)


def generalized_dice_class_weights(volume: torch.Tensor) -> torch.Tensor:
    """Sudre et al.'s class weights ``1 / volume^2`` per sample [N, C] from the target volumes [N, C], normalised
    to sum 1 per sample.

    A class absent from a sample (weight 1/0) takes the largest weight of the sample's present classes, the
    NiftyNet / MONAI convention: predicting it then costs as much as missing the rarest present class, instead of
    an infinite (or, dropped, no) penalty. Normalising changes no Dice (a ratio of weighted sums) but keeps ``eps``
    negligible against the weighted sums, whose raw scale is 1 / volume.
    """
    present = volume > 0
    weights = torch.where(present, volume.clamp_min(1.0) ** -2, torch.zeros_like(volume))
    weights = torch.where(present, weights, weights.amax(dim=1, keepdim=True))
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def per_sample_generalized_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Generalized Dice (Sudre et al. 2017) of each sample [N] over every class, background included:
    ``2 sum_c w_c sum_i p_ic t_ic / sum_c w_c sum_i (p_ic + t_ic)``, ``w`` from
    :func:`generalized_dice_class_weights` (computed from the target: no gradient).

    All classes, as Sudre et al. define it and ASDNet uses it: where foreground is present the 1/volume^2 weight
    makes background negligible, and on a crop without foreground background is what scores the crop.
    """
    probabilities = torch.softmax(logits, dim=1)
    p = probabilities.flatten(2)
    t = one_hot_targets(target, probabilities.shape[1]).flatten(2).to(p.dtype)
    volume = t.sum(2)
    weights = generalized_dice_class_weights(volume)
    overlap = (weights * (p * t).sum(2)).sum(1)
    total = (weights * (p.sum(2) + volume)).sum(1)
    return (2.0 * overlap + eps) / (total + eps)


def sample_attention_weights(sample_dice: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """ASDNet's per-sample attention ``(1 - dsc)^beta``, detached: hard samples (low Dice) weigh more, and the
    weight is a constant of the step, never a path for gradients (the paper does not back-propagate dsc)."""
    return (1.0 - sample_dice.detach()).clamp_min(0.0) ** beta


def sample_attention_dice_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0,
                               classes: Sequence[int] = (1, 2), eps: float = 1e-5) -> torch.Tensor:
    """ASDNet's Dice term ``mean_n (1 - dsc_n)^beta * (1 - GD_n)``: each sample's generalized Dice loss
    (:func:`per_sample_generalized_dice`, the paper's segmentation Dice) times its detached attention weight
    (:func:`sample_attention_weights`). ``dsc_n`` is the sample's soft Dice over the foreground ``classes``
    present in it (:func:`per_sample_soft_dice`): how well the structures the crop holds are segmented is the
    difficulty the attention means, and a well-segmented lesion-free crop is easy (weight ~0). The mean over
    samples (the paper writes a sum) keeps the scale independent of the batch size."""
    attention = sample_attention_weights(per_sample_soft_dice(logits, target, classes, eps), beta)
    return (attention * (1.0 - per_sample_generalized_dice(logits, target, eps))).mean()


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
def dice_with_cross_entropy(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int],
                            ce_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """MSDN's segmentation loss: soft Dice over ``classes`` plus ``ce_weight`` x per-pixel cross-entropy.

    MSDN passes background with the foreground classes (the paper "treats the background as another class"), so
    the Dice term itself rewards calling a pixel outside the liver background rather than lesion. ``ce_weight``
    0 is the paper's loss; a positive weight adds the usual cross-entropy term, an option beyond the paper.
    The cross-entropy is returned unweighted for logging. Returns ``{"loss", "dice", "ce"}``.
    """
    dice = soft_dice_loss(logits, target, classes)
    cross_entropy = F.cross_entropy(logits, target)
    return {"loss": dice + ce_weight * cross_entropy, "dice": dice, "ce": cross_entropy}


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
