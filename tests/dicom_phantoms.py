"""Small CT series written as real DICOM with pydicom (and gdcm / highdicom where pydicom cannot encode).

Every dataset carries the modules a viewer and highdicom expect of a CT image (patient, study, series, frame of
reference, equipment, image plane, pixel, CT image), with made-up identifying data that the tests look for in
outputs where it must not appear.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-0042"
#: Patient/study attributes a SEG need not carry; the source series carry them so the tests can look for them.
OPTIONAL_PHI = {
    "PatientComments": "allergic to contrast",
    "PatientAge": "047Y",
    "PatientWeight": "71",
    "OtherPatientIDs": "ALT-99",
    "StudyDescription": "CT ABDOMEN Jane Doe follow-up",
    "PhysiciansOfRecord": "House^Gregory",
    "AdditionalPatientHistory": "prior hepatectomy",
}

#: Encoders that pydicom itself drives (``Dataset.compress``); the JPEG lossless processes go through gdcm.
PYDICOM_ENCODED = {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}
GDCM_ENCODED = {JPEGLossless, JPEGLosslessSV1}


def study_uids() -> dict:
    """Identifiers shared by every series of one study (so a folder can hold several series of one patient)."""
    return {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}


def ct_slice(
    hu: np.ndarray,
    position: Sequence[float],
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.8, 0.7),
    thickness: float = 2.5,
    series_uid: str = "",
    study: dict | None = None,
    signed: bool = True,
    modality: str = "CT",
    instance_number: int = 1,
    series_number: int = 3,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    intercept: float | None = None,
) -> Dataset:
    """One uncompressed (Explicit VR Little Endian) CT slice holding ``hu`` ([rows, columns]).

    ``signed``: int16 stored values with intercept 0 (most scanners); else uint16 with 12 bits stored and
    intercept -1024 (the other common layout). ``intercept`` overrides the unsigned layout's intercept.
    """
    study = study or study_uids()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19770101"
    ds.PatientSex = "F"
    for keyword, value in OPTIONAL_PHI.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.Modality = modality
    ds.Manufacturer = "Phantom"
    ds.FrameOfReferenceUID = study["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    if modality == "CT":
        ds.KVP = 120
        ds.AcquisitionNumber = 1
    if signed:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        stored = hu.astype(np.int16)
    else:
        intercept = -1024 if intercept is None else intercept
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
        stored = (hu - intercept).astype(np.uint16)
        assert stored.max() < 4096 and (hu - intercept).min() >= 0
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    return ds


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """``ds`` in ``transfer_syntax`` by pydicom's own encoders (RLE, JPEG-LS, JPEG 2000); uncompressed syntaxes
    only change the meta header (pydicom deflates or re-orders on write)."""
    if transfer_syntax in PYDICOM_ENCODED:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def gdcm_transcode(source: Path, target: Path, transfer_syntax: str) -> None:
    """Re-encode the DICOM file ``source`` into ``target`` with GDCM (JPEG lossless: pydicom has no encoder)."""
    import gdcm

    syntax = {
        JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
        JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }[transfer_syntax]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), source
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    change.SetInput(reader.GetImage())
    assert change.Change(), transfer_syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), target


def save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` to ``path`` in ``transfer_syntax``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax in GDCM_ENCODED:
        plain = path.with_name(path.name + ".plain")
        ds.save_as(plain, enforce_file_format=True)
        gdcm_transcode(plain, path, transfer_syntax)
        plain.unlink()
        return path
    encode(ds, transfer_syntax).save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    volume: np.ndarray,
    transfer_syntax: str = ExplicitVRLittleEndian,
    origin: Sequence[float] = (-100.0, -50.0, 20.0),
    step: Sequence[float] | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.8, 0.7),
    thickness: float = 2.5,
    prefix: str = "IM",
    **slice_kwargs,
) -> list[Dataset]:
    """Write ``volume`` ([slice, row, column] HU) as one series, slice ``k`` at ``origin + k * step`` (default:
    ``thickness`` along the slice normal). File names and instance numbers run *against* the slice order, so a
    reader that sorts by either gets it wrong. Returns the datasets (uncompressed) in slice order."""
    orientation_arr = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation_arr[:3], orientation_arr[3:])
    step_arr = normal * thickness if step is None else np.asarray(step, dtype=float)
    slice_kwargs.setdefault("series_uid", generate_uid())
    slice_kwargs.setdefault("study", study_uids())
    datasets = []
    count = volume.shape[0]
    for k in range(count):
        ds = ct_slice(
            volume[k],
            np.asarray(origin, dtype=float) + k * step_arr,
            orientation=orientation,
            spacing=spacing,
            thickness=thickness,
            instance_number=count - k,
            **slice_kwargs,
        )
        datasets.append(copy.deepcopy(ds))
        save(ds, folder / f"{prefix}{count - k:04d}.dcm", transfer_syntax)
    return datasets


def hu_volume(shape=(3, 40, 36), seed: int = 0, low: int = -1024, high: int = 3071) -> np.ndarray:
    """Random HU over CT's full range ([slice, row, column]); not square, so a transposed read shows."""
    return np.random.default_rng(seed).integers(low, high + 1, size=shape).astype(np.int16)
