"""Which scans a batch run segments, and the case name each one gets.

Each INPUT of ``mixsup-client batch`` is one of:

* a **folder**, walked recursively: every NIfTI file is a scan, and every folder that directly holds DICOM files is a
  scan (one series folder; the DICOM reader reads it and its sub-folders and picks the series by its stated rule,
  so the walk does not descend further). Hidden entries, label maps (``*_seg``, ``*_prob``, LiTS
  ``segmentation-N``) and the output folder are skipped, and so are DICOM folders without a CT image (SEG, SR,
  dose reports, localizers): they are counted in one note line, not reported as failures.
* a **glob** (quote it so the shell does not expand it; ``**`` recurses): each match is taken as above.
* a **CSV** file (``.csv``) with a ``path`` column (or ``scan`` / ``input`` / ``file``) and an optional ``case``
  column: one scan per row, relative paths relative to the CSV.
* a **text** file listing one scan per line (``#`` comments), relative paths relative to the list.
* a NIfTI file, a DICOM file or a ``.zip`` of a series: that one scan.

A case's name is its path relative to the folder (or the glob's fixed prefix, or the list's folder) without the
NIfTI / zip / dcm suffix, e.g. ``patient7/portal`` for ``ARCHIVE/patient7/portal/`` given ``ARCHIVE``. Outputs go to
``OUT_DIR/<case>_seg.nii.gz``, mirroring the archive's layout, so cases in different sub-folders never collide.
"""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from mixsup.dicom import is_dicom_file, is_zip_file
from mixsup.errors import InputError
from mixsup.scan import NIFTI_SUFFIXES, is_nifti

#: Input suffixes dropped from a case's name (``series.zip`` -> ``series``); NIfTI suffixes are dropped as well.
DICOM_INPUT_SUFFIXES = (".zip", ".dcm")
#: Suffixes of the files the client writes beside a scan; such files are outputs, not scans.
OUTPUT_STEM_SUFFIXES = ("_seg", "_prob")
CSV_PATH_COLUMNS = ("path", "scan", "input", "file")
CSV_CASE_COLUMN = "case"
_GLOB_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class CaseInput:
    """One scan of a batch: its case name (a relative POSIX path, see the module) and where it is."""

    case: str
    path: Path


@dataclass
class Collected:
    """The scans found, and notes on what was passed over (one line each)."""

    cases: list[CaseInput]
    notes: list[str]


def strip_scan_suffix(name: str) -> str:
    """``x`` for ``x.nii`` / ``x.nii.gz`` / ``x.zip`` / ``x.dcm`` (any case); other names are kept."""
    for suffix in sorted(NIFTI_SUFFIXES + DICOM_INPUT_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name(scan_path: Path) -> str:
    """The case name of a scan given on its own: its file or folder name without the scan suffix."""
    return strip_scan_suffix(Path(scan_path).name)


def safe_case(name: str) -> str:
    """``name`` as a relative POSIX path that stays inside the output folder (no ``..``, no root, no drive)."""
    parts = [part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in ("", ".", "..", "/")]
    parts = [part.replace(":", "_") for part in parts]
    return "/".join(parts) or "case"


def relative_case(scan: Path, root: Path) -> str:
    """The case name of ``scan`` found under ``root``: the relative path without the scan suffix."""
    try:
        relative = Path(os.path.abspath(scan)).relative_to(Path(os.path.abspath(root)))
    except ValueError:
        return safe_case(case_name(scan))
    if not relative.parts:
        return safe_case(case_name(scan))
    return safe_case(str(PurePosixPath(*relative.parts[:-1], strip_scan_suffix(relative.parts[-1]))))


def is_output_file(path: Path) -> bool:
    """Label maps and probability maps beside the scans: the client's own outputs and LiTS's ``segmentation-N``."""
    stem = case_name(path)
    return stem.endswith(OUTPUT_STEM_SUFFIXES) or stem.lower().startswith("segmentation-")


class _Walker:
    """Finds scans under folders; remembers the DICOM folders it passed over."""

    def __init__(self, exclude: Path | None):
        self.exclude = Path(os.path.abspath(exclude)) if exclude is not None else None
        self.not_ct: list[Path] = []

    def _excluded(self, path: Path) -> bool:
        return self.exclude is not None and Path(os.path.abspath(path)) == self.exclude

    def scans(self, path: Path) -> Iterator[Path]:
        """The scans at ``path``: itself when it is a scan file or a DICOM series folder, else those under it."""
        if self._excluded(path):
            return
        if path.is_file():
            if (is_nifti(path) and not is_output_file(path)) or is_dicom_file(path) or is_zip_file(path):
                yield path
            return
        if not path.is_dir():
            return
        dicom_files = [entry for entry in sorted(path.iterdir()) if is_dicom_file(entry)]
        if dicom_files:
            if any(_is_ct_image(entry) for entry in dicom_files):
                yield path
            else:
                self.not_ct.append(path)
            return
        for entry in sorted(path.iterdir()):
            if entry.name.startswith(".") or self._excluded(entry):
                continue
            if entry.is_dir():
                yield from self.scans(entry)
            elif entry.is_file() and is_nifti(entry) and not is_output_file(entry):
                yield entry


def _is_ct_image(path: Path) -> bool:
    """Whether the DICOM file ``path`` is a CT image other than a localizer (unreadable headers count as CT, so
    the reader reports what is wrong with them instead of the walk hiding them)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "ImageType"])
    except Exception:  # noqa: BLE001 - any unreadable file is the reader's to report
        return True
    image_type = [str(value).upper() for value in (ds.get("ImageType") or [])]
    return str(ds.get("Modality", "CT")).upper() == "CT" and "LOCALIZER" not in image_type


def _glob_root(pattern: str) -> Path:
    """The folder part of ``pattern`` before its first wildcard: case names are relative to it."""
    parts = []
    for part in Path(pattern).parts:
        if _GLOB_MAGIC & set(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _list_entries(list_file: Path) -> list[tuple[Path, str | None]]:
    """(path, case or None) of each scan named by a CSV or text list; relative paths are relative to the list."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_file}: cannot read the list of scans ({exc})") from None
    entries: list[tuple[str, str | None]] = []
    if list_file.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        path_column = next((columns[c] for c in CSV_PATH_COLUMNS if c in columns), None)
        if path_column is None:
            raise InputError(f"{list_file}: the CSV needs a column named one of {', '.join(CSV_PATH_COLUMNS)}")
        case_column = columns.get(CSV_CASE_COLUMN)
        for row in reader:
            path = (row.get(path_column) or "").strip()
            if path:
                entries.append((path, (row.get(case_column) or "").strip() or None if case_column else None))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, None))
    resolved = []
    for text_path, case in entries:
        path = Path(text_path).expanduser()
        resolved.append((path if path.is_absolute() else list_file.parent / path, case))
    return resolved


def collect_cases(sources: Sequence[str | os.PathLike], output_dir: Path | None = None) -> Collected:
    """The scans of ``sources`` (see the module) in order, with their case names; ``output_dir`` is skipped.

    Raises :class:`InputError` for a source that does not exist, a glob without matches, an unreadable list, or
    when nothing at all is found.
    """
    walker = _Walker(output_dir)
    cases: list[CaseInput] = []
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if not path.exists() and _GLOB_MAGIC & set(text):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise InputError(f"{text}: no file or folder matches")
            root = _glob_root(str(path))
            for match in matches:
                cases.extend(CaseInput(relative_case(scan, root), scan) for scan in walker.scans(Path(match)))
        elif path.is_dir():
            cases.extend(CaseInput(relative_case(scan, path), scan) for scan in walker.scans(path))
        elif not path.exists():
            raise InputError(f"{text}: no such file or folder")
        elif is_nifti(path) or is_dicom_file(path) or is_zip_file(path):
            cases.append(CaseInput(safe_case(case_name(path)), path))
        else:
            listed = _list_entries(path)
            if not listed:
                raise InputError(f"{text}: the list of scans is empty")
            for scan, case in listed:
                cases.append(CaseInput(safe_case(case) if case else relative_case(scan, path.parent), scan))
    # The same scan reached twice (two globs, a folder and a list) is segmented once.
    seen: set[str] = set()
    distinct = []
    for case in cases:
        key = os.path.abspath(case.path)
        if key not in seen:
            seen.add(key)
            distinct.append(case)
    cases = distinct
    notes = []
    if walker.not_ct:
        notes.append(f"skipped {len(walker.not_ct)} DICOM folder(s) without a CT image (SEG, SR, localizers, ...)")
    if not cases:
        raise InputError(f"{', '.join(map(str, sources))}: no NIfTI files or DICOM series folders found")
    return Collected(cases, notes)


def unique_cases(cases: Sequence[CaseInput]) -> tuple[list[CaseInput], int]:
    """``cases`` with every case name unique: a name already taken gets ``-2``, ``-3``, ... (deterministic for the
    same inputs in the same order, so a re-run finds its earlier outputs); also how many were renamed."""
    taken: set[str] = set()
    unique, renamed = [], 0
    for case in cases:
        name, number = case.case, 1
        while name in taken:
            number += 1
            name = f"{case.case}-{number}"
        renamed += name != case.case
        taken.add(name)
        unique.append(CaseInput(name, case.path) if name != case.case else case)
    return unique, renamed
