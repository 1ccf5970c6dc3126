"""Whole-slice against tiled inference, and OpenVINO (bfloat16 on AMX CPUs) against ONNX Runtime's float32:
same Dice? And how much less time?

The served window step runs whole model-grid slices when they fit (``MAX_SLICE``) instead of 160-pixel tiles
with 25% overlap and Gaussian blending, and the network model runs on OpenVINO where it is installed (device
``auto``). This script segments the held-out phantoms of ``evaluate_served_model.py`` (same seeds, never trained
on: own generator, foreign, independent) four ways -- whole slices and tiles on ONNX Runtime float32, whole
slices on OpenVINO -- in process with the bundled network and the client's exact pipeline (pre-processing,
labels restored to the scan's grid, post-processing), and reports global Dice for liver and lesion per set and
way, their differences from whole slices on ONNX Runtime, and the seconds each way took. The issue's bar: the
ways agree within 0.005. Every way but ``whole_slice_every_pixel`` runs only the window around the body
(:func:`mixsup.serving.tiling.body_box`), as the server does; that way runs every pixel of each slice.

Usage: python benchmarks/whole_slice_accuracy.py [--cases 10] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate_served_model import generated_phantoms, labels_in_process, own_phantoms  # noqa: E402
from foreign_phantoms import make_foreign_case  # noqa: E402
from independent_phantoms import make_case as make_independent_case  # noqa: E402
from measure import print_and_write  # noqa: E402

from mixsup.metrics import GlobalDice  # noqa: E402
from mixsup.readers import read_scan  # noqa: E402
from mixsup.scan import read_nifti  # noqa: E402

#: (max_slice, device, body window) of each way; the first is the reference the others are compared with.
WAYS = {"whole_slice": (512, "cpu", True), "tiled": (0, "cpu", True), "whole_slice_openvino": (512, "openvino", True),
        "whole_slice_every_pixel": (512, "cpu", False)}
REFERENCE = "whole_slice"


def score(cases: list[tuple[Path, Path]], network_dir: Path) -> dict[str, dict[str, float]]:
    """Global liver / lesion Dice and seconds of each way over ``cases`` (each case read once)."""
    liver = {way: GlobalDice([1]) for way in WAYS}
    lesion = {way: GlobalDice([2]) for way in WAYS}
    seconds = dict.fromkeys(WAYS, 0.0)
    for volume_path, label_path in cases:
        scan, truth = read_scan(volume_path), read_nifti(label_path).voxels
        for way, (max_slice, device, body_window) in WAYS.items():
            started = time.perf_counter()
            predicted = labels_in_process(scan, network_dir, max_slice, device=device, body_window=body_window)
            seconds[way] += time.perf_counter() - started
            liver[way].update(np.minimum(predicted, 1), np.minimum(truth, 1))
            lesion[way].update(predicted, truth)
    results = {way: {"dice_liver_global": round(liver[way].result()[1], 4),
                     "dice_lesion_global": round(lesion[way].result()[2], 4), "seconds": round(seconds[way], 2)}
               for way in WAYS}
    for way in WAYS:
        if way != REFERENCE:
            results[f"difference_{way}_minus_{REFERENCE}"] = {
                key: round(results[way][key] - results[REFERENCE][key], 4)
                for key in ("dice_liver_global", "dice_lesion_global")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", type=Path, default=HERE.parent / "model_repository" / "unet")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=90210, help="never a training seed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    shape = (40, 256, 256)
    results: dict = {"network": str(args.network), "cases_per_set": args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"own": own_phantoms(work / "own", args.cases, args.seed, shape)}
        for name, make_case in [("foreign", make_foreign_case), ("independent", make_independent_case)]:
            sets[name] = generated_phantoms(work / name, args.cases, args.seed, shape, make_case)
        for name, cases in sets.items():
            results[name] = score(cases, args.network)
            print(name, json.dumps(results[name]), flush=True)
    for way in WAYS:
        if way != REFERENCE:
            key = f"difference_{way}_minus_{REFERENCE}"
            worst = max(abs(v) for name in sets for v in results[name][key].values())
            results[f"largest_abs_{key}"] = worst
            results[f"{way}_within_0_005"] = bool(worst <= 0.005)
    print_and_write(results, args.out)


if __name__ == "__main__":
    main()
