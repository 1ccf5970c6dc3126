"""DICOM input and output (mixsup.dicom, mixsup.dicom_seg): transfer syntaxes, enhanced multi-frame CT, series
choice, zip archives, gantry tilt, non-CT refusal, and the DICOM SEG written back on the source images."""
from __future__ import annotations

import copy
import re
import sys
import zipfile
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tomllib
from cli_utils import run_cli
from dicom_phantoms import (
    OPTIONAL_PHI,
    PATIENT_ID,
    PATIENT_NAME,
    ct_slice,
    hu_volume,
    save,
    study_uids,
    write_series,
)
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pixel_array
from pydicom.sr.coding import Code
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SegmentationStorage,
    generate_uid,
)

from mixsup.clients.cli import default_output_path, segment_file
from mixsup.dicom_seg import write_dicom_seg
from mixsup.errors import InputError
from mixsup.readers import read_scan
from mixsup.scan import Scan

ROOT = Path(__file__).resolve().parents[1]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

LOSSLESS_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
]


def unused_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def phantom_labels(voxels: np.ndarray) -> np.ndarray:
    """A label map shaped like the scan: liver where HU > 0, lesion where HU > 1500 (both present in hu_volume)."""
    labels = (voxels > 0).astype(np.uint8)
    labels[voxels > 1500] = 2
    return labels


# -- transfer syntaxes -------------------------------------------------------------------------------------------


def test_every_common_transfer_syntax_has_a_decoder_from_the_declared_dependencies():
    # A clean install has pydicom plus what pyproject declares; gdcm and pyjpegls (test extras) must not be what
    # makes these decodable, so the plugin that has to be available is pylibjpeg's.
    for syntax in (RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                   JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2K):
        assert "pylibjpeg" in get_decoder(syntax).available_plugins, syntax.name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert {"pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "highdicom"} <= declared


@pytest.mark.parametrize("signed", [True, False], ids=["int16", "uint12"])
@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES, ids=lambda uid: uid.keyword)
def test_lossless_transfer_syntaxes_read_to_identical_hu(tmp_path, syntax, signed):
    volume = hu_volume(seed=3)
    datasets = write_series(tmp_path / "series", volume, syntax, signed=signed)
    files = sorted((tmp_path / "series").iterdir())
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files} == {syntax}
    scan = read_scan(tmp_path / "series")
    canonical, spacing = scan.canonical()
    assert canonical.dtype == np.int16
    assert np.array_equal(canonical, volume)  # axial LPS DICOM: the canonical array is the slice stack itself
    assert spacing == pytest.approx((2.5, 0.8, 0.7))
    if syntax.is_compressed:
        # The plugin a clean install has decodes the very same stored values.
        by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
        for path in files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert np.array_equal(pixel_array(path, decoding_plugin="pylibjpeg"), by_uid[uid].pixel_array)


@pytest.mark.parametrize(
    "name", ["JPGExtended.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_RLE.dcm"]
)
def test_lossy_and_vendor_files_bundled_with_pydicom_decode(name):
    # Lossy JPEG makes no sense to write for CT, but archives hold it; pydicom's own vendor files prove the decoders.
    path = pydicom.data.get_testdata_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    pixels = pixel_array(path, decoding_plugin="pylibjpeg")
    assert pixels.shape[-2:] == (ds.Rows, ds.Columns) and np.ptp(pixels) > 0


def test_undecodable_pixel_data_is_bad_input(tmp_path, capsys):
    volume = hu_volume()
    write_series(tmp_path / "series", volume, JPEG2000Lossless)
    broken = sorted((tmp_path / "series").iterdir())[1]
    ds = pydicom.dcmread(broken)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds.save_as(broken)
    with pytest.raises(InputError, match="cannot decode"):
        read_scan(tmp_path / "series")
    code, out, err = run_cli(capsys, "segment", tmp_path / "series", "--url", unused_url())
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# -- geometry: sorting, enhanced multi-frame, tilt ---------------------------------------------------------------


def test_slices_sort_along_an_oblique_normal(tmp_path):
    a, b = np.radians(25), np.radians(-15)
    orientation = [np.cos(a), np.sin(a), 0, -np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)]
    volume = hu_volume(shape=(5, 40, 36), seed=5)
    datasets = write_series(tmp_path / "s", volume, orientation=orientation, thickness=1.25)
    scan = read_scan(tmp_path / "s")
    affine_lps = LPS_TO_RAS @ scan.affine
    for k, ds in enumerate(datasets):  # datasets come in slice order; files and InstanceNumbers run backwards
        assert affine_lps[:3, :3] @ [0, 0, k] + affine_lps[:3, 3] == pytest.approx(ds.ImagePositionPatient)
        assert np.array_equal(scan.voxels[:, :, k].T, volume[k])
    # Pixel (column 3, row 2) of slice 4 lies where PS3.3 C.7.6.2.1.1 puts it.
    ds = datasets[4]
    expected = np.asarray(ds.ImagePositionPatient) + 3 * 0.7 * np.asarray(orientation[:3]) + 2 * 0.8 * np.asarray(
        orientation[3:]
    )
    assert affine_lps[:3, :3] @ [3, 2, 4] + affine_lps[:3, 3] == pytest.approx(expected)


def legacy_enhanced(datasets: list) -> pydicom.Dataset:
    """highdicom's conversion of classic CT slices into one Legacy Converted Enhanced CT file (per-frame
    functional groups), frames in the order given."""
    return highdicom.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=generate_uid(), series_number=7, sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def shuffle_frames(ds: pydicom.Dataset, order: list[int]) -> pydicom.Dataset:
    """``ds`` (uncompressed multi-frame) with frame ``n`` of the result taken from frame ``order[n]``."""
    frames = ds.pixel_array
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    ds.PixelData = np.ascontiguousarray(frames[order]).tobytes()
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless], ids=lambda uid: uid.keyword)
def test_enhanced_multiframe_ct_reads_onto_the_grid_of_its_slices(tmp_path, syntax):
    volume = hu_volume(shape=(4, 40, 36), seed=7, low=-1000, high=2000)
    study = study_uids()
    series = generate_uid()
    # Each slice its own intercept: the per-frame Pixel Value Transformation must be applied frame by frame.
    classic = [
        ct_slice(volume[k], (-100.0, -50.0, 20.0 + 2.5 * k), signed=False, intercept=-1024 - 10 * k,
                 series_uid=series, study=study, instance_number=k + 1)
        for k in range(4)
    ]
    for k, ds in enumerate(classic):
        save(copy.deepcopy(ds), tmp_path / "classic" / f"{k}.dcm")
    enhanced = shuffle_frames(legacy_enhanced(classic), [2, 0, 3, 1])  # frames out of spatial order
    per_frame = enhanced.PerFrameFunctionalGroupsSequence
    assert "PixelValueTransformationSequence" in per_frame[0] and "PlanePositionSequence" in per_frame[0]
    if syntax != ExplicitVRLittleEndian:
        enhanced.compress(syntax, generate_instance_uid=False)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)

    scan = read_scan(path)
    assert np.array_equal(scan.canonical()[0], volume)
    np.testing.assert_allclose(scan.affine, read_scan(tmp_path / "classic").affine, atol=1e-6)
    heights = [float(groups.PlanePositionSequence[0].ImagePositionPatient[2]) for groups in per_frame]
    slice_to_frame = [int(i) for i in np.argsort(heights)]
    assert slice_to_frame not in ([0, 1, 2, 3], [3, 2, 1, 0])  # the frames really are out of order
    assert [frame.frame_index for frame in scan.source_record.frames] == slice_to_frame


def tilted_series(folder: Path, slices: int = 4):
    """A gantry-tilted axial series: image planes tilted about the patient's left-right axis, slices stacked
    along the table (z). Slice k is shifted by exactly k rows in-plane, so the resampling is exact.

    Pixel values are a linear function of the world position, ``hu = round(3 x - 2 y + 5 z)`` (LPS mm).
    """
    thickness, row_spacing, col_spacing = 2.5, 1.0, 0.8
    tilt = np.arcsin(row_spacing / thickness)  # in-plane shift of thickness * sin(tilt) = one row per slice
    row_cos = np.array([1.0, 0.0, 0.0])
    col_cos = np.array([0.0, np.cos(tilt), np.sin(tilt)])
    origin = np.array([-20.0, -30.0, 10.0])
    rows, columns = 40, 36
    datasets = []
    study, series = study_uids(), generate_uid()
    for k in range(slices):
        position = origin + k * np.array([0.0, 0.0, thickness])
        jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
        world = position + ii[..., None] * col_spacing * row_cos + jj[..., None] * row_spacing * col_cos
        hu = np.rint(world @ [3.0, -2.0, 5.0]).astype(np.int16)
        ds = ct_slice(hu, position, orientation=[*row_cos, *col_cos], spacing=(row_spacing, col_spacing),
                      thickness=thickness, series_uid=series, study=study, instance_number=k + 1)
        datasets.append(copy.deepcopy(ds))
        save(ds, folder / f"{k}.dcm")
    return datasets, (row_cos, col_cos, tilt, thickness, row_spacing, col_spacing)


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path):
    datasets, (row_cos, col_cos, tilt, thickness, row_spacing, col_spacing) = tilted_series(tmp_path / "tilt")
    scan = read_scan(tmp_path / "tilt")
    affine_lps = LPS_TO_RAS @ scan.affine
    axes = affine_lps[:3, :3]
    assert abs(axes[:, 0] @ axes[:, 2]) < 1e-9 and abs(axes[:, 1] @ axes[:, 2]) < 1e-9  # not sheared
    assert np.linalg.norm(axes[:, 2]) == pytest.approx(thickness * np.cos(tilt))
    assert scan.source_record.tilted
    ii, jj = np.meshgrid(np.arange(36), np.arange(40), indexing="ij")
    for k in range(len(datasets)):
        world = affine_lps[:3, :3] @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)]) + affine_lps[:3, 3:4]
        expected = np.rint(np.array([3.0, -2.0, 5.0]) @ world).reshape(ii.shape)
        measured = jj >= k  # rows shifted in from outside the field of view hold air
        assert np.array_equal(scan.voxels[:, :, k][measured], expected[measured])
        assert np.all(scan.voxels[:, :, k][~measured] == -1024)


def test_gantry_tilted_seg_overlays_the_source_slices(tmp_path):
    datasets, _ = tilted_series(tmp_path / "tilt")
    scan = read_scan(tmp_path / "tilt")
    labels = phantom_labels(scan.voxels)
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, scan)
    masks = seg_masks_by_source(pydicom.dcmread(seg_path))
    for k, ds in enumerate(datasets):
        source_hu = ds.pixel_array.astype(np.int32)
        liver, lesion = masks.get((ds.SOPInstanceUID, 1)), masks.get((ds.SOPInstanceUID, 2))
        # Every source row that the orthogonal grid measured maps back one to one.
        kept = np.arange(source_hu.shape[0]) < source_hu.shape[0] - k
        empty = np.zeros(source_hu.shape, bool)  # an empty frame is left out of the SEG
        assert np.array_equal((liver if liver is not None else empty)[kept], (source_hu > 0)[kept])
        assert np.array_equal((lesion if lesion is not None else empty)[kept], (source_hu > 1500)[kept])
        assert liver is not None


# -- several series, non-CT, zip ---------------------------------------------------------------------------------


def several_series(folder: Path) -> dict:
    """A study folder as a PACS export looks: the wanted axial CT, a thicker axial CT with undecodable pixels, a
    longer coronal CT, a longer MR, a CT localizer, a structured report and a stray text file."""
    study = study_uids()
    uids = {}
    uids["axial"] = generate_uid()
    write_series(folder / "a", hu_volume(shape=(5, 40, 36), seed=1), series_uid=uids["axial"], study=study,
                 series_number=3)
    uids["broken"] = generate_uid()
    write_series(folder / "b", hu_volume(shape=(3, 40, 36), seed=2), JPEG2000Lossless, thickness=5.0,
                 series_uid=uids["broken"], study=study, series_number=4)
    for path in (folder / "b").iterdir():
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 broken"])
        ds.save_as(path)
    uids["coronal"] = generate_uid()
    write_series(folder / "c", hu_volume(shape=(8, 40, 36), seed=3), orientation=(1, 0, 0, 0, 0, -1),
                 series_uid=uids["coronal"], study=study, series_number=5)
    uids["mr"] = generate_uid()
    write_series(folder / "m", hu_volume(shape=(10, 40, 36), seed=4, low=0, high=1000), series_uid=uids["mr"],
                 study=study, series_number=6, modality="MR")
    scout = ct_slice(hu_volume(shape=(1, 40, 36))[0], (0, 0, 0), study=study, series_number=1,
                     image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    save(scout, folder / "scout.dcm")
    report = pydicom.Dataset()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID = generate_uid()
    report.Modality, report.PatientName, report.SeriesInstanceUID = "SR", PATIENT_NAME, generate_uid()
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    return uids


def test_the_axial_ct_series_with_the_most_slices_is_chosen_and_said_without_phi(tmp_path):
    uids = several_series(tmp_path / "study")
    scan = read_scan(tmp_path / "study")  # the broken series is never decoded
    assert scan.source_record.series_uid == uids["axial"]
    assert scan.voxels.shape == (36, 40, 5)
    note = scan.source_record.note
    assert "\n" not in note and "chose series 3" in note and uids["axial"] in note and "--series" in note
    assert "Doe" not in note and PATIENT_ID not in note


def test_series_flag_picks_another_series(tmp_path):
    uids = several_series(tmp_path / "study")
    coronal = read_scan(tmp_path / "study", series_uid=uids["coronal"])
    assert coronal.source_record.series_uid == uids["coronal"] and coronal.voxels.shape == (36, 40, 8)
    assert coronal.source_record.note == ""
    with pytest.raises(InputError, match="not CT"):
        read_scan(tmp_path / "study", series_uid=uids["mr"])
    with pytest.raises(InputError, match="cannot decode"):
        read_scan(tmp_path / "study", series_uid=uids["broken"])
    with pytest.raises(InputError, match="no series with UID 1.2.3"):
        read_scan(tmp_path / "study", series_uid="1.2.3")


def test_a_series_that_is_not_ct_is_refused(tmp_path, capsys):
    write_series(tmp_path / "mr", hu_volume(low=0, high=1000), modality="MR")
    with pytest.raises(InputError, match="MR, not CT"):
        read_scan(tmp_path / "mr")
    code, _, err = run_cli(capsys, "segment", tmp_path / "mr", "--url", unused_url())
    assert code == 2 and "not CT" in err and len(err.strip().splitlines()) == 1


def test_the_cli_names_the_chosen_series_then_needs_the_server(tmp_path, capsys):
    uids = several_series(tmp_path / "study")
    code, out, err = run_cli(capsys, "segment", tmp_path / "study", "--url", unused_url())
    assert code == 3 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and uids["axial"] in lines[0] and "cannot reach" in lines[1]
    assert all(PATIENT_ID not in line and "Doe" not in line for line in lines)


def test_zip_of_a_series_reads_like_the_folder(tmp_path):
    volume = hu_volume(seed=9)
    write_series(tmp_path / "series", volume, RLELossless)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted((tmp_path / "series").iterdir()):
            handle.write(path, f"export/DICOM/{path.stem}")  # vendor exports drop the .dcm suffix
            handle.writestr(f"__MACOSX/export/DICOM/._{path.stem}", b"\0\x05\x16\x07 AppleDouble")
        handle.writestr("export/README.TXT", "exported by a PACS")
    scan = read_scan(archive)
    folder = read_scan(tmp_path / "series")
    assert np.array_equal(scan.voxels, folder.voxels) and np.allclose(scan.affine, folder.affine)
    assert default_output_path(archive) == tmp_path / "series_seg.nii.gz"


def test_a_corrupt_zip_is_bad_input(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError):
        read_scan(tmp_path / "broken.zip")


# -- DICOM SEG ---------------------------------------------------------------------------------------------------


def seg_masks_by_source(seg: pydicom.Dataset) -> dict:
    """``{(source SOPInstanceUID, segment number): mask [rows, columns]}`` read from the SEG's per-frame functional
    groups with pydicom alone (no highdicom), so the check does not trust the writer's library."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    masks = {}
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks[(source, segment)] = frame.astype(bool)
    return masks


def all_text(ds: pydicom.Dataset) -> str:
    return "\n".join(str(element.value) for element in ds.iterall())


def check_seg(seg_path: Path, scan: Scan, labels: np.ndarray, source_series: str) -> pydicom.Dataset:
    """The SEG opens with pydicom and highdicom, is coded as viewers expect, references the source series and
    carries, per source frame, exactly the scan's labels."""
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series
    opened = highdicom.seg.segread(seg_path)
    liver, lesion = opened.get_segment_description(1), opened.get_segment_description(2)
    assert liver.segment_label == "Liver" and lesion.segment_label == "Liver lesion"
    assert liver.segmented_property_type == Code("10200004", "SCT", "Liver")
    assert liver.segmented_property_category == Code("123037004", "SCT", "Anatomical Structure")
    assert lesion.segmented_property_type == Code("52988006", "SCT", "Lesion")
    assert lesion.segmented_property_category == Code("49755003", "SCT", "Morphologically Altered Structure")
    assert lesion.anatomic_regions == [Code("10200004", "SCT", "Liver")]
    # Only the patient and study attributes a SEG must carry.
    assert seg.PatientName == PATIENT_NAME and seg.PatientID == PATIENT_ID
    for keyword in OPTIONAL_PHI:
        assert keyword not in seg, keyword
    text = all_text(seg)
    # Nor anywhere nested (numbers are skipped: their digits turn up inside UIDs).
    assert all(value not in text for value in OPTIONAL_PHI.values() if not value.isdigit())
    masks = seg_masks_by_source(seg)
    zeros = np.zeros((seg.Rows, seg.Columns), bool)
    for k, frame in enumerate(scan.source_record.frames):
        assert frame.frame_index is None  # single-frame sources: one source instance per slice
        plane = labels[:, :, k].T  # scan [i (columns), j (rows)] -> image [rows, columns]
        # Empty frames are left out of a SEG: a missing frame is an empty mask.
        assert np.array_equal(masks.get((frame.sop_instance_uid, 1), zeros), plane > 0), k
        assert np.array_equal(masks.get((frame.sop_instance_uid, 2), zeros), plane == 2), k
    return seg


def test_seg_of_a_classic_series_overlays_its_slices(tmp_path):
    volume = hu_volume(seed=11)
    datasets = write_series(tmp_path / "series", volume, JPEGLSLossless)
    scan = read_scan(tmp_path / "series")
    labels = phantom_labels(scan.voxels)
    assert set(np.unique(labels)) == {0, 1, 2}
    seg = check_seg(write_dicom_seg(tmp_path / "out.dcm", labels, scan), scan, labels, datasets[0].SeriesInstanceUID)
    # Geometry as well as references: each SEG frame lies where its source slice lies.
    positions = {ds.SOPInstanceUID: ds.ImagePositionPatient for ds in datasets}
    for groups in seg.PerFrameFunctionalGroupsSequence:
        source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert groups.PlanePositionSequence[0].ImagePositionPatient == pytest.approx(positions[source])
    # highdicom reads the same masks back by source instance.
    uids = [frame.sop_instance_uid for frame in scan.source_record.frames]
    by_instance = highdicom.seg.segread(tmp_path / "out.dcm").get_pixels_by_source_instance(uids, [1, 2])
    assert np.array_equal(by_instance[..., 0], np.isin(labels, (1, 2)).transpose(2, 1, 0))
    assert np.array_equal(by_instance[..., 1], (labels == 2).transpose(2, 1, 0))


def test_seg_of_an_enhanced_ct_references_its_frames(tmp_path):
    volume = hu_volume(shape=(4, 40, 36), seed=12)
    study, series = study_uids(), generate_uid()
    classic = [ct_slice(volume[k], (-100.0, -50.0, 20.0 + 2.5 * k), series_uid=series, study=study) for k in range(4)]
    enhanced = shuffle_frames(legacy_enhanced(classic), [3, 1, 0, 2])
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    scan = read_scan(tmp_path / "enhanced.dcm")
    labels = phantom_labels(scan.voxels)
    write_dicom_seg(tmp_path / "seg.dcm", labels, scan)
    seg = highdicom.seg.segread(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == enhanced.SeriesInstanceUID
    frame_numbers = [frame.frame_index + 1 for frame in scan.source_record.frames]  # slice k -> source frame number
    pixels = seg.get_pixels_by_source_frame(enhanced.SOPInstanceUID, frame_numbers, segment_numbers=[1, 2])
    assert np.array_equal(pixels[..., 0], np.isin(labels, (1, 2)).transpose(2, 1, 0))
    assert np.array_equal(pixels[..., 1], (labels == 2).transpose(2, 1, 0))


class StubClient:
    """Stands in for SegmentationClient in segment_file: labels from HU thresholds, no server."""

    model = "segment"

    def segment_scan(self, scan: Scan, postprocess: bool = True) -> np.ndarray:
        return phantom_labels(scan.voxels)


def test_segment_file_writes_a_dicom_seg_for_a_dcm_output(tmp_path):
    datasets = write_series(tmp_path / "series", hu_volume(seed=13))
    scan = read_scan(tmp_path / "series")
    result = segment_file(StubClient(), tmp_path / "series", tmp_path / "labels.dcm", scan=scan)
    assert result.status == "ok" and result.liver_ml > 0
    check_seg(tmp_path / "labels.dcm", scan, phantom_labels(scan.voxels), datasets[0].SeriesInstanceUID)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.dcm", "series"]  # no temporary leftovers


def test_dicom_seg_output_needs_dicom_input(tmp_path, capsys):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(path))
    code, out, err = run_cli(capsys, "segment", path, "-o", tmp_path / "seg.dcm", "--url", unused_url())
    assert code == 2 and out == "" and "not DICOM" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "seg.dcm").exists()
    with pytest.raises(InputError):
        write_dicom_seg(tmp_path / "seg.dcm", np.zeros((8, 8, 3), np.uint8), read_scan(path))


def test_series_flag_on_nifti_input_is_bad_usage(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(path))
    with pytest.raises(InputError, match="--series"):
        read_scan(path, series_uid="1.2.3")


def test_reading_dicom_and_writing_a_seg_do_not_import_torch(tmp_path):
    import subprocess

    write_series(tmp_path / "s", hu_volume())
    code = (
        "import sys, numpy as np; from mixsup.readers import read_scan; from mixsup.dicom_seg import write_dicom_seg; "
        "scan = read_scan(sys.argv[1]); write_dicom_seg(sys.argv[2], np.ones(scan.voxels.shape, np.uint8), scan); "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s"), str(tmp_path / "seg.dcm")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
