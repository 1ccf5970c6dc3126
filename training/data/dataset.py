"""2.5D training samples: 3-slice stacks and their centre-slice labels, cropped and augmented.

Volumes are held in memory at the model's in-plane spacing (the same :func:`mixsup.resample.resample_inplane`
the client uses), as int16, so an epoch costs one crop + one affine warp per sample. Augmentations are wide on
purpose: the bundled model must generalise to CT it has never seen (other scanners, contrast phases, noise,
body sizes, orientations).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from scipy import ndimage

from mixsup.resample import inplane_shape, resample_inplane
from mixsup.scan import to_int16_hu
from mixsup.stacks import AIR_HU, slice_stack_indices
from mixsup.training.data.boxes import Box, boxes_to_mask
from mixsup.training.data.lesion_synthesis import LesionSynthesis, Stack, paste_lesions
from mixsup.training.data.manifest import Case, case_boxes, read_case
from mixsup.training.data.phantoms import LESION, LIVER
from mixsup.training.recipes.base import LESION_BOX, STRONG, UNLABELED, Batch

T = TypeVar("T")


@dataclass
class Volume:
    """One case at the model's spacing, as the samplers use it.

    ``hu`` int16 [D,H,W]; ``labels`` uint8 [D,H,W] for strong cases, else None; ``boxes`` uint8 [2,D,H,W]
    filled organ-box and lesion-box masks (zeros where a case has no boxes); ``soft_labels`` float16 [C,D,H,W]
    pseudo-labels a previous stage wrote, else None; ``instances`` [D,H,W] lesion instance ids (0 elsewhere; in
    the smallest unsigned type that holds them) beside ``labels``, so touching lesions stay apart, else None;
    ``spacing`` the arrays' voxel size (mm, z y x); ``sample_slices`` the slices worth sampling more often
    (those with organ or boxes).
    """

    hu: np.ndarray
    labels: np.ndarray | None
    boxes: np.ndarray
    kind: str = STRONG
    case: str = ""
    soft_labels: np.ndarray | None = None
    instances: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sample_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lesion_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _instance_extents: list[tuple[int, slice]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not len(self.sample_slices):
            self.sample_slices = np.flatnonzero(self.marked(all_classes=True).any(axis=(1, 2)))
        if not len(self.lesion_slices):
            self.lesion_slices = np.flatnonzero(self.marked(all_classes=False).any(axis=(1, 2)))

    def instance_extents(self) -> list[tuple[int, slice]]:
        """Each lesion instance's id and the z range it spans (none without instance ids). Found on first use: only
        runs that draw crops per lesion need it, and it is a pass over the volume."""
        if self._instance_extents is None:
            extents = [] if self.instances is None else ndimage.find_objects(self.instances)
            # ids whose lesion vanished in the in-plane resampling have no extent (None)
            self._instance_extents = [(index + 1, extent[0]) for index, extent in enumerate(extents)
                                      if extent is not None]
        return self._instance_extents

    def marked(self, all_classes: bool, z: int | slice = slice(None)) -> np.ndarray:
        """Where slice(s) ``z`` show organ, lesion or a box (``all_classes``), or only lesion or a lesion box."""
        boxes = self.boxes[:, z] if all_classes else self.boxes[LESION_BOX, z]
        marked = boxes.max(axis=0) > 0 if all_classes else boxes > 0
        if self.labels is not None:
            marked = marked | (self.labels[z] > 0 if all_classes else self.labels[z] == LESION)
        return marked


def box_masks(boxes: Sequence[Box] | None, shape: Sequence[int]) -> np.ndarray:
    """uint8 [2,D,H,W]: filled organ-box and lesion-box masks on the canonical grid of ``shape``."""
    if not boxes:
        return np.zeros((2, *shape), dtype=np.uint8)
    return np.stack([boxes_to_mask(boxes, shape, LIVER), boxes_to_mask(boxes, shape, LESION)]).astype(np.uint8)


def load_volume(case: Case, spacing_mm: Sequence[float], anti_aliasing: bool = True) -> Volume:
    """Read a case of any supervision kind and bring it in-plane to ``spacing_mm`` (the image smoothed before
    downsampling if ``anti_aliasing``: :func:`mixsup.resample.resample_inplane`).

    Strong cases keep their mask, weak cases their boxes, unlabeled cases only the image. Boxes are rasterised
    on the scan's grid and resampled with the image, so they stay aligned at any spacing. Lesion instances go with
    the mask (from the case's instances file, else the connected components of its lesions).
    """
    data = read_case(case, with_instances=case.supervision == STRONG)
    hu, labels, spacing, instances = data.volume, data.labels, data.spacing, data.instances
    kind = case.supervision
    if kind != STRONG:
        labels = instances = None
    boxes = case_boxes(case, labels, hu.shape) if kind != UNLABELED else None
    masks = box_masks(boxes, hu.shape)
    out_hw = inplane_shape(hu.shape[1:], spacing[1:], spacing_mm)
    hu = to_int16_hu(resample_inplane(hu.astype(np.float32), out_hw, order=1, anti_aliasing=anti_aliasing))
    labels, instances = (None if a is None else resample_inplane(a, out_hw, order=0) for a in (labels, instances))
    return Volume(hu=hu, labels=labels, boxes=resample_inplane(masks, out_hw, order=0), kind=kind, case=case.case,
                  instances=None if instances is None else compact_ids(instances),
                  spacing=(float(spacing[0]), *map(float, spacing_mm)))


def compact_ids(ids: np.ndarray) -> np.ndarray:
    """Non-negative integer ids in the smallest unsigned type that holds the largest (uint8 for a case's few
    lesions): the training set lives in memory, and int32 instances were 4 of its 9 bytes per voxel."""
    return ids.astype(np.min_scalar_type(int(ids.max(initial=0))), copy=False)


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms; ``Augmentation.none()`` turns them all off (validation)."""

    scale: tuple[float, float] = (0.75, 1.35)
    rotate_deg: float = 20.0
    # No in-plane flips: Scan.canonical() puts every truthful affine's anatomy on the same side, and the liver
    # being on the patient's right is what tells it from the spleen (flips at p=0.3 made the bundled model
    # segment a spleen bigger than a small liver, measured on a 40x256x256 phantom: liver Dice 0.02).
    flip_lr: float = 0.0
    flip_ap: float = 0.0
    reverse_slices: float = 0.5
    hu_scale: tuple[float, float] = (0.85, 1.2)
    hu_shift: tuple[float, float] = (-40.0, 40.0)
    noise_std: tuple[float, float] = (0.0, 25.0)
    blur_sigma: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(scale=(1.0, 1.0), rotate_deg=0.0, flip_lr=0.0, flip_ap=0.0, reverse_slices=0.0,
                   hu_scale=(1.0, 1.0), hu_shift=(0.0, 0.0), noise_std=(0.0, 0.0), blur_sigma=(0.0, 0.0))


def random_crop_transform(center_yx: Sequence[float], crop: int, rng: np.random.Generator,
                          aug: Augmentation) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset (scipy's output -> input convention) of a ``crop x crop`` window around ``center_yx``
    with random scale, rotation and flips."""
    scale = rng.uniform(*aug.scale)
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    if rng.random() < aug.flip_ap:
        matrix[:, 0] *= -1
    if rng.random() < aug.flip_lr:
        matrix[:, 1] *= -1
    half = (crop - 1) / 2.0
    return matrix, np.asarray(center_yx, dtype=np.float64) - matrix @ np.array([half, half])


def warp_channels(channels: np.ndarray, transform: tuple[np.ndarray, np.ndarray], crop: int, order: int,
                  fill: float, dtype=np.float32) -> np.ndarray:
    """Apply one crop transform to every channel of [K, H, W] (order 1 for intensities, 0 for labels)."""
    matrix, offset = transform
    out = np.empty((channels.shape[0], crop, crop), dtype=dtype)
    for index in range(channels.shape[0]):
        ndimage.affine_transform(channels[index], matrix, offset=offset, output_shape=(crop, crop),
                                 output=out[index], order=order, mode="constant", cval=fill, prefilter=False)
    return out


def perturb_intensity(image: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """Scanner / contrast-phase variation: linear HU change of tissue, blur, then noise."""
    tissue = image > -500  # keep air at air so the body outline stays sharp
    image = np.where(tissue, image * rng.uniform(*aug.hu_scale) + rng.uniform(*aug.hu_shift), image)
    sigma = rng.uniform(*aug.blur_sigma)
    if sigma > 0.2:
        image = ndimage.gaussian_filter(image, sigma=(0, sigma, sigma))
    noise = rng.uniform(*aug.noise_std)
    if noise > 0:
        image = image + rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return image.astype(np.float32)


@dataclass
class SliceSampler:
    """Draws random augmented 2.5D crops from in-memory volumes of one supervision kind.

    ``lesion_fraction`` of the crops are centred near a lesion pixel (mask, or lesion box of a weak case) of a
    volume that has one: lesions are a small share of the voxels and would otherwise be seen rarely (nnU-Net
    forces a third of its crops onto foreground for the same reason). ``lesion_instance_fraction`` of those are
    centred on one lesion instance drawn uniformly among the volume's (where it has instance ids), the others on a
    lesion slice drawn uniformly: by slice, a 30 mm lesion spanning ten slices gets ten times the crops of a 5 mm
    one on a single slice, and its pixels outnumber the small one's on a shared slice. Of the rest,
    ``foreground_fraction`` are centred near any marked pixel (organ, lesion or box), the others anywhere (the only
    crops of slices without the organ). One random geometry is applied to the image, labels, box masks and soft
    labels alike.
    """

    volumes: list[Volume]
    crop: int
    context_slices: int = 3
    foreground_fraction: float = 0.8
    lesion_fraction: float = 1.0 / 3.0
    lesion_instance_fraction: float = 0.0
    augmentation: Augmentation = field(default_factory=Augmentation)
    lesion_synthesis: LesionSynthesis = field(default_factory=LesionSynthesis)

    def _center(self, volume: Volume, rng: np.random.Generator) -> tuple[int, tuple[float, float]]:
        depth, height, width = volume.hu.shape
        draw = rng.random()
        for slices, all_classes, fraction in ((volume.lesion_slices, False, self.lesion_fraction),
                                              (volume.sample_slices, True, self.foreground_fraction)):
            if len(slices) and draw < fraction:
                z, marked = self._marked_slice(volume, slices, all_classes, rng)
                ys, xs = np.nonzero(marked)
                pick = rng.integers(len(ys))
                return z, (ys[pick] + rng.normal(0, self.crop / 6), xs[pick] + rng.normal(0, self.crop / 6))
            draw = rng.random()
        return int(rng.integers(depth)), (rng.uniform(0, height), rng.uniform(0, width))

    def _marked_slice(self, volume: Volume, slices: np.ndarray, all_classes: bool,
                      rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """A slice to centre a crop on and the pixels to centre it near: for a lesion crop, at
        ``lesion_instance_fraction``, a slice of one lesion drawn uniformly among the volume's and that lesion's
        pixels on it; otherwise a slice drawn from ``slices`` and its marked pixels (``Volume.marked``)."""
        # the extra draw only when the option is on, so runs without it keep their random stream
        if not all_classes and self.lesion_instance_fraction > 0 and volume.instance_extents() \
                and rng.random() < self.lesion_instance_fraction:
            extents = volume.instance_extents()
            lesion_id, z_range = extents[rng.integers(len(extents))]
            z = int(rng.integers(z_range.start, z_range.stop))
            pixels = volume.instances[z] == lesion_id
            if pixels.any():  # the drawn slice of its z range can miss it: a lesion need not be convex
                return z, pixels
        z = int(rng.choice(slices))
        return z, volume.marked(all_classes, z)

    def _stack(self, volume: Volume, z: int, indices: np.ndarray, center: tuple[float, float],
               rng: np.random.Generator) -> Stack:
        """The unwarped sample around slice ``z``: image, labels, boxes, instances; synthetic lesions pasted into
        a strong volume's liver at ``lesion_synthesis.probability`` (the draw is skipped when it is 0, so runs
        without it keep their random stream)."""
        stack = Stack(volume.hu[indices].astype(np.float32), None if volume.labels is None else volume.labels[indices],
                      volume.boxes[:, z], None if volume.instances is None else volume.instances[z])
        synthesis = self.lesion_synthesis
        if stack.labels is None or synthesis.probability <= 0 or rng.random() >= synthesis.probability:
            return stack
        offsets_mm = (np.asarray(indices) - z) * volume.spacing[0]
        return paste_lesions(stack, center, self.crop * 0.4, offsets_mm, volume.spacing[1:], rng, synthesis)

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        volume = self.volumes[rng.integers(len(self.volumes))]
        z, center = self._center(volume, rng)
        indices = slice_stack_indices(volume.hu.shape[0], self.context_slices)[z]
        if rng.random() < self.augmentation.reverse_slices:
            indices = indices[::-1]
        transform = random_crop_transform(center, self.crop, rng, self.augmentation)
        stack = self._stack(volume, z, indices, center, rng)
        image = warp_channels(stack.hu, transform, self.crop, 1, AIR_HU)
        crop = {"images": perturb_intensity(image, rng, self.augmentation),
                "boxes": warp_channels(stack.boxes, transform, self.crop, 0, 0)}
        if stack.labels is not None:
            centre = len(indices) // 2
            crop["labels"] = warp_channels(stack.labels[centre][None], transform, self.crop, 0, 0, np.uint8)[0]
        if stack.instances is not None:
            crop["instances"] = warp_channels(stack.instances[None], transform, self.crop, 0, 0, np.int32)[0]
        if volume.soft_labels is not None:
            soft = warp_channels(volume.soft_labels[:, z].astype(np.float32), transform, self.crop, 1, 0)
            soft[0] += 1.0 - soft.sum(axis=0)  # outside the scan is background; keeps each pixel summing to 1
            crop["soft_labels"] = soft
        return crop

    def batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        crops = [self.sample(rng) for _ in range(batch_size)]
        # a key only some crops have (instances of volumes built without them) is left out: None means "unknown"
        shared = [key for key in crops[0] if all(key in c for c in crops)]
        stacked = {key: torch.from_numpy(np.stack([c[key] for c in crops])) for key in shared}
        labels, instances = stacked.get("labels"), stacked.get("instances")
        return Batch(kind=self.volumes[0].kind, images=stacked["images"], boxes=stacked["boxes"],
                     labels=None if labels is None else labels.long(), soft_labels=stacked.get("soft_labels"),
                     instances=None if instances is None else instances.long())


def produced_ahead(produce: Callable[[], T], count: int) -> Iterator[T]:
    """``produce()`` ``count`` times, in order, each call made in one worker thread while the caller still works on
    the previous result: the next batch is cropped and warped while the network trains on this one.

    The calls run one at a time and in the same order as a plain loop, so a generator they share draws the same
    numbers; and no call is made beyond ``count``, so at the end its state is the plain loop's (a checkpoint saved
    after an epoch resumes the same run).
    """
    if count <= 0:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") as worker:
        pending = worker.submit(produce)
        for index in range(count):
            result = pending.result()
            if index + 1 < count:
                pending = worker.submit(produce)
            yield result
