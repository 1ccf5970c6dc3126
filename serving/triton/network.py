"""Triton python-backend model: the network (ONNX Runtime or OpenVINO) on batches of 2.5D tiles or slices
(input ``input`` -> ``probabilities``).

Loaded by Triton through the thin ``model.py`` that mixsup.repository writes next to ``model.onnx``.
Parameters: DEVICE (auto|cpu|cuda|tensorrt|openvino; see mixsup.serving.runtime), INTRA_OP_THREADS (0 = the
engine's default), TRT_CACHE_DIR (default: ``trt_cache`` beside the model), FP16 (TensorRT only).
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from mixsup.serving.triton.common import load_onnx_model, one_line, predict_grouped

INPUT = "input"
OUTPUT = "probabilities"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.contract, self.session = load_onnx_model(args)
        # Which engine (and precision) serves the model: "auto" decides per host, so the log says it.
        pb_utils.Logger.log_info(f"{args['model_name']}: network on {self.session.get_providers()[0]}")
        self.input_name = self.session.get_inputs()[0].name
        outputs = [output.name for output in self.session.get_outputs()]
        self.output_name = self.contract.output_name if self.contract.output_name in outputs else outputs[0]
        # Warm-up at load, before Triton reports the model ready: ONNX Runtime's first run allocates its arenas
        # and plans the graph (with TensorRT it builds the engine, minutes), which would otherwise land on the
        # first user's request.
        self.predict(np.zeros((1, self.contract.context_slices, *self.contract.patch_size), np.float32))

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        (probs,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(tiles, np.float32)})
        return np.ascontiguousarray(probs, dtype=np.float32)

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy() for request in requests]
        responses = []
        for result in predict_grouped(self.predict, batches):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(result))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, result)]))
        return responses

    def finalize(self) -> None:
        self.session = None
