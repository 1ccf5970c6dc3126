"""Where the liver Dice of the mixed-supervision rows goes: false liver by where it lies, and missed liver.

The runs a ``mixed_supervision.py --work DIR`` invocation kept are scored on that work folder's own held-out test
set through the benchmark's path (client pre-processing, whole slices, labels restored, post-processing), with
:func:`false_liver.liver_errors`' counts. Per row, mean over its runs of the per-case mean:

* **false liver** mL per case (predicted liver or lesion on true background), and the part of it on slices
  **without any liver**, binned by z distance (mm) to the nearest slice with liver: near the organ a 2.5D network
  may lack z-context, far from it it took other tissue for liver in-plane;
* **missed liver** mL per case;
* the global liver Dice, and what it would be with no false liver on liver-free slices.

Usage: python benchmarks/liver_breakdown.py --work /tmp/msb_head [--rows strong-only full ...]
       [--out benchmarks/results/liver_breakdown]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from false_liver import Z_BINS_MM, liver_errors  # noqa: E402
from mixed_supervision import (  # noqa: E402
    TestCase,
    report,
    score_kept_rows,
    segment_cases,
    work_folder_parser,
    work_test_set,
)

from mixsup.metrics import dice_from_counts  # noqa: E402
from mixsup.scan import Scan, read_nifti  # noqa: E402


def z_bin_names(edges: tuple[float, ...] = Z_BINS_MM) -> list[str]:
    return [f"{low:g}-{high:g} mm" for low, high in zip(edges, edges[1:])] + [f"{edges[-1]:g}+ mm"]


def run_errors(checkpoint: Path, cases: list[TestCase], truths: list[Scan]) -> dict[str, float | list[float]]:
    """One run's liver errors over ``cases``: global Dice (with and without the false liver on liver-free
    slices) and mL per case. ``truths`` are the cases' label scans, whose affines say which axis is axial."""
    tp = fp = fn = free = 0  # voxels, summed over cases: the global Dice
    false_ml = missed_ml = 0.0
    free_ml = np.zeros(len(Z_BINS_MM))  # false liver on liver-free slices by z bin
    for case, truth, predicted in zip(cases, truths, segment_cases(checkpoint, cases)):
        canonical_truth, spacing = truth.canonical()
        canonical_predicted = dataclasses.replace(truth, voxels=predicted).canonical()[0]
        errors = liver_errors(canonical_predicted, canonical_truth, float(spacing[0]))
        tp, fp, fn = tp + errors["tp"], fp + errors["fp"], fn + errors["fn"]
        free += int(errors["fp_liver_free_slices"].sum())
        false_ml += errors["fp"] * case.voxel_ml
        missed_ml += errors["fn"] * case.voxel_ml
        free_ml += errors["fp_liver_free_slices"] * case.voxel_ml
    return {"liver_dice_global": dice_from_counts(tp, fp, fn),
            "liver_dice_without_liver_free_false": dice_from_counts(tp, fp - free, fn),
            "false_liver_ml": false_ml / len(cases), "missed_liver_ml": missed_ml / len(cases),
            "false_liver_on_liver_free_slices_ml": float(free_ml.sum()) / len(cases),
            "by_z_ml": (free_ml / len(cases)).tolist()}


def row_errors(run_dirs: list[Path], cases: list[TestCase], truths: list[Scan]) -> dict:
    """Every run of a row, and their mean."""
    runs = [run_errors(run / "best.pt", cases, truths) for run in run_dirs]
    mean = {key: round(float(np.mean([r[key] for r in runs])), 4 if "dice" in key else 1)
            for key in runs[0] if key != "by_z_ml"}
    mean["by_z_ml"] = dict(zip(z_bin_names(), np.mean([r["by_z_ml"] for r in runs], axis=0).round(1).tolist()))
    return {"runs": [run.name for run in run_dirs], **mean}


def markdown(results: dict) -> str:
    names = z_bin_names()
    lines = ["| method | liver Dice | false liver mL per case | on liver-free slices | "
             + " | ".join(f"of it {n} from the liver" for n in names)
             + " | missed liver mL per case | Dice without false liver on liver-free slices |",
             "|---" * (len(names) + 6) + "|"]
    for method, row in results["rows"].items():
        lines.append(f"| {method} | {row['liver_dice_global']:.3f} | {row['false_liver_ml']:.0f} | "
                     f"{row['false_liver_on_liver_free_slices_ml']:.0f} | "
                     + " | ".join(f"{row['by_z_ml'][n]:.0f}" for n in names)
                     + f" | {row['missed_liver_ml']:.0f} | {row['liver_dice_without_liver_free_false']:.3f} |")
    return "\n".join(lines) + f"\n\nMeans over each row's runs ({results['test_cases']} held-out cases each).\n"


def main(argv: list[str] | None = None) -> None:
    parser = work_folder_parser(__doc__, ["strong-only", "full", "teacher-student", "teacher-student + Dice"])
    args = parser.parse_args(argv)
    cases, entries = work_test_set(args.work, args.preset)
    truths = [read_nifti(entry.path(entry.segmentation)) for entry in entries]  # their affines: the axial axis
    rows = score_kept_rows(args.work, args.rows, lambda runs: row_errors(runs, cases, truths))
    report({"work": str(args.work), "test_cases": len(cases), "z_bins_mm": list(Z_BINS_MM), "rows": rows},
           markdown({"test_cases": len(cases), "rows": rows}), args.out)


if __name__ == "__main__":
    main()
