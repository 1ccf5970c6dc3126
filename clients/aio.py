"""The asyncio twin of :class:`~mixsup.clients.client.SegmentationClient`, on ``tritonclient.grpc.aio``.

For services that run an event loop (a PACS listener, a web API)::

    from mixsup.clients.aio import AsyncSegmentationClient

    async with AsyncSegmentationClient("triton:8001") as client:
        result = await client.segment("scan.nii.gz")

The network calls are awaited; the CPU work around them (reading the scan, resampling, post-processing, stats)
runs in a worker thread (``asyncio.to_thread``) so that one big scan does not stall the loop's other requests.
Errors and results are those of the sync client. The gRPC channel is made on first use, inside the running loop
(a grpc.aio channel made outside a loop fails when awaited in ``asyncio.run``), and belongs to that loop.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from mixsup.clients.pipeline import answer_at_spacings, prepare_volume, run_spacings
from mixsup.clients.protocol import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    LESION_LABEL,
    ORGAN_LABEL,
    Endpoint,
    channel_args,
    describe_shape,
    health_report,
    inference_request,
    is_connection_failure,
    normalize_url,
    request_parameters,
)
from mixsup.clients.result import Result, ScanSource, as_scan
from mixsup.clients.slabs import DEFAULT_SLAB_SLICES, SlabAnswers, slab_plan
from mixsup.contract import ModelContract
from mixsup.errors import ServerUnavailable
from mixsup.scan import Scan

__all__ = ["AsyncSegmentationClient", "Result"]


class AsyncSegmentationClient:
    """Segments scans with the ``model`` ensemble served at ``url`` (``HOST:PORT``, gRPC), from asyncio.

    Same arguments, methods and errors as :class:`~mixsup.clients.client.SegmentationClient`, as coroutines.
    Many :meth:`segment` calls may be awaited concurrently on one client.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        slab_slices: int = DEFAULT_SLAB_SLICES,
        single_scale: bool = False,
    ):
        self.url = normalize_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.slab_slices = slab_slices
        self.single_scale = single_scale
        self._endpoint = Endpoint(self.url, model, timeout_s, connect_timeout_s)
        self._grpc: grpcaio.InferenceServerClient | None = None
        self._contract: ModelContract | None = None

    @property
    def _client(self) -> grpcaio.InferenceServerClient:
        """tritonclient's aio client, made on first use so that its channel belongs to the running loop."""
        if self._grpc is None:
            self._grpc = grpcaio.InferenceServerClient(url=self.url, channel_args=channel_args())
        return self._grpc

    async def close(self) -> None:
        """Close the gRPC channel (if one was opened)."""
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def __aenter__(self) -> "AsyncSegmentationClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- readiness and contract ---------------------------------------------------------------------------------

    async def health(self) -> dict:
        """See :meth:`mixsup.clients.client.SegmentationClient.health`."""
        timeout = self.connect_timeout_s
        report = health_report(self.url, self.model)
        try:
            report["server_live"] = bool(await self._client.is_server_live(client_timeout=timeout))
            report["server_ready"] = bool(await self._client.is_server_ready(client_timeout=timeout))
        except InferenceServerException as exc:
            raise self._endpoint.translate(exc, "checking its health") from None
        try:
            report["model_ready"] = bool(await self._client.is_model_ready(self.model, client_timeout=timeout))
            if report["model_ready"]:
                metadata = await self._client.get_model_metadata(self.model, as_json=True, client_timeout=timeout)
                report["versions"] = [str(v) for v in metadata.get("versions", [])]
        except InferenceServerException as exc:
            error = self._endpoint.translate(exc, f"checking model {self.model!r}")
            if is_connection_failure(exc) or not isinstance(error, ServerUnavailable):
                raise error from None
            report["model_ready"] = False
            report["error"] = str(error)
        report["ready"] = report["server_live"] and report["server_ready"] and report["model_ready"]
        return report

    async def ensure_ready(self) -> dict:
        """:meth:`health`, raising :class:`ServerUnavailable` unless the server and the model are ready."""
        report = await self.health()
        if not report["ready"]:
            raise self._endpoint.not_ready(report)
        return report

    async def contract(self) -> ModelContract:
        """The model's :class:`ModelContract`, read once from its config's ``contract`` parameter."""
        if self._contract is None:
            try:
                response = await self._client.get_model_config(
                    self.model, as_json=True, client_timeout=self.connect_timeout_s
                )
            except InferenceServerException as exc:
                raise self._endpoint.translate(exc, f"reading the config of model {self.model!r}") from None
            self._contract = self._endpoint.contract_from_config(response)
        return self._contract

    # -- inference ----------------------------------------------------------------------------------------------

    async def segment(self, scan: ScanSource, postprocess: bool = True, probabilities: bool = False) -> Result:
        """See :meth:`mixsup.clients.client.SegmentationClient.segment`."""
        started = time.perf_counter()
        if not isinstance(scan, Scan):
            scan = await asyncio.to_thread(as_scan, scan)
        contract = await self.contract()
        spacings = run_spacings(contract, self.single_scale)
        asks = probabilities or len(spacings) > 1  # several spacings are averaged from their probabilities
        answers = []
        for spacing in spacings:  # as in SegmentationClient._segment_scan
            volume, restore = await asyncio.to_thread(prepare_volume, scan, contract, spacing)
            # Through segment_volume, as the sync client does, so a long scan goes in slabs here too.
            answer = await self.segment_volume(volume, want_probabilities=asks)
            answers.append((*(answer if asks else (answer, None)), restore))

        def finish() -> Result:
            on_grid = answer_at_spacings(answers, contract.num_classes, probabilities, postprocess, ORGAN_LABEL,
                                         LESION_LABEL, contract.lesion_threshold)
            return Result.build(scan, *on_grid, model=self.model, postprocessed=postprocess, started=started)

        return await asyncio.to_thread(finish)

    async def segment_volume(
        self, volume: np.ndarray, want_probabilities: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """See :meth:`mixsup.clients.client.SegmentationClient.segment_volume`."""
        depth = np.shape(volume)[0] if np.ndim(volume) == 3 else 0
        if depth <= self.slab_slices:
            labels, probabilities = await self._infer(volume, want_probabilities)
        else:
            answers = SlabAnswers(depth)
            for slab in slab_plan(depth, self.slab_slices, (await self.contract()).context_slices // 2):
                answers.add(slab, *await self._infer(volume[slab.send], want_probabilities))
            labels, probabilities = answers.labels, answers.probabilities
        return (labels, probabilities) if want_probabilities else labels

    async def _infer(self, volume: np.ndarray, want_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        volume, inputs, outputs = inference_request(volume, want_probabilities)
        try:
            answer = await self._client.infer(
                self.model, inputs=inputs, outputs=outputs, client_timeout=self.timeout_s,
                parameters=request_parameters(want_probabilities),
            )
        except InferenceServerException as exc:
            action = f"segmenting a {describe_shape(volume.shape)} volume"
            raise self._endpoint.translate(exc, action, during_inference=True) from None
        return self._endpoint.read_outputs(answer, volume.shape, want_probabilities)
