"""Scan I/O: canonical order for any orthogonal orientation, exact mapping back, atomic writes, DICOM geometry."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from mixsup.errors import InputError
from mixsup.readers import read_scan
from mixsup.scan import Scan, read_nifti, write_nifti


def oriented_affine(axcodes: tuple[str, str, str], spacing=(0.7, 0.9, 2.5), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """An affine whose stored axes point along ``axcodes`` with the given voxel sizes."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world, sign) in enumerate(nib.orientations.axcodes2ornt(axcodes)):
        affine[int(world), axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    return affine


ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "I"), ("P", "S", "R"), ("S", "R", "P"), ("I", "L", "A")]


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_canonical_order_and_round_trip(axcodes):
    rng = np.random.default_rng(0)
    voxels = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    affine = oriented_affine(axcodes)
    scan = Scan(voxels, affine)
    canonical, spacing = scan.canonical()
    # Each canonical axis must run along the world direction the contract names. A volume holding its own flat
    # index tells which stored voxel each canonical voxel came from.
    world = lambda ijk: affine[:3, :3] @ np.asarray(ijk) + affine[:3, 3]  # noqa: E731
    flat_canonical, _ = Scan(np.arange(voxels.size).reshape(voxels.shape), affine).canonical()
    origin = world(np.unravel_index(flat_canonical[0, 0, 0], voxels.shape))
    for axis, world_axis, sign in [(0, 2, +1), (1, 1, -1), (2, 0, -1)]:  # D: +S, H: -A (posterior), W: -R (left)
        step = [0, 0, 0]
        step[axis] = 1
        delta = world(np.unravel_index(flat_canonical[tuple(step)], voxels.shape)) - origin
        assert np.sign(delta[world_axis]) == sign, (axcodes, axis, delta)
        assert abs(delta[world_axis]) == pytest.approx(spacing[axis])
    assert np.array_equal(scan.from_canonical(canonical), voxels)
    stacked = np.stack([canonical, canonical * 2])
    assert np.array_equal(scan.from_canonical(stacked)[1], voxels * 2)


def test_from_canonical_rejects_wrong_shape():
    scan = Scan(np.zeros((4, 5, 6), np.int16), oriented_affine(("L", "P", "S")))
    with pytest.raises(ValueError):
        scan.from_canonical(np.zeros((4, 5, 6)))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_read_keeps_affine_and_dtype(tmp_path, suffix):
    voxels = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    affine = oriented_affine(("P", "S", "R"))
    path = write_nifti(tmp_path / f"x{suffix}", voxels, affine)
    scan = read_nifti(path)
    assert scan.voxels.dtype == np.int16 and np.array_equal(scan.voxels, voxels)
    assert np.allclose(scan.affine, affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"x{suffix}"]  # no temp leftovers
    assert path.stat().st_mode & 0o777 == 0o666 & ~_current_umask()  # as open() would create it


@pytest.mark.parametrize("kind", ["nifti1", "nifti1-big-endian", "nifti2", "scaled", "float", "4d-singleton"])
def test_gzipped_files_read_exactly_as_nibabel_reads_them(tmp_path, kind):
    """.nii.gz files are decompressed with ISA-L, then parsed by nibabel: the voxels and affine must be what
    ``nib.load`` gives for every header variant, byte order and scaling."""
    rng = np.random.default_rng(0)
    voxels = rng.integers(-1024, 2000, (5, 6, 7)).astype(np.int16)
    affine = oriented_affine(("L", "A", "I"))
    if kind == "nifti2":
        image = nib.Nifti2Image(voxels, affine)
    elif kind == "nifti1-big-endian":
        image = nib.Nifti1Image(voxels.astype(">i2"), affine, nib.Nifti1Header(endianness=">"))
    elif kind == "scaled":
        image = nib.Nifti1Image(voxels, affine)
        image.header.set_slope_inter(0.5, -1000.0)
    elif kind == "float":
        image = nib.Nifti1Image(voxels.astype(np.float32) + 0.25, affine)
    elif kind == "4d-singleton":
        image = nib.Nifti1Image(voxels[..., None], affine)
    else:
        image = nib.Nifti1Image(voxels, affine)
    path = tmp_path / "scan.nii.gz"
    nib.save(image, path)
    expected = nib.load(path)
    scan = read_nifti(path)
    stored = np.asanyarray(expected.dataobj)
    np.testing.assert_array_equal(scan.voxels, stored[..., 0] if kind == "4d-singleton" else stored)
    np.testing.assert_allclose(scan.affine, expected.affine)


def test_gzipped_labels_are_written_as_nibabel_reads_them(tmp_path):
    labels = np.zeros((40, 50, 30), np.uint8)
    labels[5:30, 10:40, 3:20] = 1
    labels[10:15, 20:25, 5:9] = 2
    path = write_nifti(tmp_path / "labels.nii.gz", labels, oriented_affine(("R", "A", "S")))
    image = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), labels)
    assert image.get_data_dtype() == np.uint8 and image.header.get_sform(coded=True)[1] == 1


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_failure_leaves_no_partial_file(tmp_path):
    with pytest.raises(Exception):
        write_nifti(tmp_path / "bad.nii.gz", np.zeros((2, 2, 2), dtype=object), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_raise_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), tmp_path / "flat.nii")
    for name in ["missing.nii.gz", "notes.txt", "broken.nii.gz", "flat.nii"]:
        with pytest.raises(InputError):
            read_scan(tmp_path / name)


def _write_dicom_series(folder, volume_lps_rows_cols, spacing=(0.8, 0.7), thickness=2.5, shuffle=True):
    """Write slices [k, row, col] as CT DICOM files in LPS with an axial orientation."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series = generate_uid()
    order = list(range(volume_lps_rows_cols.shape[0]))
    if shuffle:
        order = order[::-1]
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"img{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -50.0, 20.0 + thickness * k]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = thickness
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        pixels = (volume_lps_rows_cols[k] + 1024).astype(np.uint16)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"img{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_geometry(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(-1000, 1000, size=(4, 6, 5)).astype(np.int16)  # [slice, row, col]
    _write_dicom_series(tmp_path, volume)
    scan = read_scan(tmp_path)
    canonical, spacing = scan.canonical()
    # Axial DICOM with identity orientation: rows run posterior, columns run left, slices superior -> exactly
    # the canonical order, so the canonical array is the DICOM pixel stack itself.
    assert np.array_equal(canonical, volume)
    assert spacing == pytest.approx((2.5, 0.8, 0.7))
    assert scan.affine[:3, 3] == pytest.approx([100.0, 50.0, 20.0])  # LPS (-100, -50, 20) in RAS


def test_dicom_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(InputError):
        read_scan(tmp_path)
