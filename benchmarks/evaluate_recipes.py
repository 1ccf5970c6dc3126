"""Held-out Dice of trained recipes through the served stack: each recipe alone, then all as one ensemble.

Exports every ``RUNS/<recipe>/best.pt`` with ``mixsup-export`` into its own model repository (and copies each
into one shared repository, whose ``segment`` ensemble averages them all), serves each repository with
``mixsup-serve`` and segments held-out phantoms with ``mixsup-client segment``, post-processing included: the same
measurement ``evaluate_served_model.py`` makes of the bundled model, on the same held-out seeds.

Usage: python benchmarks/evaluate_recipes.py RUNS [--cases 6] [--seed 90210] [--out FILE.json]
(``python benchmarks/recipe_runs.py --work RUNS ...`` trains the runs.)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from evaluate_served_model import BIN, evaluate, foreign_phantoms, own_phantoms, start_server
from triton_utils import stop_serve

from mixsup.repository import window_name, write_ensemble


def export_run(checkpoint: Path, repository: Path, name: str) -> None:
    subprocess.run([str(BIN / "mixsup-export"), str(checkpoint), "--repository", str(repository), "--name", name],
                   check=True, stdout=subprocess.DEVNULL)


def serve_and_score(repository: Path, cases: dict[str, list[tuple[Path, Path]]], work: Path) -> dict:
    """Global and per-case Dice of ``repository``'s ``segment`` ensemble on every held-out set in ``cases``."""
    server, url, ready_seconds = start_server(repository, work)
    try:
        started = time.perf_counter()
        scores = {name: evaluate(pairs, url, work) for name, pairs in cases.items()}
        return {"start_to_ready_s": round(ready_seconds, 2),
                "segment_seconds": round(time.perf_counter() - started, 1), **scores}
    finally:
        stop_serve(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of <recipe>/best.pt run folders")
    parser.add_argument("--cases", type=int, default=6, help="held-out cases per generator")
    parser.add_argument("--seed", type=int, default=90210, help="never a training seed")
    parser.add_argument("--no-ensemble", action="store_true", help="score each recipe alone only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    runs = sorted(path.parent for path in args.runs.glob("*/best.pt"))
    if not runs:
        raise SystemExit(f"{args.runs}: no <recipe>/best.pt run folders")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {"own_phantoms_40x256x256": own_phantoms(work / "own", args.cases, args.seed, (40, 256, 256)),
                 "foreign_phantoms_40x256x256": foreign_phantoms(work / "foreign", args.cases, args.seed,
                                                                 (40, 256, 256))}
        repositories = {}
        for run in runs:
            name = run.name.replace("-", "_")  # a Python-backend model name, like the exported members
            alone = work / "alone" / name
            export_run(run / "best.pt", alone, name)
            repositories[run.name] = alone
            if not args.no_ensemble:
                for model in (name, window_name(name)):
                    shutil.copytree(alone / model, work / "ensemble" / model)
        if not args.no_ensemble and len(runs) > 1:
            write_ensemble(work / "ensemble")
            repositories["ensemble of " + " + ".join(run.name for run in runs)] = work / "ensemble"
        for label, repository in repositories.items():
            results[label] = serve_and_score(repository, cases, work)
            summary = {set_name: (scores["dice_liver_global"], scores["dice_lesion_global"])
                       for set_name, scores in results[label].items() if isinstance(scores, dict)}
            print(json.dumps({label: summary}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": str(args.runs), "cases": args.cases, "seed": args.seed,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
