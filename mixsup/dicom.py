"""Reading a CT series from a folder of DICOM files with pydicom.

The geometry follows DICOM PS3.3 C.7.6.2.1.1: a pixel at column ``i``, row ``j`` of a slice lies at
``ImagePositionPatient + i * PixelSpacing[1] * row_cosines + j * PixelSpacing[0] * column_cosines`` (LPS).
Slices are ordered along the slice normal, not by file name or InstanceNumber.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mixsup.errors import InputError
from mixsup.scan import Scan, to_int16_hu

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read_headers(folder: Path) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False)
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            datasets.append(ds)
    return datasets


def read_dicom_series(folder: str | Path) -> Scan:
    """Read the one image series in ``folder`` (searched recursively) as a :class:`Scan` in HU."""
    folder = Path(folder)
    datasets = _read_headers(folder)
    if not datasets:
        raise InputError(f"{folder}: no DICOM images with position and orientation found")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} DICOM series; point at a folder with exactly one")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    if len(datasets) > 1:
        steps = np.diff(positions @ normal)
        if np.any(steps < 1e-3):
            raise InputError(f"{folder}: two DICOM slices share a position; is it more than one acquisition?")
        if steps.max() - steps.min() > 0.01 * steps.mean() + 1e-3:
            raise InputError(f"{folder}: DICOM slices are not evenly spaced (gaps {steps.min():.2f}-{steps.max():.2f} mm)")
        slice_vector = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        slice_vector = normal * float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = slice_vector
    affine_lps[:3, 3] = positions[0]
    slices = []
    for ds in datasets:
        pixels = ds.pixel_array.astype(np.float32)
        pixels = pixels * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append(pixels.T)  # pixel_array is [row, column]; the scan's i axis runs along columns
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise InputError(f"{folder}: DICOM slices differ in size: {sorted(shapes)}")
    return Scan(voxels=to_int16_hu(np.stack(slices, axis=-1)), affine=_LPS_TO_RAS @ affine_lps, source=str(folder))
