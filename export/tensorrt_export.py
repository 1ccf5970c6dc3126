"""ONNX -> serialized TensorRT engine (``model.plan``) for Triton's ``tensorrt_plan`` platform.

An engine only runs on the GPU architecture and TensorRT version it was built with, so it is built at export
time on a host like the serving one; that host needs the TensorRT Python package (``mixsup[gpu]``) and a CUDA GPU.
"""
from __future__ import annotations

from pathlib import Path

from mixsup.errors import InputError, MixsupError
from mixsup.repository import ShapeProfile


def tensorrt_unavailable_reason() -> str | None:
    """Why no engine can be built here (no TensorRT package, no CUDA GPU), or None when one can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the TensorRT Python package is not installed (pip install 'mixsup[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def require_tensorrt() -> None:
    """An InputError (exit 2) naming what is missing when TensorRT cannot build engines here."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise InputError(f"--format tensorrt needs TensorRT and a CUDA GPU: {reason}")


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    input_name: str,
    channels: int,
    profile: ShapeProfile,
    fp16: bool = False,
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Build a TensorRT engine from a float32 ONNX model and write it to ``plan_path``.

    One optimization profile covers ``profile``'s batch sizes and square in-plane sides; ``fp16`` lets TensorRT
    pick float16 kernels while the engine's input and output stay float32.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode, no flag needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise MixsupError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, *profile.shapes(channels))
    config.add_optimization_profile(optimization_profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise MixsupError("TensorRT could not build an engine for this network (its log above says why)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(engine))
    return plan_path
