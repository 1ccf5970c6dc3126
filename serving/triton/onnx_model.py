"""Triton python-backend model: ONNX Runtime on every input and output a model's contract names.

Serves the models beside the ensembles (contract kinds ``detection``, ``confidence``, ``annotator``): several
inputs (the annotator's image and box masks) or several outputs (MSDN's detections, ASDNet's confidence map),
where :mod:`mixsup.serving.triton.network` serves one input and one output. Loaded by Triton through the thin
``model.py`` that mixsup.repository writes next to ``model.onnx``. Parameters: DEVICE (auto|cpu|cuda|tensorrt|openvino),
INTRA_OP_THREADS (0 = ONNX Runtime's default), TRT_CACHE_DIR, FP16 (TensorRT only), as the network model's.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import triton_python_backend_utils as pb_utils

from mixsup.serving.triton.common import load_onnx_model, one_line

Tensors = dict[str, np.ndarray]


def run_grouped(run: Callable[[Tensors], Tensors],
                feeds: Sequence[Mapping[str, np.ndarray]]) -> list[Tensors | Exception]:
    """Run ``run`` once per group of requests whose inputs have the same dtypes and item shapes, and split every
    output back per request (the python backend hands a dynamic batch over as separate requests; one call over
    their concatenation is what makes dynamic batching pay). A failing group yields its exception for each of
    its requests."""
    results: list[Tensors | Exception] = [None] * len(feeds)  # type: ignore[list-item]
    groups: dict[tuple, list[int]] = {}
    for index, feed in enumerate(feeds):
        key = tuple((name, value.dtype.str, value.shape[1:]) for name, value in sorted(feed.items()))
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        try:
            sizes = [len(next(iter(feeds[i].values()))) for i in indices]
            for i, size in zip(indices, sizes):
                if any(len(value) != size for value in feeds[i].values()):
                    raise ValueError("the inputs of one request differ in batch size")
            joined = {name: np.concatenate([feeds[i][name] for i in indices]) for name in feeds[indices[0]]}
            outputs = run(joined)
            splits = np.cumsum(sizes)[:-1]
            parts: dict[str, list[np.ndarray]] = {}
            for name, value in outputs.items():
                if len(value) != sum(sizes):
                    raise ValueError(f"output {name!r} has {len(value)} items for a batch of {sum(sizes)}")
                parts[name] = np.split(value, splits)
            for position, index in enumerate(indices):
                results[index] = {name: split[position] for name, split in parts.items()}
        except Exception as exc:  # noqa: BLE001 - reported per request by the caller
            for index in indices:
                results[index] = exc
    return results


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.contract, self.session = load_onnx_model(args)
        pb_utils.Logger.log_info(f"{args['model_name']}: model on {self.session.get_providers()[0]}")
        self.inputs = [spec.name for spec in self.contract.inputs]
        self.outputs = [spec.name for spec in self.contract.outputs]
        graph = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if sorted(graph[0]) != sorted(self.inputs) or sorted(graph[1]) != sorted(self.outputs):
            raise ValueError(f"model.onnx has inputs {graph[0]} and outputs {graph[1]}; its contract names "
                             f"{self.inputs} and {self.outputs}")

    def run(self, feeds: Tensors) -> Tensors:
        values = self.session.run(self.outputs, {name: np.ascontiguousarray(value) for name, value in feeds.items()})
        return {name: np.ascontiguousarray(value) for name, value in zip(self.outputs, values)}

    def execute(self, requests: list) -> list:
        feeds = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                 for request in requests]
        responses = []
        for result in run_grouped(self.run, feeds):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(result))))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None
