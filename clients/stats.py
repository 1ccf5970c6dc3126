"""What a radiologist reads off a liver / lesion label map: volumes, lesion count and sizes, tumour burden.

* The **liver** is the organ with its lesions (labels 1 and 2): that is the organ a radiologist measures, and the
  denominator of the tumour burden. The parenchyma alone (label 1) is reported beside it.
* **Lesions** are the 26-connected components of label 2 (cc3d), as the post-processing counts components: two
  lesion voxels touching only at a corner are one lesion.
* **Tumour burden** = total lesion volume / liver volume (LiTS's definition), a fraction in [0, 1]; None when no
  liver was found.

Volumes come from the voxel size of the label map's own affine, so they are right on any grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cc3d
import numpy as np

from mixsup.metrics import voxel_volume_ml
from mixsup.postprocess import bounding_box

#: Corner neighbours count, as in :mod:`mixsup.postprocess`: one lesion is not split by a diagonal step.
LESION_CONNECTIVITY = 26


@dataclass(frozen=True)
class Lesion:
    """One connected lesion. ``centroid_ijk`` indexes the label map's stored grid; ``centroid_ras_mm`` is where
    that is in the patient (RAS+ mm, the affine's world)."""

    volume_ml: float
    voxels: int
    centroid_ijk: tuple[float, float, float]
    centroid_ras_mm: tuple[float, float, float]


@dataclass(frozen=True)
class SegmentationStats:
    """Volumes in mL of one label map; lesions largest first."""

    liver_ml: float
    parenchyma_ml: float
    lesion_ml: float
    lesion_count: int
    tumour_burden: float | None
    voxel_ml: float
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists, not tuples), with the definitions a reader of the file needs."""
        data = asdict(self)
        data["lesions"] = [asdict(lesion) for lesion in self.lesions]
        data["definitions"] = {
            "liver_ml": "liver including its lesions (labels 1 and 2)",
            "parenchyma_ml": "liver without lesions (label 1)",
            "lesions": f"{LESION_CONNECTIVITY}-connected components of label 2, largest first",
            "tumour_burden": "lesion_ml / liver_ml",
        }
        return data


def segmentation_stats(
    labels: np.ndarray, affine: np.ndarray, organ_label: int = 1, lesion_label: int = 2
) -> SegmentationStats:
    """The :class:`SegmentationStats` of a 3D ``labels`` map whose voxel-to-world transform is ``affine`` (mm)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"segmentation_stats expects a 3D label map, got shape {labels.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = voxel_volume_ml(affine)
    lesion_mask = labels == lesion_label
    parenchyma_voxels = int(np.count_nonzero(labels == organ_label))
    lesions = _lesions(lesion_mask, affine, voxel_ml)
    lesion_ml = sum(lesion.volume_ml for lesion in lesions)
    liver_ml = (parenchyma_voxels + int(np.count_nonzero(lesion_mask))) * voxel_ml
    return SegmentationStats(
        liver_ml=liver_ml,
        parenchyma_ml=parenchyma_voxels * voxel_ml,
        lesion_ml=lesion_ml,
        lesion_count=len(lesions),
        tumour_burden=lesion_ml / liver_ml if liver_ml > 0 else None,
        voxel_ml=voxel_ml,
        lesions=tuple(lesions),
    )


def _lesions(mask: np.ndarray, affine: np.ndarray, voxel_ml: float) -> list[Lesion]:
    if not mask.any():
        return []
    # Components are found inside the lesions' bounding box (the same components, a fraction of a CT volume);
    # centroids are shifted back to the volume's voxel indices.
    box = bounding_box(mask)
    components = cc3d.connected_components(mask[box], connectivity=LESION_CONNECTIVITY, binary_image=True)
    statistics = cc3d.statistics(components)
    # Index 0 is the background component.
    counts = np.asarray(statistics["voxel_counts"])[1:]
    centroids = np.asarray(statistics["centroids"], dtype=np.float64)[1:] + [axis.start for axis in box]
    lesions = []
    for index in np.argsort(-counts, kind="stable"):
        voxels = int(counts[index])
        ijk = centroids[index]
        ras = affine[:3, :3] @ ijk + affine[:3, 3]
        lesions.append(Lesion(
            volume_ml=voxels * voxel_ml,
            voxels=voxels,
            centroid_ijk=tuple(round(float(v), 2) for v in ijk),
            centroid_ras_mm=tuple(round(float(v), 2) for v in ras),
        ))
    return lesions


def describe(stats: SegmentationStats) -> str:
    """One line for a terminal: ``liver 1520.3 mL, 2 lesions 14.1 mL (burden 0.93 %)``."""
    plural = "lesion" if stats.lesion_count == 1 else "lesions"
    text = f"liver {stats.liver_ml:.1f} mL, {stats.lesion_count} {plural} {stats.lesion_ml:.1f} mL"
    if stats.tumour_burden is not None:
        text += f" (burden {100 * stats.tumour_burden:.2f} %)"
    return text
