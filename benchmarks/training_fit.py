"""Underfit or overfit: the mixed-supervision runs scored on the cases they trained on, beside the held-out set.

A low held-out Dice has two opposite causes. If a run scores about as low on its own training cases, it has not
learned them (too few steps, too small a network, or a task its inputs cannot decide): more data will not help,
more training might. If it scores high there, it has memorised them: more data or augmentation is the cure. This
script takes the runs a ``mixed_supervision.py --work DIR`` invocation kept and scores every run's ``best.pt``,
through the benchmark's own path (client pre-processing, whole slices, labels restored, post-processing), on

* **strong**: the run's strong training cases (its validation cases left out);
* **weak**: its weak training cases, against the masks the run never saw (how far its boxes took it);
* **test**: the work folder's own held-out test set.

Per row and set: Dice global (liver, lesion) and the lesion voxels found / predicted / true, means over the
row's seeds; the table shows precision and recall pooled over them.

Usage: python benchmarks/training_fit.py --work /tmp/msb [--rows full teacher-student ...]
       [--out benchmarks/results/training_fit]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mixed_supervision import (  # noqa: E402
    LESION_COUNTS,
    PRESETS,
    evaluate_checkpoint,
    format_precision_recall,
    own_test_set,
    preset_contract,
    report,
    score_kept_rows,
    work_folder_parser,
)

from mixsup.training.data.manifest import STRONG, WEAK, load_dataset  # noqa: E402
from mixsup.training.trainer import load_checkpoint  # noqa: E402

SETS = ("strong", "weak", "test")
METRICS = ("liver_dice_global", "lesion_dice_global", *(f"lesion_voxels_{name}" for name in LESION_COUNTS))


def training_cases(run: Path, pool: Path) -> dict[str, list[str]]:
    """Case ids a run trained on, by supervision: its manifest's strong cases but those its checkpoint says it
    validated on, and its weak cases."""
    validated = set(load_checkpoint(run / "best.pt")["validation_cases"])
    cases = load_dataset(pool / f"manifest-{run.name}.json").cases
    return {"strong": [c.case for c in cases if c.supervision == STRONG and c.case not in validated],
            "weak": [c.case for c in cases if c.supervision == WEAK]}


def row_fit(runs: list[Path], pool: Path, everything: dict[str, object], test: list) -> dict:
    """Means over ``runs`` of :data:`METRICS` on each of :data:`SETS` (a set a row lacks is left out)."""
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in SETS}
    for run in runs:
        ids = training_cases(run, pool)
        for name in ("strong", "weak"):
            if ids[name]:
                scores[name].append(evaluate_checkpoint(run / "best.pt", [everything[i] for i in ids[name]]))
        scores["test"].append(evaluate_checkpoint(run / "best.pt", test))
    return {"runs": [run.name for run in runs],
            **{name: {metric: round(float(np.mean([s[metric] for s in values])), 3) for metric in METRICS}
               for name, values in scores.items() if values}}


def markdown(results: dict) -> str:
    lines = ["| method | " + " | ".join(f"{name}: liver / lesion Dice, lesion precision / recall" for name in SETS)
             + " |", "|---" * (len(SETS) + 1) + "|"]
    for method, row in results["rows"].items():
        cells = [(f"{row[name]['liver_dice_global']:.3f} / {row[name]['lesion_dice_global']:.3f}, "
                  f"{format_precision_recall(row[name])}") if name in row else "" for name in SETS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = work_folder_parser(__doc__, ["strong-only", "full", "teacher-student", "msdn", "lazy", "asdnet"])
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    contract = preset_contract(preset)
    pool = args.work / "pool"
    # Every pool case with its mask, weak ones included (the pool keeps them all), by id: own_test_set reads the
    # manifest's cases in order.
    everything = dict(zip((case.case for case in load_dataset(pool).cases), own_test_set(pool, contract)))
    test = own_test_set(args.work / "test", contract)
    rows = score_kept_rows(args.work, args.rows, lambda runs: row_fit(runs, pool, everything, test))
    results = {"work": str(args.work), "rows": rows}
    report(results, markdown(results), args.out)


if __name__ == "__main__":
    main()
