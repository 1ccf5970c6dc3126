"""Reading a CT series from DICOM: a folder, a zip archive or one file.

Inputs (:func:`read_dicom`)
    A folder (searched recursively), a ``.zip`` archive of one, or a single DICOM file. Classic single-frame
    images and enhanced / legacy-converted multi-frame CT (one file whose per-frame functional groups carry each
    frame's position, orientation, pixel spacing and rescale) are both read; every frame becomes one slice.
    Pixel data are decoded by pydicom with the decoders the package depends on (pylibjpeg with its libjpeg,
    openjpeg and RLE plugins), so uncompressed, deflated, RLE, JPEG (baseline, extended, lossless), JPEG-LS and
    JPEG 2000 series all read on a clean install. A file that cannot be decoded is bad input (exit 2).

Which series (:func:`choose_series`)
    Headers are read first (``stop_before_pixels``); pixels only for the chosen series. Localizers and objects
    without pixels (SR, PR, DICOMDIR) are ignored. When several image series remain, the rule is: **CT before any
    other modality, then axial before other orientations, then the most slices** (ties: thinner slices, then the
    lower series number); ``series_uid`` (the CLI's ``--series``) overrides it. The choice is reported in one line
    (:attr:`DicomSource.note`) that names series by number and UID only, never the patient. A series that is not
    CT is refused: the models are trained on Hounsfield units.

Geometry
    DICOM PS3.3 C.7.6.2.1.1: pixel (column ``i``, row ``j``) of a slice lies at ``ImagePositionPatient +
    i * PixelSpacing[1] * row_cosines + j * PixelSpacing[0] * column_cosines`` (LPS). Slices are ordered along the
    slice normal, not by file name or InstanceNumber. The scan's affine is RAS (nibabel's convention) and
    orthogonal: its third axis is the slice normal times the slice spacing.

Gantry tilt
    A tilted acquisition's slices are shifted in-plane from one to the next, so its true grid is sheared. The
    slices are **resampled onto the orthogonal grid** (each slice moved by its in-plane offset, linear
    interpolation, air where nothing was measured), as dcm2niix does, so models see anatomy at the right place and
    label maps written as NIfTI lie on that orthogonal grid. Each slice's shift is kept in :class:`DicomSource`,
    so :mod:`mixsup.dicom_seg` writes a DICOM SEG back on the *source* slices. Drift of less than
    :data:`TILT_TOLERANCE_PX` pixels over the whole series is rounding, not tilt, and is ignored.

Source record
    A scan read here carries a :class:`DicomSource` (the series' headers, slice order and tilt shifts) as its
    ``source_record``; :func:`dicom_source` reads it back typed. Writing a DICOM SEG is :mod:`mixsup.dicom_seg`;
    choosing between NIfTI and DICOM for an input path is :func:`mixsup.readers.read_scan`.
"""
from __future__ import annotations

import io
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from mixsup.errors import InputError
from mixsup.scan import Scan, to_int16_hu

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

CT_MODALITY = "CT"
#: In-plane drift (pixels, first to last slice) below which slice positions count as rounding, not gantry tilt.
TILT_TOLERANCE_PX = 0.1
#: HU given to voxels that a tilt correction moves in from outside the measured field of view: air.
AIR_HU = -1024.0
#: A slice normal within this angle (degrees) of the patient's head-foot axis makes a series axial.
AXIAL_MAX_ANGLE_DEG = 45.0


# -- files: a folder, a zip archive or one file -----------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One file of the input: a path, or a member of a zip archive (read through ``opener``)."""

    name: str
    opener: Callable[[], io.BufferedIOBase] = field(repr=False, compare=False)

    def read(self, pixels: bool) -> "Dataset":
        """The dataset; without ``pixels`` reading stops before the pixel data, which is most of a file."""
        import pydicom

        with self.opener() as handle:
            head = handle.read(132)
            handle.seek(0)
            # Files without the 128-byte preamble (ACR-NEMA style, some old archives) start with group 0x0008
            # or 0x0002 little endian; only those are read with force=True, so a stray non-DICOM file is skipped.
            force = head[128:132] != b"DICM" and head[:2] in (b"\x08\x00", b"\x02\x00")
            return pydicom.dcmread(handle, stop_before_pixels=not pixels, force=force)


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that ends in ``.dcm`` or starts with the DICOM preamble."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_zip_file(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive (by content, whatever its name)."""
    path = Path(path)
    return path.is_file() and zipfile.is_zipfile(path)


def _skipped_name(parts: Sequence[str]) -> bool:
    # Hidden files and macOS's "__MACOSX/._x" resource forks that zip tools add beside every file.
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


@contextmanager
def open_members(path: str | Path) -> Iterator[list[Member]]:
    """The files of a folder (recursively), of a zip archive, or the one file ``path``; zip members stay readable
    while the context is open."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _skipped_name(p.relative_to(path).parts))
        yield [Member(str(p), lambda p=p: p.open("rb")) for p in files]
        return
    if is_zip_file(path):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path}: not a readable zip archive ({exc})") from None
        with archive:
            infos = [
                info for info in archive.infolist() if not info.is_dir() and not _skipped_name(info.filename.split("/"))
            ]
            # Members are read whole into memory: pydicom seeks, which is slow on a compressed zip stream.
            yield [
                Member(f"{path}:{info.filename}", lambda info=info: io.BytesIO(archive.read(info))) for info in infos
            ]
        return
    if path.is_file():
        yield [Member(str(path), lambda: path.open("rb"))]
        return
    raise InputError(f"{path}: no such file or folder")


# -- headers -> frames -------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One 2D image: a single-frame instance, or one frame of a multi-frame instance."""

    member: Member
    header: "Dataset" = field(repr=False)
    #: 0-based frame index in a multi-frame instance; None for a single-frame instance.
    frame_index: int | None
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row cosines then column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    thickness: float | None
    slope: float
    intercept: float
    rows: int
    columns: int

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)


def _functional_value(groups: Sequence["Dataset | None"], sequence: str, keyword: str):
    """``keyword`` from the first of ``groups`` (per-frame, then shared functional groups) whose ``sequence``
    has it; None when none has."""
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value):
            item = group[sequence][0]
            if keyword in item and item[keyword].value not in (None, ""):
                return item[keyword].value
    return None


def _float_or(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def frames_of(member: Member, ds: "Dataset") -> list[Frame]:
    """The frames of one image instance with their geometry and rescale; [] when ``ds`` is not a placeable
    grayscale image (no rows, colour, a localizer, or no position)."""
    if "Rows" not in ds or "Columns" not in ds or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return []
    if any(str(value).upper() == "LOCALIZER" for value in (ds.get("ImageType") or [])):
        return []
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = []
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if len(ds.get("SharedFunctionalGroupsSequence") or []) else None
        per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
        count = int(ds.get("NumberOfFrames", 1) or 1)
        for index in range(count):
            groups = (per_frame[index] if index < len(per_frame) else None, shared)
            position = _functional_value(groups, "PlanePositionSequence", "ImagePositionPatient")
            orientation = _functional_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _functional_value(groups, "PixelMeasuresSequence", "PixelSpacing")
            if position is None or orientation is None or spacing is None:
                return []
            thickness = _functional_value(groups, "PixelMeasuresSequence", "SliceThickness")
            slope = _functional_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _functional_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            frames.append(
                Frame(
                    member=member,
                    header=ds,
                    frame_index=index,
                    position=np.asarray(position, dtype=np.float64),
                    orientation=np.asarray(orientation, dtype=np.float64),
                    pixel_spacing=(float(spacing[0]), float(spacing[1])),
                    thickness=_float_or(thickness, 0.0) or None,
                    slope=_float_or(slope if slope is not None else ds.get("RescaleSlope"), 1.0),
                    intercept=_float_or(intercept if intercept is not None else ds.get("RescaleIntercept"), 0.0),
                    rows=rows,
                    columns=columns,
                )
            )
        return _checked(frames)
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return []
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return []  # a classic multi-frame image (cine, NM) has one position for all frames: not a CT volume
    return _checked([
        Frame(
            member=member,
            header=ds,
            frame_index=None,
            position=np.asarray(ds.ImagePositionPatient, dtype=np.float64),
            orientation=np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
            pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            thickness=_float_or(ds.get("SliceThickness"), 0.0) or None,
            slope=_float_or(ds.get("RescaleSlope"), 1.0),
            intercept=_float_or(ds.get("RescaleIntercept"), 0.0),
            rows=rows,
            columns=columns,
        )
    ])


def _checked(frames: list[Frame]) -> list[Frame]:
    """``frames``, or ValueError when a position or orientation has the wrong number of values."""
    for frame in frames:
        if frame.position.shape != (3,) or frame.orientation.shape != (6,) or min(frame.pixel_spacing) <= 0:
            raise ValueError("malformed image plane attributes")
    return frames


@dataclass
class SeriesCandidate:
    """The frames of one SeriesInstanceUID found in the input (headers only)."""

    uid: str
    modality: str
    number: int | None
    frames: list[Frame]

    @property
    def slice_count(self) -> int:
        return len(self.frames)

    @property
    def normal(self) -> np.ndarray:
        orientation = self.frames[0].orientation
        return np.cross(orientation[:3], orientation[3:])

    @property
    def axial(self) -> bool:
        """Whether the slice normal lies within :data:`AXIAL_MAX_ANGLE_DEG` of the head-foot axis."""
        normal = self.normal
        norm = float(np.linalg.norm(normal)) or 1.0
        return abs(normal[2]) / norm >= np.cos(np.radians(AXIAL_MAX_ANGLE_DEG))

    @property
    def thickness(self) -> float:
        values = [f.thickness for f in self.frames if f.thickness]
        return float(np.median(values)) if values else float("inf")

    def describe(self) -> str:
        """Series number, modality, orientation and size: no free text (descriptions may hold PHI)."""
        number = f"series {self.number}" if self.number is not None else "series"
        orientation = "axial" if self.axial else "not axial"
        return f"{number} ({self.modality or '?'}, {orientation}, {self.slice_count} slices, UID {self.uid})"


def read_headers(members: Sequence[Member]) -> list[SeriesCandidate]:
    """Every image series among ``members``, by SeriesInstanceUID, from headers only."""
    from pydicom.errors import InvalidDicomError

    series: dict[str, SeriesCandidate] = {}
    for member in members:
        try:
            ds = member.read(pixels=False)
        except InvalidDicomError:
            continue  # not DICOM: READMEs, viewers and other files that exports put beside the images
        except Exception:  # noqa: BLE001 - a corrupt file or zip member (any error) is not one of the images
            continue
        try:
            frames = frames_of(member, ds)
        except (ValueError, TypeError, IndexError, AttributeError, KeyError):
            continue  # a header whose geometry is malformed cannot be placed; it is left out
        if not frames:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid not in series:
            number = ds.get("SeriesNumber")
            series[uid] = SeriesCandidate(
                uid=uid,
                modality=str(ds.get("Modality", "") or "").upper(),
                number=int(number) if number not in (None, "") else None,
                frames=[],
            )
        series[uid].frames.extend(frames)
    return list(series.values())


def choose_series(
    candidates: Sequence[SeriesCandidate], series_uid: str | None, where: str
) -> tuple[SeriesCandidate, str]:
    """The series to read and a one-line note saying why (empty when there was no choice to make).

    See the module docstring for the rule. Raises :class:`InputError` when ``series_uid`` is not among the
    candidates or the chosen series is not CT.
    """
    if not candidates:
        raise InputError(f"{where}: no DICOM images with position and orientation found")
    if series_uid is not None:
        chosen = [c for c in candidates if c.uid == series_uid]
        if not chosen:
            listing = "; ".join(c.describe() for c in candidates)
            raise InputError(f"{where}: no series with UID {series_uid}; found {listing}")
        candidate, note = chosen[0], ""
    else:
        def rank(c: SeriesCandidate):
            return (
                c.modality != CT_MODALITY,
                not c.axial,
                -c.slice_count,
                c.thickness,
                c.number if c.number is not None else float("inf"),
                c.uid,
            )

        ordered = sorted(candidates, key=rank)
        candidate, note = ordered[0], ""
        if len(ordered) > 1:
            others = "; ".join(c.describe() for c in ordered[1:])
            note = (
                f"{where}: {len(ordered)} image series; chose {candidate.describe()} by the rule CT, axial, most "
                f"slices (pick another with --series UID); others: {others}"
            )
    if candidate.modality != CT_MODALITY:
        raise InputError(
            f"{where}: {candidate.describe()} is {candidate.modality or 'of unknown modality'}, not CT; "
            "mixsup segments CT (Hounsfield units) only"
        )
    return candidate, note


# -- geometry ----------------------------------------------------------------------------------------------------


@dataclass
class Geometry:
    """Where the sorted frames of a series lie: the orthogonal LPS affine and each slice's in-plane offset."""

    frames: list[Frame]  # sorted along the slice normal
    affine_lps: np.ndarray
    #: Per slice, the offset (pixels along the scan's ``i`` (columns) and ``j`` (rows) axes) of the source slice
    #: from the orthogonal grid; all zero without gantry tilt.
    shifts: np.ndarray

    @property
    def tilted(self) -> bool:
        return bool(np.any(self.shifts))


def series_geometry(frames: Sequence[Frame], where: str) -> Geometry:
    """Sort ``frames`` along the slice normal and build the orthogonal grid they lie on (see the module docs)."""
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=1e-3):
            raise InputError(f"{where}: the series mixes slice orientations; is it more than one stack?")
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise InputError(f"{where}: DICOM slices differ in size: {first.rows}x{first.columns}, "
                             f"{frame.rows}x{frame.columns}")
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise InputError(f"{where}: DICOM slices differ in pixel spacing")
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    unit = abs(np.linalg.norm(row_cos) - 1) < 1e-2 and abs(np.linalg.norm(col_cos) - 1) < 1e-2
    if not unit or abs(row_cos @ col_cos) > 1e-2:
        raise InputError(f"{where}: ImageOrientationPatient is not two orthogonal unit vectors")
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    ordered = sorted(frames, key=lambda f: float(f.position @ normal))
    positions = np.array([f.position for f in ordered])
    row_spacing, col_spacing = first.pixel_spacing
    shifts = np.zeros((len(ordered), 2))
    if len(ordered) > 1:
        along = positions @ normal
        steps = np.diff(along)
        if np.any(steps < 1e-3):
            raise InputError(f"{where}: two DICOM slices share a position; is it more than one acquisition?")
        if steps.max() - steps.min() > 0.01 * steps.mean() + 1e-3:
            raise InputError(
                f"{where}: DICOM slices are not evenly spaced (gaps {steps.min():.2f}-{steps.max():.2f} mm)"
            )
        step = (along[-1] - along[0]) / (len(ordered) - 1)
        # In-plane offset of each slice from the first, in pixels along columns (i) and rows (j).
        offsets = positions - positions[0]
        shifts = np.stack([offsets @ row_cos / col_spacing, offsets @ col_cos / row_spacing], axis=1)
        linear = np.outer(np.arange(len(ordered)) / (len(ordered) - 1), shifts[-1])
        if np.abs(shifts - linear).max() > 0.5:  # half a pixel off the line: not one stack
            raise InputError(f"{where}: DICOM slice positions do not lie on a straight line")
        if np.abs(shifts[-1]).max() < TILT_TOLERANCE_PX:
            shifts = np.zeros_like(shifts)
        slice_vector = normal * step
    else:
        spacing = _float_or(first.header.get("SpacingBetweenSlices"), 0.0) or first.thickness or 1.0
        slice_vector = normal * spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = slice_vector
    affine_lps[:3, 3] = positions[0]
    return Geometry(frames=list(ordered), affine_lps=affine_lps, shifts=shifts)


# -- pixels ------------------------------------------------------------------------------------------------------


def _transfer_syntax_name(ds: "Dataset") -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown transfer syntax"


def _decode_error(member: Member, ds: "Dataset | None", exc: Exception) -> InputError:
    syntax = _transfer_syntax_name(ds) if ds is not None else "unreadable file"
    # pydicom lists each plugin's failure on its own line; the error stays one line, and a bounded one.
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    if len(message) > 300:
        message = message[:297] + "..."
    return InputError(f"{member.name}: cannot decode the pixel data ({syntax}): {message}")


def _frame_pixels(geometry: Geometry) -> Iterator[tuple[int, np.ndarray]]:
    """``(slice index, stored pixels [rows, columns])`` for every slice, each file read and decoded once."""
    from pydicom.pixels import iter_pixels

    by_member: dict[str, list[tuple[int, Frame]]] = {}
    for k, frame in enumerate(geometry.frames):
        by_member.setdefault(frame.member.name, []).append((k, frame))
    for entries in by_member.values():
        member = entries[0][1].member
        ds = None
        try:
            ds = member.read(pixels=True)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise InputError(f"{member.name}: the image has no pixel data")
            if entries[0][1].frame_index is None:
                yield entries[0][0], np.asarray(ds.pixel_array)
                continue
            slice_of = {frame.frame_index: k for k, frame in entries}
            indices = sorted(slice_of)
            # Frame by frame: a 600-frame enhanced CT is never held decoded in full.
            for index, pixels in zip(indices, iter_pixels(ds, indices=indices)):
                yield slice_of[index], np.asarray(pixels)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise anything; all of it is "this file is unusable"
            raise _decode_error(member, ds, exc) from None


def read_pixels(geometry: Geometry, where: str) -> np.ndarray:
    """The series as int16 HU in the scan's stored order ``[i (columns), j (rows), k (slices)]``; tilted series
    are resampled onto the orthogonal grid."""
    first = geometry.frames[0]
    volume = np.empty((first.columns, first.rows, len(geometry.frames)), dtype=np.int16)
    filled = np.zeros(len(geometry.frames), dtype=bool)
    for k, pixels in _frame_pixels(geometry):
        frame = geometry.frames[k]
        if pixels.shape != (frame.rows, frame.columns):
            raise InputError(
                f"{frame.member.name}: decoded pixels have shape {pixels.shape}, the header says "
                f"{frame.rows}x{frame.columns}"
            )
        hu = pixels.astype(np.float64) * frame.slope + frame.intercept
        hu = hu.T  # pixel_array is [row, column]; the scan's i axis runs along columns
        if np.any(geometry.shifts[k]):
            from scipy import ndimage

            # Orthogonal voxel p of slice k is source pixel p - shift; ndimage.shift(x, s)[p] is x[p - s].
            hu = ndimage.shift(hu, geometry.shifts[k], order=1, mode="constant", cval=AIR_HU)
        volume[:, :, k] = to_int16_hu(hu)
        filled[k] = True
    if not filled.all():
        raise InputError(f"{where}: {int((~filled).sum())} slices could not be read")
    return volume


# -- reading -----------------------------------------------------------------------------------------------------


@dataclass
class DicomSource:
    """What a :class:`Scan` read from DICOM remembers of its source, to write a DICOM SEG that references it."""

    series_uid: str
    #: One per slice ``k`` of the scan, sorted along the slice normal (headers only, no pixel data).
    frames: list[Frame] = field(repr=False)
    #: Per slice, the in-plane offset (pixels along ``i``, ``j``) undone by the tilt correction; zeros if none.
    shifts: np.ndarray = field(repr=False)
    #: The one-line note on the series choice ("" when the input held one image series).
    note: str = ""

    @property
    def tilted(self) -> bool:
        return bool(np.any(self.shifts))


def read_dicom(path: str | Path, series_uid: str | None = None) -> Scan:
    """Read one CT series from a folder, a zip archive or a DICOM file as a :class:`Scan` in HU.

    ``series_uid`` picks the series when the input holds several; otherwise the rule in the module docstring
    does, and the scan's :attr:`DicomSource.note` (see :func:`dicom_source`) says which it took. Bad input of
    every kind raises :class:`InputError`.
    """
    where = str(path)
    with open_members(path) as members:
        candidates = read_headers(members)
        candidate, note = choose_series(candidates, series_uid, where)
        geometry = series_geometry(candidate.frames, where)
        voxels = read_pixels(geometry, where)
    source = DicomSource(series_uid=candidate.uid, frames=geometry.frames, shifts=geometry.shifts, note=note)
    return Scan(voxels=voxels, affine=_LPS_TO_RAS @ geometry.affine_lps, source=where, source_record=source)


def dicom_source(scan: Scan) -> DicomSource | None:
    """The DICOM series ``scan`` was read from (its ``source_record``), or None when it was not read from DICOM.

    :class:`Scan` types the record as ``object`` so that :mod:`mixsup.scan` need not import this module; this is
    the typed way back.
    """
    record = scan.source_record
    return record if isinstance(record, DicomSource) else None
