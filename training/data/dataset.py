"""2.5D training samples: 3-slice stacks and their centre-slice labels, cropped and augmented.

Volumes are held in memory at the model's in-plane spacing (the same :func:`mixsup.resample.resample_inplane`
the client uses), as int16, so an epoch costs one crop + one affine warp per sample. Augmentations are wide on
purpose: the bundled model must generalise to CT it has never seen (other scanners, contrast phases, noise,
body sizes, orientations).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from mixsup.resample import inplane_shape, resample_inplane
from mixsup.training.data.manifest import Case, load_case

AIR_HU = -1024


@dataclass
class Volume:
    """One case at the model's spacing: HU [D,H,W] int16, labels [D,H,W] uint8, and slices worth sampling."""

    hu: np.ndarray
    labels: np.ndarray
    foreground_slices: np.ndarray
    case: str = ""


def load_volume(case: Case, spacing_mm: Sequence[float]) -> Volume:
    """Read a labelled case and bring it in-plane to ``spacing_mm``."""
    hu, labels, spacing = load_case(case)
    if labels is None:
        raise ValueError(f"case {case.case} has no mask")
    out_hw = inplane_shape(hu.shape[1:], spacing[1:], spacing_mm)
    hu = resample_inplane(hu.astype(np.float32), out_hw, order=1)
    hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    labels = resample_inplane(labels, out_hw, order=0)
    foreground = np.flatnonzero(labels.reshape(labels.shape[0], -1).max(axis=1) > 0)
    return Volume(hu=hu, labels=labels, foreground_slices=foreground, case=case.case)


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms; ``Augmentation.none()`` turns them all off (validation)."""

    scale: tuple[float, float] = (0.75, 1.35)
    rotate_deg: float = 20.0
    flip_lr: float = 0.3
    flip_ap: float = 0.1
    reverse_slices: float = 0.5
    hu_scale: tuple[float, float] = (0.85, 1.2)
    hu_shift: tuple[float, float] = (-40.0, 40.0)
    noise_std: tuple[float, float] = (0.0, 25.0)
    blur_sigma: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(scale=(1.0, 1.0), rotate_deg=0.0, flip_lr=0.0, flip_ap=0.0, reverse_slices=0.0,
                   hu_scale=(1.0, 1.0), hu_shift=(0.0, 0.0), noise_std=(0.0, 0.0), blur_sigma=(0.0, 0.0))


def stack_indices(depth: int, center: int, context_slices: int) -> np.ndarray:
    """Indices of the slices stacked around ``center``, edge slices replicated (as the serving tiler does)."""
    half = context_slices // 2
    return np.clip(np.arange(center - half, center + half + 1), 0, depth - 1)


def warp_crop(image: np.ndarray, labels: np.ndarray, center_yx: Sequence[float], crop: int,
              rng: np.random.Generator, aug: Augmentation) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``crop x crop`` around ``center_yx`` with random scale, rotation and flips in one affine warp."""
    scale = rng.uniform(*aug.scale)
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    if rng.random() < aug.flip_ap:
        matrix[:, 0] *= -1
    if rng.random() < aug.flip_lr:
        matrix[:, 1] *= -1
    half = (crop - 1) / 2.0
    offset = np.asarray(center_yx, dtype=np.float64) - matrix @ np.array([half, half])
    warped = np.empty((image.shape[0], crop, crop), dtype=np.float32)
    for channel in range(image.shape[0]):
        ndimage.affine_transform(image[channel], matrix, offset=offset, output_shape=(crop, crop),
                                 output=warped[channel], order=1, mode="constant", cval=AIR_HU, prefilter=False)
    warped_labels = ndimage.affine_transform(labels, matrix, offset=offset, output_shape=(crop, crop),
                                             order=0, mode="constant", cval=0, prefilter=False)
    return warped, warped_labels


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
    """Draws random augmented 2.5D crops from in-memory volumes; ``foreground_fraction`` of them on organ slices."""

    volumes: list[Volume]
    crop: int
    context_slices: int = 3
    foreground_fraction: float = 0.8
    augmentation: Augmentation = field(default_factory=Augmentation)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        volume = self.volumes[rng.integers(len(self.volumes))]
        depth, height, width = volume.hu.shape
        on_organ = len(volume.foreground_slices) > 0 and rng.random() < self.foreground_fraction
        z = int(rng.choice(volume.foreground_slices)) if on_organ else int(rng.integers(depth))
        if on_organ:
            ys, xs = np.nonzero(volume.labels[z])
            pick = rng.integers(len(ys))
            center = (ys[pick] + rng.normal(0, self.crop / 6), xs[pick] + rng.normal(0, self.crop / 6))
        else:
            center = (rng.uniform(0, height), rng.uniform(0, width))
        indices = stack_indices(depth, z, self.context_slices)
        if rng.random() < self.augmentation.reverse_slices:
            indices = indices[::-1]
        image, labels = warp_crop(volume.hu[indices].astype(np.float32), volume.labels[z], center, self.crop,
                                  rng, self.augmentation)
        return perturb_intensity(image, rng, self.augmentation), labels

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self.sample(rng) for _ in range(batch_size)))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels).astype(np.int64))
