"""Post-processing of an organ + inner-lesion label map (the client's last step and the evaluation's).

Rules, in order (``postprocess_labels`` composes them):

1. **One organ.** The organ is ``organ ∪ lesion``: a lesion is part of the liver it sits in, so both labels are
   taken together when looking for connected components. Only the largest 26-connected component is kept;
   everything else (a second liver blob, a lesion floating outside the liver) becomes background.
2. **No holes in the organ.** Background cavities fully enclosed (in 3D) by that component become organ.
   Lesion voxels are never relabelled: a lesion enclosed by liver is a *hole of the liver label* but not of
   ``organ ∪ lesion``, which is why a per-label fill (MONAI's ``FillHoles([1])``) must not be used here -- on a
   512x512x300 phantom it turned 10,748 of 19,665 lesion voxels into liver (DESIGN.md).
3. **No holes in a lesion.** Voxels fully enclosed (in 3D) by lesion become lesion. A radiologist delineates a
   lesion with its necrotic or cystic core (LiTS annotates it so); parenchyma cannot sit sealed inside a tumour,
   so such a core predicted as liver or background is a misclassification of the lesion's inside. This is the only
   rule that creates lesion voxels, and only where lesion encloses them on every side in 3D (a ring that is open
   in any direction, e.g. in the next slice, is left alone).

Labels other than ``organ_label`` and ``lesion_label`` are treated as background. Components and holes come from
``cc3d`` and ``fill_voids``, which did the work 3.8x faster than MONAI's transforms on a full CT volume.
"""
from __future__ import annotations

import cc3d
import fill_voids
import numpy as np

#: Face, edge and corner neighbours: a thin vessel-like bridge of diagonal voxels still connects liver parts.
CONNECTIVITY = 26


def largest_component(mask: np.ndarray, connectivity: int = CONNECTIVITY) -> np.ndarray:
    """The largest connected component of a boolean 3D ``mask`` (all False if the mask is empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    return cc3d.largest_k(mask, k=1, connectivity=connectivity, binary_image=True) > 0


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region of False voxels that does not reach the volume's border set to True (3D)."""
    mask = np.asarray(mask, dtype=bool)
    filled = mask.copy()
    if not mask.any():
        return filled
    # Filling only inside the mask's bounding box gives the same result (everything outside the box is False and
    # reaches the border) at a fraction of the cost for small masks such as lesions.
    box = bounding_box(mask)
    filled[box] = fill_voids.fill(mask[box], in_place=False).astype(bool, copy=False)
    return filled


def lesions_inside_organ(lesion_mask: np.ndarray, organ_mask: np.ndarray) -> np.ndarray:
    """The lesion voxels that lie in ``organ_mask`` (which must include the lesions, i.e. organ ∪ lesion)."""
    return np.logical_and(lesion_mask, organ_mask)


def postprocess_labels(labels: np.ndarray, organ_label: int = 1, lesion_label: int = 2) -> np.ndarray:
    """Apply the module's three rules to a ``[D, H, W]`` label map and return a new ``uint8`` label map."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"postprocess_labels expects a 3D label map, got shape {labels.shape}")
    out = np.zeros_like(labels, dtype=np.uint8)  # the input's memory order (Fortran for a label map to write)
    foreground = (labels == organ_label) | (labels == lesion_label)
    if not foreground.any():
        return out
    # Every rule acts inside the bounding box of organ ∪ lesion: components and holes are the same there as in
    # the whole volume (what lies outside is background connected to the volume's border), at the box's cost.
    box = bounding_box(foreground)
    labels = labels[box]
    lesion = labels == lesion_label
    organ_with_lesions = fill_holes(largest_component(foreground[box]))
    lesion = fill_holes(lesions_inside_organ(lesion, organ_with_lesions))
    inside = out[box]
    inside[organ_with_lesions] = organ_label
    inside[lesion] = lesion_label
    return out
