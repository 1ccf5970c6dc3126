"""Helpers for tests that run the real Triton server through ``mixsup-serve``.

``start_serve(repository)`` launches ``python -m mixsup.serving.cli`` on free ports and waits until Triton is
ready; ``stop_serve(proc)`` sends SIGTERM to that launcher by PID and returns its exit code. Process and port
probes for the fault tests read /proc and ``ps`` themselves rather than trusting the launcher's helpers. Also
builds tiny per-pixel ONNX networks with ``onnx.helper`` (no torch) and their numpy reference.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

LAUNCHER_LOG_ATTR = "mixsup_launcher_log"


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free right now (all held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def serve_command(repository: str | os.PathLike, grpc_port: int, http_port: int, metrics_port: int,
                  extra_args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "mixsup.serving.cli",
        "--model-repository", str(repository),
        "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        *extra_args,
    ]


def launcher_output(proc: subprocess.Popen) -> str:
    """What the launcher wrote to stdout/stderr so far."""
    path = getattr(proc, LAUNCHER_LOG_ATTR, None)
    return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""


def start_serve(
    repository: str | os.PathLike,
    startup_timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    log_dir: str | os.PathLike | None = None,
) -> tuple[subprocess.Popen, str, str]:
    """Start ``mixsup-serve`` on free ports; return (launcher process, gRPC url, HTTP url) once ready.

    The launcher's own output goes to a file (see :func:`launcher_output`), the server log beside it.
    Raises RuntimeError with the launcher's output if it exits or is not ready in time.
    """
    grpc_port, http_port, metrics_port = free_ports(3)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mixsup-test-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher_log = log_dir / f"launcher-{http_port}.log"
    args = ["--startup-timeout", str(startup_timeout), "--log-file", str(log_dir / f"triton-{http_port}.log"),
            *extra_args]
    with open(launcher_log, "wb") as out:
        proc = subprocess.Popen(serve_command(repository, grpc_port, http_port, metrics_port, args),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_stop_with_parent)
    setattr(proc, LAUNCHER_LOG_ATTR, str(launcher_log))
    http_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + startup_timeout + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mixsup-serve exited with {proc.returncode}:\n{launcher_output(proc)}")
        if "ready on grpc" in launcher_output(proc) and _is_ready(http_url):
            return proc, f"127.0.0.1:{grpc_port}", http_url
        time.sleep(0.2)
    stop_serve(proc)
    raise RuntimeError(f"mixsup-serve not ready in time:\n{launcher_output(proc)}")


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, so a killed pytest (or benchmark) leaves no
    server behind; the launcher then stops Triton and its stubs as on any SIGTERM."""
    from mixsup.serving.processes import PR_SET_PDEATHSIG, prctl

    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_serve(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM the launcher by PID and wait for it; SIGKILL after ``timeout``. Returns its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def launched_pids(proc: subprocess.Popen) -> tuple[int, int | None]:
    """(tritonserver pid, supervisor pid or None) as the launcher printed them."""
    match = re.search(r"\(pid (\d+)(?:, supervisor (\d+))?,", launcher_output(proc))
    if not match:
        raise AssertionError(f"no server pid in the launcher's output:\n{launcher_output(proc)}")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (read from /proc, independently of the launcher's code)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state not in ("Z", "X")


def process_group(pgid: int) -> list[int]:
    """Running members of process group ``pgid`` (tritonserver and its python-backend stubs), from ``ps``."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,stat="], capture_output=True, text=True,
                          check=True).stdout.split("\n")
    return [int(pid) for pid, group, stat in (row.split() for row in rows if row.strip())
            if int(group) == pgid and not stat.startswith("Z")]


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def _is_ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(http_url + "/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ---------------------------------------------------------------------------------------------------------
# a tiny per-pixel network


def write_pixel_network(path: str | os.PathLike, weight: np.ndarray, bias: np.ndarray, opset: int = 17) -> Path:
    """ONNX model: ``input`` [N,3,h,w] float -> 1x1 Conv (weight [C,3], bias [C]) -> Softmax over classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    classes, channels = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "weight", "bias"], ["logits"], kernel_shape=[1, 1]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "pixel_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes, "H", "W"])],
        initializer=[
            numpy_helper.from_array(weight.reshape(classes, channels, 1, 1), "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def pixel_network_reference(stacks: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What :func:`write_pixel_network` computes, in float64 numpy: [N,3,h,w] -> [N,C,h,w]."""
    logits = np.einsum("ck,nkhw->nchw", np.asarray(weight, np.float64), stacks.astype(np.float64))
    logits += np.asarray(bias, np.float64)[None, :, None, None]
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


@contextlib.contextmanager
def serving_one_network(root: Path, name: str, onnx_path: Path, contract) -> Iterator[str]:
    """``mixsup-serve`` on a repository under ``root`` holding network ``name`` (``onnx_path``, ``contract``) and the
    ``segment`` ensemble over it; yields its gRPC ``HOST:PORT`` and stops it by PID after. Skips the calling test
    (or fixture) where no tritonserver is installed."""
    import pytest

    from mixsup.errors import ServerUnavailable
    from mixsup.repository import write_ensemble, write_network
    from mixsup.serving.launcher import find_tritonserver

    try:
        find_tritonserver()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    repository = root / "repository"
    write_network(repository, name, onnx_path, contract)
    write_ensemble(repository)
    proc, grpc_url, _ = start_serve(repository, log_dir=root / "logs")
    try:
        yield grpc_url
    finally:
        stop_serve(proc)
