"""ONNX Runtime sessions and the choice of execution providers (TensorRT, CUDA, CPU)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import onnxruntime as ort

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda", "tensorrt")

Provider = Union[str, tuple[str, dict]]


def tensorrt_provider(trt_cache_dir: str | os.PathLike | None = None, fp16: bool = False) -> tuple[str, dict]:
    """The TensorRT EP with its options; caching the engines avoids minutes of rebuilding on every start."""
    options: dict = {"trt_fp16_enable": bool(fp16)}
    if trt_cache_dir is not None:
        options["trt_engine_cache_enable"] = True
        options["trt_engine_cache_path"] = str(trt_cache_dir)
    return TENSORRT, options


def choose_providers(
    available: Sequence[str],
    device: str = "auto",
    trt_cache_dir: str | os.PathLike | None = None,
    fp16: bool = False,
) -> list[Provider]:
    """ORT providers in priority order for ``device`` (auto | cpu | cuda | tensorrt); CPU is always last.

    ``auto`` takes the fastest of ``available`` (usually ``ort.get_available_providers()``); naming a device
    that is not available is an error rather than a silent fall-back to the CPU.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and CUDA not in available:
        raise ValueError(f"device 'cuda' asked for, but ONNX Runtime offers only {list(available)} "
                         "(install onnxruntime-gpu on a CUDA host)")
    if device == "tensorrt" and TENSORRT not in available:
        raise ValueError(f"device 'tensorrt' asked for, but ONNX Runtime offers only {list(available)} "
                         "(install onnxruntime-gpu and TensorRT)")
    providers: list[Provider] = []
    if device in ("auto", "tensorrt") and TENSORRT in available:
        providers.append(tensorrt_provider(trt_cache_dir, fp16))
    if device != "cpu" and CUDA in available:
        providers.append(CUDA)
    providers.append(CPU)
    return providers


def create_session(
    onnx_path: str | os.PathLike,
    device: str = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    trt_cache_dir: str | os.PathLike | None = None,
    fp16: bool = False,
) -> ort.InferenceSession:
    """An ONNX Runtime session for ``onnx_path`` on ``device``; thread counts of None or 0 mean ORT's default."""
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        options.inter_op_num_threads = int(inter_op_threads)
    providers = choose_providers(ort.get_available_providers(), device, trt_cache_dir, fp16)
    if trt_cache_dir is not None and isinstance(providers[0], tuple):
        Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
