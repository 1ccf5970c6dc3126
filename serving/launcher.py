"""Starting, watching and stopping a Triton Inference Server for a model repository.

The server is a ``tritonserver`` on PATH (an NGC container) or the one bundled in the ``nvidia-pytriton``
wheel. The bundled one needs some help to run our python-backend models (TRITON.md, measured):

- the python-backend stub for this interpreter's minor version must sit in the backend directory, so each
  launch builds ``<runtime>/backends/python/`` with links to the wheel's files;
- the stub's embedded Python ignores PYTHONPATH; it finds the virtual environment through the ``python3`` it
  sees first on PATH, so the running interpreter's ``bin/`` goes first;
- it needs libpython on LD_LIBRARY_PATH, and without it the server hangs while loading, never ready and never
  failing, so readiness is polled with a deadline and the log tail is the diagnosis.

Each launch uses its own python-backend shared-memory prefix so its ``/dev/shm`` regions can be removed after
the server stops, even if it had to be killed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
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
from typing import Sequence

from mixsup.errors import ServerUnavailable

STUB_NAME = "triton_python_backend_stub"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
SHM_DIR = Path("/dev/shm")
POLL_INTERVAL_S = 0.2
#: How long Triton waits for in-flight requests on SIGTERM. Triton 2.51 never releases an ensemble request
#: whose parallel step failed (measured), so shutdown after such a request always waits this long.
EXIT_TIMEOUT_S = 15
#: Grace beyond EXIT_TIMEOUT_S before the launcher kills the server's process group.
KILL_GRACE_S = 15.0


class ServerStartupError(ServerUnavailable):
    """Triton died or never became ready; ``log_tail`` holds the end of its log, where the cause is."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


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


def new_shm_prefix() -> str:
    """A python-backend shared-memory prefix unique to one launch (pid + random, no '/')."""
    return f"mixsup_serve_{os.getpid()}_{secrets.token_hex(4)}_"


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
) -> list[str]:
    """The tritonserver command line."""
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
    if backend_directory is not None:
        command.append(f"--backend-directory={backend_directory}")
    if verbose:
        command.append("--log-verbose=1")
    return command


def local_address(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (wildcards mean loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def url_host(host: str) -> str:
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


class TritonProcess:
    """One tritonserver process: start, wait until ready, stop (SIGTERM, then SIGKILL) and clean up.

    Usable as a context manager. The server runs in its own session so a terminal's Ctrl-C reaches only the
    launcher, which then stops the server in order.
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
        self.process: subprocess.Popen | None = None
        self._runtime_dir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://{url_host(local_address(self.host))}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{url_host(local_address(self.host))}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs."""
        return self.process.poll() if self.process else None

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("this TritonProcess was already started")
        tritonserver = self.tritonserver or find_tritonserver()
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="mixsup-serve-"))
        backends = prepare_backend_directory(tritonserver, self._runtime_dir)
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="mixsup-serve-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        command = server_command(
            tritonserver, self.model_repository, self.host, self.grpc_port, self.http_port, self.metrics_port,
            self.shm_prefix, backends, self.verbose,
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=server_environment(), start_new_session=True,
            )

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
        request = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return {entry["name"]: entry.get("state", "") for entry in json.load(response)}

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log_path, lines) if self.log_path else ""

    def stop(self, timeout: float = EXIT_TIMEOUT_S + KILL_GRACE_S) -> int | None:
        """SIGTERM the server, SIGKILL its process group after ``timeout``, then remove what it left behind."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_group()
            code = self.process.wait()
        self.remove_shm_regions()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None
        return code

    def _kill_group(self) -> None:
        # The whole group: a hung server's stubs would otherwise keep their shared memory mapped.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(self.shm_prefix + "*")) if SHM_DIR.is_dir() else []

    def remove_shm_regions(self) -> list[Path]:
        removed = []
        for region in self.shm_regions():
            try:
                region.unlink()
                removed.append(region)
            except FileNotFoundError:
                pass
        return removed

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
