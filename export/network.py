"""The segmentation network in the format a user asks for (ONNX fp32 / fp16, TorchScript, TensorRT engine),
checked against eager PyTorch on raw-HU probes before it counts as exported."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mixsup.contract import ModelContract
    from mixsup.repository import ShapeProfile, TensorRTAccelerator


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
    from mixsup.export.parity import check_parity, parity_probes
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
