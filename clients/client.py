"""A gRPC client for the ``segment`` ensemble on Triton Inference Server (the official ``tritonclient.grpc``).

For services::

    from mixsup.clients.client import SegmentationClient

    with SegmentationClient("triton:8001") as client:
        result = client.segment("scan.nii.gz")       # or a mixsup.scan.Scan, or a DICOM series folder
        result.labels, result.affine, result.stats.liver_ml, result.stats.lesions

The asyncio twin is :class:`mixsup.clients.aio.AsyncSegmentationClient`. How tritonclient's errors map to mixsup
errors (and exit codes) is the table in :mod:`mixsup.clients.protocol`.
"""
from __future__ import annotations

import threading

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mixsup.clients.pipeline import answer_at_spacings, prepare_volume, run_spacings
from mixsup.clients.protocol import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    INPUT_NAME,
    LABELS_OUTPUT,
    LESION_LABEL,
    ORGAN_LABEL,
    PROBABILITIES_OUTPUT,
    Endpoint,
    channel_args,
    describe_shape,
    health_report,
    inference_request,
    is_connection_failure,
    normalize_url,
    request_parameters,
    request_volume,
)
from mixsup.clients.result import Result, ScanSource, as_scan, segment_to_result
from mixsup.clients.shm import SharedMemoryException, SharedMemoryRegions, wants_shared_memory
from mixsup.clients.slabs import DEFAULT_SLAB_SLICES, SlabAnswers, slab_plan
from mixsup.contract import ModelContract
from mixsup.errors import MixsupError, ServerUnavailable
from mixsup.scan import Scan

__all__ = ["SegmentationClient", "Result", "normalize_url"]


class SegmentationClient:
    """Segments scans with the ``model`` ensemble served at ``url`` (``HOST:PORT``, gRPC).

    ``timeout_s`` bounds one inference (None: no bound), ``connect_timeout_s`` every health or metadata call.
    A volume longer than ``slab_slices`` goes in slabs (:mod:`mixsup.clients.slabs`): the same labels, bounded
    server memory. ``shared_memory`` (auto|on|off, :mod:`mixsup.clients.shm`) passes the tensors through
    ``/dev/shm`` when the server is on this host. A model whose contract names test spacings is run at each and the
    mean taken on the scan's grid (multi-scale test-time augmentation); ``single_scale`` runs it at its training
    spacing alone: faster (one run instead of several), a little less accurate (the model card says how much).
    Calls are thread-safe, so one client can serve a pool of worker threads; the channel reconnects by itself
    within seconds when the server comes back after a restart.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        slab_slices: int = DEFAULT_SLAB_SLICES,
        shared_memory: str = "auto",
        single_scale: bool = False,
    ):
        self.url = normalize_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.slab_slices = slab_slices
        self.shared_memory = shared_memory
        self.single_scale = single_scale
        self._use_shared_memory = wants_shared_memory(shared_memory, self.url)
        self._endpoint = Endpoint(self.url, model, timeout_s, connect_timeout_s)
        self._client = grpcclient.InferenceServerClient(url=self.url, channel_args=channel_args())
        self._contract: ModelContract | None = None
        # Registered shared-memory regions between requests, one pair per request in flight at most.
        self._idle_regions: list[SharedMemoryRegions] = []
        self._regions_lock = threading.Lock()

    def close(self) -> None:
        """Remove this client's shared-memory regions and close the gRPC channel."""
        with self._regions_lock:
            idle, self._idle_regions = self._idle_regions, []
        for regions in idle:
            regions.close()
        self._client.close()

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- readiness and contract ---------------------------------------------------------------------------------

    def health(self) -> dict:
        """Server liveness/readiness and the model's readiness and versions (keys: url, server_live, server_ready,
        model, model_ready, versions, ready; ``error`` when the model check failed).

        Raises :class:`ServerUnavailable` when the server cannot be reached at all; a reachable server whose model
        is missing or loading is reported in the dict (``model_ready`` False), not raised.
        """
        timeout = self.connect_timeout_s
        report = health_report(self.url, self.model)
        try:
            report["server_live"] = bool(self._client.is_server_live(client_timeout=timeout))
            report["server_ready"] = bool(self._client.is_server_ready(client_timeout=timeout))
        except InferenceServerException as exc:
            raise self._endpoint.translate(exc, "checking its health") from None
        try:
            report["model_ready"] = bool(self._client.is_model_ready(self.model, client_timeout=timeout))
            if report["model_ready"]:
                metadata = self._client.get_model_metadata(self.model, as_json=True, client_timeout=timeout)
                report["versions"] = [str(v) for v in metadata.get("versions", [])]
        except InferenceServerException as exc:
            error = self._endpoint.translate(exc, f"checking model {self.model!r}")
            if is_connection_failure(exc) or not isinstance(error, ServerUnavailable):
                raise error from None
            report["model_ready"] = False
            report["error"] = str(error)
        report["ready"] = report["server_live"] and report["server_ready"] and report["model_ready"]
        return report

    def ensure_ready(self) -> dict:
        """:meth:`health`, raising :class:`ServerUnavailable` unless the server and the model are ready."""
        report = self.health()
        if not report["ready"]:
            raise self._endpoint.not_ready(report)
        return report

    def contract(self) -> ModelContract:
        """The model's :class:`ModelContract`, read once from its config's ``contract`` parameter."""
        if self._contract is None:
            try:
                response = self._client.get_model_config(
                    self.model, as_json=True, client_timeout=self.connect_timeout_s
                )
            except InferenceServerException as exc:
                raise self._endpoint.translate(exc, f"reading the config of model {self.model!r}") from None
            self._contract = self._endpoint.contract_from_config(response)
        return self._contract

    # -- inference ----------------------------------------------------------------------------------------------

    def segment(self, scan: ScanSource, postprocess: bool = True, probabilities: bool = False) -> Result:
        """Segment ``scan`` (a :class:`~mixsup.scan.Scan` or the path of a NIfTI file or DICOM series).

        Returns a :class:`Result`: labels on the scan's exact grid (post-processed unless ``postprocess`` is
        False), its affine, the stats (volumes, lesions, tumour burden) and, with ``probabilities``, the raw class
        probabilities. Raises :class:`~mixsup.errors.InputError` for a bad scan, :class:`ServerUnavailable` when
        the server cannot be reached or has no ready model, :class:`~mixsup.errors.MixsupError` otherwise.
        """
        return segment_to_result(self, as_scan(scan), postprocess, probabilities)

    def segment_volume(
        self, volume: np.ndarray, want_probabilities: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Labels (uint8 ``[D, H, W]``) for a canonical int16 HU ``volume`` already at the contract's spacing.

        With ``want_probabilities`` also returns the fused probabilities (float16 ``[C, D, H, W]``). Nothing is
        post-processed here.
        """
        depth = np.shape(volume)[0] if np.ndim(volume) == 3 else 0
        if depth <= self.slab_slices:
            labels, probabilities = self._infer(volume, want_probabilities)
        else:
            answers = SlabAnswers(depth)
            for slab in slab_plan(depth, self.slab_slices, self.contract().context_slices // 2):
                answers.add(slab, *self._infer(volume[slab.send], want_probabilities))
            labels, probabilities = answers.labels, answers.probabilities
        return (labels, probabilities) if want_probabilities else labels

    def _infer(self, volume: np.ndarray, want_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        volume = request_volume(volume)
        regions = self._shared_memory_regions(volume, want_probabilities) if self._use_shared_memory else None
        if regions is not None:
            try:
                answer = self._infer_through(regions, volume, want_probabilities)
            except BaseException:
                # A server restarted since has forgotten them: the next request registers new ones.
                regions.close()
                raise
            with self._regions_lock:
                self._idle_regions.append(regions)
            return answer
        volume, inputs, outputs = inference_request(volume, want_probabilities)
        answer = self._run(inputs, outputs, volume.shape, want_probabilities)
        return self._endpoint.read_outputs(answer, volume.shape, want_probabilities)

    def _run(self, inputs: list, outputs: list, shape: tuple[int, ...], want_probabilities: bool):
        try:
            return self._client.infer(self.model, inputs=inputs, outputs=outputs, client_timeout=self.timeout_s,
                                      parameters=request_parameters(want_probabilities))
        except InferenceServerException as exc:
            action = f"segmenting a {describe_shape(shape)} volume"
            raise self._endpoint.translate(exc, action, during_inference=True) from None

    def _output_sizes(self, shape: tuple[int, ...], want_probabilities: bool) -> tuple[int, int]:
        """Bytes of the labels (uint8) and of the probabilities (float16, 0 if not wanted) of a volume."""
        voxels = int(np.prod(shape))
        return voxels, (2 * self.contract().num_classes * voxels if want_probabilities else 0)

    def _shared_memory_regions(self, volume: np.ndarray, want_probabilities: bool) -> SharedMemoryRegions | None:
        """Registered regions for this request -- idle ones of this client that are large enough, else new ones
        (an idle pair too small is removed, so the client holds no more pairs than requests it ran at once) --
        or None (and plain gRPC from now on) when ``auto`` meets a server that refuses them."""
        sizes = {"input": volume.nbytes, "output": sum(self._output_sizes(volume.shape, want_probabilities))}
        with self._regions_lock:
            for index, regions in enumerate(self._idle_regions):
                if regions.fits(sizes):
                    return self._idle_regions.pop(index)
            too_small = self._idle_regions.pop() if self._idle_regions else None
        if too_small is not None:
            too_small.close()
        try:
            return SharedMemoryRegions(self._client, sizes)
        except (InferenceServerException, SharedMemoryException) as exc:
            if self.shared_memory == "on":
                detail = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
                raise MixsupError(f"Triton at {self.url} cannot use shared memory with this client ({detail}); "
                                  "use --shm off, or run the client on the server's host") from None
            self._use_shared_memory = False
            return None

    def _infer_through(self, regions: SharedMemoryRegions, volume: np.ndarray,
                       want_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        labels_bytes, probability_bytes = self._output_sizes(volume.shape, want_probabilities)
        regions.write("input", volume)
        request = grpcclient.InferInput(INPUT_NAME, list(volume.shape), "INT16")
        request.set_shared_memory(regions.names["input"], volume.nbytes)
        outputs = [grpcclient.InferRequestedOutput(LABELS_OUTPUT)]
        outputs[0].set_shared_memory(regions.names["output"], labels_bytes)
        if want_probabilities:
            outputs.append(grpcclient.InferRequestedOutput(PROBABILITIES_OUTPUT))
            outputs[1].set_shared_memory(regions.names["output"], probability_bytes, offset=labels_bytes)
        answer = self._run([request], outputs, volume.shape, want_probabilities)
        for output in outputs:
            returned = answer.get_output(output.name())
            self._endpoint.check_output_shape(output.name(), None if returned is None else list(returned.shape),
                                              volume.shape)
        labels = regions.read("output", np.uint8, volume.shape)
        probabilities = None
        if want_probabilities:
            classes = self.contract().num_classes
            probabilities = regions.read("output", np.float16, (classes, *volume.shape), offset=labels_bytes)
        return labels, probabilities

    def segment_scan(self, scan: Scan, postprocess: bool = True) -> np.ndarray:
        """uint8 labels on ``scan``'s stored grid (same shape as ``scan.voxels``): 0 bg, 1 liver, 2 lesion."""
        return self._segment_scan(scan, postprocess, want_probabilities=False)[0]

    def segment_scan_with_probabilities(self, scan: Scan, postprocess: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`segment_scan` plus the raw (not post-processed) probabilities, float32 ``[C, i, j, k]``."""
        return self._segment_scan(scan, postprocess, want_probabilities=True)

    def _segment_scan(
        self, scan: Scan, postprocess: bool, want_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        contract = self.contract()
        spacings = run_spacings(contract, self.single_scale)
        asks = want_probabilities or len(spacings) > 1  # several spacings are averaged from their probabilities
        answers = []
        for spacing in spacings:
            volume, restore = prepare_volume(scan, contract, spacing)
            answer = self.segment_volume(volume, want_probabilities=asks)
            answers.append((*(answer if asks else (answer, None)), restore))
        return answer_at_spacings(answers, contract.num_classes, want_probabilities, postprocess, ORGAN_LABEL,
                                  LESION_LABEL, contract.lesion_threshold)
