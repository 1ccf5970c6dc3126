"""Inference sessions for an ONNX model: ONNX Runtime with the choice of execution providers (TensorRT, CUDA,
CPU), or OpenVINO on a CPU host.

OpenVINO is there for speed on CPUs: its CPU plugin runs convolutions in bfloat16 where the processor computes
bfloat16 natively (Intel AMX), and the bundled 2.5D U-Net then takes a fifth of ONNX Runtime's float32 time on
the same cores (``benchmarks/serving.py``); on other CPUs it runs float32. ``auto`` prefers a GPU, then
OpenVINO when it is installed, then ONNX Runtime's CPU provider; ``cpu`` always means ONNX Runtime's exact
float32, the reference the tests and in-process checks compare with.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np
import onnxruntime as ort

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
OPENVINO = "openvino"
#: Where the python runtime's adapters run an ONNX model (a model's parameter DEVICE, ``mixsup-export --device``).
DEVICES = ("auto", "cpu", "cuda", "tensorrt", OPENVINO)

Provider = Union[str, tuple[str, dict]]


def tensorrt_provider(trt_cache_dir: str | os.PathLike | None = None, fp16: bool = False) -> tuple[str, dict]:
    """The TensorRT EP with its options; caching the engines avoids minutes of rebuilding on every start."""
    options: dict = {"trt_fp16_enable": bool(fp16)}
    if trt_cache_dir is not None:
        options["trt_engine_cache_enable"] = True
        options["trt_engine_cache_path"] = str(trt_cache_dir)
    return TENSORRT, options


def check_device(device: str) -> None:
    """A ValueError naming the choices unless ``device`` is one of :data:`DEVICES`."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


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
    check_device(device)
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


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def uses_openvino(device: str, available: Sequence[str], openvino: bool) -> bool:
    """Whether ``device`` runs on OpenVINO: asked for by name (an error when ``openvino`` is not installed),
    or ``auto`` on a host whose ONNX Runtime offers no GPU provider in ``available``."""
    check_device(device)
    if device == OPENVINO and not openvino:
        raise ValueError("device 'openvino' asked for, but OpenVINO is not installed (pip install openvino)")
    return device == OPENVINO or (device == "auto" and openvino and not {TENSORRT, CUDA} & set(available))


class TensorName(NamedTuple):
    """What the adapters read of ``ort.InferenceSession.get_inputs()`` / ``get_outputs()`` items."""

    name: str


def _port_name(port, is_input: bool) -> str:
    """The ONNX name of an OpenVINO model port. A port can carry several tensor names (OpenVINO merges an input
    with a Cast that follows it into one tensor), so ``any_name`` may be an internal one: an input's Parameter
    keeps the ONNX input's name as its friendly name; of an output's names, the exporter's internal ones start
    with "/"."""
    if is_input:
        return port.get_node().get_friendly_name()
    names = sorted(port.get_names())
    public = [name for name in names if not name.startswith("/")]
    return public[0] if len(public) == 1 else port.any_name


class OpenVinoSession:
    """An OpenVINO CPU model behind the part of ``ort.InferenceSession``'s interface the adapters use: ``run``,
    ``get_inputs``, ``get_outputs``, ``get_providers``.

    Compiled for latency (one stream: a request gets every thread) at OpenVINO's default inference precision,
    bfloat16 on CPUs that compute it natively, else float32 (:attr:`precision` says which). Dynamic input shapes
    stay dynamic. One infer request, made once, serves every ``run``; a lock keeps concurrent calls from
    sharing its buffers.
    """

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._model = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        self._inputs = {_port_name(port, True): index for index, port in enumerate(self._model.inputs)}
        self._outputs = {_port_name(port, False): index for index, port in enumerate(self._model.outputs)}
        self.precision = self._model.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"
        self._request = self._model.create_infer_request()
        self._lock = threading.Lock()

    def get_inputs(self) -> list[TensorName]:
        return [TensorName(name) for name in self._inputs]

    def get_outputs(self) -> list[TensorName]:
        return [TensorName(name) for name in self._outputs]

    def get_providers(self) -> list[str]:
        return [f"{OPENVINO} ({self.precision})"]

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names) if output_names else list(self._outputs)
        for name, known in [*((n, self._inputs) for n in feeds), *((n, self._outputs) for n in names)]:
            if name not in known:
                raise ValueError(f"the model has no tensor {name!r}; it has inputs {sorted(self._inputs)} and "
                                 f"outputs {sorted(self._outputs)}")
        with self._lock:
            results = self._request.infer({self._inputs[name]: np.ascontiguousarray(value)
                                           for name, value in feeds.items()})
            # Copies: the request's output buffers are reused by the next call.
            return [np.array(results[self._outputs[name]], copy=True) for name in names]


def create_session(
    onnx_path: str | os.PathLike,
    device: str = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    trt_cache_dir: str | os.PathLike | None = None,
    fp16: bool = False,
) -> ort.InferenceSession | OpenVinoSession:
    """A session for ``onnx_path`` on ``device`` (module docstring); thread counts of None or 0 mean the
    engine's default."""
    if uses_openvino(device, ort.get_available_providers(), openvino_installed()):
        return OpenVinoSession(onnx_path, intra_op_threads)
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        options.inter_op_num_threads = int(inter_op_threads)
    providers = choose_providers(ort.get_available_providers(), device, trt_cache_dir, fp16)
    if trt_cache_dir is not None and isinstance(providers[0], tuple):
        Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
