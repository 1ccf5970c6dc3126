"""Triton python-backend model: weighted average of the ensemble members' probabilities -> labels.

Inputs ``probabilities_0`` .. ``probabilities_{n-1}`` FP16 [C,D,H,W]; outputs ``labels`` UINT8 [D,H,W] and
``probabilities`` FP16 [C,D,H,W]. Parameter WEIGHTS: one positive number per member, comma-separated.

The probabilities go out only when the request carries the parameter ``probabilities: true`` (TRITON.md): as an
ensemble step this model is asked for every output whatever the client requested, and copying out 2 bytes per
voxel and class that the ensemble then drops is wasted time.
"""
from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from mixsup.serving.fuse import fuse_probabilities, normalized_weights
from mixsup.serving.triton.common import (
    asks_for_probabilities,
    lesion_threshold,
    model_parameters,
    one_line,
    parse_floats,
    required_parameter,
)

LABELS = "labels"
PROBABILITIES = "probabilities"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = model_parameters(json.loads(args["model_config"]))
        self.weights = parse_floats(required_parameter(parameters, "WEIGHTS"))
        normalized_weights(self.weights, len(self.weights))  # fail at load time, not on the first request
        self.inputs = [f"probabilities_{index}" for index in range(len(self.weights))]
        self.lesion_threshold = lesion_threshold(parameters)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                member_probs = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs]
                labels, probabilities = fuse_probabilities(member_probs, self.weights, self.lesion_threshold)
                outputs = [pb_utils.Tensor(LABELS, labels)]
                if asks_for_probabilities(request.parameters()):
                    outputs.append(pb_utils.Tensor(PROBABILITIES, probabilities))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(exc))))
        return responses
