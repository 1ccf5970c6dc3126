"""Where the client's own time goes: what ``mixsup-client segment`` adds over the served request, step by step.

``benchmarks/serving.py`` reports ``client_seconds`` (the CLI end to end minus the served request) as one number;
this script splits it, on the same 512x512x100 phantom at 0.7 mm and the bundled model: reading the NIfTI,
pre-processing (canonical order, resampling to the model grid; beside it, for a model whose contract smooths
before downsampling, the same without the smoothing, not counted in the total), restoring labels to the scan's grid,
post-processing, writing the labels, and what a fresh interpreter spends importing the CLI (paid on every
``mixsup-client`` call; ``import_top`` names the heaviest top-level imports). The network runs in process on the
served engine, untimed: its labels only feed the steps after it. Each step is timed on the second of two passes
(the first warms caches).

Usage: python benchmarks/client_profile.py [--repository model_repository] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate_served_model import network_session  # noqa: E402
from measure import make_scan, print_and_write  # noqa: E402

from mixsup.clients.pipeline import prepare_volume, restore_labels  # noqa: E402
from mixsup.postprocess import postprocess_labels  # noqa: E402
from mixsup.readers import read_scan  # noqa: E402
from mixsup.scan import write_nifti  # noqa: E402
from mixsup.serving.fuse import fuse_probabilities  # noqa: E402
from mixsup.serving.tiling import predict_volume_probabilities  # noqa: E402


def step_seconds(scan_path: Path, network_dir: Path, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of each client step on ``scan_path`` (second of two passes), and of the peers timed beside them."""
    contract, session = network_session(network_dir, "auto")
    seconds: dict[str, float] = {}
    peers: dict[str, float] = {}

    def timed(name: str, function, into: dict[str, float] = seconds):
        started = time.perf_counter()
        value = function()
        into[name] = time.perf_counter() - started
        return value

    for _ in range(2):
        scan = timed("read", lambda: read_scan(scan_path))
        volume, restore = timed("pre-process", lambda: prepare_volume(scan, contract))
        if contract.anti_aliasing:
            linear = contract.replace(anti_aliasing=False)
            timed("pre-process without anti-aliasing", lambda: prepare_volume(scan, linear), peers)
        probabilities = predict_volume_probabilities(
            volume, lambda inputs: session.run(None, {contract.input_name: inputs})[0], contract.patch_size,
            num_classes=contract.num_classes, context_slices=contract.context_slices,
            size_divisor=contract.size_divisor)
        labels, _ = fuse_probabilities([probabilities], [1.0])
        labels = timed("restore labels", lambda: restore_labels(labels, restore, contract.num_classes))
        labels = timed("post-process", lambda: postprocess_labels(labels))
        timed("write", lambda: write_nifti(out, labels, scan.affine))
    return seconds, peers


def import_profile(module: str = "mixsup.clients.cli", top: int = 6) -> tuple[float, dict[str, float]]:
    """Seconds a fresh interpreter takes to import ``module`` (wall, interpreter start-up subtracted) and the
    ``top`` heaviest third-party packages it pulls in, each with its cumulative import seconds (``python -X
    importtime``; a package imported inside another counts in both)."""
    def wall(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - started

    seconds = min(wall(f"import {module}") for _ in range(3)) - min(wall("pass") for _ in range(3))
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], check=True,
                           capture_output=True, text=True).stderr
    packages: dict[str, float] = {}
    for line in trace.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| *(\S+)$", line)
        name = match.group(2).split(".")[0] if match else ""
        if name and name != "mixsup" and name not in sys.stdlib_module_names and not name.startswith("_"):
            packages[name] = max(packages.get(name, 0.0), int(match.group(1)) / 1e6)
    heaviest = dict(sorted(packages.items(), key=lambda item: -item[1])[:top])
    return seconds, {name: round(value, 3) for name, value in heaviest.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=HERE.parent / "model_repository")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scan_path = make_scan(Path(tmp) / "scan", (100, 512, 512), (2.5, 0.7, 0.7))
        steps, peers = step_seconds(scan_path, args.repository / "unet", Path(tmp) / "labels.nii.gz")
    import_seconds, heaviest = import_profile()
    results = {"scan": {"shape_dhw": [100, 512, 512], "spacing_mm": [2.5, 0.7, 0.7]},
               "step_seconds": {name: round(value, 3) for name, value in steps.items()},
               "peer_seconds": {name: round(value, 3) for name, value in peers.items()},
               "import_cli_seconds": round(import_seconds, 3), "import_top": heaviest,
               "total_seconds": round(sum(steps.values()) + import_seconds, 3),
               "command": "python benchmarks/client_profile.py " + " ".join(sys.argv[1:])}
    print_and_write(results, args.out)


if __name__ == "__main__":
    main()
