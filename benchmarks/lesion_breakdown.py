"""Where the lesion Dice of the mixed-supervision rows goes: lesions found and missed by size, and false lesions.

Global lesion Dice mixes three things: how many true lesions a model finds, how much of each found one it covers,
and how much lesion it paints where there is none. This script takes the runs a ``mixed_supervision.py --work
DIR`` invocation kept and scores every run's ``best.pt`` on that work folder's own held-out test set (the
phantoms carry lesion instance ids, ``instances-N.nii.gz``), through the same path as the benchmark (client
pre-processing, whole slices, labels restored, post-processing). Per row, summed over seeds and cases:

* per size bin of true lesions (mL): how many there are, the share **detected** (any predicted lesion voxel on
  it) and the share of their voxels **covered**;
* **false lesion** mL per case: predicted lesion voxels on no true lesion, and the share of it lying outside the
  true liver (lesion painted into tissue the model took for liver: a liver error, not a lesion-appearance one).

Usage: python benchmarks/lesion_breakdown.py --work /tmp/msb_long [--rows full teacher-student ...]
       [--out benchmarks/results/long_schedule/lesion_breakdown]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mixed_supervision import (  # noqa: E402
    report,
    score_kept_rows,
    segment_cases,
    work_folder_parser,
    work_test_set,
)

from mixsup.scan import read_nifti  # noqa: E402

#: Upper edges (mL) of the lesion size bins; the last bin is open.
BIN_EDGES_ML = (0.5, 2.0, 8.0)


def bin_names(edges: tuple[float, ...] = BIN_EDGES_ML) -> list[str]:
    lows = (0.0, *edges)
    return [f"{low:g}-{high:g} mL" for low, high in zip(lows, edges)] + [f">{edges[-1]:g} mL"]


def lesion_outcomes(predicted: np.ndarray, instances: np.ndarray, organ: np.ndarray, voxel_ml: float,
                    edges: tuple[float, ...] = BIN_EDGES_ML) -> dict[str, np.ndarray | float]:
    """Per size bin: true lesions, detected ones, their voxels and the covered voxels; false lesion mL, all of
    it and the part outside the true ``organ`` (liver or lesion).

    ``predicted`` holds labels (2 = lesion), ``instances`` the true lesion ids (0 = none), on one grid.
    """
    lesion = predicted == 2
    ids, sizes = np.unique(instances[instances > 0], return_counts=True)
    hits = np.bincount(instances[lesion & (instances > 0)], minlength=int(instances.max()) + 1)[ids]
    bins = np.digitize(sizes * voxel_ml, edges)
    count, found, voxels, covered = (np.zeros(len(edges) + 1) for _ in range(4))
    np.add.at(count, bins, 1)
    np.add.at(found, bins, hits > 0)
    np.add.at(voxels, bins, sizes)
    np.add.at(covered, bins, hits)
    return {"lesions": count, "detected": found, "voxels": voxels, "covered": covered,
            "false_ml": float(np.count_nonzero(lesion & (instances == 0)) * voxel_ml),
            "false_outside_ml": float(np.count_nonzero(lesion & ~organ) * voxel_ml)}


def row_breakdown(run_dirs: list[Path], cases, instances: list[np.ndarray]) -> dict:
    """Outcomes of every run in ``run_dirs`` on every case, summed."""
    totals = {key: np.zeros(len(BIN_EDGES_ML) + 1) for key in ("lesions", "detected", "voxels", "covered")}
    false_ml, outside_ml = [], []
    for run in run_dirs:
        for case, truth_ids, predicted in zip(cases, instances, segment_cases(run / "best.pt", cases)):
            outcome = lesion_outcomes(predicted, truth_ids, case.truth > 0, case.voxel_ml)
            for key in totals:
                totals[key] += outcome[key]
            false_ml.append(outcome["false_ml"])
            outside_ml.append(outcome["false_outside_ml"])
    with np.errstate(invalid="ignore", divide="ignore"):
        detected = totals["detected"] / totals["lesions"]
        covered = totals["covered"] / totals["voxels"]
    return {"runs": [run.name for run in run_dirs],
            "bins": {name: {"lesions": int(n), "detected": round(float(d), 3), "voxels_covered": round(float(c), 3)}
                     for name, n, d, c in zip(bin_names(), totals["lesions"], detected, covered)},
            "false_lesion_ml_per_case": round(float(np.mean(false_ml)), 2),
            "false_lesion_outside_liver_share": round(float(np.sum(outside_ml) / max(np.sum(false_ml), 1e-9)), 3)}


def markdown(results: dict) -> str:
    names = bin_names()
    lines = ["| method | " + " | ".join(f"{n}: detected / voxels covered" for n in names)
             + " | false lesion mL per case | of it outside the liver |", "|---" * (len(names) + 3) + "|"]
    for method, row in results["rows"].items():
        cells = [f"{row['bins'][n]['detected']:.2f} / {row['bins'][n]['voxels_covered']:.2f}" for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['false_lesion_ml_per_case']:.2f} | "
                     f"{row['false_lesion_outside_liver_share']:.0%} |")
    counts = ", ".join(f"{n}: {next(iter(results['rows'].values()))['bins'][n]['lesions']}" for n in names)
    return "\n".join(lines) + f"\n\nTrue lesions per bin, summed over the runs of a row: {counts}.\n"


def main(argv: list[str] | None = None) -> None:
    parser = work_folder_parser(__doc__, ["strong-only", "full", "teacher-student", "teacher-student + Dice"])
    args = parser.parse_args(argv)
    cases, entries = work_test_set(args.work, args.preset)
    instances = [read_nifti(entry.path(entry.instances)).voxels.astype(np.int64) for entry in entries]
    rows = score_kept_rows(args.work, args.rows, lambda runs: row_breakdown(runs, cases, instances))
    results = {"work": str(args.work), "test_cases": len(cases), "bin_edges_ml": list(BIN_EDGES_ML), "rows": rows}
    report(results, markdown(results), args.out)


if __name__ == "__main__":
    main()
