"""A training dataset folder: LiTS file naming plus a manifest saying how each case is supervised.

Layout (``N`` is an integer; real LiTS downloads use ``.nii``, phantoms ``.nii.gz``; numbers may have gaps)::

    volume-N.nii[.gz]          the CT
    segmentation-N.nii[.gz]    its mask (0 background, 1 liver, 2 lesion)
    instances-N.nii[.gz]       optional lesion instance ids on the mask's grid (one id per lesion, 0 elsewhere);
                               written by ``mixsup-data phantoms``, absent from real LiTS folders
    boxes/boxes-N.json         optional per-slice boxes on the canonical grid (see boxes.py)
    boxes/boxes-N.perturbed.json  the same boxes after the paper's perturbation (``mixsup-data split --perturb-boxes``)
    hidden/segmentation-N.nii.gz  masks kept out of training (phantoms' weak / unlabeled cases); used only to split
    hidden/instances-N.nii.gz     their lesion instances
    manifest.json              optional; without it every case with a segmentation is strong, the rest unlabeled

``manifest.json``::

    {"format": "mixsup-manifest", "version": 1,
     "split": {"seed": 0, "fractions": {"strong": .., "weak": .., "test": .., "unlabeled": ..},
               "perturb_boxes": false},                                     optional, written by mixsup-data split
     "cases": [{"case": "N", "volume": "volume-N.nii.gz", "segmentation": "segmentation-N.nii.gz" | null,
                "boxes": "boxes/boxes-N.json" | null, "supervision": "strong" | "weak" | "unlabeled" | "test",
                "boxes_perturbed": true | false,                             optional, weak cases only
                "instances": "instances-N.nii.gz"}]}                         optional, cases with a segmentation

A strong case has a segmentation; a weak case has boxes and no segmentation (its mask, if any, stays hidden); an
unlabeled case has neither. A test case has a segmentation and no boxes and is held out for evaluation: no
training recipe may see it (``Manifest.strong/weak/unlabeled`` never return it). Paths are relative to the
manifest's folder. The optional keys are omitted when unset, so older manifests load and hash as before.

Lesion instances tell touching lesions apart, which a label map cannot: two lesions that touch are one connected
component of label 2. A case without an instances file (every real LiTS case) gets the 8-connected components of
each slice's lesion mask instead (:func:`lesion_components`), so touching lesions there count as one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from mixsup.errors import InputError
from mixsup.files import atomic_path
from mixsup.scan import Scan, read_nifti, to_int16_hu
from mixsup.training.data.boxes import Box, boxes_from_labels, load_boxes

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "mixsup-manifest"
MANIFEST_VERSION = 1
STRONG, WEAK, UNLABELED, TEST = "strong", "weak", "unlabeled", "test"
SUPERVISIONS = (STRONG, WEAK, UNLABELED, TEST)
BOXES_DIR = "boxes"
#: Where masks kept out of training lie (phantoms' weak and unlabeled cases): for evaluation and re-splitting only.
HIDDEN_DIR = "hidden"
LABEL_VALUES = (0, 1, 2)
LESION_LABEL = 2
AFFINE_TOLERANCE_MM = 1e-3

_LITS_NAME = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
INSTANCES_PREFIX = "instances"


@dataclass
class Case:
    """One case; file paths are relative to the dataset root (``root``, set when loaded)."""

    case: str
    volume: str
    segmentation: str | None = None
    boxes: str | None = None
    supervision: str = STRONG
    #: weak cases: whether the boxes file holds perturbed boxes (None: not recorded, e.g. an older manifest)
    boxes_perturbed: bool | None = None
    #: lesion instance ids on the segmentation's grid (None: none recorded; instances come from connected components)
    instances: str | None = None
    root: Path | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        document = {"case": self.case, "volume": self.volume, "segmentation": self.segmentation,
                    "boxes": self.boxes, "supervision": self.supervision}
        if self.boxes_perturbed is not None:
            document["boxes_perturbed"] = self.boxes_perturbed
        if self.instances is not None:
            document["instances"] = self.instances
        return document

    def path(self, relative: str) -> Path:
        return (self.root or Path(".")) / relative


@dataclass
class Manifest:
    """The cases of a dataset folder and where it is."""

    cases: list[Case]
    root: Path
    #: how ``mixsup-data split`` made it (seed, fractions, perturb_boxes); None for other manifests
    split: dict | None = None

    def strong(self) -> list[Case]:
        return [c for c in self.cases if c.supervision == STRONG]

    def weak(self) -> list[Case]:
        return [c for c in self.cases if c.supervision == WEAK]

    def unlabeled(self) -> list[Case]:
        return [c for c in self.cases if c.supervision == UNLABELED]

    def test(self) -> list[Case]:
        """The held-out cases, for evaluation only."""
        return [c for c in self.cases if c.supervision == TEST]

    def to_json(self) -> dict:
        document = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
        if self.split is not None:
            document["split"] = self.split
        document["cases"] = [c.to_json() for c in self.cases]
        return document

    def sha256(self) -> str:
        """Hash of the canonical JSON (sorted keys, no whitespace): checkpoints record which split they saw."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ loading
def load_dataset(root: str | os.PathLike) -> Manifest:
    """The dataset at ``root``: its ``manifest.json`` validated, or one built from LiTS file names.

    ``root`` may also be a manifest file (e.g. one written with ``mixsup-data split --out``); its paths are
    relative to its folder.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_FILENAME
    if root.is_file():
        manifest_path, root = root, root.parent
    elif not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
    else:
        manifest = manifest_from_lits_names(root)
    for case in manifest.cases:
        case.root = root
    validate_manifest(manifest)
    return manifest


def _read_manifest(path: Path) -> Manifest:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a mixsup manifest (expected \"format\": \"{MANIFEST_FORMAT}\")")
    if document.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path}: unsupported manifest version {document.get('version')!r} (expected {MANIFEST_VERSION})")
    entries = document.get("cases")
    if not isinstance(entries, list):
        raise InputError(f"{path}: \"cases\" must be a list")
    split = document.get("split")
    if split is not None and not isinstance(split, dict):
        raise InputError(f"{path}: \"split\" must be an object or absent")
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("case"), str) or not isinstance(entry.get("volume"), str):
            raise InputError(f"{path}: every case needs string \"case\" and \"volume\" entries, got {entry!r}")
        optional = {key: entry.get(key) for key in ("segmentation", "boxes", "instances")}
        for key, value in optional.items():
            if value is not None and not isinstance(value, str):
                raise InputError(f"{path}: case {entry['case']}: \"{key}\" must be a path or null")
        perturbed = entry.get("boxes_perturbed")
        if perturbed is not None and not isinstance(perturbed, bool):
            raise InputError(f"{path}: case {entry['case']}: \"boxes_perturbed\" must be true, false or absent")
        cases.append(Case(entry["case"], entry["volume"], optional["segmentation"], optional["boxes"],
                          entry.get("supervision", STRONG), perturbed, optional["instances"]))
    return Manifest(cases=cases, root=path.parent, split=split)


def manifest_from_lits_names(root: str | os.PathLike) -> Manifest:
    """Cases from ``volume-N`` / ``segmentation-N`` files as LiTS ships them, sorted by N.

    With a segmentation a case is strong (with ``instances-N.nii[.gz]`` if that lies beside it); without one but
    with ``boxes/boxes-N.json`` weak; otherwise unlabeled.
    """
    root = Path(root)
    found: dict[str, dict[int, str]] = {"volume": {}, "segmentation": {}}
    for entry in sorted(os.listdir(root)):
        match = _LITS_NAME.match(entry)
        if not match:
            continue
        kind, number = match.group(1), int(match.group(2))
        if number in found[kind]:
            raise InputError(f"{root}: both {found[kind][number]} and {entry} exist; keep one")
        found[kind][number] = entry
    orphans = sorted(set(found["segmentation"]) - set(found["volume"]))
    if orphans:
        raise InputError(f"{root}: {found['segmentation'][orphans[0]]} has no matching volume-{orphans[0]}.nii[.gz]")
    if not found["volume"]:
        raise InputError(f"{root}: no {MANIFEST_FILENAME} and no volume-N.nii[.gz] files")
    cases = []
    for number in sorted(found["volume"]):
        segmentation = found["segmentation"].get(number)
        boxes = boxes_path(str(number))
        boxes = boxes if (root / boxes).is_file() else None
        supervision = STRONG if segmentation else (WEAK if boxes else UNLABELED)
        instances = existing_instances(root, str(number)) if segmentation else None
        cases.append(Case(str(number), found["volume"][number], segmentation, boxes, supervision,
                          instances=instances))
    return Manifest(cases=cases, root=root)


def dataset_cases(root: str | os.PathLike) -> Manifest:
    """Every case of a dataset folder: :func:`load_dataset`'s, plus LiTS-named volumes its manifest does not list
    (cases an earlier split left out), as :func:`manifest_from_lits_names` would see them."""
    manifest = load_dataset(root)
    if not (Path(root) / MANIFEST_FILENAME).is_file():
        return manifest
    has_lits_volume = any((m := _LITS_NAME.match(name)) and m.group(1) == "volume" for name in os.listdir(manifest.root))
    if not has_lits_volume:
        return manifest
    listed_volumes = {Path(c.volume).as_posix() for c in manifest.cases}
    listed_names = {c.case for c in manifest.cases}
    for case in manifest_from_lits_names(manifest.root).cases:
        if case.volume not in listed_volumes and case.case not in listed_names:
            case.root = manifest.root
            manifest.cases.append(case)
    return manifest


def validate_manifest(manifest: Manifest) -> None:
    """Check the supervision rules and that every referenced file exists; InputError names the case."""
    seen = set()
    for case in manifest.cases:
        where = f"{manifest.root / MANIFEST_FILENAME}: case {case.case}"
        if case.case in seen:
            raise InputError(f"{where}: listed twice")
        seen.add(case.case)
        if case.supervision not in SUPERVISIONS:
            raise InputError(f"{where}: supervision {case.supervision!r} is not one of {', '.join(SUPERVISIONS)}")
        if case.supervision == STRONG and not case.segmentation:
            raise InputError(f"{where}: strong supervision needs a segmentation")
        if case.supervision == WEAK and (case.segmentation or not case.boxes):
            raise InputError(f"{where}: weak supervision needs boxes and no segmentation")
        if case.supervision == UNLABELED and (case.segmentation or case.boxes):
            raise InputError(f"{where}: an unlabeled case has neither segmentation nor boxes")
        if case.supervision == TEST and (not case.segmentation or case.boxes):
            raise InputError(f"{where}: a test case needs a segmentation and no boxes")
        if case.boxes_perturbed is not None and case.supervision != WEAK:
            raise InputError(f"{where}: \"boxes_perturbed\" belongs to weak cases only")
        if case.instances and not case.segmentation:
            raise InputError(f"{where}: \"instances\" belongs to cases with a segmentation only")
        for relative in (case.volume, case.segmentation, case.boxes, case.instances):
            if relative is not None and not (manifest.root / relative).is_file():
                raise InputError(f"{where}: missing file {manifest.root / relative}")


def write_manifest(manifest: Manifest, path: str | os.PathLike | None = None) -> Path:
    """Write the manifest atomically to ``path`` (default ``manifest.json`` in its root).

    Its case paths must be relative to ``path``'s folder.
    """
    path = Path(manifest.root) / MANIFEST_FILENAME if path is None else Path(path)
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    return path


def merge_manifests(sources: Sequence[Manifest], path: str | os.PathLike, first: int | None = None,
                    last_of_each: int = 0) -> Manifest:
    """One manifest, to be written at ``path``, over the cases of several datasets (e.g. two phantom styles).

    Each source contributes its first ``first`` cases (all if None), in order, with paths made relative to
    ``path``'s folder and cases renumbered ``0, 1, ...``. The last ``last_of_each`` cases of every source go at
    the end, after all the others: the trainer validates on a manifest's last cases, so its validation set then
    holds every source.
    """
    if first is not None and first < 1:
        raise InputError(f"first must be at least 1, got {first}")
    chosen = [source.cases[:first] for source in sources]
    if last_of_each < 0 or any(last_of_each >= len(cases) for cases in chosen):
        raise InputError(f"last_of_each must be 0 or more and leave every source a case before it, got {last_of_each}")
    folder = Path(path).absolute().parent
    cuts = (slice(None, -last_of_each), slice(-last_of_each, None)) if last_of_each else (slice(None),)
    ordered = [(source, case) for cut in cuts for source, cases in zip(sources, chosen) for case in cases[cut]]

    def moved(source: Manifest, relative: str | None) -> str | None:
        if relative is None:
            return None
        return Path(os.path.relpath(Path(source.root).absolute() / relative, folder)).as_posix()

    paths = ("volume", "segmentation", "boxes", "instances")
    cases = [replace(case, case=str(index), root=None, **{key: moved(source, getattr(case, key)) for key in paths})
             for index, (source, case) in enumerate(ordered)]
    return Manifest(cases=cases, root=folder)


# ------------------------------------------------------------------------------------------- file naming
def case_number(case: Case) -> str:
    """The ``N`` of the case's LiTS file names: from ``volume-N.nii[.gz]`` if so named, else the case name."""
    match = _LITS_NAME.match(Path(case.volume).name)
    return str(int(match.group(2))) if match and match.group(1) == "volume" else case.case


def instances_path(number: str, folder: str = "") -> str:
    """Where case ``N``'s lesion instances file is written, relative to the dataset root (next to its mask)."""
    return f"{folder}/{INSTANCES_PREFIX}-{number}.nii.gz".lstrip("/")


def existing_instances(root: str | os.PathLike, number: str, folder: str = "") -> str | None:
    """``instances-N.nii[.gz]`` in ``folder`` of ``root`` if it exists (relative to ``root``), else None."""
    for suffix in (".nii.gz", ".nii"):
        name = f"{folder}/{INSTANCES_PREFIX}-{number}{suffix}".lstrip("/")
        if (Path(root) / name).is_file():
            return name
    return None


def instances_of(root: str | os.PathLike, case: Case, mask: str | None) -> str | None:
    """The instances file that goes with ``case``'s ``mask`` (relative to ``root``): the one the case references,
    else ``instances-N.nii[.gz]`` beside the mask (in ``hidden/`` for a hidden one); None without a mask."""
    if mask is None:
        return None
    return case.instances or existing_instances(root, case_number(case), Path(mask).parent.as_posix().strip("."))


def boxes_path(number: str, perturbed: bool = False) -> str:
    """Where case ``N``'s boxes file lives, relative to the dataset root; perturbed boxes get their own file."""
    return f"{BOXES_DIR}/boxes-{number}{'.perturbed' if perturbed else ''}.json"


def find_mask(root: str | os.PathLike, case: Case, hidden_dirs: tuple[str, ...] = (HIDDEN_DIR,)) -> str | None:
    """The case's mask relative to ``root``: the one it references, else ``segmentation-N.nii[.gz]`` in ``root``
    (a mask the manifest hides), else the same name in one of ``hidden_dirs``; None if it has none."""
    root = Path(root)
    if case.segmentation:
        return case.segmentation
    number = case_number(case)
    for folder in ("", *hidden_dirs):
        for suffix in (".nii", ".nii.gz"):
            relative = f"{folder}/segmentation-{number}{suffix}".lstrip("/")
            if (root / relative).is_file():
                return relative
    return None


# -------------------------------------------------------------------------------------------- case data
def canonical_hu(scan: Scan) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A CT on the canonical grid as int16 HU (scaled/float files are rounded and clipped)."""
    voxels, spacing = scan.canonical()
    return to_int16_hu(voxels), spacing


@dataclass
class CaseData:
    """A case's arrays on the canonical grid: ``volume`` int16 HU, ``labels`` uint8 (None without a segmentation),
    ``spacing`` in mm and ``instances`` int32 lesion ids, 0 outside lesions (None without a segmentation)."""

    volume: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float]
    instances: np.ndarray | None = None


def read_case(case: Case, root: str | os.PathLike | None = None, with_instances: bool = True) -> CaseData:
    """The case's canonical volume, labels, spacing and (``with_instances``) lesion instances.

    The segmentation and the instances file must lie on the volume's exact grid (shape, and affine within 1e-3 mm).
    A case with a segmentation but no instances file gets :func:`lesion_components` of its labels.
    """
    base = Path(root) if root is not None else (case.root or Path("."))
    volume_scan = read_nifti(base / case.volume)
    volume, spacing = canonical_hu(volume_scan)
    if not case.segmentation:
        return CaseData(volume, None, spacing)
    labels = _canonical_on_grid(case, base / case.segmentation, volume_scan, "segmentation")
    unexpected = np.setdiff1d(np.unique(labels), LABEL_VALUES)
    if unexpected.size:
        raise InputError(f"case {case.case}: segmentation has values {unexpected.tolist()} (expected 0, 1, 2)")
    labels = labels.astype(np.uint8)
    if not with_instances:
        return CaseData(volume, labels, spacing)
    if not case.instances:
        return CaseData(volume, labels, spacing, lesion_components(labels))
    instances = _canonical_on_grid(case, base / case.instances, volume_scan, "instances")
    if instances.min(initial=0) < 0 or not np.array_equal(instances > 0, labels == LESION_LABEL):
        raise InputError(f"case {case.case}: instances must be a non-negative id on every lesion voxel and 0 "
                         "elsewhere")
    return CaseData(volume, labels, spacing, instances.astype(np.int32))


def load_case(case: Case, root: str | os.PathLike | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """The case's canonical volume (int16 HU), labels (uint8, or None without a segmentation) and spacing; see
    :func:`read_case` for its instances too."""
    data = read_case(case, root, with_instances=False)
    return data.volume, data.labels, data.spacing


def _canonical_on_grid(case: Case, path: Path, volume_scan: Scan, what: str) -> np.ndarray:
    """A label-like file of ``case`` (``what`` names it in errors) on the canonical grid, checked to lie on the
    volume's grid; float files are rounded."""
    scan = read_nifti(path)
    if scan.voxels.shape != volume_scan.voxels.shape:
        raise InputError(f"case {case.case}: {what} shape {scan.voxels.shape} differs from the volume's "
                         f"{volume_scan.voxels.shape}")
    if not np.allclose(scan.affine, volume_scan.affine, atol=AFFINE_TOLERANCE_MM):
        raise InputError(f"case {case.case}: {what} affine differs from the volume's")
    voxels, _ = scan.canonical()
    return np.rint(voxels) if voxels.dtype.kind == "f" else voxels


def lesion_components(labels: np.ndarray, lesion: int = LESION_LABEL) -> np.ndarray:
    """int32 lesion instances of a label map [..., H, W] without recorded ones: the 8-connected components of each
    slice's ``lesion`` mask (ids unique over the whole array, 0 elsewhere). Touching lesions are one component."""
    labels = np.asarray(labels)
    structure = np.zeros((3,) * labels.ndim, dtype=bool)
    structure[(1,) * (labels.ndim - 2)] = True  # in-plane neighbours only
    components, _ = ndimage.label(labels == lesion, structure=structure)
    return components.astype(np.int32)


def case_boxes(case: Case, labels: np.ndarray | None = None, shape: tuple[int, int, int] | None = None) -> list[Box] | None:
    """The case's boxes: from its boxes file, else derived from its mask (``labels``), else None.

    ``shape`` (the canonical volume shape), when given, must match the boxes file's.
    """
    if case.boxes:
        boxes, boxes_shape = load_boxes(case.path(case.boxes))
        if shape is not None and tuple(boxes_shape) != tuple(shape):
            raise InputError(f"case {case.case}: boxes file is for shape {list(boxes_shape)}, the volume is {list(shape)}")
        return boxes
    if labels is not None:
        return boxes_from_labels(labels)
    return None
