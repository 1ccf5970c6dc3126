"""``mixsup-data``: make and manage training datasets.

``mixsup-data phantoms OUT --n N [--style classic|randomized|mixed]`` writes N synthetic CT cases in LiTS naming
with boxes files and a manifest, plus ``instances-N.nii.gz`` per case: the generator's lesion ids, which keep
touching lesions apart (the manifest references it for strong cases; hidden cases keep theirs under ``hidden/``).
``--style`` picks the generator (:data:`mixsup.training.data.phantoms.STYLES`; default classic, unchanged).
Each NIfTI is stored in its own randomly drawn orthogonal orientation (RAS, LPS, LAS, permuted axes ...) with the
affine composed so the world geometry is unchanged: every loader must get the same canonical phantom back.

``mixsup-data split DIR --strong F --weak F --test F [--unlabeled F] [--seed S] [--perturb-boxes] [--out FILE]``
re-deals the cases of DIR that have masks (a phantom folder or a plain LiTS download) into strong, weak (mask
hidden, boxes derived from it, optionally perturbed as in the teacher-student paper), held-out test and unlabeled
cases; see :mod:`mixsup.training.data.split`. An existing manifest is copied to ``manifest.json.bak`` first.

``mixsup-data merge OUT DATASET [DATASET ...] [--first N] [--last-of-each K]`` writes one manifest over several
datasets (:func:`mixsup.training.data.manifest.merge_manifests`): a training set of two phantom styles, or phantoms
beside a LiTS folder, with the last K cases of each at the end so the trainer's validation cases hold every one.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from mixsup.errors import InputError, add_debug_flag, run_command
from mixsup.scan import write_nifti
from mixsup.training.data.boxes import boxes_from_labels, save_boxes
from mixsup.training.data.manifest import (
    HIDDEN_DIR,
    MANIFEST_FILENAME,
    STRONG,
    TEST,
    UNLABELED,
    WEAK,
    Case,
    Manifest,
    instances_path,
    load_dataset,
    merge_manifests,
    validate_manifest,
    write_manifest,
)
from mixsup.training.data.phantoms import MIXED_CLASSIC_FRACTION, STYLES, generate_phantom
from mixsup.training.data.split import SPLIT_KINDS, UNUSED, plan_split, write_split

PROG = "mixsup-data"
#: RAS+ direction of each canonical axis (D, H, W): superior, posterior, patient left.
CANONICAL_AXIS_CODES = ("S", "P", "L")
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
#: Orientations real data comes in most (NIfTI tools, DICOM-derived, dcm2niix radiological), then any other.
COMMON_ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "P", "I"))


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case ``index`` in a dataset made with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def all_orientations() -> list[tuple[str, str, str]]:
    """The 48 orthogonal orientations as axis codes of the stored axes ``i, j, k``."""
    out = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            out.append(tuple(_OPPOSITE[CANONICAL_AXIS_CODES[a]] if f else CANONICAL_AXIS_CODES[a] for a, f in zip(perm, flips)))
    return out


def draw_orientation(rng: np.random.Generator) -> tuple[str, str, str]:
    """Half the time a common orientation, otherwise any of the 48."""
    if rng.random() < 0.5:
        return COMMON_ORIENTATIONS[int(rng.integers(len(COMMON_ORIENTATIONS)))]
    choices = all_orientations()
    return choices[int(rng.integers(len(choices)))]


def canonical_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Voxel-to-RAS affine of a canonical ``[D, H, W]`` array (D superior, H posterior, W patient left)."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0.0, 0.0, -spacing[2]], [0.0, -spacing[1], 0.0], [spacing[0], 0.0, 0.0]])
    affine[:3, 3] = origin
    return affine


def to_orientation(
    canonical: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Store a canonical array along ``axcodes`` (e.g. ``("L", "P", "S")``) with the affine that keeps the world.

    Stored axis ``k`` is canonical axis ``perm[k]``, reversed when its code is the opposite of the canonical one.
    """
    perm, flips = [], []
    for code in axcodes:
        for axis, canonical_code in enumerate(CANONICAL_AXIS_CODES):
            if code in (canonical_code, _OPPOSITE[canonical_code]):
                perm.append(axis)
                flips.append(code != canonical_code)
    if sorted(perm) != [0, 1, 2]:
        raise ValueError(f"{axcodes} is not an orthogonal orientation")
    stored = np.transpose(canonical, perm)
    index_map = np.zeros((4, 4))  # stored index -> canonical index
    index_map[3, 3] = 1.0
    for k, (axis, flip) in enumerate(zip(perm, flips)):
        index_map[axis, k] = -1.0 if flip else 1.0
        index_map[axis, 3] = canonical.shape[axis] - 1 if flip else 0.0
        if flip:
            stored = np.flip(stored, axis=k)
    return np.ascontiguousarray(stored), affine @ index_map


def assign_supervision(n_cases: int, weak_fraction: float, unlabeled_fraction: float) -> list[str]:
    """All strong, except the last cases: unlabeled at the very end, weak just before them."""
    for name, value in (("--weak-fraction", weak_fraction), ("--unlabeled-fraction", unlabeled_fraction)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be within [0, 1], got {value}")
    n_weak, n_unlabeled = int(round(weak_fraction * n_cases)), int(round(unlabeled_fraction * n_cases))
    if weak_fraction + unlabeled_fraction > 1.0 + 1e-9 or n_weak + n_unlabeled > n_cases:
        raise InputError("--weak-fraction plus --unlabeled-fraction must not exceed 1")
    n_strong = n_cases - n_weak - n_unlabeled
    return [STRONG] * n_strong + [WEAK] * n_weak + [UNLABELED] * n_unlabeled


def write_phantom_case(
    out: Path,
    index: int,
    seed: int,
    supervision: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] | None,
    style: str = "classic",
) -> tuple[Case, str]:
    """Generate and write case ``index`` in generator ``style``; returns its manifest entry and a one-line summary."""
    phantom_seed = case_seed(seed, index)
    phantom = generate_phantom(phantom_seed, shape, spacing, style=style)
    rng = np.random.Generator(np.random.PCG64([phantom_seed, 1]))  # orientation and origin, per case
    axcodes = draw_orientation(rng)
    origin = rng.uniform(-250.0, 250.0, 3)
    volume, affine = to_orientation(phantom.volume, canonical_affine(phantom.spacing, origin), axcodes)
    labels, _ = to_orientation(phantom.labels, canonical_affine(phantom.spacing, origin), axcodes)
    instances, _ = to_orientation(phantom.instances, canonical_affine(phantom.spacing, origin), axcodes)
    name = str(index)
    write_nifti(out / f"volume-{name}.nii.gz", volume, affine)
    mask_dir = "" if supervision == STRONG else HIDDEN_DIR
    write_nifti(out / mask_dir / f"segmentation-{name}.nii.gz", labels, affine)
    write_nifti(out / instances_path(name, mask_dir), instances, affine)
    boxes_rel = f"boxes/boxes-{name}.json"
    save_boxes(out / boxes_rel, boxes_from_labels(phantom.labels), phantom.labels.shape)
    case = Case(
        case=name,
        volume=f"volume-{name}.nii.gz",
        segmentation=f"segmentation-{name}.nii.gz" if supervision == STRONG else None,
        boxes=boxes_rel if supervision != UNLABELED else None,
        supervision=supervision,
        boxes_perturbed=False if supervision == WEAK else None,
        instances=instances_path(name) if supervision == STRONG else None,
        root=out,
    )
    summary = (
        f"case {name}: {supervision:9s} {phantom.style:10s} shape {'x'.join(map(str, volume.shape))} stored {''.join(axcodes)} "
        f"spacing {'x'.join(f'{s:.2f}' for s in phantom.spacing)} mm, liver {int((phantom.labels >= 1).sum())} "
        f"lesion {int((phantom.labels == 2).sum())} voxels"
    )
    return case, summary


def cmd_phantoms(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    if any(n < 2 for n in args.shape):
        raise InputError(f"--shape sizes must be at least 2, got {args.shape}")
    if args.spacing is not None and any(s <= 0 for s in args.spacing):
        raise InputError(f"--spacing must be positive, got {args.spacing}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    supervision = assign_supervision(args.n, args.weak_fraction, args.unlabeled_fraction)
    cases = []
    for index in range(args.n):
        case, summary = write_phantom_case(out, index, args.seed, supervision[index], tuple(args.shape),
                                           tuple(args.spacing) if args.spacing else None, args.style)
        cases.append(case)
        if not args.quiet:
            print(summary, flush=True)
    manifest = Manifest(cases=cases, root=out)
    validate_manifest(manifest)
    path = write_manifest(manifest)
    print(f"wrote {args.n} cases ({len(manifest.strong())} strong, {len(manifest.weak())} weak, "
          f"{len(manifest.unlabeled())} unlabeled) and {path}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    manifest_path = Path(args.out) if args.out else root / MANIFEST_FILENAME
    if manifest_path.is_dir():
        raise InputError(f"--out {manifest_path}: is a folder; give a file name")
    fractions = {kind: getattr(args, kind) for kind in SPLIT_KINDS}
    result = plan_split(root, fractions, args.seed, args.perturb_boxes, manifest_path)
    backup = write_split(result, root, manifest_path)
    counts = result.counts
    print(f"split {sum(counts.values())} masked cases (seed {args.seed}): " + ", ".join(
        f"{counts[kind]} {kind}" for kind in SPLIT_KINDS) + f", {counts[UNUSED]} left out"
        + (" (weak boxes perturbed)" if args.perturb_boxes and counts[WEAK] else "")
        + f"; {result.kept} without masks kept; wrote {manifest_path}"
        + (f" (previous one saved as {backup.name})" if backup else ""))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give the manifest's file name")
    # load_dataset validates each source, and the merge only renumbers cases and rebases their paths
    merged = merge_manifests([load_dataset(source) for source in args.datasets], out, args.first, args.last_of_each)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(merged, out)
    print(f"merged {len(merged.cases)} cases from {len(args.datasets)} datasets into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Make and manage mixsup training datasets.")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    phantoms = commands.add_parser(
        "phantoms", help="write synthetic CT phantoms in LiTS naming with boxes and a manifest",
        description="Write N synthetic abdominal CT phantoms (volume-N.nii.gz, segmentation-N.nii.gz, "
                    "instances-N.nii.gz (one id per lesion), boxes/boxes-N.json, manifest.json). "
                    "The last cases can be marked weak or unlabeled; their "
                    f"masks go to {HIDDEN_DIR}/ for evaluation only.")
    phantoms.add_argument("out", metavar="OUT", help="output folder")
    phantoms.add_argument("--n", type=int, required=True, help="number of cases")
    phantoms.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses a seed derived from (seed, i)")
    phantoms.add_argument("--shape", type=int, nargs=3, default=[48, 256, 256], metavar=("D", "H", "W"),
                          help="canonical volume shape (default 48 256 256)")
    phantoms.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SD", "SH", "SW"),
                          help="voxel size in mm (default: drawn per case for the 48x256x256 grid and scaled to "
                               "--shape; classic in-plane 0.6-2.0, slices 1.0-5.0; randomized 0.5-3.5, 0.6-7.0)")
    phantoms.add_argument("--style", choices=STYLES, default="classic",
                          help="generator: classic (realistic contrasts, anatomy fitted to the field of view), "
                               "randomized (domain-randomized intensities, texture, resolution, coverage and anatomy, "
                               "SynthSeg-like) or mixed (each case draws one, "
                               f"{MIXED_CLASSIC_FRACTION * 100:.0f}%% classic); "
                               "default classic")
    phantoms.add_argument("--weak-fraction", type=float, default=0.0, help="fraction of cases (the last ones) that are weak")
    phantoms.add_argument("--unlabeled-fraction", type=float, default=0.0,
                          help="fraction of cases (the very last ones) that are unlabeled")
    phantoms.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    # SUPPRESS keeps a --debug given before the subcommand from being reset by the subparser's default
    phantoms.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback on errors")
    phantoms.set_defaults(handler=cmd_phantoms)

    split = commands.add_parser(
        "split", help="deal a dataset's masked cases into strong, weak, test and unlabeled",
        description="Shuffle the cases of DIR that have a mask (referenced, segmentation-N.nii[.gz] in DIR, or under "
                    f"{HIDDEN_DIR}/) by --seed and deal them out by fraction. Strong and test cases reference their "
                    "mask (test cases are held out of training); weak cases hide it and get boxes derived from it in "
                    "boxes/boxes-N.json (perturbed ones in boxes/boxes-N.perturbed.json); unlabeled ones get neither. "
                    "Fractions may sum to less than 1: the remaining masked cases are left out. Cases without a mask "
                    "keep their supervision. No file is moved; an existing manifest is first copied to <name>.bak.")
    split.add_argument("dir", metavar="DIR", help="dataset folder (with manifest.json, or LiTS naming without one)")
    for kind, required in ((STRONG, True), (WEAK, True), (TEST, True), (UNLABELED, False)):
        split.add_argument(f"--{kind}", type=float, required=required, default=0.0, metavar="F",
                           help=f"fraction of the masked cases that are {kind}" + ("" if required else " (default 0)"))
    split.add_argument("--seed", type=int, default=0, help="shuffle and perturbation seed (default 0)")
    split.add_argument("--perturb-boxes", action="store_true",
                       help="perturb weak boxes as in the teacher-student paper (organ scale 0.95-1.1, vertices moved "
                            "< 1/20 side; lesion 0.9-1.2, < 1/10 side)")
    split.add_argument("--out", metavar="MANIFEST", default=None,
                       help="manifest file to write (default DIR/manifest.json); its paths are relative to its folder")
    split.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback on errors")
    split.set_defaults(handler=cmd_split)

    merge = commands.add_parser(
        "merge", help="write one manifest over the cases of several datasets",
        description="Write one manifest over several datasets (folders with a manifest or LiTS naming, or manifest "
                    "files): each dataset's cases in order, renumbered 0, 1, ..., paths relative to the new "
                    "manifest's folder, supervision kept. With --last-of-each K the last K cases of every dataset "
                    "go at the end, so that the trainer's validation cases (a manifest's last ones) hold each.")
    merge.add_argument("out", metavar="OUT", help="manifest file to write")
    merge.add_argument("datasets", metavar="DATASET", nargs="+", help="dataset folders or manifest files")
    merge.add_argument("--first", type=int, default=None, metavar="N",
                       help="take only the first N cases of each dataset (default all)")
    merge.add_argument("--last-of-each", type=int, default=0, metavar="K",
                       help="move each dataset's last K (chosen) cases to the end, in dataset order (default 0)")
    merge.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback on errors")
    merge.set_defaults(handler=cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_command(PROG, parser, lambda args: args.handler(args), argv)


if __name__ == "__main__":
    sys.exit(main())
