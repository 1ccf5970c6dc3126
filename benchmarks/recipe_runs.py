"""Wall time and validation Dice of every recipe at a preset, on one phantom folder with mixed supervision.

Usage: python benchmarks/recipe_runs.py --preset tiny [--n 6 --shape 16 96 96] [--recipes unet msdn ...]
       [--set key=value ...] [--work DIR] [--out results.json]

Writes phantoms (a third weak, a sixth unlabeled), trains each recipe with ``mixsup-train`` in a fresh process,
and reports seconds, the best validation liver / lesion Dice from its log.csv, and the epochs run. With
``--work DIR`` the phantoms and runs (``DIR/<recipe>/best.pt``) are kept for ``evaluate_recipes.py``.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

BIN = Path(sys.executable).parent


def run_recipe(recipe: str, data: Path, out: Path, preset: str, overrides: list[str]) -> dict:
    command = [str(BIN / "mixsup-train"), recipe, "--data", str(data), "--out", str(out), "--preset", preset,
               "--no-progress", *[arg for item in overrides for arg in ("--set", item)]]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    rows = list(csv.DictReader((out / "log.csv").open()))
    last_stage = rows[-1]["stage"]
    scored = [r for r in rows if r["stage"] == last_stage]
    best = max(scored, key=lambda r: float(r["dice_liver"]))
    return {"recipe": recipe, "seconds": round(seconds, 1), "epochs": len(rows),
            "best_dice_liver": round(float(best["dice_liver"]), 4),
            "best_dice_lesion": round(float(best["dice_lesion"]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 96, 96))
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--recipes", nargs="*")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", type=Path, help="keep phantoms and runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from mixsup.training.recipes import RECIPES

    with nullcontext(str(args.work)) if args.work else tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([str(BIN / "mixsup-data"), "phantoms", str(data), "--n", str(args.n), "--seed", str(args.seed),
                        "--shape", *map(str, args.shape), "--weak-fraction", "0.34", "--unlabeled-fraction", "0.17",
                        "-q"], check=True, stdout=subprocess.DEVNULL)
        results = []
        for recipe in args.recipes or RECIPES:
            results.append(run_recipe(recipe, data, Path(tmp) / recipe, args.preset, args.overrides))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"preset": args.preset, "n": args.n, "shape": list(args.shape),
                                        "overrides": args.overrides, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
