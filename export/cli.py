"""``mixsup-export CKPT --repository DIR --name NAME``: a checkpoint becomes a served member of ``segment``.

Writes ``DIR/NAME`` (the network), ``DIR/NAME_window`` (its sliding-window step) and regenerates ``DIR/fuse`` and
the public ensemble ``DIR/segment`` over every network in the repository. Only the recipe's segmentation path is
exported (its auxiliary heads stay in training), with the HU window as its first op and a softmax on top.

Formats: ``onnx`` (default) runs on ONNX Runtime inside Triton's python backend, or with ``--backend onnxruntime``
on Triton's native onnxruntime platform (``--tensorrt-accelerator`` adds TensorRT there); ``torchscript`` gives a
``pytorch_libtorch`` model; ``tensorrt`` a ``tensorrt_plan`` engine (needs TensorRT and a CUDA GPU here). Every
export is checked against PyTorch on raw-HU probes of several shapes: within 1e-4 in fp32, 1e-2 in fp16.
A NAME already in the repository is refused unless ``--replace``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from mixsup.errors import InputError, MixsupError, add_debug_flag, run_command

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mixsup.contract import ModelContract
    from mixsup.repository import ShapeProfile, TensorRTAccelerator

FORMATS = ("onnx", "torchscript", "tensorrt")
BACKENDS = ("python", "onnxruntime")
#: Largest difference from eager PyTorch, on probabilities, an export may show.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
#: Widest in-plane side the TensorRT engines accept: whole 512 x 512 slices.
TENSORRT_MAX_SIDE = 512
#: Tiles per request from the window step, and the most the network model takes at once (dynamic batching).
WINDOW_BATCH, MAX_BATCH_SIZE = 8, 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixsup-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repository", required=True, type=Path, help="Triton model repository folder")
    parser.add_argument("--name", required=True, help="model name in the repository, e.g. unet")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="exported graph format (default onnx)")
    parser.add_argument("--precision", default="fp32", choices=sorted(PARITY_TOLERANCE),
                        help="fp16: half-precision weights and math (onnx, tensorrt); input and output stay fp32")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="Triton backend of an onnx export: python (ONNX Runtime in the python backend; the "
                             "default, and what the bundled server runs) or onnxruntime (native, NGC containers)")
    parser.add_argument("--tensorrt-accelerator", action="store_true",
                        help="with --backend onnxruntime: run through ONNX Runtime's TensorRT execution provider")
    parser.add_argument("--trt-cache-dir", help="where Triton keeps TensorRT engines on the serving host "
                                                "(--tensorrt-accelerator; default /tmp/mixsup_trt_cache/NAME)")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing network of this name")
    parser.add_argument("--patch-size", type=int, help="sliding-window tile size (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--instances", type=int, default=1, help="Triton instances of the network model")
    parser.add_argument("--no-ensemble", action="store_true", help="write the network and its window step only")
    add_debug_flag(parser)
    return parser


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_options(args: argparse.Namespace) -> None:
    """Refuse flag combinations that have no meaning, before any work is done."""
    if args.backend is not None and args.format != "onnx":
        raise InputError(f"--backend chooses how an onnx export is served; --format {args.format} has its own")
    if args.tensorrt_accelerator and args.backend != "onnxruntime":
        raise InputError("--tensorrt-accelerator is an option of --backend onnxruntime")
    if args.trt_cache_dir and not args.tensorrt_accelerator:
        raise InputError("--trt-cache-dir only applies with --tensorrt-accelerator")
    if args.format == "torchscript" and args.precision == "fp16":
        raise InputError("--precision fp16 is for --format onnx or tensorrt; TorchScript is exported in fp32")
    if args.instances < 1:
        raise InputError(f"--instances must be at least 1, got {args.instances}")


def parity_probes(context_slices: int, patch: int, divisor: int, seed: int = 0) -> list[np.ndarray]:
    """Raw-HU inputs of two shapes, values well beyond the HU window on both sides: a batch of patch-sized
    tiles, and one non-square tile of another size (height and width are dynamic in every export)."""
    rng = np.random.default_rng(seed)
    shapes = [(2, patch, patch), (1, patch + divisor, max(divisor, patch - divisor))]
    return [rng.uniform(-1100, 1500, (n, context_slices, h, w)).astype(np.float32) for n, h, w in shapes]


def check_parity(what: str, compute: Callable[[np.ndarray], np.ndarray], reference: Sequence[np.ndarray],
                 probes: Sequence[np.ndarray], precision: str) -> float:
    """Largest difference of ``compute`` from the PyTorch ``reference`` over ``probes``; too large is an error."""
    error = max(float(np.abs(compute(probe) - expected).max()) for probe, expected in zip(probes, reference))
    tolerance = PARITY_TOLERANCE[precision]
    if not error <= tolerance:  # `not <=` so that NaN fails too
        raise MixsupError(f"{what} output differs from PyTorch by {error:.2e} (> {tolerance} for {precision})")
    return error


@dataclass
class Exported:
    """A network file ready for the repository, how Triton runs it, and how close it came to PyTorch."""

    path: Path
    runtime: str
    description: str
    parity: float
    accelerator: TensorRTAccelerator | None = None


def export_model(args: argparse.Namespace, network: torch.nn.Module, contract: ModelContract, work: Path,
                 profile: ShapeProfile) -> Exported:
    """Export ``network`` into ``work`` as ``args`` ask and check it against eager PyTorch."""
    from mixsup.export.onnx_export import convert_to_fp16, export_onnx, onnx_probabilities, torch_probabilities
    from mixsup.export.tensorrt_export import build_engine
    from mixsup.export.torchscript_export import export_torchscript, torchscript_probabilities
    from mixsup.repository import LIBTORCH, ONNXRUNTIME, PYTHON, TENSORRT_PLAN, TensorRTAccelerator

    patch = contract.patch_size[0]
    probes = parity_probes(contract.context_slices, patch, getattr(network, "size_divisor", 1))
    reference = [torch_probabilities(network, probe) for probe in probes]
    if args.format == "torchscript":
        path = export_torchscript(network, contract, work / "model.pt")
        error = check_parity("TorchScript", lambda x: torchscript_probabilities(path, x), reference, probes, "fp32")
        return Exported(path, LIBTORCH, "TorchScript fp32", error)

    onnx_path = export_onnx(network, contract, work / "model.onnx", opset=args.opset)
    error = check_parity("ONNX", lambda x: onnx_probabilities(onnx_path, x), reference, probes, "fp32")
    graph = f"ONNX opset {args.opset}"
    if args.format == "tensorrt":
        # Built from the float32 graph, from which TensorRT picks its own fp16 kernels. The engine itself is not
        # run here (that needs a CUDA runtime binding); the graph it was built from was checked above.
        plan = build_engine(onnx_path, work / "model.plan", contract.input_name, contract.context_slices, profile,
                            fp16=args.precision == "fp16")
        return Exported(plan, TENSORRT_PLAN, f"TensorRT engine {args.precision} from {graph}", error)
    if args.tensorrt_accelerator:
        # Likewise: the TensorRT execution provider gets the float32 graph and the precision as an option.
        cache = args.trt_cache_dir or f"/tmp/mixsup_trt_cache/{args.name}"
        accelerator = TensorRTAccelerator(precision=args.precision, engine_cache_path=cache, profile=profile)
        return Exported(onnx_path, ONNXRUNTIME, f"{graph} fp32, TensorRT accelerator {args.precision}", error,
                        accelerator)
    if args.precision == "fp16":
        onnx_path = convert_to_fp16(onnx_path, work / "fp16" / "model.onnx")
        error = check_parity("fp16 ONNX", lambda x: onnx_probabilities(onnx_path, x), reference, probes, "fp16")
    runtime = ONNXRUNTIME if args.backend == "onnxruntime" else PYTHON
    return Exported(onnx_path, runtime, f"{graph} {args.precision}, {runtime} backend", error)


def handle(args: argparse.Namespace) -> int:
    """Export the checkpoint, write its repository entries and the ensemble; errors are MixsupErrors."""
    from mixsup.contract import ModelContract
    from mixsup.export.tensorrt_export import require_tensorrt
    from mixsup.repository import ShapeProfile, check_network_name, write_ensemble, write_network
    from mixsup.training.trainer import load_checkpoint, network_from_checkpoint

    check_options(args)
    if args.format == "tensorrt":
        require_tensorrt()
    check_network_name(args.repository, args.name, args.replace)  # before the work, not after
    payload = load_checkpoint(args.checkpoint)
    network = network_from_checkpoint(payload)
    contract = ModelContract.from_dict(payload["contract"])
    patch = args.patch_size or contract.patch_size[0]
    divisor = getattr(network, "size_divisor", 1)
    if patch % divisor:
        raise InputError(f"--patch-size {patch} must be a multiple of {divisor} for this network")
    contract = contract.replace(
        patch_size=(patch, patch), opset=None if args.format == "torchscript" else args.opset,
        precision=args.precision, checkpoint=f"{args.checkpoint.name} sha256:{sha256_of(args.checkpoint)[:16]}",
    )
    # The window step sends up to WINDOW_BATCH patch-sized tiles per request; engines also take whole slices.
    profile = ShapeProfile(batch=(1, WINDOW_BATCH, MAX_BATCH_SIZE),
                           side=(patch, patch, max(patch, TENSORRT_MAX_SIDE)))
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(args, network, contract, Path(tmp), profile)
        write_network(args.repository, args.name, exported.path, contract, instance_count=args.instances,
                      max_batch_size=MAX_BATCH_SIZE, batch_size=WINDOW_BATCH, runtime=exported.runtime,
                      accelerator=exported.accelerator, replace=args.replace)
    if not args.no_ensemble:
        write_ensemble(args.repository)
    parameters = sum(parameter.numel() for parameter in network.parameters())
    print(f"mixsup-export: wrote {args.repository / args.name} ({exported.description}, {parameters:,} parameters, "
          f"parity {exported.parity:.1e}, patch {patch}x{patch})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mixsup-export`` command; returns its exit code (DESIGN.md)."""
    return run_command("mixsup-export", build_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
