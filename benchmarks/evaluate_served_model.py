"""Accuracy and latency of a served model repository, measured through the real stack.

Starts ``mixsup-serve`` on the repository, segments held-out phantoms with the ``mixsup-client segment``
command (a fresh process per scan, as a user runs it), and reports:

* server start-to-ready seconds;
* global and per-case Dice (liver as LiTS counts it: liver ∪ lesion; lesion) against the phantoms' labels,
  for phantoms of the project's generator (classic style, seeds never used in training), of the foreign generator
  in ``benchmarks/foreign_phantoms.py`` and of the independent evaluation generator in
  ``benchmarks/independent_phantoms.py`` (never trained or tuned on);
* end-to-end seconds of ``mixsup-client segment`` for a 256x256x40 and a 512x512x100 scan, side by side with
  a peer that does the same work in one process with no server (read, pre-process, ONNX Runtime sliding
  window with the same tiles and blending, post-process, write), and their ratio: what serving costs; and with
  ``mixsup-client segment --single-scale``: what the contract's test spacings cost.

Usage: python benchmarks/evaluate_served_model.py [--repository model_repository] [--cases 10] [--out FILE.json]
       [--no-timing]
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from foreign_phantoms import make_foreign_case  # noqa: E402
from independent_phantoms import make_case as make_independent_case  # noqa: E402
from measure import print_and_write  # noqa: E402
from triton_utils import start_serve, stop_serve  # noqa: E402

from mixsup.contract import ModelContract  # noqa: E402
from mixsup.metrics import GlobalDice, dice  # noqa: E402
from mixsup.readers import read_scan  # noqa: E402
from mixsup.scan import Scan, read_nifti, write_nifti  # noqa: E402
from mixsup.stacks import DEFAULT_MAX_SLICE  # noqa: E402

BIN = Path(sys.executable).parent


def start_server(repository: Path, log_dir: Path) -> tuple[object, str, float]:
    """mixsup-serve on free ports (the test suite's launcher helper); returns it, its gRPC URL, seconds to ready."""
    started = time.perf_counter()
    process, grpc_url, _ = start_serve(repository, log_dir=log_dir)
    return process, grpc_url, time.perf_counter() - started


def segment_with_cli(scan: Path, out: Path, url: str, *options: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "mixsup-client"), "segment", str(scan), "-o", str(out), "--url", url, *options],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def evaluate(cases: list[tuple[Path, Path]], url: str, work: Path) -> dict:
    liver, lesion, per_case = GlobalDice([1]), GlobalDice([2]), []
    for volume_path, label_path in cases:
        out = work / f"pred-{volume_path.name}"
        seconds = segment_with_cli(volume_path, out, url)
        predicted, truth = read_nifti(out), read_nifti(label_path)
        if predicted.voxels.shape != truth.voxels.shape or not np.allclose(predicted.affine, truth.affine):
            raise SystemExit(f"{out}: not on the input grid")
        p, t = predicted.voxels, truth.voxels
        liver.update(np.minimum(p, 1), np.minimum(t, 1))
        lesion.update(p, t)
        per_case.append({"case": volume_path.name, "seconds": round(seconds, 2),
                         "dice_liver": round(dice(np.minimum(p, 1), np.minimum(t, 1), 1), 4),
                         "dice_lesion": round(dice(p, t, 2), 4), "lesion_voxels": int((t == 2).sum())})
    return {"dice_liver_global": round(liver.result()[1], 4), "dice_lesion_global": round(lesion.result()[2], 4),
            "cases": per_case}


def segment_in_process(scan_path: Path, out: Path, network_dir: Path, max_slice: int = DEFAULT_MAX_SLICE) -> float:
    """The peer: the same pipeline as the served path, in this process, no Triton, no gRPC."""
    started = time.perf_counter()
    scan = read_scan(scan_path)
    labels = labels_in_process(scan, network_dir, max_slice)
    write_nifti(out, labels, scan.affine)
    return time.perf_counter() - started


@functools.lru_cache(maxsize=4)
def network_session(network_dir: Path, device: str = "cpu"):
    """The network's contract and a session of it on ``device`` (``mixsup.serving.runtime``; default ONNX
    Runtime's float32 on CPU), cached: a session costs a second to build."""
    from mixsup.serving.runtime import create_session

    return (ModelContract.load(network_dir / "1" / "contract.json"),
            create_session(network_dir / "1" / "model.onnx", device=device))


def spacing_answers(scan: Scan, network_dir: Path, max_slice: int = DEFAULT_MAX_SLICE, device: str = "cpu",
                    body_window: bool = True) -> tuple[ModelContract, list]:
    """The network's contract and its answers for ``scan``, a ``(labels, probabilities, restore)`` per spacing of
    the contract (:func:`mixsup.clients.pipeline.answer_at_spacings` takes them): pre-processing to the model grid,
    whole slices up to ``max_slice`` (0: tiles, 25% overlap, Gaussian) of the window around the body (every pixel
    with ``body_window`` false), the network on ``device``, labels decided as the served step decides them."""
    from mixsup.clients.pipeline import prepare_volume, run_spacings
    from mixsup.serving.fuse import fuse_probabilities
    from mixsup.serving.tiling import BODY_MARGIN, predict_volume_probabilities

    contract, session = network_session(network_dir, device)
    answers = []
    for spacing in run_spacings(contract):
        volume, restore = prepare_volume(scan, contract, spacing)
        probabilities = predict_volume_probabilities(
            volume, lambda inputs: session.run(None, {contract.input_name: inputs})[0], contract.patch_size,
            overlap=0.25, batch_size=8, num_classes=contract.num_classes, context_slices=contract.context_slices,
            max_slice=max_slice, size_divisor=contract.size_divisor,
            body_margin=BODY_MARGIN if body_window else None)
        answers.append((*fuse_probabilities([probabilities], [1.0], contract.lesion_threshold), restore))
    return contract, answers


def labels_in_process(scan: Scan, network_dir: Path, max_slice: int = DEFAULT_MAX_SLICE,
                      postprocess: bool = True, device: str = "cpu", body_window: bool = True) -> np.ndarray:
    """What ``mixsup-client segment`` writes for ``scan``, computed here: :func:`spacing_answers`, labels restored
    (from the mean of the spacings' probabilities, if the contract has several), post-processed."""
    from mixsup.clients.pipeline import answer_at_spacings

    contract, answers = spacing_answers(scan, network_dir, max_slice, device, body_window)
    return answer_at_spacings(answers, contract.num_classes, False, postprocess,
                              lesion_threshold=contract.lesion_threshold)[0]


def own_phantoms(folder: Path, count: int, seed: int, shape: tuple[int, int, int],
                 style: str = "classic") -> list[tuple[Path, Path]]:
    """``count`` phantoms of the project's generator in ``style`` (``mixsup-data phantoms``) as NIfTI pairs."""
    subprocess.run([str(BIN / "mixsup-data"), "phantoms", str(folder), "--n", str(count), "--seed", str(seed),
                    "--shape", *map(str, shape), "--style", style], check=True, stdout=subprocess.DEVNULL)
    return [(folder / f"volume-{i}.nii.gz", folder / f"segmentation-{i}.nii.gz") for i in range(count)]


def generated_phantoms(folder: Path, count: int, seed: int, shape: tuple[int, int, int],
                       make_case: Callable[[int, tuple[int, int, int]], tuple[np.ndarray, np.ndarray, np.ndarray]]
                       ) -> list[tuple[Path, Path]]:
    """``count`` cases of a benchmark generator (``make_case(seed, shape) -> (HU, labels, affine)``) as NIfTI pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(count):
        volume, labels, affine = make_case(seed + index, shape)
        pair = (folder / f"volume-{index}.nii.gz", folder / f"segmentation-{index}.nii.gz")
        write_nifti(pair[0], volume, affine)
        write_nifti(pair[1], labels, affine)
        cases.append(pair)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=HERE.parent / "model_repository")
    parser.add_argument("--cases", type=int, default=10, help="held-out cases per generator (0: timing only)")
    parser.add_argument("--seed", type=int, default=90210, help="never a training seed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-timing", action="store_true", help="accuracy only: skip the end-to-end timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server, url, ready_seconds = start_server(args.repository, work)
        try:
            results = {"repository": str(args.repository), "start_to_ready_s": round(ready_seconds, 2)}
            if args.cases:
                results["own_phantoms_40x256x256"] = evaluate(
                    own_phantoms(work / "own", args.cases, args.seed, (40, 256, 256)), url, work)
            for name, make_case in [("foreign", make_foreign_case), ("independent", make_independent_case)]:
                if args.cases:
                    results[f"{name}_phantoms_40x256x256"] = evaluate(
                        generated_phantoms(work / name, args.cases, args.seed, (40, 256, 256), make_case), url, work)
            timing = {}
            for shape in [] if args.no_timing else [(40, 256, 256), (100, 512, 512)]:
                (case,) = own_phantoms(work / f"timing-{shape[1]}", 1, args.seed + 7, shape)
                segment_with_cli(case[0], work / "warmup.nii.gz", url)  # first-call costs are not latency
                served = [segment_with_cli(case[0], work / "timing.nii.gz", url) for _ in range(3)]
                single = [segment_with_cli(case[0], work / "timing.nii.gz", url, "--single-scale") for _ in range(3)]
                peer = [segment_in_process(case[0], work / "peer.nii.gz", args.repository / "unet")
                        for _ in range(3)]
                timing["x".join(map(str, shape[::-1]))] = {
                    "served_cli_median_s": round(float(np.median(served)), 2),
                    "in_process_median_s": round(float(np.median(peer)), 2),
                    "served_over_in_process": round(float(np.median(served) / np.median(peer)), 2),
                    "served_single_scale_median_s": round(float(np.median(single)), 2),
                    "served_over_single_scale": round(float(np.median(served) / np.median(single)), 2),
                    "served_runs_s": [round(r, 2) for r in served], "in_process_runs_s": [round(r, 2) for r in peer],
                    "single_scale_runs_s": [round(r, 2) for r in single]}
            if timing:
                results["end_to_end_cli_seconds"] = timing
        finally:
            stop_serve(server)
    print_and_write(results, args.out)


if __name__ == "__main__":
    main()
