"""What the python-backend adapters share, kept free of ``triton_python_backend_utils`` so it is testable.

Reading a model's ``parameters``, opening a model version's contract and ONNX Runtime session, turning exceptions
into the one-line message of an error response, and running the requests of one dynamic batch as a single network
call.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from mixsup.contract import PROBABILITIES_PARAMETER, ModelContract
from mixsup.errors import MixsupError

if TYPE_CHECKING:
    import onnxruntime as ort


def asks_for_probabilities(parameters_json: str) -> bool:
    """Whether a request's parameters (the JSON ``request.parameters()`` returns) ask for the probabilities."""
    return json.loads(parameters_json or "{}").get(PROBABILITIES_PARAMETER) is True


def model_parameters(model_config: Mapping) -> dict[str, str]:
    """The ``parameters`` of a Triton model config (as the JSON the python backend hands over) as strings."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def load_onnx_model(args: Mapping) -> tuple[ModelContract, ort.InferenceSession]:
    """The contract and inference session (ONNX Runtime or OpenVINO) of the ``model.onnx`` version Triton's
    ``initialize`` ``args`` name.

    Parameters: DEVICE (auto|cpu|cuda|tensorrt|openvino; see mixsup.serving.runtime), INTRA_OP_THREADS (0 = the
    engine's default), TRT_CACHE_DIR (default: ``trt_cache`` beside the model), FP16 (TensorRT only).
    """
    # Imported here: the adapters that run no ONNX model (fuse, window) do not load onnxruntime.
    from mixsup.serving.runtime import create_session

    parameters = model_parameters(json.loads(args["model_config"]))
    version_dir = Path(args["model_repository"]) / args["model_version"]
    contract = ModelContract.load(version_dir)
    session = create_session(
        version_dir / "model.onnx",
        device=parameters.get("DEVICE") or "auto",
        intra_op_threads=int(parameters.get("INTRA_OP_THREADS") or 0),
        trt_cache_dir=parameters.get("TRT_CACHE_DIR") or version_dir / "trt_cache",
        fp16=parse_bool(parameters.get("FP16", "")),
    )
    return contract, session


def required_parameter(parameters: Mapping[str, str], key: str) -> str:
    value = parameters.get(key, "")
    if not value:
        raise ValueError(f"model config is missing parameter {key!r}")
    return value


def parse_ints(text: str) -> tuple[int, ...]:
    """``"160,160"`` -> ``(160, 160)``."""
    return tuple(int(part) for part in text.replace(" ", "").split(",") if part)


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.replace(" ", "").split(",") if part)


def parse_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def one_line(exc: BaseException) -> str:
    """The message of an error response: the user's mistake as is, anything else prefixed with its type."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, MixsupError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def predict_grouped(
    predict: Callable[[np.ndarray], np.ndarray], batches: Sequence[np.ndarray]
) -> list[np.ndarray | Exception]:
    """Run ``predict`` once per group of batches with the same item shape and split the result back.

    The python backend hands dynamically batched requests over one by one; concatenating them is what makes
    dynamic batching pay. A failing group yields its exception in place of each of its outputs.
    """
    results: list[np.ndarray | Exception] = [None] * len(batches)  # type: ignore[list-item]
    groups: dict[tuple, list[int]] = {}
    for index, batch in enumerate(batches):
        groups.setdefault((batch.dtype.str, batch.shape[1:]), []).append(index)
    for indices in groups.values():
        try:
            joined = batches[indices[0]] if len(indices) == 1 else np.concatenate([batches[i] for i in indices])
            output = predict(joined)
            if len(output) != len(joined):
                raise ValueError(f"network returned {len(output)} items for a batch of {len(joined)}")
            splits = np.cumsum([len(batches[i]) for i in indices])[:-1]
            for index, part in zip(indices, np.split(output, splits)):
                results[index] = part
        except Exception as exc:  # noqa: BLE001 - reported per request by the caller
            for index in indices:
                results[index] = exc
    return results
