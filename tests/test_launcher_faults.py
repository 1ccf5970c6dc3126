"""A launcher that never leaves a server behind (issue 9): faults of the launcher, of tritonserver and of the
supervisor between them, busy ports, stale shared memory, and what is open beyond loopback.

The server tests run the real Triton with a python-backend model whose stubs behave like the one that outlived
its server in the field: it ignores SIGTERM and can be kept busy in ``execute``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from triton_utils import (
    free_ports,
    is_running,
    launched_pids,
    launcher_output,
    port_is_free,
    process_group,
    serve_command,
    start_serve,
    stop_serve,
    wait_for,
)

from mixsup.clients.client import SegmentationClient
from mixsup.clients.shm import SharedMemoryRegions
from mixsup.errors import MixsupError
from mixsup.serving import launcher, processes, supervisor

SHM = Path("/dev/shm")
#: How long everything may take to disappear after the launcher is SIGKILLed: the supervisor's 5 s grace for
#: Triton (supervisor.ORPHAN_GRACE_S) plus slack for a 2-core host that is also training.
GONE_AFTER_LAUNCHER_KILL_S = 15.0


def write_sleeper(repository: Path, marker: Path, instances: int = 2) -> Path:
    """A python model: x > 0 touches ``marker`` and sleeps in ``execute``; x <= 0 echoes. Stubs ignore SIGTERM."""
    model = repository / "sleeper"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "sleeper"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n")
    (model / "1" / "model.py").write_text(
        "import signal\nimport time\n\nimport triton_python_backend_utils as pb_utils\n\n\n"
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\n"
        "    def execute(self, requests):\n"
        "        responses = []\n"
        "        for request in requests:\n"
        '            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()\n'
        "            if x[0] > 0:\n"
        f"                open({str(marker)!r}, 'w').close()\n"
        "                time.sleep(600)\n"
        '            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))\n'
        "        return responses\n")
    return repository


def infer(http_url: str, x: float, timeout: float = 30, headers: dict | None = None) -> int:
    """HTTP status of one inference on the sleeper."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [x]}]}).encode()
    return post(http_url + "/v2/models/sleeper/infer", body, timeout, headers)


def post(url: str, body: bytes = b"{}", timeout: float = 10, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def keep_a_stub_busy(http_url: str, marker: Path) -> None:
    """Send a request that blocks one stub in ``execute``; return once it is in there."""
    def send() -> None:
        try:
            infer(http_url, 1.0, timeout=120)
        except OSError:
            pass  # the server goes away under it, by design

    threading.Thread(target=send, daemon=True).start()
    assert wait_for(marker.exists, 30), "the sleeper never started executing"


def kill_leftovers(pgid: int | None) -> None:
    """Tear down what a failing test leaves: the server group this test started."""
    for pid in process_group(pgid) if pgid else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(tmp_path: Path, *extra_args: str) -> tuple[subprocess.Popen, str, str, Path]:
    marker = tmp_path / "executing"
    repository = write_sleeper(tmp_path / "repo", marker)
    proc, grpc_url, http_url = start_serve(repository, log_dir=tmp_path / "logs", extra_args=extra_args)
    return proc, grpc_url, http_url, marker


def last_error_line(proc: subprocess.Popen) -> str:
    return launcher_output(proc).strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ without a server


def start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: when the process started (read here, not through the launcher)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_shm_prefix_names_its_owner():
    prefix = processes.new_shm_prefix()
    me = (os.getpid(), start_time(os.getpid()))
    assert processes.shm_owner(prefix + "3a09861c-74b9-4c13-9262-72a108d459e3") == me
    assert processes.shm_owner("mixsup_serve_123_7b982494_3a09861c-74b9") == (123, None)  # before start times
    assert processes.shm_owner("mixsup_serve_123_12345678_3a09861c-74b9") == (123, None)  # all-digit random part
    assert processes.shm_owner("mixsup_client_456_0a1b2c3d_input") == (456, None)  # a client's (no start time)
    assert processes.shm_owner("mixsup_client_x_0a1b2c3d_input") is None
    assert processes.shm_owner("triton_python_backend_shm_region_1") is None


def test_stale_shm_regions_of_gone_launchers_are_swept_live_ones_kept():
    me, started = os.getpid(), start_time(os.getpid())
    zombie = subprocess.Popen(["true"])  # exited, not reaped: it cleans up nothing any more
    assert wait_for(lambda: not is_running(zombie.pid), 10)
    tag = secrets.token_hex(4)
    names = {
        "dead": f"mixsup_serve_{dead_pid()}_123_{tag}_a",
        "dead, older naming": f"mixsup_serve_{dead_pid()}_{tag}_a",
        "zombie": f"mixsup_serve_{zombie.pid}_{start_time(zombie.pid)}_{tag}_a",
        "pid reused by another process": f"mixsup_serve_{me}_{started + 1}_{tag}_a",
        "live": f"mixsup_serve_{me}_{started}_{tag}_a",
        "live, older naming": f"mixsup_serve_{me}_{tag}_a",
        "dead client": f"mixsup_client_{dead_pid()}_{tag}_input",
        "live client": f"mixsup_client_{me}_{tag}_output",
        "not mixsup's": f"triton_python_backend_shm_region_{tag}",
    }
    try:
        for name in names.values():
            (SHM / name).write_bytes(b"x" * 1000)
        removed = processes.sweep_stale_shm_regions()
        left = {what for what, name in names.items() if (SHM / name).exists()}
        assert left == {"live", "live, older naming", "live client", "not mixsup's"}
        assert {SHM / names[what] for what in names if what not in left} <= set(removed)
        assert all(removed[SHM / names[what]] == 1000 for what in names if what not in left)
    finally:
        zombie.wait()
        for name in names.values():
            (SHM / name).unlink(missing_ok=True)


@pytest.mark.parametrize("busy, held_on", [("grpc", "127.0.0.1"), ("http", "0.0.0.0"), ("metrics", "127.0.0.1")])
def test_busy_port_is_one_line_exit_3_before_triton_starts(tmp_path, busy, held_on):
    write_sleeper(tmp_path / "repo", tmp_path / "executing", instances=1)
    ports = dict(zip(("grpc", "http", "metrics"), free_ports(3)))
    with socket.socket() as holder:  # what another server does to the port
        holder.bind((held_on, ports[busy]))
        holder.listen()
        started = time.monotonic()
        result = subprocess.run(
            serve_command(tmp_path / "repo", ports["grpc"], ports["http"], ports["metrics"],
                          extra_args=["--log-file", str(tmp_path / "triton.log")]),
            capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mixsup-serve: error: {busy} port {ports[busy]} on 127.0.0.1 is already in use (another mixsup-serve or "
        f"tritonserver?): stop it or pass another --{busy}-port"]
    assert "starting Triton" not in result.stdout
    assert not (tmp_path / "triton.log").exists(), "tritonserver was started"
    assert seconds < 20


def test_same_port_twice_is_bad_usage(tmp_path):
    port, metrics = free_ports(2)
    result = subprocess.run(serve_command(tmp_path, port, port, metrics), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mixsup-serve: error: --grpc-port and --http-port are both {port}"]


def test_restricted_apis_only_beyond_loopback(tmp_path):
    for host in ("127.0.0.1", "localhost", "::1"):
        assert not launcher.TritonProcess(tmp_path, host=host).restricted, host
    server = launcher.TritonProcess(tmp_path, host="0.0.0.0")
    assert server.restricted and server.admin_headers() == {launcher.ADMIN_HEADER: server.admin_key}
    command = launcher.server_command(Path("/x/tritonserver"), tmp_path, "0.0.0.0", 1, 2, 3, "pre_",
                                      admin_key="k3y")
    closed = "model-repository,shared-memory,logging,trace:mixsup-admin-key=k3y"
    assert f"--http-restricted-api={closed}" in command and f"--grpc-restricted-protocol={closed}" in command
    loopback = launcher.server_command(Path("/x/tritonserver"), tmp_path, "127.0.0.1", 1, 2, 3, "pre_")
    assert not [flag for flag in loopback if flag.startswith(("--http-restricted", "--grpc-restricted"))]


def test_supervisor_depends_on_processes_only():
    """The supervisor runs as its own module and loads none of the launcher's code (no cycle, a quick start)."""
    code = ("import sys, mixsup.serving.supervisor\n"
            "print(sorted(name for name in sys.modules if name.startswith('mixsup.serving.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.split() == ["['mixsup.serving.processes',", "'mixsup.serving.supervisor']"], loaded.stderr
    usage = subprocess.run([sys.executable, "-m", supervisor.SUPERVISOR_MODULE], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "usage: python -m mixsup.serving.supervisor SPEC_JSON" in usage.stderr


# ------------------------------------------------------------------------------------------ with a server


@pytest.mark.triton
def test_sigkill_of_the_launcher_takes_triton_and_its_stubs_down(tmp_path):
    me, started = os.getpid(), start_time(os.getpid())
    tag = secrets.token_hex(4)
    stale = SHM / f"mixsup_serve_{dead_pid()}_1_{tag}_stale"
    live = SHM / f"mixsup_serve_{me}_{started}_{tag}_live"
    stale.write_bytes(b"x" * 2**20)
    live.write_bytes(b"x")
    server_pid = None
    try:
        proc, grpc_url, http_url, marker = launch(tmp_path)
        server_pid, supervisor_pid = launched_pids(proc)
        swept = (stale.exists(), live.exists())  # checked at the end, after the fault this test is about
        stubs = [pid for pid in process_group(server_pid) if pid != server_pid]
        assert len(stubs) >= 2, "two sleeper instances run in tritonserver's process group"
        prefix = re.escape(f"mixsup_serve_{proc.pid}_")
        assert [p for p in SHM.iterdir() if re.match(prefix, p.name)], "the stubs map this launch's regions"
        keep_a_stub_busy(http_url, marker)

        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
        watched = [server_pid, *stubs, *([supervisor_pid] if supervisor_pid else [])]
        gone = wait_for(lambda: not any(map(is_running, watched)), GONE_AFTER_LAUNCHER_KILL_S)
        seconds = time.monotonic() - killed
        assert gone, f"still running {GONE_AFTER_LAUNCHER_KILL_S} s after the launcher's SIGKILL: " \
                     f"{[pid for pid in watched if is_running(pid)]}"
        print(f"tritonserver, {len(stubs)} stubs and the supervisor gone {seconds:.1f} s after SIGKILL")
        ports = [int(port) for port in re.findall(r"--\w+-port (\d+)", " ".join(proc.args))]
        assert len(ports) == 3 and all(port_is_free(port) for port in ports)
        assert not [p for p in SHM.iterdir() if re.match(prefix, p.name)]
        log = Path(tmp_path / "logs").glob("triton-*.log")
        assert "the launcher (pid" in next(log).read_text(), "the server log says why it stopped"
        assert swept == (False, True), "start sweeps only regions of launchers that are gone"
        assert re.search(r"removed \d+ shared-memory regions \(\d+\.\d MiB\) of launchers that are gone",
                         launcher_output(proc))
    finally:
        kill_leftovers(server_pid)
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


@pytest.mark.triton
def test_sigkill_of_tritonserver_takes_its_stubs_down_and_the_launcher_says_so(tmp_path):
    server_pid = None
    try:
        proc, grpc_url, http_url, marker = launch(tmp_path)
        server_pid, _ = launched_pids(proc)
        stubs = [pid for pid in process_group(server_pid) if pid != server_pid]
        assert len(stubs) >= 2
        keep_a_stub_busy(http_url, marker)
        os.kill(server_pid, signal.SIGKILL)
        proc.wait(60)
        still = [pid for pid in stubs if is_running(pid)]  # when the launcher has exited, not some time later
        assert not still, f"stubs outlived tritonserver: {still}"
        assert proc.returncode == 1
        assert last_error_line(proc).startswith(
            "mixsup-serve: error: tritonserver stopped on its own (SIGKILL); its stubs are gone too (log: ")
        assert not list(SHM.glob(f"mixsup_serve_{proc.pid}_*"))
    finally:
        if server_pid is not None:
            stop_serve(proc)
        kill_leftovers(server_pid)


@pytest.mark.triton
def test_sigkill_of_the_supervisor_takes_everything_down(tmp_path):
    server_pid = None
    try:
        proc, grpc_url, http_url, marker = launch(tmp_path)
        server_pid, supervisor_pid = launched_pids(proc)
        assert supervisor_pid is not None, "the launcher names its supervisor"
        group = process_group(server_pid)
        os.kill(supervisor_pid, signal.SIGKILL)
        proc.wait(60)
        assert not [pid for pid in group if is_running(pid)]
        assert proc.returncode == 1
        assert last_error_line(proc).startswith(
            f"mixsup-serve: error: the supervisor of tritonserver (pid {supervisor_pid}) died (SIGKILL); "
            f"tritonserver (pid {server_pid}) and its stubs were killed (log: ")
        assert not list(SHM.glob(f"mixsup_serve_{proc.pid}_*"))
    finally:
        if server_pid is not None:
            stop_serve(proc)
        kill_leftovers(server_pid)


@pytest.mark.triton
def test_beyond_loopback_the_restricted_apis_are_closed(tmp_path):
    proc, grpc_url, http_url, _ = launch(tmp_path, "--host", "0.0.0.0")
    try:
        output = launcher_output(proc)
        assert "beyond loopback: Triton's model-repository, shared-memory, logging, trace APIs are closed" in output
        assert re.search(r"ready on grpc 127\.0\.0\.1:\d+, http 127\.0\.0\.1:\d+, 1 models", output), \
            "the launcher itself still reads the repository index"
        assert infer(http_url, 0.0) == 200
        for path in ("/v2/repository/index", "/v2/repository/models/sleeper/unload", "/v2/logging",
                     "/v2/systemsharedmemory/region/r/register", "/v2/trace/setting"):
            assert post(http_url + path) == 403, path
        assert post(http_url + "/v2/repository/index", headers={launcher.ADMIN_HEADER: "guess"}) == 403

        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(grpc_url) as client:
            assert client.is_model_ready("sleeper")
            with pytest.raises(InferenceServerException, match="restricted"):
                client.unload_model("sleeper")
            with pytest.raises(InferenceServerException, match="restricted"):
                client.register_system_shared_memory("r", "/r", 8)
            # The client's shared memory: refused, nothing left in /dev/shm; `auto` falls back to plain gRPC for
            # good, `on` says why in one line.
            with pytest.raises(InferenceServerException, match="restricted"):
                SharedMemoryRegions(client, {"input": 8, "output": 4})
        assert not list(Path("/dev/shm").glob(f"mixsup_client_{os.getpid()}_*"))
        volume = np.zeros((1, 2, 2), np.int16)
        with SegmentationClient(grpc_url, model="sleeper") as auto:
            assert auto._shared_memory_regions(volume, False) is None and not auto._use_shared_memory
        with SegmentationClient(grpc_url, model="sleeper", shared_memory="on") as insisting:
            with pytest.raises(MixsupError, match="cannot use shared memory") as refused:
                insisting._shared_memory_regions(volume, False)
            assert "\n" not in str(refused.value)
    finally:
        assert stop_serve(proc) == 0, launcher_output(proc)



def test_a_server_started_by_a_killed_test_process_goes_with_it(tmp_path):
    """tests/triton_utils.start_serve sets a parent-death signal: SIGKILL the process that started the server
    (as a killed pytest run) and the launcher, Triton and its stubs all go."""
    repository = write_sleeper(tmp_path / "repo", tmp_path / "executing")
    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from triton_utils import launched_pids, start_serve\n"
              f"proc, _, _ = start_serve({str(repository)!r}, log_dir={str(tmp_path / 'logs')!r})\n"
              "print(proc.pid, *launched_pids(proc), flush=True)\n"
              "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split() if p != "None"]
        assert pids and all(is_running(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in pids if is_running(pid)]
