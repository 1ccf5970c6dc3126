"""Triton python-backend model: the network (ONNX Runtime or OpenVINO) on batches of 2.5D tiles or slices
(input ``input`` -> ``probabilities``).

Loaded by Triton through the thin ``model.py`` that mixsup.repository writes next to ``model.onnx``.
Parameters: DEVICE (auto|cpu|cuda|tensorrt|openvino; see mixsup.serving.runtime), INTRA_OP_THREADS (0 = the
engine's default), TRT_CACHE_DIR (default: ``trt_cache`` beside the model), FP16 (TensorRT only).
"""
from __future__ import annotations

import triton_python_backend_utils as pb_utils

from mixsup.serving.triton.common import NetworkRunner, load_onnx_model, one_line, predict_grouped

INPUT = "input"
OUTPUT = "probabilities"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.run = NetworkRunner(*load_onnx_model(args))
        # Which engine (and precision) serves the model: "auto" decides per host, so the log says it.
        pb_utils.Logger.log_info(f"{args['model_name']}: network on {self.run.session.get_providers()[0]}")
        self.run.warm_up()

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy() for request in requests]
        responses = []
        for result in predict_grouped(self.run, batches):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(result))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, result)]))
        return responses

    def finalize(self) -> None:
        self.run = None
