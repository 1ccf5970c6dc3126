"""What the python-backend adapters share, kept free of ``triton_python_backend_utils`` so it is testable.

Reading a model's ``parameters``, opening a model version's contract and ONNX Runtime session (also a network's from
its window step), turning exceptions into the one-line message of an error response, and running the requests of
one dynamic batch as a single network call.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from mixsup.contract import LESION_THRESHOLD_PARAMETER, PROBABILITIES_PARAMETER, ModelContract
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
    ``initialize`` ``args`` name, set up by the model's parameters (:func:`open_session`)."""
    version_dir = Path(args["model_repository"]) / args["model_version"]
    parameters = model_parameters(json.loads(args["model_config"]))
    return ModelContract.load(version_dir), open_session(version_dir, parameters)


def open_session(version_dir: Path, parameters: Mapping[str, str]) -> ort.InferenceSession:
    """The inference session of ``version_dir/model.onnx``.

    Parameters: DEVICE (auto|cpu|cuda|tensorrt|openvino; see mixsup.serving.runtime), INTRA_OP_THREADS (0 = the
    engine's default), TRT_CACHE_DIR (default: ``trt_cache`` beside the model), FP16 (TensorRT only).
    """
    # Imported here: the adapters that run no ONNX model (fuse) do not load onnxruntime.
    from mixsup.serving.runtime import create_session

    return create_session(
        version_dir / "model.onnx",
        device=parameters.get("DEVICE") or "auto",
        intra_op_threads=int(parameters.get("INTRA_OP_THREADS") or 0),
        trt_cache_dir=parameters.get("TRT_CACHE_DIR") or version_dir / "trt_cache",
        fp16=parse_bool(parameters.get("FP16", "")),
    )


def network_beside(window_dir: Path, network: str) -> tuple[Path, dict[str, str]] | None:
    """Where the network model ``network`` of the window step in ``window_dir`` keeps its ``model.onnx`` (the
    version Triton serves: the highest) and the parameters to open it with, when this process can run it as that
    model does: a python-backend model in the same repository folder. None for a network that another backend
    serves (native ONNX Runtime, TensorRT, LibTorch) or that is not beside the window step (Triton copies models
    of a cloud repository to separate local folders).

    The parameters are the network model's, but for a TensorRT engine cache of its own (``window/`` inside the
    network's): both processes build their engine while Triton loads them, and would write the same files.
    """
    from mixsup.repository import read_config  # imports Triton's config schema: only where it is read

    network_dir = Path(window_dir).parent / network
    if not (network_dir / "config.pbtxt").is_file():
        return None
    config = read_config(network_dir / "config.pbtxt")
    versions = [int(path.name) for path in network_dir.iterdir()
                if path.name.isdigit() and (path / "model.onnx").is_file()]
    if config.backend != "python" or not versions:
        return None
    version_dir = network_dir / str(max(versions))
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    parameters["TRT_CACHE_DIR"] = str(Path(parameters.get("TRT_CACHE_DIR") or version_dir / "trt_cache") / "window")
    return version_dir, parameters


class NetworkRunner:
    """A 2.5D network's session as one call: float32 raw-HU batches [N, context_slices, h, w] -> float32
    probabilities [N, C, h, w] (the output the contract names, else the graph's first)."""

    def __init__(self, contract: ModelContract, session: ort.InferenceSession) -> None:
        self.contract = contract
        self.session = session
        self.input_name = session.get_inputs()[0].name
        outputs = [output.name for output in session.get_outputs()]
        self.output_name = contract.output_name if contract.output_name in outputs else outputs[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (probs,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return np.ascontiguousarray(probs, dtype=np.float32)

    def warm_up(self) -> None:
        """One run on a patch of zeros. Called at load, before Triton reports the model ready: ONNX Runtime's first
        run allocates its arenas and plans the graph (with TensorRT it builds the engine, minutes), which would
        otherwise land on the first user's request."""
        self(np.zeros((1, self.contract.context_slices, *self.contract.patch_size), np.float32))


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


def lesion_threshold(parameters: dict[str, str]) -> float | None:
    """A step's lesion threshold (:func:`mixsup.labels.decide_labels`); None where its config has none."""
    text = parameters.get(LESION_THRESHOLD_PARAMETER, "").strip()
    return float(text) if text else None


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
