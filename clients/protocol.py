"""What the sync and the asyncio clients share about talking to Triton: the endpoint, the channel, the request,
the answer, the contract, and how tritonclient's errors become mixsup errors. No network calls here.

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
big volume, so a batch run reports that case and goes on with the next. Only :class:`ServerUnavailable` is worth
retrying (a batch run does, for a bounded time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mixsup.contract import PROBABILITIES_PARAMETER, ModelContract
from mixsup.errors import InputError, MixsupError, ServerUnavailable
from mixsup.scan import to_int16_hu

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

#: gRPC's reconnect backoff after a lost connection, in ms. gRPC's own default grows to 120 s, so a channel that
#: saw its server restart could keep failing for minutes after the server is back; 2 s keeps a batch's retries
#: meaningful while still not hammering a host that is down.
RECONNECT_BACKOFF_MS = (500, 2000)


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


def channel_args() -> list[tuple[str, Any]]:
    """gRPC channel options: tritonclient's own defaults plus a short reconnect backoff.

    Passing ``channel_args`` replaces tritonclient's list wholesale, and without its message limits gRPC's 4 MB
    default would refuse whole CT volumes (TRITON.md), so the list is rebuilt from tritonclient's own constants.
    A local subchannel pool keeps one client's reconnect state from leaking into another to the same server.
    """
    keepalive = grpcclient.KeepAliveOptions()
    initial_ms, max_ms = RECONNECT_BACKOFF_MS
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max_ms),
        ("grpc.use_local_subchannel_pool", 1),
    ]


# -- errors -------------------------------------------------------------------------------------------------------


def _first_line(text: str | None) -> str:
    return (str(text or "").strip().splitlines() or [""])[0]


def is_connection_failure(exc: InferenceServerException) -> bool:
    """Whether ``exc`` says no connection could be made (refused, unresolvable, dropped), not a server answer."""
    message = _first_line(exc.message() or str(exc)).lower()
    return "UNAVAILABLE" in str(exc.status() or "") and any(
        hint in message for hint in ("connect", "resolv", "socket closed", "connection reset")
    )


@dataclass(frozen=True)
class Endpoint:
    """Where a client talks to and how long it waits: what error messages need to say."""

    url: str
    model: str
    timeout_s: float | None
    connect_timeout_s: float

    def translate(self, exc: InferenceServerException, action: str, during_inference: bool = False) -> MixsupError:
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
                limit = "no limit" if self.timeout_s is None else f"{self.timeout_s:g} s"
                return MixsupError(f"{where} did not finish {action} within {limit} (raise --timeout)")
            return ServerUnavailable(f"{where} did not answer within {self.connect_timeout_s:g} s while {action}")
        if "INVALID_ARGUMENT" in status:
            return InputError(f"{where} rejected the input while {action} ({message})")
        return MixsupError(f"{where} failed while {action}: {status.replace('StatusCode.', '')} {message}".rstrip())

    def not_ready(self, report: dict) -> ServerUnavailable:
        """The error for a health ``report`` that is not ready."""
        if not report["server_ready"]:
            return ServerUnavailable(f"Triton at {self.url} is live={report['server_live']} but not ready")
        return ServerUnavailable(f"Triton at {self.url} has no ready model {self.model!r}")

    def contract_from_config(self, response: dict) -> ModelContract:
        """The :class:`ModelContract` in a ``get_model_config(as_json=True)`` answer (its ``contract`` parameter)."""
        parameters = response.get("config", {}).get("parameters", {})
        text = parameters.get(CONTRACT_PARAMETER, {}).get("string_value")
        if not text:
            raise InputError(
                f"model {self.model!r} at {self.url} carries no mixsup contract; is it the 'segment' ensemble?"
            )
        return ModelContract.from_json(text)

    def read_outputs(
        self, result: Any, volume_shape: tuple[int, ...], want_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 labels ``[D, H, W]``, float16 probabilities ``[C, D, H, W]`` or None) from an infer result."""
        labels = self._output(result, LABELS_OUTPUT, volume_shape).astype(np.uint8, copy=False)
        probabilities = self._output(result, PROBABILITIES_OUTPUT, volume_shape) if want_probabilities else None
        return labels, probabilities

    def _output(self, result: Any, name: str, volume_shape: tuple[int, ...]) -> np.ndarray:
        array = result.as_numpy(name)
        self.check_output_shape(name, None if array is None else array.shape, volume_shape)
        return array

    def check_output_shape(self, name: str, shape: Any, volume_shape: tuple[int, ...]) -> None:
        """A MixsupError unless output ``name`` came back (``shape`` not None) ending in the volume's shape."""
        if shape is None or tuple(shape[-3:]) != tuple(volume_shape):
            raise MixsupError(f"Triton at {self.url} returned {name} of shape {shape} for a volume of {volume_shape}")


def health_report(url: str, model: str) -> dict:
    """An empty health report, filled in by the clients' ``health``."""
    return {"url": url, "server_live": False, "server_ready": False, "model": model, "model_ready": False,
            "versions": [], "ready": False}


def inference_request(
    volume: np.ndarray, want_probabilities: bool
) -> tuple[np.ndarray, list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
    """(int16 volume, inputs, requested outputs) of one ``segment`` request for a ``[D, H, W]`` HU volume.

    The aio client uses the same request classes (``tritonclient.grpc.aio`` re-exports them).
    """
    volume = request_volume(volume)
    request = grpcclient.InferInput(INPUT_NAME, list(volume.shape), "INT16")
    request.set_data_from_numpy(volume)
    names = [LABELS_OUTPUT] + ([PROBABILITIES_OUTPUT] if want_probabilities else [])
    return volume, [request], [grpcclient.InferRequestedOutput(name) for name in names]


def request_parameters(want_probabilities: bool) -> dict[str, bool] | None:
    """The request parameters of one ``segment`` request (None: none needed)."""
    return {PROBABILITIES_PARAMETER: True} if want_probabilities else None


def request_volume(volume: np.ndarray) -> np.ndarray:
    """A ``[D, H, W]`` HU volume as the ``segment`` model takes it: int16 (InputError if not 3D and non-empty)."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise InputError(f"expected a non-empty [D, H, W] volume, got shape {volume.shape}")
    return to_int16_hu(volume)


def describe_shape(shape: tuple[int, ...]) -> str:
    """``"40x256x256"``: how a volume is named in messages."""
    return "x".join(str(n) for n in shape)
