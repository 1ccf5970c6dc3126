"""What segmenting one scan gives a caller: :class:`Result` (labels on the input grid, its affine, the stats), and
:func:`segment_to_result`, which builds one from anything that can segment a scan."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mixsup.clients.protocol import LESION_LABEL, ORGAN_LABEL
from mixsup.clients.stats import SegmentationStats, segmentation_stats
from mixsup.readers import read_scan
from mixsup.scan import Scan


@dataclass(frozen=True, eq=False)
class Result:
    """The segmentation of one scan, on the scan's exact stored grid.

    ``labels`` is uint8 with the scan's voxel shape (0 background, 1 liver, 2 lesion) and ``affine`` the scan's
    voxel-to-RAS affine, so ``nibabel.Nifti1Image(result.labels, result.affine)`` overlays the scan in any viewer.
    ``probabilities`` (float32 ``[C, i, j, k]``, raw: before post-processing) is there only when asked for.
    ``seconds`` is the wall time of the whole call (pre-processing, server, post-processing, stats).
    """

    labels: np.ndarray
    affine: np.ndarray
    stats: SegmentationStats
    probabilities: np.ndarray | None = None
    model: str = ""
    postprocessed: bool = True
    seconds: float = 0.0

    @classmethod
    def build(
        cls,
        scan: Scan,
        labels: np.ndarray,
        probabilities: np.ndarray | None = None,
        model: str = "",
        postprocessed: bool = True,
        started: float | None = None,
    ) -> "Result":
        """A :class:`Result` for ``labels`` on ``scan``'s grid, with its stats; ``started`` is a perf_counter."""
        affine = np.array(scan.affine, dtype=np.float64)
        stats = segmentation_stats(labels, affine, ORGAN_LABEL, LESION_LABEL)
        seconds = 0.0 if started is None else time.perf_counter() - started
        return cls(labels, affine, stats, probabilities, model, postprocessed, seconds)


ScanSource = Scan | str | os.PathLike
"""A scan, or the path of one: a NIfTI file or DICOM (a series folder, a .zip of one, or a file)."""


def as_scan(scan: ScanSource) -> Scan:
    """``scan`` itself, or the scan read from that path (:func:`mixsup.readers.read_scan`; bad input raises
    :class:`~mixsup.errors.InputError`)."""
    return scan if isinstance(scan, Scan) else read_scan(scan)


class ScanSegmenter(Protocol):
    """What :func:`segment_to_result` needs: :class:`~mixsup.clients.client.SegmentationClient` has it, and so
    can a stand-in in a test."""

    model: str

    def segment_scan(self, scan: Scan, postprocess: bool = True) -> np.ndarray: ...

    def segment_scan_with_probabilities(
        self, scan: Scan, postprocess: bool = True
    ) -> tuple[np.ndarray, np.ndarray]: ...


def segment_to_result(
    segmenter: ScanSegmenter, scan: Scan, postprocess: bool = True, probabilities: bool = False
) -> Result:
    """Segment ``scan`` with ``segmenter`` and wrap the answer in a :class:`Result`."""
    started = time.perf_counter()
    if probabilities:
        labels, probability_map = segmenter.segment_scan_with_probabilities(scan, postprocess=postprocess)
    else:
        labels, probability_map = segmenter.segment_scan(scan, postprocess=postprocess), None
    return Result.build(scan, labels, probability_map, segmenter.model, postprocess, started)
