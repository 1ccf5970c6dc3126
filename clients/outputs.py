"""Writing a segmentation's files: labels (NIfTI or DICOM SEG), probabilities, stats JSON, preview PNG.

Every file is written atomically (complete or absent, never half-written), so a killed batch leaves no file that a
re-run would mistake for a finished one.

Probabilities are 16-bit, as the server sends them (FP16 on the wire): half the bytes of float32.

* ``.npz``: a true float16 array ``probabilities`` ``[C, i, j, k]`` with ``affine`` and ``class_names``.
* ``.nii`` / ``.nii.gz``: NIfTI has no 16-bit float type (nibabel refuses float16), so each probability is stored
  as int16 with the header's ``scl_slope`` = 1/32767 (a step of 3e-5, finer than FP16's 5e-4 near 1); every NIfTI
  reader applies the slope and gets floats in [0, 1]. Classes go on the 4th axis ``[i, j, k, C]`` (NIfTI keeps the
  three spatial axes first).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from mixsup.clients.preview import write_preview
from mixsup.clients.result import Result
from mixsup.dicom_seg import write_dicom_seg
from mixsup.errors import InputError
from mixsup.files import atomic_path
from mixsup.scan import Scan, is_nifti, write_nifti

#: A label output with this suffix is written as a DICOM SEG (the default output stays NIfTI).
DICOM_SEG_SUFFIX = ".dcm"
NPZ_SUFFIX = ".npz"
PNG_SUFFIX = ".png"
JSON_SUFFIX = ".json"
#: int16 steps per unit probability in a NIfTI probability map.
PROBABILITY_SCALE = 32767


def is_dicom_seg_path(path: str | os.PathLike) -> bool:
    """Whether the label output ``path`` asks for a DICOM SEG (it ends in ``.dcm``)."""
    return str(path).lower().endswith(DICOM_SEG_SUFFIX)


def is_probability_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a probabilities output this module writes (NIfTI or ``.npz``)."""
    return is_nifti(path) or str(path).lower().endswith(NPZ_SUFFIX)


def write_labels(output: Path, labels: np.ndarray, scan: Scan, model: str) -> Path:
    """Write ``labels`` (on ``scan``'s stored grid) as NIfTI, or as a DICOM SEG when ``output`` ends in ``.dcm``."""
    if is_dicom_seg_path(output):
        return write_dicom_seg(output, labels, scan, algorithm_name=f"mixsup {model}")
    return write_nifti(output, labels, scan.affine)


def write_probabilities(
    output: Path, probabilities: np.ndarray, affine: np.ndarray, class_names: Sequence[str] = ()
) -> Path:
    """Write float ``[C, i, j, k]`` probabilities as 16-bit values (see the module's docstring for the formats)."""
    output = Path(output)
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be [C, i, j, k], got shape {probabilities.shape}")
    if str(output).lower().endswith(NPZ_SUFFIX):
        with atomic_path(output, NPZ_SUFFIX) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(
                handle,
                probabilities=probabilities.astype(np.float16),
                affine=np.asarray(affine, dtype=np.float64),
                class_names=np.asarray(list(class_names), dtype=str),
            )
        return output
    if not is_nifti(output):
        raise InputError(f"{output}: the probabilities output must end in .nii, .nii.gz or .npz")
    quantized = np.rint(np.clip(np.moveaxis(probabilities, 0, -1), 0.0, 1.0) * PROBABILITY_SCALE).astype(np.int16)
    image = nib.Nifti1Image(quantized, affine)
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(1.0 / PROBABILITY_SCALE, 0.0)
    image.header.set_intent("estimate", name="probability")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    suffix = ".nii.gz" if str(output).lower().endswith(".gz") else ".nii"
    with atomic_path(output, suffix) as tmp:
        nib.save(image, tmp)
    return output


def write_stats(output: Path, result: Result, class_names: Sequence[str] = ()) -> Path:
    """The result's stats as JSON (volumes in mL, lesions largest first); no patient data goes in."""
    data = result.stats.to_dict()
    data["model"] = result.model
    data["postprocessed"] = result.postprocessed
    if class_names:
        data["labels"] = {str(index): name for index, name in enumerate(class_names)}
    with atomic_path(output, JSON_SUFFIX) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(output)


def write_outputs(
    result: Result,
    scan: Scan,
    labels: Path,
    probabilities: Path | None = None,
    preview: Path | None = None,
    stats: Path | None = None,
    class_names: Sequence[str] = (),
) -> list[Path]:
    """Write every output asked for; the label map last, so that its presence means the case is complete."""
    written = []
    if probabilities is not None:
        if result.probabilities is None:
            raise ValueError("the result holds no probabilities; segment with probabilities=True")
        written.append(write_probabilities(probabilities, result.probabilities, result.affine, class_names))
    if preview is not None:
        written.append(write_preview(preview, scan, result))
    if stats is not None:
        written.append(write_stats(stats, result, class_names))
    written.append(write_labels(labels, result.labels, scan, result.model))
    return written
