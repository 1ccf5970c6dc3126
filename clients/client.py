"""A gRPC client for the ``segment`` ensemble on Triton Inference Server (the official ``tritonclient.grpc``).

Errors from the server or the network become mixsup errors, so every command exits with the contract's code:

=================================================  ===================================  =====
what happened                                      raised                               exit
=================================================  ===================================  =====
no connection (refused, DNS, server gone) or the   :class:`ServerUnavailable`           3
model is unknown / not ready / has no version
a metadata call (health, contract) timed out       :class:`ServerUnavailable`           3
the server rejected the volume (INVALID_ARGUMENT)  :class:`InputError`                  2
the named model carries no mixsup contract         :class:`InputError` (wrong --model)  2
inference timed out, the server failed inside,     :class:`MixsupError`                 1
or it answered with the wrong shapes
=================================================  ===================================  =====

An inference timeout is *not* "unavailable": the server answered health checks and may simply need longer for a
big volume, so a batch run reports that case and goes on with the next.
"""
from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mixsup.clients.pipeline import (
    prepare_volume,
    restore_labels,
    restore_probabilities,
)
from mixsup.contract import ModelContract
from mixsup.errors import InputError, MixsupError, ServerUnavailable
from mixsup.postprocess import postprocess_labels
from mixsup.scan import Scan, to_int16_hu

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MODEL = "segment"
DEFAULT_GRPC_PORT = 8001
#: Seconds a health or metadata call may take; an unreachable host must not hang a command.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: Seconds one whole-volume inference may take (a 600-slice CT on a CPU server takes minutes).
DEFAULT_TIMEOUT_S = 900.0

INPUT_NAME = "volume"
LABELS_OUTPUT = "labels"
PROBABILITIES_OUTPUT = "probabilities"
CONTRACT_PARAMETER = "contract"

ORGAN_LABEL = 1
LESION_LABEL = 2


def normalize_url(url: str) -> str:
    """``HOST:PORT`` of Triton's gRPC endpoint; ``grpc://`` is dropped and a bare host gets port 8001."""
    text = url.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() != "grpc":
            raise InputError(f"--url {url!r}: the client speaks gRPC; give HOST:PORT of Triton's gRPC port (8001)")
    text = text.rstrip("/")
    host, colon, port = text.rpartition(":")
    if not colon or host.endswith(":") or (text.startswith("[") and text.endswith("]")):
        host, port = text, str(DEFAULT_GRPC_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--url {url!r}: expected HOST:PORT, e.g. {DEFAULT_URL}")
    return f"{host}:{int(port)}"


def _first_line(text: str | None) -> str:
    return (str(text or "").strip().splitlines() or [""])[0]


def is_connection_failure(exc: InferenceServerException) -> bool:
    """Whether ``exc`` says no connection could be made (refused, unresolvable, dropped), not a server answer."""
    message = _first_line(exc.message() or str(exc)).lower()
    return "UNAVAILABLE" in str(exc.status() or "") and any(
        hint in message for hint in ("connect", "resolv", "socket closed", "connection reset")
    )


class SegmentationClient:
    """Segments scans with the ``model`` ensemble served at ``url`` (``HOST:PORT``, gRPC).

    The client keeps tritonclient's default channel options on purpose: passing ``channel_args`` would replace
    its 2 GiB message limit with gRPC's 4 MB default and break whole-volume requests (TRITON.md). Calls are
    thread-safe, so one client can serve a pool of worker threads.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ):
        self.url = normalize_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client = grpcclient.InferenceServerClient(url=self.url)
        self._contract: ModelContract | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- errors -------------------------------------------------------------------------------------------------

    def _translate(self, exc: InferenceServerException, action: str, during_inference: bool = False) -> MixsupError:
        """The mixsup error (see the module's table) for a tritonclient error raised while doing ``action``."""
        status = str(exc.status() or "")
        message = _first_line(exc.message() or str(exc))
        where = f"Triton at {self.url}"
        if is_connection_failure(exc):
            return ServerUnavailable(f"cannot reach {where} while {action} ({message})")
        if "UNAVAILABLE" in status:
            return ServerUnavailable(f"{where} is not ready while {action} ({message})")
        if "NOT_FOUND" in status or "unknown model" in message.lower():
            return ServerUnavailable(f"{where} does not serve a ready model {self.model!r} ({message})")
        if "DEADLINE_EXCEEDED" in status:
            if during_inference:
                return MixsupError(f"{where} did not finish {action} within {self.timeout_s:g} s (raise --timeout)")
            return ServerUnavailable(f"{where} did not answer within {self.connect_timeout_s:g} s while {action}")
        if "INVALID_ARGUMENT" in status:
            return InputError(f"{where} rejected the input while {action} ({message})")
        return MixsupError(f"{where} failed while {action}: {status.replace('StatusCode.', '')} {message}".rstrip())

    # -- readiness and contract ---------------------------------------------------------------------------------

    def health(self) -> dict:
        """Server liveness/readiness and the model's readiness and versions.

        Raises :class:`ServerUnavailable` when the server cannot be reached at all; a reachable server whose model
        is missing or loading is reported in the dict (``model_ready`` False), not raised.
        """
        timeout = self.connect_timeout_s
        try:
            report = {
                "url": self.url,
                "server_live": bool(self._client.is_server_live(client_timeout=timeout)),
                "server_ready": bool(self._client.is_server_ready(client_timeout=timeout)),
                "model": self.model,
                "model_ready": False,
                "versions": [],
            }
        except InferenceServerException as exc:
            raise self._translate(exc, "checking its health") from None
        try:
            report["model_ready"] = bool(self._client.is_model_ready(self.model, client_timeout=timeout))
            if report["model_ready"]:
                metadata = self._client.get_model_metadata(self.model, as_json=True, client_timeout=timeout)
                report["versions"] = [str(v) for v in metadata.get("versions", [])]
        except InferenceServerException as exc:
            error = self._translate(exc, f"checking model {self.model!r}")
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
            if not report["server_ready"]:
                raise ServerUnavailable(f"Triton at {self.url} is live={report['server_live']} but not ready")
            raise ServerUnavailable(f"Triton at {self.url} has no ready model {self.model!r}")
        return report

    def contract(self) -> ModelContract:
        """The model's :class:`ModelContract`, read once from its config's ``contract`` parameter."""
        if self._contract is None:
            try:
                response = self._client.get_model_config(
                    self.model, as_json=True, client_timeout=self.connect_timeout_s
                )
            except InferenceServerException as exc:
                raise self._translate(exc, f"reading the config of model {self.model!r}") from None
            parameters = response.get("config", {}).get("parameters", {})
            text = parameters.get(CONTRACT_PARAMETER, {}).get("string_value")
            if not text:
                raise InputError(
                    f"model {self.model!r} at {self.url} carries no mixsup contract; is it the 'segment' ensemble?"
                )
            self._contract = ModelContract.from_json(text)
        return self._contract

    # -- inference ----------------------------------------------------------------------------------------------

    def segment_volume(
        self, volume: np.ndarray, want_probabilities: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Labels (uint8 ``[D, H, W]``) for a canonical int16 HU ``volume`` already at the contract's spacing.

        With ``want_probabilities`` also returns the fused probabilities (float16 ``[C, D, H, W]``). Nothing is
        post-processed here.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3 or min(volume.shape) < 1:
            raise InputError(f"expected a non-empty [D, H, W] volume, got shape {volume.shape}")
        volume = to_int16_hu(volume)
        request = grpcclient.InferInput(INPUT_NAME, list(volume.shape), "INT16")
        request.set_data_from_numpy(volume)
        names = [LABELS_OUTPUT] + ([PROBABILITIES_OUTPUT] if want_probabilities else [])
        try:
            result = self._client.infer(
                self.model,
                inputs=[request],
                outputs=[grpcclient.InferRequestedOutput(name) for name in names],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise self._translate(exc, f"segmenting a {'x'.join(map(str, volume.shape))} volume", True) from None
        labels = self._output(result, LABELS_OUTPUT, volume.shape)
        if not want_probabilities:
            return labels.astype(np.uint8, copy=False)
        probabilities = self._output(result, PROBABILITIES_OUTPUT, volume.shape)
        return labels.astype(np.uint8, copy=False), probabilities

    def _output(self, result, name: str, volume_shape: tuple[int, ...]) -> np.ndarray:
        array = result.as_numpy(name)
        if array is None or tuple(array.shape[-3:]) != tuple(volume_shape):
            shape = None if array is None else array.shape
            raise MixsupError(f"Triton at {self.url} returned {name} of shape {shape} for a volume of {volume_shape}")
        return array

    def segment_scan(self, scan: Scan, postprocess: bool = True) -> np.ndarray:
        """uint8 labels on ``scan``'s stored grid (same shape as ``scan.voxels``): 0 bg, 1 liver, 2 lesion."""
        return self._segment_scan(scan, postprocess, want_probabilities=False)[0]

    def segment_scan_with_probabilities(self, scan: Scan, postprocess: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`segment_scan` plus the raw (not post-processed) probabilities, float32 ``[C, i, j, k]``."""
        return self._segment_scan(scan, postprocess, want_probabilities=True)

    def _segment_scan(self, scan: Scan, postprocess: bool, want_probabilities: bool):
        contract = self.contract()
        volume, restore = prepare_volume(scan, contract)
        answer = self.segment_volume(volume, want_probabilities=want_probabilities)
        labels_model_grid, probabilities = answer if want_probabilities else (answer, None)
        labels = restore_labels(labels_model_grid, restore, contract.num_classes)
        if postprocess:
            labels = postprocess_labels(labels, organ_label=ORGAN_LABEL, lesion_label=LESION_LABEL)
        if probabilities is not None:
            probabilities = restore_probabilities(probabilities, restore)
        return labels, probabilities
