"""Multi-task U-net with lazy labels (Ke et al.): learn exact masks from a few strong scans and many boxes.

The network (:class:`~mixsup.training.models.lazy.MultiTaskUNet`) learns three tasks at once, each with its own
class-weighted cross-entropy and a per-sample indicator of whether the sample carries that task's label
(:func:`~mixsup.training.losses.indicated_weighted_cross_entropy`):

1. **detection** of rough inner regions, a 3-class map (background / organ / lesion) with an *unknown* band that
   is ignored — every sample has it;
2. **separation**: interfaces between touching lesions, a binary map — strong samples only;
3. **segmentation**: the exact mask — strong samples only.

Weak samples therefore train only task 1, and the indicator zeroes tasks 2 and 3 for them: no value, no gradient.

How the lazy labels are made for CT (the paper draws scribbles inside objects; our scans carry boxes):

* weak crops, from their box masks (:func:`rough_regions_from_boxes`): inside every lesion box a centred ellipse
  (the box's inscribed ellipse scaled by ``lesion_shrink``) is lesion; inside the organ box the inscribed
  ellipse scaled by ``organ_shrink``, minus the lesion boxes, is organ; everything farther than
  ``background_margin`` pixels from any box is background (the organ box circumscribes organ ∪ lesion on its
  slice, so that is certain); the rest — the ring between the inner ellipses and the box borders — is unknown.
  Ellipses, not shrunk rectangles, because organs and lesions are round-ish and a rectangle's corners are the
  part of a box most likely to be background. The ellipse comes from each box component's second moments, so it
  stays inscribed after the sampler's rotations. Lesion boxes that overlap merge into one component (box masks
  keep no instance identity) and get one ellipse; a box cut by the crop border gets the ellipse of its visible
  part.
* strong crops (``rough_from_mask`` = 1, the default), from their masks (:func:`rough_regions_from_mask`):
  every class region eroded by ``mask_margin`` pixels (less for thin components, which keep their core) — an
  always-correct rough label, like a scribble by someone who knows the answer. With ``rough_from_mask`` = 0
  strong crops use their box-derived rough regions like weak ones.

Interfaces (:func:`interface_map`): lesion instances are the 8-connected components of the strong mask (the same
instances the lesion boxes are drawn around); a lesion pixel is an interface pixel when a pixel of a *different*
instance lies within ``interface_radius`` pixels (Euclidean). On crops with no close lesions the map is all 0,
which is a label too ("no interface here").

Only the segmentation network (:class:`~mixsup.training.models.lazy.LazySegmenter`) is exported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from mixsup.training.losses import IGNORE_INDEX, indicated_weighted_cross_entropy
from mixsup.training.models.lazy import (
    DETECTION,
    SEGMENTATION,
    SEPARATION,
    MultiTaskUNet,
    MultiTaskUNetConfig,
)
from mixsup.training.recipes.base import (
    LESION_BOX,
    ORGAN_BOX,
    STRONG,
    WEAK,
    Batch,
    Recipe,
    mixed_batch_sizes,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from mixsup.training.trainer import TrainConfig

NAME = "lazy"
BACKGROUND, ORGAN, LESION = 0, 1, 2
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ------------------------------------------------------------------------------------------ lazy labels
def inscribed_ellipses(region: np.ndarray, shrink: float) -> np.ndarray:
    """Boolean [h, w]: in every 8-connected component of ``region``, the centred ellipse with the component's
    second moments, scaled to be the inscribed ellipse of a filled rectangle (any rotation) times ``shrink``.

    A rectangle of half sides ``a, b`` has coordinate variances ``a²/3, b²/3`` (a pixel counts as a unit square,
    hence the ``+1/12``), so the inscribed ellipse is Mahalanobis distance² <= 3; ``shrink`` scales its axes.
    The result is clipped to the component. A one-pixel component keeps its pixel.
    """
    region = np.asarray(region, dtype=bool)
    inside = np.zeros(region.shape, dtype=bool)
    components, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
    if count == 0:
        return inside
    ys, xs = np.nonzero(components)
    ids = components[ys, xs] - 1
    pixels = np.bincount(ids, minlength=count).astype(np.float64)
    cy = np.bincount(ids, ys, count) / pixels
    cx = np.bincount(ids, xs, count) / pixels
    dy, dx = ys - cy[ids], xs - cx[ids]
    syy = np.bincount(ids, dy * dy, count) / pixels + 1.0 / 12.0
    sxx = np.bincount(ids, dx * dx, count) / pixels + 1.0 / 12.0
    sxy = np.bincount(ids, dy * dx, count) / pixels
    determinant = syy * sxx - sxy**2  # > 0: both variances are at least 1/12
    distance2 = (sxx[ids] * dy * dy - 2.0 * sxy[ids] * dy * dx + syy[ids] * dx * dx) / determinant[ids]
    inside[ys, xs] = distance2 <= 3.0 * shrink**2
    return inside


def rough_regions_from_boxes(organ_box: np.ndarray, lesion_box: np.ndarray, organ_shrink: float = 0.5,
                             lesion_shrink: float = 0.6, background_margin: float = 2.0) -> np.ndarray:
    """Rough inner regions of one crop from its filled box masks [h, w]: int64 [h, w] with 0 background,
    1 organ, 2 lesion and :data:`IGNORE_INDEX` (unknown) — see the module docstring for the rule."""
    organ_box, lesion_box = np.asarray(organ_box, bool), np.asarray(lesion_box, bool)
    boxed = organ_box | lesion_box
    target = np.full(organ_box.shape, IGNORE_INDEX, dtype=np.int64)
    if boxed.any():
        # distance_transform_edt measures each non-box pixel's distance to the nearest box pixel.
        target[ndimage.distance_transform_edt(~boxed) > background_margin] = BACKGROUND
    else:
        target[:] = BACKGROUND
    target[inscribed_ellipses(organ_box, organ_shrink) & ~lesion_box] = ORGAN
    target[inscribed_ellipses(lesion_box, lesion_shrink)] = LESION
    return target


def component_cores(region: np.ndarray, margin: float, shrink: float) -> np.ndarray:
    """Boolean [h, w]: ``region`` without the pixels within ``margin`` of its outside (Euclidean), except that a
    component thinner than that keeps its core: its margin is at most ``(1 - shrink)`` times its largest depth."""
    region = np.asarray(region, dtype=bool)
    if region.all() or not region.any():
        return region.copy()
    depth = ndimage.distance_transform_edt(region)  # 1 at the border pixels of the region
    components, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
    deepest = np.zeros(count + 1)
    np.maximum.at(deepest, components.ravel(), depth.ravel())
    allowed = np.minimum(margin, (1.0 - shrink) * deepest)
    allowed[0] = np.inf  # outside the region
    return depth > allowed[components]


def rough_regions_from_mask(labels: np.ndarray, margin: float = 3.0, organ_shrink: float = 0.5,
                            lesion_shrink: float = 0.6) -> np.ndarray:
    """Rough inner regions of a strong crop: each class of ``labels`` [h, w] eroded by :func:`component_cores`
    (background and organ with ``organ_shrink``, lesion with ``lesion_shrink``); the eroded band is unknown."""
    labels = np.asarray(labels)
    target = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    for label, shrink in ((BACKGROUND, organ_shrink), (ORGAN, organ_shrink), (LESION, lesion_shrink)):
        target[component_cores(labels == label, margin, shrink)] = label
    return target


def disk(radius: float) -> np.ndarray:
    """Boolean footprint of the pixels within ``radius`` (Euclidean) of the centre."""
    reach = int(np.floor(radius))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    return dy**2 + dx**2 <= radius**2


def interface_map(labels: np.ndarray, radius: float = 2.0, lesion: int = LESION) -> np.ndarray:
    """int64 [h, w]: 1 on lesion pixels with a pixel of another lesion instance within ``radius``, else 0.

    Instances are the 8-connected components of ``labels == lesion``. A pixel is on an interface exactly when
    the instance ids in its disk are not all equal: the disk's largest id (background 0 never wins) differs from
    its smallest (background counted as +inf).
    """
    instances, count = ndimage.label(np.asarray(labels) == lesion, structure=_EIGHT_CONNECTED)
    if count < 2:
        return np.zeros(instances.shape, dtype=np.int64)
    footprint = disk(radius)
    largest = ndimage.maximum_filter(instances, footprint=footprint, mode="constant", cval=0)
    none = count + 1
    smallest = ndimage.minimum_filter(np.where(instances > 0, instances, none), footprint=footprint,
                                      mode="constant", cval=none)
    return ((instances > 0) & (largest != smallest)).astype(np.int64)


# ------------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class LazySettings:
    """The method's hyperparameters that a training step needs, read from a run's options by
    :meth:`LazyRecipe.settings`."""

    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # detection, separation, segmentation
    lesion_class_weight: float = 3.0
    interface_class_weight: float = 10.0
    organ_shrink: float = 0.5
    lesion_shrink: float = 0.6
    background_margin: float = 2.0
    mask_margin: float = 3.0
    interface_radius: float = 2.0
    rough_from_mask: bool = True

    @property
    def class_weights(self) -> torch.Tensor:
        """Weights of background, organ, lesion in the detection and segmentation CE."""
        return torch.tensor([1.0, 1.0, self.lesion_class_weight])

    @property
    def interface_weights(self) -> torch.Tensor:
        return torch.tensor([1.0, self.interface_class_weight])


@dataclass
class TaskTargets:
    """Targets of a concatenated batch: int64 [N, h, w] maps (:data:`IGNORE_INDEX` where unlabelled) and the
    per-sample indicators ``has_rough`` / ``has_mask`` [N] of the tasks' labels."""

    detection: torch.Tensor
    separation: torch.Tensor
    segmentation: torch.Tensor
    has_rough: torch.Tensor
    has_mask: torch.Tensor


def crop_targets(boxes: np.ndarray, labels: np.ndarray | None,
                 settings: LazySettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rough regions, interfaces, mask)`` int64 [h, w] of one crop from its box masks [2, h, w] and, for a
    strong crop, its labels [h, w]; a crop without labels gets all-unknown interface and mask maps."""
    if labels is not None and settings.rough_from_mask:
        rough = rough_regions_from_mask(labels, settings.mask_margin, settings.organ_shrink, settings.lesion_shrink)
    else:
        rough = rough_regions_from_boxes(boxes[ORGAN_BOX], boxes[LESION_BOX], settings.organ_shrink,
                                         settings.lesion_shrink, settings.background_margin)
    if labels is None:
        unknown = np.full(rough.shape, IGNORE_INDEX, dtype=np.int64)
        return rough, unknown, unknown.copy()
    return rough, interface_map(labels, settings.interface_radius), labels.astype(np.int64)


def task_targets(batches: Mapping[str, Batch], settings: LazySettings) -> tuple[torch.Tensor, TaskTargets]:
    """Images and targets of all tasks for strong and weak batches, concatenated in the order given.

    Strong samples get all three tasks; weak samples only the rough regions of their boxes (their separation and
    segmentation maps are all unknown and their mask indicators 0).
    """
    images, maps, has_mask = [], [], []
    for kind, batch in batches.items():
        if len(batch) == 0:
            continue
        if kind not in (STRONG, WEAK):
            raise ValueError(f"the lazy recipe trains on strong and weak batches, got {kind!r}")
        if kind == STRONG and batch.labels is None:
            raise ValueError("a strong batch needs labels")
        boxes = (batch.boxes >= 0.5).cpu().numpy()
        labels = batch.labels.cpu().numpy() if kind == STRONG else None
        for index in range(len(batch)):
            maps.append(crop_targets(boxes[index], None if labels is None else labels[index], settings))
            has_mask.append(labels is not None)
        images.append(batch.images)
    if not images:
        raise ValueError("no samples in the batches")
    device = images[0].device
    detection, separation, segmentation = (torch.from_numpy(np.stack(task)).to(device) for task in zip(*maps))
    mask_indicator = torch.tensor(has_mask, device=device)
    return torch.cat(images), TaskTargets(detection, separation, segmentation,
                                          has_rough=torch.ones_like(mask_indicator), has_mask=mask_indicator)


def multi_task_losses(outputs: Mapping[str, torch.Tensor], targets: TaskTargets,
                      settings: LazySettings) -> dict[str, torch.Tensor]:
    """``loss = sum_t lambda_t * CE_t`` over detection, separation and segmentation, each term class-weighted and
    gated per sample by its label indicator; returns the total and the three terms."""
    class_weights = settings.class_weights
    terms = {
        DETECTION: indicated_weighted_cross_entropy(outputs[DETECTION], targets.detection, class_weights,
                                                    targets.has_rough),
        SEPARATION: indicated_weighted_cross_entropy(outputs[SEPARATION], targets.separation,
                                                     settings.interface_weights, targets.has_mask),
        SEGMENTATION: indicated_weighted_cross_entropy(outputs[SEGMENTATION], targets.segmentation, class_weights,
                                                       targets.has_mask),
    }
    total = sum(weight * terms[name] for weight, name in zip(settings.task_weights, (DETECTION, SEPARATION,
                                                                                      SEGMENTATION)))
    return {"loss": total, **terms}


class LazyRecipe(Recipe):
    """One stage: strong and weak crops in every step, one AdamW over the whole multi-task network."""

    NAME = NAME
    DEFAULTS: dict[str, float | int] = {
        "weak_fraction": 0.5,            # share of each batch drawn from weak (box-only) cases
        "detection_weight": 1.0,         # task weights lambda_t
        "separation_weight": 1.0,
        "segmentation_weight": 1.0,
        "lesion_class_weight": 3.0,      # background and organ weigh 1 (detection and segmentation CE)
        "interface_class_weight": 10.0,  # non-interface weighs 1 (separation CE)
        "organ_shrink": 0.5,             # inner ellipse of a box = inscribed ellipse scaled by this
        "lesion_shrink": 0.6,
        "background_margin": 2.0,        # pixels around the boxes left unknown (perturbed / resampled boxes)
        "mask_margin": 3.0,              # pixels eroded from each class of a strong mask
        "interface_radius": 2.0,         # pixels: how close two lesion instances must come to touch
        "rough_from_mask": 1,            # 1: strong crops' rough regions from their masks, 0: from their boxes
    }

    def settings(self, config: "TrainConfig") -> LazySettings:
        """The hyperparameters a training step needs, from the run's options."""
        value = lambda key: float(self.option(config, key))  # noqa: E731
        return LazySettings(
            task_weights=(value("detection_weight"), value("separation_weight"), value("segmentation_weight")),
            lesion_class_weight=value("lesion_class_weight"),
            interface_class_weight=value("interface_class_weight"),
            organ_shrink=value("organ_shrink"), lesion_shrink=value("lesion_shrink"),
            background_margin=value("background_margin"), mask_margin=value("mask_margin"),
            interface_radius=value("interface_radius"), rough_from_mask=bool(int(self.option(config, "rough_from_mask"))),
        )

    def build(self, config: "TrainConfig") -> nn.ModuleDict:
        network = MultiTaskUNet(MultiTaskUNetConfig(base_channels=config.base_channels, depth=config.depth))
        return nn.ModuleDict({"network": network})

    def batch_sizes(self, stage: str, config: "TrainConfig") -> dict[str, int]:
        return mixed_batch_sizes(config.batch_size, float(self.option(config, "weak_fraction")))

    @staticmethod
    def losses(network: nn.Module, batches: Mapping[str, Batch], settings: LazySettings) -> dict[str, torch.Tensor]:
        """One forward pass over the concatenated strong and weak crops (shared BatchNorm statistics, as the paper
        trains on mixed batches) and the three gated task losses."""
        images, targets = task_targets(batches, settings)
        return multi_task_losses(network(images), targets, settings)

    def train_step(self, stage: str, modules: Mapping[str, nn.Module], batches: Mapping[str, Batch],
                   optimizers: Mapping[str, torch.optim.Optimizer], config: "TrainConfig") -> dict[str, float]:
        losses = self.losses(modules["network"], batches, self.settings(config))
        optimizer = optimizers["all"]
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {name: float(value.detach()) for name, value in losses.items()}

    def segmentation_network(self, modules: nn.ModuleDict) -> nn.Module:
        """Encoder, shared path, segmentation path and head: no detection head, no separation branch."""
        return unwrap(modules["network"]).segmenter


RECIPE = LazyRecipe()
