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
  (the box's inscribed ellipse scaled by ``lesion_shrink``) is lesion; inside the organ box a small *organ core*
  — the inscribed ellipse scaled by ``organ_core_radius``, centred at ``organ_core`` (y, x) box half sides from
  the box's centre: vertically centred, toward the patient's right (the liver's right lobe) — minus the lesion
  boxes, is organ; everything farther than ``background_margin`` pixels from any box is background (the organ
  box circumscribes organ ∪ lesion on its slice, so that is certain); the rest of the boxes is unknown. Ellipses
  come from each box component's second moments (:func:`placed_ellipses`), so they follow the sampler's
  rotations. An organ box cut by the crop border on a side its core depends on gets no core (its extent is
  unknown); lesion boxes that overlap merge into one component (box masks keep no instance identity).

  Why not the box's centred inscribed ellipse (the rule before): a liver slice is not an ellipse centred in its
  box — the box's centre often lies in the notch by the IVC and spine, or between two lobes. Measured as the share
  of organ / lesion rough pixels whose true label differs, on training crops of phantoms with boxes derived from
  their masks (``phantom_box_crops`` and ``wrong_label_fractions`` in tests/test_recipe_lazy.py; 12 phantoms of
  ``case_seed(0, i)``, 400 crops, the trainer's augmentation):

  ====================================  ==================================  ==================================
  rule                                  tiny preset (12x64x64, 3.2 mm, 48)  default (16x256x256, 1.6 mm, 128)
  ====================================  ==================================  ==================================
  centred ellipse, organ 0.5, les. 0.6  organ 19.2 %, lesion 5.4 %, 16.5 %  organ 22.0 %, lesion 15.4 %, 21.0 %
  organ core + lesion 0.3 (this rule)   organ 1.6 %, lesion 1.2 %, 1.4 %    organ 0.8 %, lesion 6.8 %, 2.8 %
  ====================================  ==================================  ==================================

  (the last figure of each cell is both classes together). A smaller centred ellipse does not help (organ shrink
  0.15: still 21 % wrong on full slices); the core keeps about 1/10 of the old organ pixels. The residual lesion
  error comes from slices where overlapping lesions share one box and from crescent-shaped lesion slices; with
  dataset seed 1 the same default-size measurement gives lesion 0.5 %, organ 2.0 %. Reproduce with
  ``.venv/bin/python -c "import sys; sys.path[:0] = ['tests']; import test_recipe_lazy as t;
  print(t.wrong_label_fractions(t.phantom_box_crops((16, 256, 256), 1.6, 128)))"``.
* strong crops (``rough_from_mask`` = 1, the default), from their masks (:func:`rough_regions_from_mask`):
  every class region eroded by ``mask_margin`` pixels (less for thin components, which keep their core) — an
  always-correct rough label, like a scribble by someone who knows the answer. With ``rough_from_mask`` = 0
  strong crops use their box-derived rough regions like weak ones.

Interfaces (:func:`interface_map`): lesion instances are the batch's ``instances`` — the phantoms record one id
per lesion (``instances-N.nii.gz``), so touching and overlapping lesions get an interface — or, where a case has
none (real LiTS), the 8-connected components of the strong mask, in which touching lesions are one instance and
never get one; a lesion pixel is an interface pixel when a pixel of a *different*
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

from mixsup.training.data.manifest import lesion_components
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
    network_size,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from mixsup.training.trainer import TrainConfig

NAME = "lazy"
BACKGROUND, ORGAN, LESION = 0, 1, 2
#: Where a box's organ core sits, in units of the box's half sides (y, x): vertically centred, toward the image's
#: left edge (canonical W runs patient right -> left, so that is the patient's right, the liver's right lobe).
ORGAN_CORE = (0.0, -0.55)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ------------------------------------------------------------------------------------------ lazy labels
def placed_ellipses(region: np.ndarray, shrink: float, offset: tuple[float, float] = (0.0, 0.0),
                    skip_cut: bool = False) -> np.ndarray:
    """Boolean [h, w]: in every 8-connected component of ``region`` (a filled box, possibly rotated), the box's
    inscribed ellipse scaled by ``shrink`` and moved by ``offset`` (y, x) in units of the box's half sides.

    The box comes from the component's second moments: a rectangle of half sides ``a, b`` has coordinate variances
    ``a²/3, b²/3`` (a pixel counts as a unit square, hence the ``+1/12``), so its inscribed ellipse is Mahalanobis
    distance² <= 3, and ``sqrt(3) * sqrtm(covariance) @ offset`` is the offset in pixels (exact for an upright box;
    under the sampler's rotation by θ the offset turns by -θ with it). The result is clipped to the component; a
    one-pixel component keeps its pixel when it is the core's centre.

    ``skip_cut`` leaves out components that touch the crop border on a side the core's position depends on: both
    sides of an axis whose offset is 0, the side the offset points to otherwise (a box cut on the far side only
    puts its core nearer the edge it is anchored to). A cut box's visible part has another centre and size than
    the box, so a core placed in it would land off target.
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
    syy = np.bincount(ids, (ys - cy[ids]) ** 2, count) / pixels + 1.0 / 12.0
    sxx = np.bincount(ids, (xs - cx[ids]) ** 2, count) / pixels + 1.0 / 12.0
    sxy = np.bincount(ids, (ys - cy[ids]) * (xs - cx[ids]), count) / pixels
    determinant = syy * sxx - sxy**2  # > 0: both variances are at least 1/12
    # sqrtm of a 2x2 SPD matrix M is (M + sqrt(det) I) / sqrt(trace + 2 sqrt(det)).
    root_det = np.sqrt(determinant)
    norm = np.sqrt(3.0) / np.sqrt(syy + sxx + 2.0 * root_det)
    oy, ox = offset
    py = cy + norm * ((syy + root_det) * oy + sxy * ox)
    px = cx + norm * (sxy * oy + (sxx + root_det) * ox)
    dy, dx = ys - py[ids], xs - px[ids]
    distance2 = (sxx[ids] * dy * dy - 2.0 * sxy[ids] * dy * dx + syy[ids] * dx * dx) / determinant[ids]
    keep = distance2 <= 3.0 * shrink**2
    if skip_cut:
        keep &= ~cut_components(components, offset)[ids]
    inside[ys[keep], xs[keep]] = True
    return inside


def cut_components(components: np.ndarray, offset: tuple[float, float]) -> np.ndarray:
    """Boolean [count]: which components of a label image touch the border on a side a core placed at ``offset``
    (see :func:`placed_ellipses`) depends on."""
    count = int(components.max())
    cut = np.zeros(count + 1, dtype=bool)
    for axis, shift in enumerate(offset):
        low, high = np.take(components, 0, axis=axis), np.take(components, -1, axis=axis)
        for edge, matters in ((low, shift <= 0), (high, shift >= 0)):
            if matters:
                cut[edge] = True
    return cut[1:]


def rough_regions_from_boxes(organ_box: np.ndarray, lesion_box: np.ndarray,
                             organ_core: tuple[float, float] = ORGAN_CORE, organ_core_radius: float = 0.25,
                             lesion_shrink: float = 0.3, background_margin: float = 2.0) -> np.ndarray:
    """Rough inner regions of one crop from its filled box masks [h, w]: int64 [h, w] with 0 background,
    1 organ, 2 lesion and :data:`IGNORE_INDEX` (unknown) — see the module docstring for the rule and why."""
    organ_box, lesion_box = np.asarray(organ_box, bool), np.asarray(lesion_box, bool)
    boxed = organ_box | lesion_box
    target = np.full(organ_box.shape, IGNORE_INDEX, dtype=np.int64)
    if boxed.any():
        # distance_transform_edt measures each non-box pixel's distance to the nearest box pixel.
        target[ndimage.distance_transform_edt(~boxed) > background_margin] = BACKGROUND
    else:
        target[:] = BACKGROUND
    target[placed_ellipses(organ_box, organ_core_radius, organ_core, skip_cut=True) & ~lesion_box] = ORGAN
    target[placed_ellipses(lesion_box, lesion_shrink)] = LESION
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
                            lesion_shrink: float = 0.3) -> np.ndarray:
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


def interface_map(labels: np.ndarray, radius: float = 2.0, lesion: int = LESION,
                  instances: np.ndarray | None = None) -> np.ndarray:
    """int64 [h, w]: 1 on lesion pixels with a pixel of another lesion instance within ``radius``, else 0.

    Instances are ``instances`` [h, w] (ids, 0 outside lesions) where known — the phantoms record one id per
    lesion, so lesions that touch or overlap have an interface — else the 8-connected components of
    ``labels == lesion``, in which touching lesions are one instance and never get one. A pixel is on an interface
    exactly when the instance ids in its disk are not all equal: the disk's largest id (background 0 never wins)
    differs from its smallest (background counted as +inf).
    """
    lesions = np.asarray(labels) == lesion
    ids = lesion_components(labels, lesion) if instances is None else np.where(lesions, instances, 0)
    if np.unique(ids[lesions]).size < 2:
        return np.zeros(lesions.shape, dtype=np.int64)
    footprint = disk(radius)
    largest = ndimage.maximum_filter(ids, footprint=footprint, mode="constant", cval=0)
    none = int(ids.max()) + 1
    smallest = ndimage.minimum_filter(np.where(ids > 0, ids, none), footprint=footprint, mode="constant", cval=none)
    return ((ids > 0) & (largest != smallest)).astype(np.int64)


# ------------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class LazySettings:
    """The method's hyperparameters that a training step needs, read from a run's options by
    :meth:`LazyRecipe.settings`."""

    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # detection, separation, segmentation
    lesion_class_weight: float = 3.0
    interface_class_weight: float = 10.0
    organ_shrink: float = 0.5
    lesion_shrink: float = 0.3
    organ_core: tuple[float, float] = ORGAN_CORE
    organ_core_radius: float = 0.25
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


def crop_targets(boxes: np.ndarray, labels: np.ndarray | None, settings: LazySettings,
                 instances: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rough regions, interfaces, mask)`` int64 [h, w] of one crop from its box masks [2, h, w] and, for a
    strong crop, its labels [h, w] and lesion instances [h, w] if known; a crop without labels gets all-unknown
    interface and mask maps."""
    if labels is not None and settings.rough_from_mask:
        rough = rough_regions_from_mask(labels, settings.mask_margin, settings.organ_shrink, settings.lesion_shrink)
    else:
        rough = rough_regions_from_boxes(boxes[ORGAN_BOX], boxes[LESION_BOX], settings.organ_core,
                                         settings.organ_core_radius, settings.lesion_shrink,
                                         settings.background_margin)
    if labels is None:
        unknown = np.full(rough.shape, IGNORE_INDEX, dtype=np.int64)
        return rough, unknown, unknown.copy()
    return rough, interface_map(labels, settings.interface_radius, instances=instances), labels.astype(np.int64)


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
        instances = batch.instances.cpu().numpy() if kind == STRONG and batch.instances is not None else None
        for index in range(len(batch)):
            maps.append(crop_targets(boxes[index], None if labels is None else labels[index], settings,
                                     None if instances is None else instances[index]))
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
        "organ_shrink": 0.5,             # thin organ / background parts of a strong mask keep this share of their depth
        "lesion_shrink": 0.3,            # lesion core of a box = inscribed ellipse scaled by this (and mask cap)
        "organ_core_y": ORGAN_CORE[0],   # organ core of a box: centre in box half sides, toward the right lobe
        "organ_core_x": ORGAN_CORE[1],
        "organ_core_radius": 0.25,       # ... and its size: the box's inscribed ellipse scaled by this
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
            organ_core=(value("organ_core_y"), value("organ_core_x")), organ_core_radius=value("organ_core_radius"),
            background_margin=value("background_margin"), mask_margin=value("mask_margin"),
            interface_radius=value("interface_radius"), rough_from_mask=bool(int(self.option(config, "rough_from_mask"))),
        )

    def build(self, config: "TrainConfig") -> nn.ModuleDict:
        network = MultiTaskUNet(MultiTaskUNetConfig(**network_size(config)))
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
