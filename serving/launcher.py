"""Starting, waiting for and stopping a Triton Inference Server for a model repository: the launcher side.

The server is a ``tritonserver`` on PATH (an NGC container) or the one bundled in the ``nvidia-pytriton``
wheel. The bundled one needs some help to run our python-backend models (TRITON.md, measured):

- the python-backend stub for this interpreter's minor version must sit in the backend directory, so each
  launch builds ``<runtime>/backends/python/`` with links to the wheel's files;
- the stub's embedded Python ignores PYTHONPATH; it finds the virtual environment through the ``python3`` it
  sees first on PATH, so the running interpreter's ``bin/`` goes first;
- it needs libpython on LD_LIBRARY_PATH, and without it the server hangs while loading, never ready and never
  failing, so readiness is polled with a deadline and the log tail is the diagnosis.

Before anything starts:

- Ports are checked before Triton starts, so a busy port is one clear error instead of a failed server.
- Any address other than loopback closes Triton's restricted APIs (model control, shared memory, logging,
  trace) to everyone but this launcher.
- The ``/dev/shm`` regions of launchers that are gone are swept (mixsup.serving.processes).

A launch never leaves a server behind: :class:`TritonProcess` does not run tritonserver itself but starts a
supervisor (mixsup.serving.supervisor, which says how) and holds the only write end of its stdin pipe. If the
supervisor is killed, the launcher kills Triton's process group and removes its shared memory itself.
"""
from __future__ import annotations

import errno
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

from mixsup.errors import InputError, ServerUnavailable
from mixsup.serving.processes import (
    SHM_DIR,
    describe_exit,
    group_members,
    new_shm_prefix,
    remove_shm_regions,
    sweep_stale_shm_regions,
)
from mixsup.serving.supervisor import (
    EXIT_TIMEOUT_S,
    KILL_GRACE_S,
    REAP_TIMEOUT_S,
    SUPERVISOR_MODULE,
    SupervisorSpec,
)

STUB_NAME = "triton_python_backend_stub"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
#: How often readiness is polled while the server starts.
POLL_INTERVAL_S = 0.2
#: Extra time the launcher gives the supervisor (to reap stubs and remove shared memory) before killing it.
SUPERVISOR_MARGIN_S = 10.0
#: How long the supervisor may take to start Triton and report its pid (an interpreter start, on a busy host).
SUPERVISOR_START_TIMEOUT_S = 60.0
#: The header that opens Triton's restricted APIs; gRPC clients send it as ``triton-grpc-protocol-<name>``.
ADMIN_HEADER = "mixsup-admin-key"
#: APIs closed when listening beyond loopback: model control, shared-memory registration (it maps files of
#: the server's host), log settings and trace settings. Inference, health, metadata and configs stay open.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")

class ServerStartupError(ServerUnavailable):
    """Triton died or never became ready; ``log_tail`` holds the end of its log, where the cause is."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class PortInUse(ServerUnavailable):
    """A port the server needs is taken (usually by another server), found before Triton is started."""


def find_tritonserver() -> Path:
    """``tritonserver`` on PATH, else the one bundled in nvidia-pytriton (found without importing pytriton)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("pytriton")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "tritonserver" / "bin" / "tritonserver"
        if candidate.is_file():
            return candidate
    raise ServerUnavailable("no tritonserver found: put one on PATH or `pip install nvidia-pytriton`")


def bundled_stub(triton_root: Path, python_version: Sequence[int] = sys.version_info[:2]) -> Path | None:
    """The python-backend stub a pytriton-style install ships for ``python_version``; None for other installs."""
    stubs = triton_root / "python_backend_stubs"
    if not stubs.is_dir():
        return None
    stub = stubs / f"{python_version[0]}.{python_version[1]}" / STUB_NAME
    if not stub.is_file():
        shipped = sorted(path.name for path in stubs.iterdir())
        raise ServerUnavailable(
            f"{triton_root}: no python-backend stub for Python {python_version[0]}.{python_version[1]} "
            f"(shipped: {', '.join(shipped)})"
        )
    return stub


def prepare_backend_directory(
    tritonserver: Path, runtime_dir: Path, python_version: Sequence[int] = sys.version_info[:2]
) -> Path | None:
    """Build ``runtime_dir/backends/python`` for a bundled tritonserver; None if its own backends suffice."""
    triton_root = tritonserver.resolve().parent.parent
    stub = bundled_stub(triton_root, python_version)
    if stub is None:
        return None
    source = triton_root / "backends" / "python"
    backends = runtime_dir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {name: source / name for name in PYTHON_BACKEND_FILES}
    links[STUB_NAME] = stub
    for name, target in links.items():
        if not target.is_file():
            raise ServerUnavailable(f"{target}: missing from the Triton install")
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return backends


def server_environment(base: dict | None = None) -> dict[str, str]:
    """The server's environment: this interpreter's ``bin`` first on PATH and its libpython on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH", "")]))
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH", "")]))
    return env


# ------------------------------------------------------------------------------------------ addresses and ports


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (unresolvable counts as not loopback)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_ports(host: str, ports: Mapping[str, int]) -> None:
    """Raise InputError for unusable ports and PortInUse for a busy one, before anything is started.

    ``ports`` maps a flag stem ("grpc", "http", "metrics") to its port. The probe binds like a server does
    (SO_REUSEADDR, so a port in TIME_WAIT counts as free, as it does for Triton) and only listeners conflict.
    """
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if not 0 < port < 65536:
            raise InputError(f"--{name}-port {port}: not a TCP port (1-65535)")
        if port in seen:
            raise InputError(f"--{seen[port]}-port and --{name}-port are both {port}")
        seen[port] = name
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--host {host}: cannot resolve ({exc})") from None
    for name, port in ports.items():
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address[0], port, *address[2:]))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PortInUse(
                            f"{name} port {port} on {host} is already in use (another mixsup-serve or "
                            f"tritonserver?): stop it or pass another --{name}-port"
                        ) from None
                    raise InputError(f"cannot listen on {url_host(host)}:{port}: {exc.strerror}") from None


def server_command(
    tritonserver: Path,
    model_repository: Path,
    host: str,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    shm_prefix: str,
    backend_directory: Path | None = None,
    verbose: bool = False,
    exit_timeout: int = EXIT_TIMEOUT_S,
    admin_key: str | None = None,
) -> list[str]:
    """The tritonserver command line; with ``admin_key``, RESTRICTED_APIS need ADMIN_HEADER set to it."""
    command = [
        str(tritonserver),
        f"--model-repository={model_repository}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={int(exit_timeout)}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    if admin_key is not None:
        restriction = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}"
        command += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
    if backend_directory is not None:
        command.append(f"--backend-directory={backend_directory}")
    if verbose:
        command.append("--log-verbose=1")
    return command


def local_address(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (wildcards mean loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


#: Triton log lines that look like errors but are expected on a CPU-only host.
HARMLESS_ERRORS = ("CudaDriverHelper", "pinned", "NVML", "DCGM", "GPU metrics")
_TRITON_ERROR = re.compile(r'^E\d{4} \S+ +\d+ \S+\] "?(.*?)"?$')


def read_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, without Triton's status tables (their rows say nothing new)."""
    try:
        with open(path, errors="replace") as log:
            kept = (line for line in log if line.strip() and not line.startswith(("|", "+")))
            return "".join(deque(kept, maxlen=lines))
    except OSError:
        return ""


def first_error(path: Path) -> str | None:
    """The first line of the first real error Triton logged (e.g. a model's failing ``initialize``)."""
    try:
        with open(path, errors="replace") as log:
            for line in log:
                match = _TRITON_ERROR.match(line.rstrip("\n"))
                if match and not any(noise in line for noise in HARMLESS_ERRORS):
                    return match.group(1).split("\\n")[0].strip()
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------ the server process


class TritonProcess:
    """One tritonserver, run by a supervisor process: start, wait until ready, stop, and clean up.

    Usable as a context manager. The supervisor runs in its own session so a terminal's Ctrl-C reaches only
    the launcher, which then stops the server in order. ``pid`` is tritonserver's, ``supervisor_pid`` the
    supervisor's.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        log_file: str | os.PathLike | None = None,
        verbose: bool = False,
        tritonserver: str | os.PathLike | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.verbose = verbose
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.log_path = Path(log_file) if log_file else None
        self.shm_prefix = new_shm_prefix()
        #: Beyond loopback the restricted APIs need this key; only this launcher knows it.
        self.admin_key = None if is_loopback(host) else secrets.token_hex(16)
        #: {region: bytes} of launchers that are gone, removed by start().
        self.swept_shm_regions: dict[Path, int] = {}
        #: True when the supervisor died without reporting (it was killed); the launcher then killed the group.
        self.supervisor_lost = False
        self.process: subprocess.Popen | None = None  # the supervisor
        self.server_pid: int | None = None
        self._exit_code: int | None = None
        self._reports = b""
        self._runtime_dir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://{url_host(local_address(self.host))}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{url_host(local_address(self.host))}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        """tritonserver's pid (also its process group id, shared with its stubs)."""
        return self.server_pid

    @property
    def supervisor_pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def restricted(self) -> bool:
        """Whether Triton's RESTRICTED_APIS are closed (listening beyond loopback)."""
        return self.admin_key is not None

    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the restricted APIs for this launcher."""
        return {ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    def poll(self) -> int | None:
        """tritonserver's exit code, or None while it runs; once it has exited its stubs are gone too."""
        if self._exit_code is None and self.process is not None and self.process.poll() is not None:
            self._exit_code = self._collect_exit()
        return self._exit_code

    def start(self) -> None:
        """Check the ports, sweep stale shared memory, and start the supervisor, which starts tritonserver."""
        if self.process is not None:
            raise RuntimeError("this TritonProcess was already started")
        check_ports(self.host, {"grpc": self.grpc_port, "http": self.http_port, "metrics": self.metrics_port})
        self.swept_shm_regions = sweep_stale_shm_regions()
        tritonserver = self.tritonserver or find_tritonserver()
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="mixsup-serve-"))
        backends = prepare_backend_directory(tritonserver, self._runtime_dir)
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="mixsup-serve-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        command = server_command(
            tritonserver, self.model_repository, self.host, self.grpc_port, self.http_port, self.metrics_port,
            self.shm_prefix, backends, self.verbose, admin_key=self.admin_key,
        )
        spec = SupervisorSpec(command, os.getpid(), self.shm_prefix, str(self._runtime_dir))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # stdin is the lifeline: this process holds its only write end, so the supervisor sees end-of-file
            # when the launcher dies, however it dies. Python pipes are not inherited by other children.
            self.process = subprocess.Popen(
                [sys.executable, "-m", SUPERVISOR_MODULE, spec.to_json()],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                env=server_environment(), start_new_session=True,
            )
        line = self._next_report(SUPERVISOR_START_TIMEOUT_S)
        if line.startswith("pid "):
            self.server_pid = int(line.split()[1])
            return
        if self.process.poll() is None:  # hung before starting the server
            self.process.kill()
            self.process.wait()
        self._exit_code = self.process.returncode
        what = line[len("error "):] if line.startswith("error ") else (
            f"the server supervisor exited ({describe_exit(self.process.returncode)}) before starting tritonserver")
        raise self._startup_error(what)

    def _next_report(self, timeout: float) -> str:
        """The supervisor's next protocol line; "" at end of file or after ``timeout`` seconds."""
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._reports:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            self._reports += chunk
        line, _, self._reports = self._reports.partition(b"\n")
        return line.decode(errors="replace").strip()

    def _collect_exit(self) -> int | None:
        """After the supervisor exited: the server's code it reported, or (it was killed) kill the group."""
        code = None
        while line := self._next_report(1.0):
            if line.startswith("exit "):
                code = int(line.split()[1])
        if code is not None:
            return code
        self.supervisor_lost = True
        if self.server_pid is not None:
            # Triton got SIGTERM through its parent-death signal; SIGKILL the group so no stub outlives it.
            try:
                os.killpg(self.server_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + REAP_TIMEOUT_S
            while group_members(self.server_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.remove_shm_regions()
        return self.process.returncode

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float, stop_event: threading.Event | None = None) -> bool:
        """Block until ready (True) or ``stop_event`` is set (False); raise ServerStartupError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if stop_event is not None and stop_event.is_set():
                return False
            code = self.poll()
            if code is not None:
                raise self._startup_error(f"tritonserver exited with code {code} while starting")
            if self.is_ready():
                return True
            if time.monotonic() >= deadline:
                raise self._startup_error(f"tritonserver was not ready after {timeout:g} s")
            time.sleep(POLL_INTERVAL_S)

    def _startup_error(self, what: str) -> ServerStartupError:
        error = first_error(self.log_path) if self.log_path else None
        cause = f": {error}" if error else ""
        return ServerStartupError(f"{what}{cause} (log: {self.log_path})", self.log_tail())

    def model_states(self) -> dict[str, str]:
        """{model name: state} from the repository index, e.g. {"segment": "READY"}."""
        request = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}", method="POST",
                                         headers=self.admin_headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            return {entry["name"]: entry.get("state", "") for entry in json.load(response)}

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log_path, lines) if self.log_path else ""

    def stop(self, timeout: float = EXIT_TIMEOUT_S + KILL_GRACE_S + SUPERVISOR_MARGIN_S) -> int | None:
        """Ask the supervisor to stop the server (SIGTERM, SIGKILL after its grace); kill it after ``timeout``.

        Returns the server's exit code. Afterwards tritonserver, its stubs and its shared memory are gone.
        """
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()  # then poll() kills the group itself
                    self.process.wait()
            code = self.poll()
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()
        self.remove_shm_regions()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None
        return code

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(self.shm_prefix + "*")) if SHM_DIR.is_dir() else []

    def remove_shm_regions(self) -> list[Path]:
        return remove_shm_regions(self.shm_prefix)

    def __enter__(self) -> "TritonProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_server(
    model_repository: str | os.PathLike, startup_timeout: float = 120.0, **options
) -> TritonProcess:
    """Start Triton and wait until it is ready; on failure stop it and raise ServerStartupError."""
    server = TritonProcess(model_repository, **options)
    server.start()
    try:
        server.wait_ready(startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server

