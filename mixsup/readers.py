"""Which reader reads an input path: :func:`read_scan` sends NIfTI to :mod:`mixsup.scan` and DICOM to
:mod:`mixsup.dicom`.

The dispatch lives apart from both readers so that neither imports the other: :mod:`mixsup.dicom` builds a
:class:`~mixsup.scan.Scan`, and only this module needs to know every format.
"""
from __future__ import annotations

import os
from pathlib import Path

from mixsup.dicom import is_dicom_file, is_zip_file, read_dicom
from mixsup.errors import InputError
from mixsup.scan import Scan, is_nifti, read_nifti


def is_dicom_input(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as DICOM: a folder, a zip archive, or a DICOM file (``.dcm`` or the preamble)."""
    path = Path(path)
    return path.is_dir() or is_zip_file(path) or is_dicom_file(path)


def read_scan(path: str | os.PathLike, series_uid: str | None = None) -> Scan:
    """Read a NIfTI file, or one CT series from a DICOM folder, zip archive or file (see :mod:`mixsup.dicom`).

    ``series_uid`` picks the DICOM series when the input holds several; it is bad input for NIfTI.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not is_nifti(path) and is_dicom_input(path):
        return read_dicom(path, series_uid)
    if not is_nifti(path):
        raise InputError(f"{path}: expected a .nii / .nii.gz file, or DICOM: a file, a series folder or a .zip")
    if series_uid is not None:
        raise InputError(f"{path}: --series picks a DICOM series; the input is NIfTI")
    return read_nifti(path)
