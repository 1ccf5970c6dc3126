"""The client's pre- and post-processing around the server call: scan grid <-> model grid. No network here.

The server's ``segment`` model takes the canonical ``[D, H, W]`` volume in raw HU at the contract's in-plane
spacing (INT16 to halve the bytes on the wire). :func:`prepare_volume` builds it from a :class:`Scan` and a
:class:`Restore` that remembers the way back; :func:`restore_labels` / :func:`restore_probabilities` bring the
server's answer back onto the scan's stored grid, so a label map has exactly the input's shape and affine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mixsup.contract import ModelContract
from mixsup.errors import MixsupError
from mixsup.labels import decide_labels
from mixsup.postprocess import bounding_box, postprocess_labels
from mixsup.resample import inplane_shape, output_window, resample_inplane, resample_inplane_window
from mixsup.scan import Scan, to_int16_hu

#: Resample only when the scan's in-plane spacing differs from the model's by more than this fraction: below it
#: the interpolation blur costs more than the tiny scale mismatch (0.78 vs 0.79 mm is the same anatomy).
SPACING_TOLERANCE = 0.01


@dataclass(frozen=True, eq=False)
class Restore:
    """What is needed to map an array on the model grid back to the scan's stored grid."""

    affine: np.ndarray
    stored_shape: tuple[int, int, int]
    canonical_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]

    @property
    def resampled(self) -> bool:
        return self.canonical_shape != self.model_shape

    def to_stored(self, canonical: np.ndarray) -> np.ndarray:
        """Reorder an array on the canonical grid (leading axes allowed) to the stored voxel order."""
        # Scan.from_canonical reads only the affine and the shape, so a zero-stride stand-in avoids holding the
        # scan's voxels here.
        grid = Scan(voxels=np.broadcast_to(np.uint8(0), self.stored_shape), affine=self.affine)
        return grid.from_canonical(canonical)


def needs_resampling(spacing_hw: tuple[float, float], target_spacing_hw: tuple[float, float]) -> bool:
    """Whether in-plane ``spacing_hw`` differs from ``target_spacing_hw`` by more than :data:`SPACING_TOLERANCE`."""
    return any(abs(s - t) > SPACING_TOLERANCE * t for s, t in zip(spacing_hw, target_spacing_hw))


def prepare_volume(scan: Scan, contract: ModelContract,
                   spacing_mm: tuple[float, float] | None = None) -> tuple[np.ndarray, Restore]:
    """The ``segment`` model's input for ``scan``: canonical ``[D, H, W]`` int16 HU at in-plane ``spacing_mm``
    (default the contract's), anti-aliased on the way down where the contract says so."""
    target = tuple(contract.spacing_mm if spacing_mm is None else spacing_mm)
    canonical, spacing = scan.canonical()
    canonical_shape = tuple(int(n) for n in canonical.shape)
    model_hw = canonical_shape[1:]
    if needs_resampling(spacing[1:], target):
        model_hw = inplane_shape(canonical_shape[1:], spacing[1:], target)
        # Linear interpolation of HU into float32: the int16 rounding happens once, after resampling. Smoothed
        # first if the network trained so: it has to see the scans as it learned them.
        canonical = resample_inplane(canonical, model_hw, order=1, dtype=np.float32,
                                     anti_aliasing=contract.anti_aliasing)
    restore = Restore(
        affine=np.array(scan.affine, dtype=np.float64),
        stored_shape=tuple(int(n) for n in scan.voxels.shape[:3]),
        canonical_shape=canonical_shape,
        model_shape=(canonical_shape[0],) + tuple(model_hw),
    )
    return to_int16_hu(canonical), restore


def _check_model_grid(array: np.ndarray, restore: Restore, what: str) -> None:
    if tuple(array.shape[-3:]) != restore.model_shape:
        # The server answered for a different grid than it was sent: a server bug, not the user's input.
        raise MixsupError(f"the server returned {what} of shape {array.shape}, expected [...] + {restore.model_shape}")


def restore_labels(labels_model_grid: np.ndarray, restore: Restore, num_classes: int) -> np.ndarray:
    """Labels ``[D, h, w]`` on the model grid -> ``uint8`` labels on the scan's stored grid
    (:func:`restore_labels_canonical`, then the stored voxel order)."""
    return restore.to_stored(restore_labels_canonical(labels_model_grid, restore, num_classes))


def restore_labels_canonical(labels_model_grid: np.ndarray, restore: Restore, num_classes: int) -> np.ndarray:
    """Labels ``[D, h, w]`` on the model grid -> ``uint8`` labels on the canonical grid at the scan's spacing.

    When the volume was resampled, each class's one-hot mask is interpolated linearly and the argmax taken: the
    boundaries come out smoother than with nearest-neighbour and no class is favoured. Beyond the reach of a
    slice's foreground bounding box every interpolated mask but background's is 0, so only the window around it
    is resampled, slice by slice (the liver fills a fraction of a CT slice, and most slices hold at most a few
    stray voxels before post-processing), and the memory stays at one window's ``num_classes`` maps.
    """
    labels_model_grid = np.asarray(labels_model_grid)
    _check_model_grid(labels_model_grid, restore, "labels")
    if not restore.resampled:
        return labels_model_grid.astype(np.uint8, copy=False)
    canonical = np.zeros(restore.canonical_shape, dtype=np.uint8)
    out_hw = restore.canonical_shape[1:]
    classes = np.arange(num_classes, dtype=labels_model_grid.dtype).reshape(-1, 1, 1)
    for index, slice_labels in enumerate(labels_model_grid):
        foreground = slice_labels != 0
        if not foreground.any():
            continue
        rows, columns = bounding_box(foreground)
        out_rows = output_window(restore.model_shape[1], out_hw[0], rows)
        out_columns = output_window(restore.model_shape[2], out_hw[1], columns)
        one_hot = (slice_labels[None] == classes).astype(np.float32)
        smooth = resample_inplane_window(one_hot, out_hw, out_rows, out_columns, order=1)
        canonical[index, out_rows, out_columns] = np.argmax(smooth, axis=0)
    return canonical


def restore_probabilities(probabilities_model_grid: np.ndarray, restore: Restore) -> np.ndarray:
    """Probabilities ``[C, D, h, w]`` on the model grid -> float32 ``[C, i, j, k]`` on the stored grid."""
    return restore_mean_probabilities([(probabilities_model_grid, restore)])


def restore_mean_probabilities(answers: Sequence[tuple[np.ndarray, Restore]]) -> np.ndarray:
    """The mean of probability maps ``[C, D, h, w]``, each on its own model grid (``(probabilities, restore)``
    pairs of one scan), as float32 ``[C, i, j, k]`` on the scan's stored grid."""
    restore = answers[0][1]
    checked = [_checked_probabilities(probabilities, grid) for probabilities, grid in answers]
    canonical = np.zeros((checked[0].shape[0],) + restore.canonical_shape, dtype=np.float32)
    for index in range(restore.canonical_shape[0]):
        for probabilities in checked:
            canonical[:, index] += resample_inplane(
                probabilities[:, index].astype(np.float32), restore.canonical_shape[1:], order=1
            )
    if len(checked) > 1:
        canonical /= np.float32(len(checked))
    return restore.to_stored(canonical)


def mean_labels_canonical(answers: Sequence[tuple[np.ndarray, Restore]],
                          lesion_threshold: float | None = None) -> np.ndarray:
    """``uint8`` labels on the canonical grid at the scan's spacing: the labels (argmax, or with the contract's
    ``lesion_threshold``, :func:`mixsup.labels.decide_labels`) of the mean of probability maps
    ``[C, D, h, w]``, each on its own model grid (``(probabilities, restore)`` pairs of one scan, the client's
    multi-scale test-time augmentation), each interpolated linearly onto the scan's grid before the mean.

    Where every map gives background at least 0.5 on a slice, so does their mean at every pixel (a linear
    interpolation stays within its inputs' range): only the window around the other pixels of a slice is
    resampled, as in :func:`restore_labels_canonical`.
    """
    restore = answers[0][1]
    checked = [(_checked_probabilities(probabilities, grid), grid) for probabilities, grid in answers]
    canonical = np.zeros(restore.canonical_shape, dtype=np.uint8)
    out_hw = restore.canonical_shape[1:]
    for index in range(restore.canonical_shape[0]):
        windows = []
        for probabilities, grid in checked:
            foreground = probabilities[0, index] < 0.5
            if foreground.any():
                rows, columns = bounding_box(foreground)
                windows.append((output_window(grid.model_shape[1], out_hw[0], rows),
                                output_window(grid.model_shape[2], out_hw[1], columns)))
        if not windows:
            continue
        out_rows = slice(min(w[0].start for w in windows), max(w[0].stop for w in windows))
        out_columns = slice(min(w[1].start for w in windows), max(w[1].stop for w in windows))
        total = sum(resample_inplane_window(probabilities[:, index].astype(np.float32), out_hw, out_rows,
                                            out_columns, order=1)
                    for probabilities, _ in checked)
        # total is the sum of the maps: its argmax is their mean's, and p(lesion) > t reads total > t * count
        canonical[index, out_rows, out_columns] = decide_labels(
            total, None if lesion_threshold is None else lesion_threshold * len(checked))
    return canonical


def _checked_probabilities(probabilities_model_grid: np.ndarray, restore: Restore) -> np.ndarray:
    probabilities = np.asarray(probabilities_model_grid)
    _check_model_grid(probabilities, restore, "probabilities")
    if probabilities.ndim != 4:
        raise MixsupError(f"the server returned probabilities of shape {probabilities.shape}, expected [C, D, H, W]")
    return probabilities


def answer_on_scan_grid(
    labels_model_grid: np.ndarray,
    probabilities_model_grid: np.ndarray | None,
    restore: Restore,
    num_classes: int,
    postprocess: bool = True,
    organ_label: int = 1,
    lesion_label: int = 2,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The server's answer on the scan's stored grid: (uint8 labels, post-processed unless ``postprocess`` is
    False; float32 probabilities ``[C, i, j, k]`` as the server gave them, or None)."""
    # Post-processed on the canonical grid, where the array is C-ordered (cc3d and fill_voids are fastest so);
    # its rules do not depend on the axes' order or direction.
    labels = restore_labels_canonical(labels_model_grid, restore, num_classes)
    probabilities = None
    if probabilities_model_grid is not None:
        probabilities = restore_probabilities(probabilities_model_grid, restore)
    return _finished_labels(labels, restore, postprocess, organ_label, lesion_label), probabilities


def mean_answer_on_scan_grid(
    answers: Sequence[tuple[np.ndarray, Restore]],
    want_probabilities: bool,
    postprocess: bool = True,
    organ_label: int = 1,
    lesion_label: int = 2,
    lesion_threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`answer_on_scan_grid` of the server's probabilities for one scan at several spacings
    (``(probabilities, restore)`` pairs): labels from their mean on the scan's grid (:func:`mean_labels_canonical`),
    and that mean itself, float32 ``[C, i, j, k]``, with ``want_probabilities``."""
    labels = mean_labels_canonical(answers, lesion_threshold)
    probabilities = restore_mean_probabilities(answers) if want_probabilities else None
    return _finished_labels(labels, answers[0][1], postprocess, organ_label, lesion_label), probabilities


def run_spacings(contract: ModelContract, single_scale: bool = False) -> tuple[tuple[float, float], ...]:
    """The in-plane spacings a client sends a scan at: the contract's test spacings, or with ``single_scale`` (or
    none named) its training spacing alone. With several, each answer must carry its probabilities."""
    return (tuple(contract.spacing_mm),) if single_scale else contract.run_spacings_mm


def answer_at_spacings(
    answers: Sequence[tuple[np.ndarray | None, np.ndarray | None, Restore]],
    num_classes: int,
    want_probabilities: bool,
    postprocess: bool = True,
    organ_label: int = 1,
    lesion_label: int = 2,
    lesion_threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The server's answers for one scan, a ``(labels, probabilities, restore)`` per spacing of
    :func:`run_spacings`, on the scan's grid: one spacing's labels restored (:func:`answer_on_scan_grid`; the
    server decided them with the contract's ``lesion_threshold``), several spacings' labels from the mean of their
    probabilities (:func:`mean_answer_on_scan_grid`, deciding with ``lesion_threshold``, the contract's)."""
    if len(answers) == 1:
        labels, probabilities, restore = answers[0]
        return answer_on_scan_grid(labels, probabilities, restore, num_classes, postprocess, organ_label,
                                   lesion_label)
    return mean_answer_on_scan_grid([(probabilities, restore) for _, probabilities, restore in answers],
                                    want_probabilities, postprocess, organ_label, lesion_label, lesion_threshold)


def _finished_labels(canonical: np.ndarray, restore: Restore, postprocess: bool, organ_label: int,
                     lesion_label: int) -> np.ndarray:
    """Canonical labels post-processed (unless not ``postprocess``) and put in the scan's stored voxel order."""
    if postprocess:
        canonical = postprocess_labels(canonical, organ_label=organ_label, lesion_label=lesion_label)
    return restore.to_stored(canonical)
