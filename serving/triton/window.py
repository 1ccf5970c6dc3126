"""Triton python-backend model: one network over a whole volume.

Input ``volume`` INT16 [D,H,W] (raw HU) -> the in-plane window around the body (air beyond it is background) ->
batches of whole 2.5D slices of it (padded to SIZE_DIVISOR) when they fit MAX_SLICE, else Gaussian-blended tiles
of ROI (:mod:`mixsup.serving.tiling`) -> sent to the network model -> outputs ``probabilities`` FP16 [C,D,H,W]
and ``labels`` UINT8 [D,H,W] (their argmax, or LESION_THRESHOLD's decision: :func:`mixsup.labels.decide_labels`).
Parameters: NETWORK, ROI ("h,w"), OVERLAP, BATCH_SIZE (tiles per request; whole-slice requests carry as many
pixels), SIGMA_SCALE, NUM_CLASSES, CONTEXT_SLICES, MAX_SLICE (0: always tile), SIZE_DIVISOR, NETWORK_IN_STEP,
LESION_THRESHOLD (optional).

Where the network runs: with NETWORK_IN_STEP true and the network a python-backend ONNX model beside this step
(:func:`~mixsup.serving.triton.common.network_beside`), this step opens the network's ``model.onnx`` itself, with
that model's parameters, and runs it in its own process. Over BLS every batch is copied into Triton and on to the
network's process, and its probabilities back the same way; on a 512x512x100 scan that made the served request
1.13-1.25x the in-process path, in step 0.95-1.04x (``benchmarks/serving.py``). Otherwise (a network served
by a native backend, or NETWORK_IN_STEP false) the batches go to the network model over BLS, two in flight, so
the next batch is built (and the previous one placed) while the network works.

As a member of an ensemble of several networks this step is asked for the probabilities only (the fuse step
averages them). An ensemble of one network is this step alone, asked for both outputs: it then sends the
probabilities only when the request's parameters ask for them (:func:`sends_probabilities`), since Triton asks an
ensemble step for every output it maps whatever the client requested.
"""
from __future__ import annotations

import asyncio
import json
from collections import deque
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mixsup.contract import ModelContract
from mixsup.labels import decide_labels
from mixsup.serving.tiling import Accumulator, plan_volume_inference
from mixsup.serving.triton.common import (
    NetworkRunner,
    asks_for_probabilities,
    lesion_threshold,
    model_parameters,
    network_beside,
    one_line,
    open_session,
    parse_bool,
    parse_ints,
    required_parameter,
)

VOLUME = "volume"
NETWORK_INPUT = "input"
OUTPUT = "probabilities"
LABELS = "labels"
#: Two batches in flight keep the network busy while this process tiles and blends; more only costs memory.
MAX_IN_FLIGHT = 2


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = model_parameters(json.loads(args["model_config"]))
        self.network = required_parameter(parameters, "NETWORK")
        self.roi_size = parse_ints(required_parameter(parameters, "ROI"))
        self.overlap = float(parameters.get("OVERLAP") or 0.25)
        self.batch_size = int(parameters.get("BATCH_SIZE") or 8)
        self.sigma_scale = float(parameters.get("SIGMA_SCALE") or 0.125)
        self.num_classes = int(required_parameter(parameters, "NUM_CLASSES"))
        self.context_slices = int(parameters.get("CONTEXT_SLICES") or 3)
        # Repositories written before whole-slice inference lack both: they keep tiling, as they were measured.
        self.max_slice = int(parameters.get("MAX_SLICE") or 0)
        self.size_divisor = int(parameters.get("SIZE_DIVISOR") or 1)
        self.lesion_threshold = lesion_threshold(parameters)
        self.run_network = None
        if parse_bool(parameters.get("NETWORK_IN_STEP", "")):
            found = network_beside(Path(args["model_repository"]), self.network)
            if found is None:
                pb_utils.Logger.log_info(f"{args['model_name']}: {self.network} is not a python-backend model "
                                         "beside this step; it runs over BLS")
            else:
                version_dir, network_parameters = found
                self.run_network = NetworkRunner(ModelContract.load(version_dir),
                                                 open_session(version_dir, network_parameters))
                pb_utils.Logger.log_info(f"{args['model_name']}: {self.network} runs in this step on "
                                         f"{self.run_network.session.get_providers()[0]}")
                self.run_network.warm_up()

    async def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                volume = pb_utils.get_input_tensor_by_name(request, VOLUME).as_numpy()
                probabilities = await self.predict(volume)
                requested = set(request.requested_output_names())
                outputs = []
                if LABELS in requested:
                    outputs.append(pb_utils.Tensor(LABELS, decide_labels(probabilities, self.lesion_threshold)))
                if sends_probabilities(requested, request.parameters()):
                    outputs.append(pb_utils.Tensor(OUTPUT, probabilities))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(exc))))
        return responses

    async def predict(self, volume: np.ndarray) -> np.ndarray:
        if volume.ndim == 3 and 0 in volume.shape:
            # Empty in, empty out. An error here, in one of the ensemble's parallel steps, would leave Triton
            # 2.51 counting the ensemble request as in flight forever (measured; see mixsup.serving.supervisor).
            return np.zeros((self.num_classes, *volume.shape), dtype=np.float16)
        plan = plan_volume_inference(
            volume, self.roi_size, self.overlap, self.batch_size, num_classes=self.num_classes,
            max_slice=self.max_slice, size_divisor=self.size_divisor, sigma_scale=self.sigma_scale,
            context_slices=self.context_slices)
        accumulator = plan.accumulator
        if self.run_network is not None:
            for inputs, where in plan.batches:
                accumulator.add(self.run_network(inputs), where)
            return accumulator.result()
        in_flight: deque = deque()
        try:
            for inputs, where in plan.batches:
                if len(in_flight) >= MAX_IN_FLIGHT:
                    await self._collect(accumulator, *in_flight.popleft())
                in_flight.append((self._send(inputs), where))
            while in_flight:
                await self._collect(accumulator, *in_flight.popleft())
        finally:
            # After a failure, let the remaining requests finish so none outlives this one unobserved.
            if in_flight:
                await asyncio.gather(*(future for future, _ in in_flight), return_exceptions=True)
        return accumulator.result()

    def _send(self, tiles: np.ndarray):
        request = pb_utils.InferenceRequest(
            model_name=self.network,
            requested_output_names=[OUTPUT],
            inputs=[pb_utils.Tensor(NETWORK_INPUT, tiles)],
        )
        return request.async_exec()

    async def _collect(self, accumulator: Accumulator, future, where) -> None:
        response = await future
        if response.has_error():
            raise RuntimeError(f"network {self.network!r} failed: {response.error().message()}")
        probs = pb_utils.get_output_tensor_by_name(response, OUTPUT).as_numpy()
        accumulator.add(probs, where)


def sends_probabilities(requested: set[str], parameters_json: str) -> bool:
    """Probabilities go out to a fuse step (it asks for them alone) and to a request whose parameters ask for them."""
    return OUTPUT in requested and (LABELS not in requested or asks_for_probabilities(parameters_json))
