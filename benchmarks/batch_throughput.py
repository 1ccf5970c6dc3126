"""Throughput of ``mixsup-client batch``: scans per minute with 1 and 2 jobs against one local server.

Starts ``mixsup-serve`` on the bundled repository, writes ``--cases`` phantoms of the project's generator
(``--shape``, default 40x256x256) as NIfTI, and runs the real ``mixsup-client batch`` command over them once per
``--jobs`` value, each into a fresh output folder (so nothing is skipped as already done). One scan is segmented
first so that the server's first-call costs are not counted. With one server on 2 cores, a second job overlaps
one scan's client work (reading, resampling, post-processing, writing) with another scan's inference.

Usage: python benchmarks/batch_throughput.py [--cases 8] [--jobs 1 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from evaluate_served_model import own_phantoms, segment_with_cli, start_server  # noqa: E402
from measure import print_and_write  # noqa: E402
from triton_utils import stop_serve  # noqa: E402

BIN = Path(sys.executable).parent


def run_batch(inputs: Path, output_dir: Path, url: str, jobs: int) -> float:
    """Wall seconds of one ``mixsup-client batch`` over ``inputs`` (exit 0 required)."""
    started = time.perf_counter()
    subprocess.run([str(BIN / "mixsup-client"), "batch", str(inputs), "-o", str(output_dir), "--url", url,
                    "--jobs", str(jobs), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=HERE.parent / "model_repository")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 256, 256], metavar=("D", "H", "W"))
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = own_phantoms(work / "scans", args.cases, 90310, tuple(args.shape))
        for extra in (work / "scans").iterdir():  # only the volumes are inputs: labels and boxes go elsewhere
            if not extra.name.startswith("volume-"):
                extra.rename(work / extra.name)
        server, url, _ = start_server(args.repository, work)
        try:
            segment_with_cli(cases[0][0], work / "warmup.nii.gz", url)
            runs = {}
            for jobs in args.jobs:
                seconds = run_batch(work / "scans", work / f"out-{jobs}", url, jobs)
                runs[str(jobs)] = {"seconds": round(seconds, 2),
                                   "scans_per_minute": round(60.0 * args.cases / seconds, 2)}
        finally:
            stop_serve(server)
    results = {"cases": args.cases, "shape_dhw": args.shape, "jobs": runs}
    first = runs[str(args.jobs[0])]["seconds"]
    for jobs, run in runs.items():
        run["speedup_vs_first"] = round(first / run["seconds"], 2)
    print_and_write(results, args.out)


if __name__ == "__main__":
    main()
