"""Load: N concurrent clients against one ``mixsup-serve`` on loopback for a bounded time.

Each client (a thread with its own gRPC client) sends the same scan's model-grid volume to the ``segment``
ensemble again and again until the time is up. Reports requests served, errors (with the first few messages),
latency p50 / p99, scans per minute, and the server's resident memory (Triton and its python-backend stubs
together) at start, after one warm-up request, after the first quarter of the run, at the end and at its peak:
from the first quarter on it should stay flat.

Usage: python benchmarks/load.py [--repository model_repository] [--clients 4] [--seconds 60]
       [--shape 40 256 256] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from measure import PeakRss, make_scan, print_and_write  # noqa: E402
from triton_utils import start_serve, stop_serve  # noqa: E402

from mixsup.clients.client import SegmentationClient  # noqa: E402
from mixsup.clients.pipeline import prepare_volume  # noqa: E402
from mixsup.readers import read_scan  # noqa: E402


def client_loop(url: str, volume: np.ndarray, deadline: float, shm: str) -> tuple[list[float], list[str]]:
    """Latencies of the requests this client completed before ``deadline``, and the errors it met."""
    latencies, errors = [], []
    with SegmentationClient(url, shared_memory=shm) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.segment_volume(volume)
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the run
                errors.append(f"{type(exc).__name__}: {exc}")
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=HERE.parent / "model_repository")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 256, 256], metavar=("D", "H", "W"))
    parser.add_argument("--shm", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scan_path = make_scan(work / "scan", tuple(args.shape), (2.5, 1.0, 1.0))
        server, url, _ = start_serve(args.repository, log_dir=work / "logs")
        try:
            with SegmentationClient(url) as client:
                volume, _ = prepare_volume(read_scan(scan_path), client.contract())
                with PeakRss(server.pid) as rss:
                    client.segment_volume(volume)  # warm-up
                    after_warm_up = rss.sample()
                    deadline = time.monotonic() + args.seconds
                    started = time.perf_counter()
                    with ThreadPoolExecutor(args.clients) as pool:
                        runs = [pool.submit(client_loop, url, volume, deadline, args.shm) for _ in range(args.clients)]
                        # The first quarter under load is the rest of the warm-up (arenas sized for concurrency).
                        time.sleep(args.seconds / 4)
                        after_first_quarter = rss.sample()
                        outcomes = [run.result() for run in runs]
                    elapsed = time.perf_counter() - started
                    at_end = rss.sample()
                live = server.poll() is None
        finally:
            stop_serve(server)
    latencies = sorted(t for done, _ in outcomes for t in done)
    errors = [e for _, failed in outcomes for e in failed]
    results = {
        "clients": args.clients, "seconds": round(elapsed, 1), "model_grid_dhw": list(volume.shape),
        "requests_served": len(latencies), "errors": len(errors), "first_errors": errors[:3],
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "scans_per_minute": round(60.0 * len(latencies) / elapsed, 2),
        "server_rss_mb": {"start": round(rss.start), "after_warm_up": round(after_warm_up), "end": round(at_end),
                          "after_first_quarter": round(after_first_quarter), "peak": round(rss.peak),
                          "growth_after_first_quarter": round(at_end - after_first_quarter)},
        "server_alive_at_end": live,
        "command": "python benchmarks/load.py " + " ".join(sys.argv[1:]),
    }
    print_and_write(results, args.out)


if __name__ == "__main__":
    main()
