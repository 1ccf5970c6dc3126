"""Split a dataset folder's masked cases into strong, weak, test and unlabeled (``mixsup-data split``).

Only cases with a mask are split (the mask the manifest references, ``segmentation-N.nii[.gz]`` in the folder, or
the same name under ``hidden/``); cases without one keep their supervision. Each fraction is of the masked cases;
the fractions may sum to less than 1, and the rest of the masked cases is left out of the manifest (so
``--strong 0.1 --test 0.2`` trains on a tenth of the data). No file is moved: a weak case's mask is hidden by the
manifest alone (``segmentation: null``), and its boxes are derived from that mask into ``boxes/boxes-N.json``,
with the paper's perturbation into ``boxes/boxes-N.perturbed.json`` so the clean boxes stay on disk.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mixsup.errors import InputError
from mixsup.training.data.boxes import Box, boxes_from_labels, perturb_boxes, save_boxes
from mixsup.training.data.manifest import (
    MANIFEST_FILENAME,
    STRONG,
    TEST,
    UNLABELED,
    WEAK,
    Case,
    Manifest,
    boxes_path,
    case_number,
    dataset_cases,
    find_mask,
    instances_of,
    load_case,
    validate_manifest,
    write_manifest,
)

#: The order in which the shuffled masked cases are dealt out.
SPLIT_KINDS = (STRONG, WEAK, TEST, UNLABELED)
#: A masked case the fractions leave out of the manifest.
UNUSED = "unused"


def check_fractions(fractions: Mapping[str, float]) -> None:
    """Each fraction within [0, 1], their sum at most 1 and above 0; InputError otherwise."""
    for kind, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise InputError(f"--{kind} must be within [0, 1], got {value}")
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise InputError(f"the fractions sum to {total:g}; they must not exceed 1")
    if total <= 0.0:
        raise InputError("all fractions are 0; nothing to split")


def allocate_counts(n_cases: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Case counts per kind by largest remainder, so they add up to ``round(sum(fractions) * n_cases)``.

    The leftover of ``n_cases`` is returned under :data:`UNUSED`. Ties go to the kind listed first.
    """
    quotas = {kind: fractions.get(kind, 0.0) * n_cases for kind in SPLIT_KINDS}
    counts = {kind: int(np.floor(quota + 1e-9)) for kind, quota in quotas.items()}
    target = min(n_cases, int(np.floor(sum(quotas.values()) + 0.5 + 1e-9)))
    by_remainder = sorted(SPLIT_KINDS, key=lambda kind: -(quotas[kind] - counts[kind]))
    for kind in by_remainder[: max(0, target - sum(counts.values()))]:
        counts[kind] += 1
    counts[UNUSED] = n_cases - sum(counts.values())
    return counts


def assign_kinds(names: Sequence[str], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """Each case name's kind: the names shuffled by ``seed`` and dealt out in :data:`SPLIT_KINDS` order."""
    counts = allocate_counts(len(names), fractions)
    dealt = [kind for kind in (*SPLIT_KINDS, UNUSED) for _ in range(counts[kind])]
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[index]: kind for index, kind in zip(order, dealt)}


def perturbation_rng(seed: int, case_name: str) -> np.random.Generator:
    """The generator perturbing one case's boxes: fixed by (seed, case), whatever else the split holds."""
    case_key = int.from_bytes(hashlib.sha256(case_name.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, case_key]))


@dataclass
class SplitResult:
    """The new manifest, the boxes files it needs (relative to the dataset root) and what went where."""

    manifest: Manifest
    boxes_files: dict[str, tuple[list[Box], tuple[int, int, int]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    kept: int = 0  # cases without a mask, passed through unchanged


def plan_split(
    root: str | os.PathLike,
    fractions: Mapping[str, float],
    seed: int,
    perturb: bool,
    manifest_path: str | os.PathLike | None = None,
) -> SplitResult:
    """Work out the split of the dataset at ``root`` without writing anything.

    Weak cases' masks are read here (on the volume's grid, as training would read them), so a bad mask fails the
    whole split before any file changes. Case paths are made relative to ``manifest_path``'s folder.
    """
    check_fractions(fractions)
    source = dataset_cases(root)
    root = source.root
    manifest_path = Path(manifest_path) if manifest_path is not None else root / MANIFEST_FILENAME
    masks = {case.case: find_mask(root, case) for case in source.cases}
    candidates = [case.case for case in source.cases if masks[case.case]]
    if not candidates:
        raise InputError(f"{root}: no case has a mask (segmentation-N.nii[.gz] here or under hidden/); nothing to split")
    kinds = assign_kinds(candidates, fractions, seed)

    def relative(path: str | None) -> str | None:
        return None if path is None else Path(os.path.relpath(root / path, manifest_path.parent)).as_posix()

    result = SplitResult(manifest=Manifest(cases=[], root=manifest_path.parent), counts=dict.fromkeys((*SPLIT_KINDS, UNUSED), 0))
    for case in source.cases:
        kind = kinds.get(case.case)
        if kind is None:
            result.kept += 1
            result.manifest.cases.append(Case(case.case, relative(case.volume), relative(case.segmentation),
                                              relative(case.boxes), case.supervision, case.boxes_perturbed,
                                              relative(case.instances)))
            continue
        result.counts[kind] += 1
        if kind == UNUSED:
            continue
        mask, boxes_file, perturbed = masks[case.case], None, None
        if kind == WEAK:
            _, labels, _ = load_case(Case(case.case, case.volume, mask), root)
            boxes = boxes_from_labels(labels)
            number = case_number(case)
            boxes_file = boxes_path(number)
            result.boxes_files[boxes_file] = (boxes, labels.shape)
            if perturb:
                boxes_file = boxes_path(number, perturbed=True)
                result.boxes_files[boxes_file] = (perturb_boxes(boxes, perturbation_rng(seed, case.case), labels.shape),
                                                  labels.shape)
            mask, perturbed = None, perturb
        elif kind == UNLABELED:
            mask = None
        # Lesion instances travel with the mask: a case that becomes strong or test keeps them.
        result.manifest.cases.append(Case(case.case, relative(case.volume), relative(mask), relative(boxes_file),
                                          kind, perturbed, relative(instances_of(root, case, mask))))
    result.manifest.split = {"seed": seed, "fractions": {kind: float(fractions.get(kind, 0.0)) for kind in SPLIT_KINDS},
                             "perturb_boxes": perturb}
    for case in result.manifest.cases:
        case.root = result.manifest.root
    return result


def backup_manifest(path: str | os.PathLike) -> Path | None:
    """Copy an existing manifest to ``<name>.bak`` (replacing an older backup); None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    return backup


def write_split(result: SplitResult, root: str | os.PathLike, manifest_path: str | os.PathLike) -> Path | None:
    """Write the boxes files under ``root``, back up any manifest at ``manifest_path`` and write the new one.

    Returns the backup's path, if one was made.
    """
    root = Path(root)
    for relative_path, (boxes, shape) in result.boxes_files.items():
        save_boxes(root / relative_path, boxes, shape)
    Path(manifest_path).parent.mkdir(parents=True, exist_ok=True)  # "out/../DIR/x" resolves only if out exists
    validate_manifest(result.manifest)
    backup = backup_manifest(manifest_path)
    write_manifest(result.manifest, manifest_path)
    return backup
