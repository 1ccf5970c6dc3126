"""A CT scan as voxels + affine, NIfTI reading and writing, and the canonical axial order models see.

Voxel arrays are kept exactly as stored in the file (NIfTI index order ``[i, j, k]``) together with the
voxel-to-world affine (RAS+ millimetres, as nibabel reports it). Models never see that order: they see the
*canonical* array ``[D, H, W]`` in which

* ``D`` runs inferior -> superior (axial slices),
* ``H`` runs anterior -> posterior (image rows, top of a radiological display is anterior),
* ``W`` runs patient right -> patient left (image columns, radiological convention).

:meth:`Scan.canonical` brings any orthogonal orientation into that order and :meth:`Scan.from_canonical` maps
an array on the canonical grid back to the file's exact voxel order, so a label map lands on the input grid.

Reading any input, DICOM included, is :func:`mixsup.readers.read_scan`. This module knows no other format's
reader: the readers import :class:`Scan`, so importing them here would make a cycle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from nibabel import orientations

from mixsup.errors import InputError
from mixsup.files import atomic_path

#: Axis codes of the canonical array *before* the final transpose: i -> Left, j -> Posterior, k -> Superior.
CANONICAL_AXCODES = ("L", "P", "S")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: ``sizeof_hdr``, the first four bytes of a NIfTI-1 / NIfTI-2 header, in either byte order.
_HEADER_CLASSES = {np.array(size, dtype).tobytes(): image_class
                   for size, image_class in ((348, nib.Nifti1Image), (540, nib.Nifti2Image))
                   for dtype in ("<i4", ">i4")}


@dataclass
class Scan:
    """Voxels as stored (``[i, j, k]``), their voxel-to-RAS affine, the input's name and, for DICOM, the reader's
    record of the source series."""

    voxels: np.ndarray
    affine: np.ndarray
    source: str = ""
    #: The reader's record of the input beyond its voxels, for writing results back onto it: a
    #: :class:`mixsup.dicom.DicomSource` for DICOM (headers, slice order, tilt shifts; read it typed with
    #: :func:`mixsup.dicom.dicom_source`), None for NIfTI. Typed ``object`` because naming the DICOM type here
    #: would make this module import :mod:`mixsup.dicom`, which imports this one.
    source_record: object | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the stored axes ``i, j, k``."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    def _to_canonical_ornt(self) -> np.ndarray:
        return orientations.ornt_transform(
            orientations.io_orientation(self.affine), orientations.axcodes2ornt(CANONICAL_AXCODES)
        )

    def canonical(self) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The voxels in canonical ``[D, H, W]`` order and their spacing ``(sD, sH, sW)`` in mm."""
        ornt = self._to_canonical_ornt()
        lps = orientations.apply_orientation(self.voxels, ornt)
        spacing_lps = [0.0, 0.0, 0.0]
        for src_axis, (dst_axis, _flip) in enumerate(ornt):
            spacing_lps[int(dst_axis)] = self.spacing[src_axis]
        return np.ascontiguousarray(lps.transpose(2, 1, 0)), (spacing_lps[2], spacing_lps[1], spacing_lps[0])

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Map an array on the canonical ``[D, H, W]`` grid (extra leading axes allowed) back to stored order."""
        lead = array.ndim - 3
        lps = np.moveaxis(array, (lead, lead + 1, lead + 2), (lead + 2, lead + 1, lead))
        back = orientations.ornt_transform(
            orientations.axcodes2ornt(CANONICAL_AXCODES), orientations.io_orientation(self.affine)
        )
        if lead:
            lps = np.moveaxis(lps, range(lead), range(3, 3 + lead))
        out = orientations.apply_orientation(lps, back)
        if lead:
            out = np.moveaxis(out, range(3, 3 + lead), range(lead))
        if out.shape[lead:] != self.voxels.shape[:3]:
            raise ValueError(f"array of shape {array.shape} does not fit a scan of shape {self.voxels.shape}")
        # Fortran order, the NIfTI file's: for the usual axial storage the canonical array already lies so in
        # memory (i fastest), and this copy is sequential instead of a transpose (0.22 s on 512x512x100), and
        # so is the write after it.
        return np.asfortranarray(out)


_INT16 = np.iinfo(np.int16)


def to_int16_hu(volume: np.ndarray) -> np.ndarray:
    """Round and clip HU values to int16 (the ``volume`` input's type); non-finite values are bad input."""
    if volume.dtype == np.int16:
        return np.ascontiguousarray(volume)
    if np.issubdtype(volume.dtype, np.floating):
        if not np.all(np.isfinite(volume)):
            raise InputError("the scan contains NaN or infinite voxel values")
        volume = np.rint(volume)
        np.clip(volume, _INT16.min, _INT16.max, out=volume)  # in place: the rounded copy is ours
        return np.ascontiguousarray(volume.astype(np.int16))
    if not np.issubdtype(volume.dtype, np.integer) and volume.dtype != bool:
        raise InputError(f"the scan's voxels have type {volume.dtype}, expected numbers (HU)")
    return np.ascontiguousarray(np.clip(volume, _INT16.min, _INT16.max).astype(np.int16))


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file, by its suffix (``.nii`` or ``.nii.gz``, any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike) -> Scan:
    """Read a 3D NIfTI file keeping its affine (the sform/qform nibabel picks)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        image = _load_nifti(path)
        voxels = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    # Only trailing singleton axes (e.g. a [X, Y, Z, 1] file) are dropped; a real 4th dimension is bad input below.
    singleton = tuple(axis for axis in range(3, voxels.ndim) if voxels.shape[axis] == 1)
    voxels = np.squeeze(voxels, axis=singleton) if singleton else voxels
    if voxels.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(image.shape)}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: the NIfTI header has no usable affine")
    return Scan(voxels=voxels, affine=affine, source=str(path))


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """nibabel's image of ``path``, a ``.gz`` one decompressed with ISA-L first (a 512x512x100 CT in 0.12 s
    instead of zlib's 0.43 s); anything that is not a single-file NIfTI goes to ``nib.load`` as is."""
    if path.suffix.lower() != ".gz":
        return nib.load(str(path))
    raw = igzip.decompress(path.read_bytes())
    image_class = _HEADER_CLASSES.get(raw[:4])
    return image_class.from_bytes(raw) if image_class is not None else nib.load(str(path))


def write_nifti(path: str | os.PathLike, voxels: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``voxels`` with ``affine`` atomically: the file appears complete or not at all."""
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: output must end in .nii or .nii.gz")
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    # nibabel writes in Fortran order; handing it a C-ordered array makes it transpose in small chunks (slow).
    image = nib.Nifti1Image(np.asfortranarray(voxels), affine)
    image.header.set_data_dtype(voxels.dtype)
    # The xform code says "scanner" so viewers place the labels exactly where the scan is.
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    with atomic_path(path, suffix) as tmp:
        if suffix == ".nii.gz":
            # ISA-L at level 1: a tenth of zlib's time, and a smaller file for label maps (measured).
            tmp.write_bytes(igzip.compress(image.to_bytes(), compresslevel=1))
        else:
            nib.save(image, tmp)
    return path
