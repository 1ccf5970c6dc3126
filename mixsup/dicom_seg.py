"""Writing labels back as a DICOM SEG that references the source images of a scan read by :mod:`mixsup.dicom`.

Output (:func:`write_dicom_seg`)
    A binary DICOM Segmentation written with highdicom that references the source images, with the segments
    "Liver" (the whole organ, lesions included) and "Liver lesion", coded in SNOMED CT as viewers expect. Of the
    patient and study attributes it carries only those the SEG IOD requires (:data:`SEG_PATIENT_STUDY_KEEP`).

Gantry tilt
    :mod:`mixsup.dicom` resamples a tilted series onto an orthogonal grid, so the labels lie on that grid. The SEG
    is written back on the *source* slices (each slice's shift undone, nearest neighbour), so it overlays the
    original images in a viewer.

Which inputs
    Only a scan read from DICOM has source images to reference (:func:`check_seg_possible` says so before
    inference), and a SEG can reference one multi-frame image or many single-frame ones, not a mix.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mixsup.dicom import dicom_source
from mixsup.errors import InputError
from mixsup.files import atomic_path
from mixsup.scan import Scan

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


#: Patient- and study-level attributes a SEG keeps from its source: the Type 1 and 2 attributes of the Patient
#: and General Study modules (without them PACS cannot file the SEG with its study) and the de-identification
#: flags (so a de-identified source stays marked as such). Everything else of those levels is dropped.
SEG_PATIENT_STUDY_KEEP = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
})
#: Groups whose attributes are patient or study level only (Patient, Patient Study, Clinical Trial, Visit).
_PATIENT_STUDY_GROUPS = frozenset({0x0010, 0x0012, 0x0032, 0x0038})
#: Study-level Type 3 attributes outside those groups that highdicom copies from the General Study module.
_STUDY_TYPE3 = frozenset({
    "StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    "ReferencedStudySequence", "RequestingServiceCodeSequence", "IssuerOfAccessionNumberSequence",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "StudyComments",
})


def _strip_patient_study(seg: "Dataset") -> None:
    """Remove every patient/study attribute the SEG does not need (see :data:`SEG_PATIENT_STUDY_KEEP`)."""
    from pydicom.datadict import keyword_for_tag

    for element in list(seg):
        keyword = keyword_for_tag(element.tag) or ""
        if keyword in SEG_PATIENT_STUDY_KEEP:
            continue
        if element.tag.group in _PATIENT_STUDY_GROUPS or keyword in _STUDY_TYPE3:
            del seg[element.tag]


def check_seg_possible(scan: Scan, output: str | Path) -> None:
    """Raise :class:`InputError` unless a DICOM SEG can be written for ``scan`` (checked before inference)."""
    source = dicom_source(scan)
    if source is None:
        raise InputError(
            f"{output}: a DICOM SEG references its source images, and {scan.source or 'the input'} is not DICOM; "
            "write .nii.gz instead"
        )
    multi = {f.member.name for f in source.frames if f.frame_index is not None}
    single = [f for f in source.frames if f.frame_index is None]
    if len(multi) > 1 or (multi and single):
        raise InputError(
            f"{output}: the series spreads over {len(multi) + len(single)} instances of which some are multi-frame; "
            "a DICOM SEG can reference only one multi-frame image (write .nii.gz instead)"
        )


def segment_descriptions(algorithm_name: str, algorithm_version: str) -> list:
    """highdicom segment descriptions: 1 "Liver" (organ incl. lesions), 2 "Liver lesion", in SNOMED CT."""
    from highdicom import AlgorithmIdentificationSequence
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algorithm = AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    liver = Code("10200004", "SCT", "Liver")
    return [
        SegmentDescription(
            segment_number=1,
            segment_label="Liver",
            segmented_property_category=Code("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=liver,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=None,
            tracking_id=None,
        ),
        SegmentDescription(
            segment_number=2,
            segment_label="Liver lesion",
            segmented_property_category=Code("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=Code("52988006", "SCT", "Lesion"),
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[liver],
        ),
    ]


def source_frames(
    labels: np.ndarray, scan: Scan, organ_label: int = 1, lesion_label: int = 2
) -> tuple[list["Dataset"], np.ndarray]:
    """The SEG's source images and its ``[frames, rows, columns, 2]`` boolean masks (liver ∪ lesion, lesion),
    one frame per source frame in the order highdicom expects (source image order, or frame order of one
    multi-frame image). The tilt correction is undone, so the masks lie on the source pixels. ``scan`` must have
    been read from DICOM (:func:`check_seg_possible`); otherwise ValueError."""
    source = dicom_source(scan)
    if source is None:
        raise ValueError(f"{scan.source or 'the scan'} was not read from DICOM: a SEG has no source frames to use")
    first = source.frames[0]
    multi_frame = first.frame_index is not None
    count = int(first.header.get("NumberOfFrames", 1) or 1) if multi_frame else len(source.frames)
    masks = np.zeros((count, first.rows, first.columns, 2), dtype=bool)
    for k, frame in enumerate(source.frames):
        plane = labels[:, :, k]
        if np.any(source.shifts[k]):
            from scipy import ndimage

            # Back onto the tilted source slice: source pixel p is orthogonal voxel p + shift.
            plane = ndimage.shift(plane, -source.shifts[k], order=0, mode="constant", cval=0)
        plane = plane.T  # the scan's [i (columns), j (rows)] -> the image's [rows, columns]
        index = frame.frame_index if multi_frame else k
        masks[index, :, :, 0] = (plane == organ_label) | (plane == lesion_label)
        masks[index, :, :, 1] = plane == lesion_label
    images = [first.header] if multi_frame else [frame.header for frame in source.frames]
    return images, masks


def write_dicom_seg(
    path: str | Path,
    labels: np.ndarray,
    scan: Scan,
    algorithm_name: str = "mixsup",
    organ_label: int = 1,
    lesion_label: int = 2,
) -> Path:
    """Write ``labels`` (on ``scan``'s stored grid) as a binary DICOM SEG referencing the scan's source images.

    Segment 1 "Liver" is the whole organ (``organ_label`` ∪ ``lesion_label``: a liver with holes where the
    lesions are would render wrongly in viewers), segment 2 "Liver lesion" is ``lesion_label``. Empty frames are
    left out (all kept when nothing was found). The file is written atomically.
    """
    import highdicom
    from pydicom.uid import generate_uid

    path = Path(path)
    check_seg_possible(scan, path)
    labels = np.asarray(labels)
    if labels.shape != scan.voxels.shape[:3]:
        raise ValueError(f"labels of shape {labels.shape} do not fit a scan of shape {scan.voxels.shape}")
    images, masks = source_frames(labels, scan, organ_label, lesion_label)
    try:
        from importlib.metadata import version

        software = version("mixsup")
    except Exception:  # noqa: BLE001 - a source checkout without installed metadata still writes a SEG
        software = "0"
    try:
        seg = highdicom.seg.Segmentation(
            source_images=images,
            pixel_array=masks,
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(algorithm_name, software),
            series_instance_uid=generate_uid(),
            series_number=9000,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="mixsup",
            manufacturer_model_name=algorithm_name,
            software_versions=software,
            device_serial_number="0",
            series_description="mixsup liver and lesion segmentation",
            content_label="MIXSUP",
            content_description="Liver and liver lesion segmentation",
            # highdicom keeps every frame of an all-empty result anyway, and logs a warning when asked not to.
            omit_empty_frames=bool(masks.any()),
        )
    except (ValueError, AttributeError, KeyError) as exc:
        # highdicom checks the source images (frame of reference, geometry); a source it cannot describe is bad
        # input for a SEG, and NIfTI output still works.
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: cannot write a DICOM SEG for this series ({message})") from None
    _strip_patient_study(seg)
    with atomic_path(path, ".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
