"""Helpers the speed benchmarks share: a phantom CT at a given size, and peak memory of a process tree."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

BIN = Path(sys.executable).parent


def print_and_write(results: dict, out: Path | None) -> None:
    """Print a benchmark's results as JSON, and write them to ``out`` (folders made) when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def make_scan(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """One phantom of the project's generator, stored at ``shape`` (D, H, W) and ``spacing`` (mm)."""
    subprocess.run([str(BIN / "mixsup-data"), "phantoms", str(folder), "--n", "1", "--seed", "4242",
                    "--shape", *map(str, shape), "--spacing", *map(str, spacing)],
                   check=True, stdout=subprocess.DEVNULL)
    return folder / "volume-0.nii.gz"


class PeakRss:
    """Peak resident memory (MB) of a process and its descendants, sampled every 0.2 s in a thread (each sample
    walks the process tree: more often would take CPU from what is measured)."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0.0
        self.start = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        import psutil

        total = 0
        try:
            for process in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return self.peak
        mb = total / 2**20
        self.peak = max(self.peak, mb)
        return mb

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
