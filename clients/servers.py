"""Spreading a batch's scans over one or more Triton servers, and riding out a server that goes away.

:class:`ServerPool` hands each piece of work to the server with the fewest cases in flight. When a server cannot
be reached (:class:`~mixsup.errors.ServerUnavailable`: refused, dropped, restarting, model not loaded yet) it is
marked down and the work is retried, on another server if one is up, else on the same one once it answers its
health check again, with exponential backoff (0.5 s doubling to 8 s). A case gives up, raising the last
:class:`ServerUnavailable`, once ``retry_seconds`` have passed since its own first failure, or at once when every
server has already been down that long -- so a server that is gone for good costs the batch ``retry_seconds`` once,
not once per remaining scan, and each later scan still checks (one quick health call) whether it came back.

Servers that are down are re-checked every few seconds while others work, so a restarted server rejoins. Every
server must serve the same model (the same contract); one that does not is left out with a warning.

Other errors (bad input, an inference timeout, a server failing inside) are not retried: retrying cannot fix them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from mixsup.clients.client import SegmentationClient
from mixsup.contract import ModelContract
from mixsup.errors import InputError, MixsupError, ServerUnavailable

T = TypeVar("T")

DEFAULT_RETRY_SECONDS = 60.0
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
#: How often a server that is down is re-checked while other servers work.
PROBE_INTERVAL_S = 5.0


@dataclass
class _Server:
    client: SegmentationClient
    in_flight: int = 0
    used: int = 0
    down_since: float | None = None
    last_probe: float = float("-inf")
    excluded: bool = False

    @property
    def url(self) -> str:
        return self.client.url


@dataclass(frozen=True)
class Attempted(Generic[T]):
    """What :meth:`ServerPool.run` returns: the work's value, the server that did it, and how many tries it took."""

    value: T
    url: str
    attempts: int


class ServerPool:
    """The servers of one batch run (see the module). Thread-safe: worker threads call :meth:`run` together.

    ``notify`` gets one line whenever a server goes down, comes back or is left out.
    """

    def __init__(
        self,
        clients: Sequence[SegmentationClient],
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        notify: Callable[[str], None] = lambda line: None,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        probe_interval_s: float = PROBE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ):
        if not clients:
            raise ValueError("ServerPool needs at least one client")
        self._servers = [_Server(client) for client in clients]
        self.retry_seconds = retry_seconds
        self._notify = notify
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._probe_interval_s = probe_interval_s
        self._clock = clock
        self._stopping = threading.Event()
        # Waiting on the stop event, not time.sleep, so that stop() ends every backoff at once.
        self._sleep = sleep or self._stopping.wait
        self._lock = threading.Lock()
        self._contract: ModelContract | None = None
        self.started = False

    def stop(self) -> None:
        """End every wait for a server now (the run is being interrupted): waiting work raises at once."""
        self._stopping.set()

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self._servers]

    @property
    def contract(self) -> ModelContract:
        """The contract every admitted server serves (after :meth:`start`)."""
        if self._contract is None:
            raise RuntimeError("ServerPool.contract before start()")
        return self._contract

    # -- admission ----------------------------------------------------------------------------------------------

    def start(self) -> ModelContract:
        """Check every server once. Ready ones are admitted; the others are marked down (and re-checked later).

        Raises :class:`ServerUnavailable` when none is ready (nothing to wait for at the start: a wrong URL should
        fail now, not in ``retry_seconds``) and :class:`InputError` when two ready servers serve different models.
        """
        errors = []
        for server in self._servers:
            try:
                server.client.ensure_ready()
                self._admit(server, strict=True)
            except ServerUnavailable as exc:
                server.down_since = self._clock()
                server.last_probe = server.down_since
                errors.append(str(exc))
        if self._contract is None:
            raise ServerUnavailable(errors[0] if len(errors) == 1 else "no server is ready: " + "; ".join(errors))
        for error in errors:
            self._notify(f"{error}; it is re-checked while the others work")
        self.started = True
        return self._contract

    def _admit(self, server: _Server, strict: bool = False) -> bool:
        """Read ``server``'s contract; keep it if it matches the pool's (or is the first). A mismatch is an
        :class:`InputError` when ``strict``, else the server is left out for the rest of the run."""
        contract = server.client.contract()
        with self._lock:
            if self._contract is None:
                self._contract = contract
                return True
            if contract.to_dict() == self._contract.to_dict():
                return True
        message = f"Triton at {server.url} serves a different model than {self._servers[0].url} (contracts differ)"
        if strict:
            raise InputError(message)
        server.excluded = True
        self._notify(f"{message}; leaving it out")
        return False

    # -- work ---------------------------------------------------------------------------------------------------

    def run(self, work: Callable[[SegmentationClient], T]) -> Attempted[T]:
        """Call ``work(client)`` on a server until it does not raise :class:`ServerUnavailable` (see the module)."""
        attempts = 0
        first_failure: float | None = None
        delay = self._initial_backoff_s
        last_error: ServerUnavailable | None = None
        while True:
            server = self._take()
            if server is not None:
                attempts += 1
                try:
                    value = work(server.client)
                except ServerUnavailable as exc:
                    last_error = exc
                    self._release(server, exc)
                else:
                    self._release(server, None)
                    return Attempted(value, server.url, attempts)
            if self._stopping.is_set():
                raise last_error or ServerUnavailable("stopped while waiting for a Triton server")
            now = self._clock()
            first_failure = now if first_failure is None else first_failure
            give_up_at = min(first_failure + self.retry_seconds, self._outage_start(now) + self.retry_seconds)
            if now >= give_up_at:
                raise last_error or ServerUnavailable(
                    f"no Triton server answered for {self.retry_seconds:g} s ({', '.join(self.urls)})"
                )
            if self._any_up():
                continue  # another server can take it right away
            self._sleep(max(0.0, min(delay, give_up_at - now)))
            delay = min(2 * delay, self._max_backoff_s)

    def _any_up(self) -> bool:
        with self._lock:
            return any(s.down_since is None and not s.excluded for s in self._servers)

    def _outage_start(self, now: float) -> float:
        """When the last server went down (``now`` when one is up): the outage a case is waiting out."""
        with self._lock:
            active = [s for s in self._servers if not s.excluded]
            if not active or any(s.down_since is None for s in active):
                return now
            return max(s.down_since for s in active)

    def _take(self) -> _Server | None:
        """Reserve the least busy server that is up, after re-checking the down servers that are due."""
        now = self._clock()
        with self._lock:
            active = [s for s in self._servers if not s.excluded]
            anyone_up = any(s.down_since is None for s in active)
            due = [
                s for s in active
                if s.down_since is not None and (not anyone_up or now - s.last_probe >= self._probe_interval_s)
            ]
            for server in due:
                server.last_probe = now
        for server in due:  # network calls, outside the lock
            if self._probe(server):
                with self._lock:
                    revived = server.down_since is not None
                    server.down_since = None
                if revived:
                    self._notify(f"Triton at {server.url} is back")
        with self._lock:
            up = [s for s in self._servers if s.down_since is None and not s.excluded]
            if not up:
                return None
            server = min(up, key=lambda s: (s.in_flight, s.used))
            server.in_flight += 1
            server.used += 1
            return server

    def _probe(self, server: _Server) -> bool:
        try:
            return bool(server.client.health()["ready"]) and self._admit(server)
        except MixsupError:
            return False

    def _release(self, server: _Server, error: ServerUnavailable | None) -> None:
        with self._lock:
            server.in_flight -= 1
            went_down = error is not None and server.down_since is None
            came_back = error is None and server.down_since is not None
            if went_down:
                server.down_since = server.last_probe = self._clock()
            elif came_back:
                server.down_since = None
        if went_down:
            self._notify(f"{error}; retrying for up to {self.retry_seconds:g} s")
        elif came_back:
            self._notify(f"Triton at {server.url} is back")
