"""The served path against what a user would run instead, side by side in one run, on one whole CT scan.

One network (the bundled architecture: 2.5D U-Net, 16 base channels, 4 poolings; seeded random weights unless
``--checkpoint`` is given, since speed does not depend on the weights), exported once with ``mixsup-export``
into a fresh repository, and one scan (``mixsup-data phantoms``, 512x512x100 at 0.7 mm in-plane -> a 100x224x224
model grid). Every path gets the same model-grid volume and the same weights and ends in labels:

* ``served``              -- tritonclient -> the ``segment`` ensemble of ``mixsup-serve`` (INT16 in, UINT8 out),
                             warm; the window step runs whole slices (``MAX_SLICE``) of the window around the
                             body (:func:`mixsup.serving.tiling.body_box`), the network model runs on
                             the repository's device ``auto`` (OpenVINO on a CPU host where it is installed:
                             bfloat16 on CPUs with AMX, else float32; ``served_engine`` says which);
* ``monai_eager``         -- MONAI ``sliding_window_inference`` (160 px tiles, 25% overlap, Gaussian, batch 8)
                             over the network in eager PyTorch: what most users run;
* ``monai_torchscript``   -- the same with the network traced, frozen and in channels_last: a savvy PyTorch user;
* ``monai_torchscript_bf16`` -- the same traced under ``torch.autocast`` bfloat16: the savviest user of a CPU
                             with native bfloat16, the peer of a bfloat16 served path (run only on such a CPU:
                             elsewhere bfloat16 is emulated, 7x slower than float32, and the served path is
                             float32 too);
* ``in_process``          -- the project's own inference (:func:`mixsup.serving.tiling.predict_volume_probabilities`,
                             whole slices) in this process, on the served engine: what serving may cost at most over;
* ``in_process_onnxruntime`` -- the same on ONNX Runtime's float32 (device ``cpu``);
* ``in_process_tiled``    -- the same as ``in_process``, tiled as MONAI tiles: what whole slices save;
* ``in_process_whole_slices`` -- the same as ``in_process`` over every pixel of each slice, air included: what the
                             body window saves (and ``label_agreement_with_whole_slices``: what it changes);
* ``matmul_ceiling``      -- the network's FLOPs for the served plan over this CPU's float32 matmul rate
                             (``matmul_ceiling_bf16``: over its bfloat16 matmul rate).

Then ``mixsup-client segment`` end to end (read, resample, serve, restore, post-process, write) and what the
client adds over the served request, both against the bundled model (``--cli-repository``): the client's work
follows the label map, and random weights label the whole volume;
scans per minute with 1, 2 and 4 concurrent clients (threads, one gRPC
client each); peak resident memory of the server (Triton and its stubs) and of the CLI.

Writes ``benchmarks/results/serving.json`` (``speedup_vs_monai_eager``, ``speedup_vs_monai_torchscript``,
``speedup_vs_monai_torchscript_bf16``, ``overhead_vs_inprocess``, ``client_seconds``, ...) and ``serving.png``.
``overhead_vs_inprocess`` comes from ``paired_seconds``: served and in process timed in turns, round by round,
once the server is up (``seconds`` times each path in a block of its own, minutes apart);
``overhead_vs_inprocess_cli_model`` the same with the bundled model's trained weights.
Needs the ``bench`` extra (MONAI).

Usage: python benchmarks/serving.py [--shape 100 512 512] [--spacing 2.5 0.7 0.7] [--repeats 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from measure import PeakRss, make_scan  # noqa: E402
from triton_utils import start_serve, stop_serve  # noqa: E402

from mixsup.clients.client import SegmentationClient  # noqa: E402
from mixsup.clients.pipeline import prepare_volume  # noqa: E402
from mixsup.contract import ModelContract  # noqa: E402
from mixsup.readers import read_scan  # noqa: E402
from mixsup.serving.fuse import fuse_probabilities  # noqa: E402
from mixsup.serving.runtime import create_session  # noqa: E402
from mixsup.serving.tiling import (  # noqa: E402
    BODY_MARGIN,
    body_box,
    padded_size,
    predict_volume_probabilities,
    slice_stacks,
    tile_positions,
)
from mixsup.training.precision import native_bfloat16  # noqa: E402

BIN = Path(sys.executable).parent
ROI, OVERLAP, BATCH, SIGMA = (160, 160), 0.25, 8, 0.125


# ------------------------------------------------------------------------------------------------- set-up


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint of the bundled architecture with seeded random weights, as ``mixsup-train`` writes one."""
    from dataclasses import asdict

    import torch

    from mixsup.training.recipes import get_recipe
    from mixsup.training.trainer import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, TrainConfig

    config = TrainConfig.preset("default", recipe="unet")
    recipe = get_recipe("unet")
    config = config.updated({"options": dict(recipe.DEFAULTS)})
    torch.manual_seed(seed)
    modules = recipe.build(config)
    network = recipe.segmentation_network(modules)
    contract = ModelContract(patch_size=(config.patch_size,) * 2, spacing_mm=config.spacing_mm, recipe="unet")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "recipe": "unet",
                "config": asdict(config), "network_config": asdict(network.config),
                "state_dict": modules.state_dict(), "contract": contract.to_dict(), "stage": 0, "epoch": 0,
                "history": []}, path)
    return path


def export(checkpoint: Path, repository: Path) -> Path:
    subprocess.run([str(BIN / "mixsup-export"), str(checkpoint), "--repository", str(repository), "--name", "unet"],
                   check=True, stdout=subprocess.DEVNULL)
    return repository / "unet"


def torch_network(checkpoint: Path):
    """``softmax(network(hu))`` in eager PyTorch, eval mode: exactly what the export wrote to ONNX."""
    from mixsup.training.models.unet import Probabilities
    from mixsup.training.trainer import load_checkpoint, network_from_checkpoint

    return Probabilities(network_from_checkpoint(load_checkpoint(checkpoint))).eval()


# ------------------------------------------------------------------------------------------------- paths


def monai_labels(volume: np.ndarray, predictor: Callable, channels_last: bool = False) -> np.ndarray:
    """MONAI's sliding window over every slice's 3-slice stack: same tiles, overlap, Gaussian and batch."""
    import torch
    from monai.inferers import sliding_window_inference

    stacks = torch.from_numpy(slice_stacks(volume).astype(np.float32))
    if channels_last:
        stacks = stacks.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        probabilities = sliding_window_inference(
            stacks, roi_size=ROI, sw_batch_size=BATCH, predictor=predictor, overlap=OVERLAP, mode="gaussian",
            sigma_scale=SIGMA, padding_mode="constant", cval=-1024.0)
        return probabilities.max(dim=1).indices.numpy().astype(np.uint8)


def frozen_channels_last(network, example_hw: tuple[int, int], bfloat16: bool = False):
    """The network traced, frozen and optimised for inference, taking channels_last input; with ``bfloat16``
    traced under CPU autocast (convolutions in bfloat16, float32 probabilities out)."""
    import contextlib

    import torch

    example = torch.zeros(BATCH, 3, *example_hw).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bfloat16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        network = network.to(memory_format=torch.channels_last)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(network, example).eval()))
        for _ in range(2):  # the profiling runs of the TorchScript executor are not latency
            frozen(example)

    def predict(tiles):
        return frozen(tiles.contiguous(memory_format=torch.channels_last)).float()

    return predict


def in_process_labels(volume: np.ndarray, session, contract: ModelContract, max_slice: int,
                      body_window: bool = True) -> np.ndarray:
    probabilities = predict_volume_probabilities(
        volume, lambda inputs: session.run(None, {contract.input_name: inputs})[0], ROI, OVERLAP, BATCH,
        num_classes=contract.num_classes, context_slices=contract.context_slices, max_slice=max_slice,
        size_divisor=contract.size_divisor, sigma_scale=SIGMA, body_margin=BODY_MARGIN if body_window else None)
    return fuse_probabilities([probabilities], [1.0])[0]


def matmul_gflops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """This CPU's matmul rate in GFLOP/s (median of ``repeats``), PyTorch on every core, in ``dtype``."""
    import torch

    a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, size, dtype=getattr(torch, dtype))
    torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - started)
    return 2 * size**3 / float(np.median(seconds)) / 1e9


def network_gflop(network, height: int, width: int) -> float:
    """GFLOP of one forward pass on a [1, 3, height, width] input (a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, 3, height, width))
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------------- measuring


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median seconds of ``repeats`` calls after one warm-up call, every run's seconds (the warm-up's first),
    the last result."""
    started = time.perf_counter()
    result = function()
    runs = [time.perf_counter() - started]
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        runs.append(time.perf_counter() - started)
    return float(np.median(runs[1:])), [round(r, 3) for r in runs], result


def paired_medians(functions: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds that call each once, in turn: a ratio of two paths
    measured minutes apart on a shared CPU carries the drift between them, one of paths taken in turns does not."""
    runs: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            runs[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in runs.items()}


def served_against_in_process(client: SegmentationClient, volume: np.ndarray, session, contract: ModelContract,
                              rounds: int) -> dict[str, float]:
    """:func:`paired_medians` of the served request and the same network's whole-slice plan in process."""
    return paired_medians({"served": lambda: client.segment_volume(volume),
                           "in_process": lambda: in_process_labels(volume, session, contract, max_slice=512)}, rounds)


def cli_segment(scan: Path, out: Path, url: str) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one ``mixsup-client segment`` process."""
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "mixsup-client"), "segment", str(scan), "-o", str(out), "--url", url],
                               stdout=subprocess.DEVNULL)
    with PeakRss(process.pid) as rss:
        if process.wait() != 0:
            raise SystemExit(f"mixsup-client segment exited with {process.returncode}")
    return time.perf_counter() - started, rss.peak


def scans_per_minute(url: str, volume: np.ndarray, clients: int, scans_each: int) -> float:
    """Throughput of ``clients`` threads, each with its own gRPC client, each segmenting ``scans_each`` scans."""
    def worker(_: int) -> None:
        with SegmentationClient(url) as client:
            for _ in range(scans_each):
                client.segment_volume(volume)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return 60.0 * clients * scans_each / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [name for name in ("monai_eager", "monai_torchscript", "monai_torchscript_bf16")
             if name in results["seconds"]]
    ours = ["in_process_onnxruntime", "in_process_tiled", "in_process_whole_slices", "in_process"]
    ceilings = [name for name in ("matmul_ceiling", "matmul_ceiling_bf16") if name in results["seconds"]]
    names = peers + ours + ["served"] + ceilings
    colours = ["#999999"] * len(peers) + ["#4c72b0"] * len(ours) + ["#dd8452"] + ["#dddddd"] * len(ceilings)
    seconds = [results["seconds"][name] for name in names]
    figure, axis = plt.subplots(figsize=(8, 4.4))
    bars = axis.barh(names[::-1], seconds[::-1], color=colours[::-1])
    axis.bar_label(bars, fmt="%.2f s", padding=3)
    axis.set_xlabel("seconds per scan (median)")
    axis.set_title(f"{results['scan']['shape_dhw']} scan -> {results['scan']['model_grid_dhw']} model grid, "
                   f"{os.cpu_count()} CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[100, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.7, 0.7], metavar=("SD", "SH", "SW"))
    parser.add_argument("--checkpoint", type=Path, help="a unet checkpoint (default: seeded random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cli-repository", type=Path, default=HERE.parent / "model_repository",
                        help="repository (trained weights) the CLI end to end runs against (default: the bundled)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for serving.json and serving.png")
    args = parser.parse_args()

    import torch

    results: dict[str, Any] = {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scan_path = make_scan(work / "scan", tuple(args.shape), tuple(args.spacing))
        checkpoint = args.checkpoint or make_checkpoint(work / "random.pt")
        network_dir = export(checkpoint, work / "repository")
        contract = ModelContract.load(network_dir / "1")
        volume, _ = prepare_volume(read_scan(scan_path), contract)
        depth, height, width = volume.shape
        results["scan"] = {"shape_dhw": list(args.shape), "spacing_mm": list(args.spacing),
                           "model_grid_dhw": [depth, height, width], "checkpoint": str(args.checkpoint or "random")}
        network = torch_network(checkpoint)
        session = create_session(network_dir / "1" / "model.onnx", device="auto")  # the served engine
        reference_session = create_session(network_dir / "1" / "model.onnx", device="cpu")
        results["served_engine"] = session.get_providers()[0]

        seconds, runs, labels = {}, {}, {}

        def measure(name: str, function: Callable[[], np.ndarray]) -> None:
            seconds[name], runs[name], labels[name] = timed(function, args.repeats)
            print(f"{name:>20}: {seconds[name]:.2f} s {runs[name]}", flush=True)

        measure("in_process", lambda: in_process_labels(volume, session, contract, max_slice=512))
        measure("in_process_onnxruntime", lambda: in_process_labels(volume, reference_session, contract, max_slice=512))
        measure("in_process_tiled", lambda: in_process_labels(volume, session, contract, max_slice=0))
        measure("in_process_whole_slices",
                lambda: in_process_labels(volume, session, contract, max_slice=512, body_window=False))
        measure("monai_eager", lambda: monai_labels(volume, network))
        frozen = frozen_channels_last(network, ROI)  # built once: tracing is not inference
        measure("monai_torchscript", lambda: monai_labels(volume, frozen, channels_last=True))
        bfloat16 = native_bfloat16(torch.device("cpu"))
        if bfloat16:
            frozen_bf16 = frozen_channels_last(network, ROI, bfloat16=True)
            measure("monai_torchscript_bf16", lambda: monai_labels(volume, frozen_bf16, channels_last=True))

        server, url, _ = start_serve(work / "repository", log_dir=work / "logs")
        try:
            with SegmentationClient(url) as client:
                measure("served", lambda: client.segment_volume(volume))
                paired = served_against_in_process(client, volume, session, contract, args.repeats)
                print(f"{'paired':>20}: {paired}", flush=True)
            # Memory is sampled from here on, not while the served path is timed: sampling costs CPU.
            with PeakRss(server.pid) as server_rss:
                throughput = {str(n): round(scans_per_minute(url, volume, n, 2), 2) for n in args.clients}
                print(f"{'scans/minute':>20}: {throughput}", flush=True)
        finally:
            stop_serve(server)
        # The client's work depends on the label map (restore and post-processing cover the foreground's extent),
        # and random weights label the whole volume: the CLI runs against a model with trained weights, same
        # architecture, so that its labels look like a liver's; its own served request is timed beside it.
        cli_repository = args.cli_repository if (args.cli_repository / "segment").is_dir() else work / "repository"
        server, url, _ = start_serve(cli_repository, log_dir=work / "logs_cli")
        try:
            cli_network = cli_repository / "unet" / "1"
            cli_session, cli_contract = create_session(cli_network / "model.onnx", device="auto"), ModelContract.load(
                cli_network)
            with SegmentationClient(url) as client:
                measure("served_cli_model", lambda: client.segment_volume(volume))
                paired_cli_model = served_against_in_process(client, volume, cli_session, cli_contract, args.repeats)
                print(f"{'paired (CLI model)':>20}: {paired_cli_model}", flush=True)
            cli_runs = [cli_segment(scan_path, work / "labels.nii.gz", url) for _ in range(args.repeats + 1)][1:]
            foreground = float(np.mean(np.asarray(read_scan(work / "labels.nii.gz").voxels) > 0))
        finally:
            stop_serve(server)

    # Work counted the way each path does it: whole padded slices of the body window (served, in process), of the
    # full slice, or 160-pixel tiles on the padded slice (MONAI, tiled).
    rows, columns = body_box(volume, size_divisor=contract.size_divisor)
    window_hw = (rows.stop - rows.start, columns.stop - columns.start)
    window_gflop = depth * network_gflop(network, *(padded_size(n, contract.size_divisor) for n in window_hw))
    whole_gflop = depth * network_gflop(network, padded_size(height, contract.size_divisor),
                                        padded_size(width, contract.size_divisor))
    tiles = len(tile_positions((depth, max(height, ROI[0]), max(width, ROI[1])), ROI, OVERLAP))
    tiled_gflop = tiles * network_gflop(network, *ROI)
    ceiling = matmul_gflops()
    seconds["matmul_ceiling"] = window_gflop / ceiling
    ceiling_bf16 = matmul_gflops(dtype="bfloat16") if bfloat16 else None
    if ceiling_bf16:
        seconds["matmul_ceiling_bf16"] = window_gflop / ceiling_bf16
    cli_seconds = float(np.median([s for s, _ in cli_runs]))
    paths = [name for name in ("served", "in_process", "in_process_onnxruntime", "in_process_tiled",
                               "in_process_whole_slices", "monai_eager", "monai_torchscript",
                               "monai_torchscript_bf16") if name in labels]
    agreement = {name: round(float(np.mean(labels[name] == labels["in_process_onnxruntime"])), 5)
                 for name in paths if name != "in_process_onnxruntime"}
    work_of = {name: tiled_gflop if name.startswith("monai") or name.endswith("tiled")
               else whole_gflop if name == "in_process_whole_slices" else window_gflop for name in paths}
    results.update({
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "runs_seconds": runs,
        "served_first_request_seconds": runs["served"][0],
        "speedup_vs_monai_eager": round(seconds["monai_eager"] / seconds["served"], 2),
        "speedup_vs_monai_torchscript": round(seconds["monai_torchscript"] / seconds["served"], 2),
        "speedup_vs_monai_torchscript_bf16": (round(seconds["monai_torchscript_bf16"] / seconds["served"], 2)
                                              if bfloat16 else None),
        "native_bfloat16": bfloat16,
        "engine_speedup_in_process": round(seconds["in_process_onnxruntime"] / seconds["in_process"], 2),
        "overhead_vs_inprocess": round(paired["served"] / paired["in_process"], 3),
        "paired_seconds": {name: round(value, 3) for name, value in paired.items()},
        "overhead_vs_inprocess_cli_model": round(paired_cli_model["served"] / paired_cli_model["in_process"], 3),
        "paired_seconds_cli_model": {name: round(value, 3) for name, value in paired_cli_model.items()},
        "whole_slice_speedup_in_process": round(seconds["in_process_tiled"] / seconds["in_process_whole_slices"], 2),
        "body_window_speedup_in_process": round(seconds["in_process_whole_slices"] / seconds["in_process"], 2),
        "body_window_hw": list(window_hw),
        "label_agreement_with_whole_slices": round(float(np.mean(labels["in_process"]
                                                                  == labels["in_process_whole_slices"])), 6),
        "cli_end_to_end_seconds": round(cli_seconds, 2),
        "client_seconds": round(cli_seconds - seconds["served_cli_model"], 2),
        "cli_repository": str(cli_repository), "cli_label_foreground_fraction": round(foreground, 4),
        "scans_per_minute_by_clients": throughput,
        "peak_rss_mb": {"server": round(server_rss.peak), "server_after_served_runs": round(server_rss.start),
                        "cli": round(max(rss for _, rss in cli_runs))},
        "work": {"network_gflop_body_window": round(window_gflop, 1),
                 "network_gflop_whole_slices": round(whole_gflop, 1), "network_gflop_tiled": round(tiled_gflop, 1),
                 "matmul_gflops": round(ceiling, 1),
                 "matmul_gflops_bf16": round(ceiling_bf16, 1) if ceiling_bf16 else None,
                 "effective_gflops": {name: round(work_of[name] / seconds[name], 1) for name in paths}},
        "label_agreement_with_onnxruntime_float32": agreement,
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
    })
    text = json.dumps(results, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(text + "\n")
    plot(results, args.out / "serving.png")


if __name__ == "__main__":
    main()
