"""``mixsup-serve`` and its launcher (mixsup.serving.launcher / cli); the server tests run the real Triton."""
import os
import re
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from triton_utils import (
    free_ports,
    launcher_output,
    pixel_network_reference,
    serve_command,
    start_serve,
    stop_serve,
    write_pixel_network,
)

from mixsup.contract import ModelContract
from mixsup.errors import ServerUnavailable
from mixsup.repository import write_ensemble, write_network
from mixsup.serving import cli, launcher, processes
from mixsup.serving.runtime import openvino_installed
from mixsup.serving.tiling import slice_stacks

SHM = Path("/dev/shm")

# ------------------------------------------------------------------------------------------ without a server


def test_finds_a_tritonserver():
    assert os.access(launcher.find_tritonserver(), os.X_OK)


def test_backend_directory_links_the_stub_for_this_python(tmp_path):
    tritonserver = launcher.find_tritonserver()
    backends = launcher.prepare_backend_directory(tritonserver, tmp_path)
    if backends is None:
        pytest.skip("this tritonserver brings its own python backend")
    python_dir = backends / "python"
    names = sorted(p.name for p in python_dir.iterdir())
    assert names == sorted([*launcher.PYTHON_BACKEND_FILES, launcher.STUB_NAME])
    stub = (python_dir / launcher.STUB_NAME).resolve()
    assert stub.parent.name == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert os.access(stub, os.X_OK)
    with pytest.raises(ServerUnavailable, match="Python 2.7"):
        launcher.prepare_backend_directory(tritonserver, tmp_path / "old", python_version=(2, 7))


def test_server_environment_puts_this_venv_first():
    env = launcher.server_environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].endswith("/opt/lib")


def test_server_command(tmp_path):
    command = launcher.server_command(Path("/x/tritonserver"), tmp_path, "0.0.0.0", 1, 2, 3, "pre_",
                                      backend_directory=tmp_path / "backends")
    assert command[0] == "/x/tritonserver"
    for flag in (f"--model-repository={tmp_path}", "--grpc-port=1", "--http-port=2", "--metrics-port=3",
                 "--grpc-address=0.0.0.0", "--http-address=0.0.0.0", "--allow-gpu-metrics=false",
                 "--backend-config=python,shm-region-prefix-name=pre_", f"--backend-directory={tmp_path}/backends"):
        assert flag in command


def test_shm_prefixes_are_unique_and_safe():
    prefixes = {processes.new_shm_prefix() for _ in range(20)}
    assert len(prefixes) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", prefix) for prefix in prefixes)


def test_urls_for_wildcard_hosts(tmp_path):
    server = launcher.TritonProcess(tmp_path, host="0.0.0.0", grpc_port=5, http_port=6)
    assert (server.grpc_url, server.http_url) == ("127.0.0.1:5", "http://127.0.0.1:6")


def test_log_diagnosis_skips_cpu_noise_and_tables(tmp_path):
    log = tmp_path / "triton.log"
    log.write_text(
        'E1123 03:39:15.968690 13719 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        'E1123 03:39:17.989802 13719 backend_model.cc:692] "ERROR: Failed to create instance: boom\\n\\nAt:\\n"\n'
        'E1123 03:39:17.989939 13719 model_lifecycle.cc:642] "failed to load \'m\' version 1: boom"\n'
        "+------+\n| Model | Status |\n\n"
        "error: creating server: Internal - failed to load all models\n"
    )
    assert launcher.first_error(log) == "ERROR: Failed to create instance: boom"
    tail = launcher.read_tail(log, lines=2)
    assert tail.splitlines() == [log.read_text().splitlines()[2], "error: creating server: Internal - failed to "
                                 "load all models"]
    assert launcher.first_error(tmp_path / "missing.log") is None


def test_missing_repository_is_bad_usage(tmp_path, capsys):
    assert cli.main(["--model-repository", str(tmp_path / "nope")]) == 2
    assert "no such model repository" in capsys.readouterr().err


def test_default_repository_is_the_checkouts():
    found = cli.default_model_repository()
    assert found is None or found == Path(cli.mixsup.__file__).resolve().parents[1] / "model_repository"


# ------------------------------------------------------------------------------------------ with a server

WEIGHTS = {"alpha": 1.0, "beta": 3.0}
PATCHES = {"alpha": (32, 32), "beta": (24, 40)}


def pixel_parameters(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    return rng.normal(0, 0.01, (3, 3)), rng.normal(0, 1, 3)


def build_repository(root, members, device="cpu"):
    """Pixel networks in one ensemble, on ONNX Runtime's float32 by default: the tests check the window and fuse
    steps' arithmetic against numpy to 1e-4."""
    for name in members:
        weight, bias = pixel_parameters(name)
        onnx_path = write_pixel_network(root / f"{name}.onnx", weight, bias)
        write_network(root / "repo", name, onnx_path, ModelContract(patch_size=PATCHES[name], recipe="pixel"),
                      batch_size=4, device=device)
    write_ensemble(root / "repo", [(name, WEIGHTS[name]) for name in members])
    return root / "repo"


def expected_output(volume, members):
    stacks = slice_stacks(volume.astype(np.float32))
    total = sum(WEIGHTS[name] for name in members)
    probs = sum(WEIGHTS[name] / total * pixel_network_reference(stacks, *pixel_parameters(name)) for name in members)
    return probs.transpose(1, 0, 2, 3)  # [C,D,H,W]


def segment(grpc_url, volume, outputs=("labels", "probabilities")):
    import tritonclient.grpc as grpcclient

    from mixsup.clients.protocol import request_parameters

    with grpcclient.InferenceServerClient(grpc_url) as client:
        request = grpcclient.InferInput("volume", list(volume.shape), "INT16")
        request.set_data_from_numpy(volume)
        result = client.infer("segment", [request], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                              parameters=request_parameters("probabilities" in outputs))
        return [result.as_numpy(o) for o in outputs]


@pytest.fixture(scope="module")
def ensemble_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    repository = build_repository(root, ["alpha", "beta"])
    proc, grpc_url, http_url = start_serve(repository, log_dir=root / "logs")
    yield grpc_url
    stop_serve(proc)


@pytest.mark.triton
def test_segment_matches_the_whole_image_computation(ensemble_server):
    volume = np.random.default_rng(5).integers(-200, 250, (5, 40, 50)).astype(np.int16)
    labels, probs = segment(ensemble_server, volume)
    expected = expected_output(volume, ["alpha", "beta"])
    assert labels.dtype == np.uint8 and labels.shape == volume.shape
    assert probs.dtype == np.float16 and probs.shape == (3, *volume.shape)
    np.testing.assert_allclose(probs.astype(np.float64), expected, atol=1e-3, rtol=0)
    top2 = np.sort(expected, axis=0)[-2:]
    clear = top2[1] - top2[0] > 2e-3  # away from ties, fp16 cannot flip the argmax
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], np.argmax(expected, axis=0)[clear])
    assert len(np.unique(labels)) > 1  # the weights give a non-trivial label map


@pytest.mark.triton
@pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed (the serve extra installs it)")
def test_openvino_serves_the_same_segmentation_to_bfloat16_precision(tmp_path):
    """A repository on OpenVINO (what device auto picks on a CPU host) answers like the float32 computation to
    bfloat16's precision, and the server's log names the engine that ran it."""
    repository = build_repository(tmp_path, ["alpha", "beta"], device="openvino")
    proc, grpc_url, _ = start_serve(repository, log_dir=tmp_path / "logs")
    try:
        volume = np.random.default_rng(5).integers(-200, 250, (5, 40, 50)).astype(np.int16)
        labels, probs = segment(grpc_url, volume)
    finally:
        assert stop_serve(proc) == 0
    expected = expected_output(volume, ["alpha", "beta"])
    np.testing.assert_allclose(probs.astype(np.float64), expected, atol=0.02, rtol=0)
    top2 = np.sort(expected, axis=0)[-2:]
    clear = top2[1] - top2[0] > 0.05
    assert clear.mean() > 0.5 and len(np.unique(labels)) > 1
    np.testing.assert_array_equal(labels[clear], np.argmax(expected, axis=0)[clear])
    log = "".join(path.read_text() for path in (tmp_path / "logs").glob("*.log"))
    assert "alpha: network on openvino (" in log and "beta: network on openvino (" in log


@pytest.mark.triton
def test_contract_is_in_the_ensemble_config(ensemble_server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(ensemble_server) as client:
        config = client.get_model_config("segment", as_json=True)["config"]
    contract = ModelContract.from_json(config["parameters"]["contract"]["string_value"])
    assert contract.class_names == ("background", "liver", "lesion")
    assert [m["name"] for m in contract.extra["ensemble_members"]] == ["alpha", "beta"]


@pytest.mark.triton
def test_bad_request_errors_and_the_next_one_succeeds(ensemble_server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="volume"):
        segment(ensemble_server, np.zeros((40, 50), np.int16))
    labels, probs = segment(ensemble_server, np.zeros((0, 40, 50), np.int16))  # empty in, empty out
    assert labels.shape == (0, 40, 50) and probs.shape == (3, 0, 40, 50)
    volume = np.full((2, 20, 20), 100, np.int16)  # smaller than both patch sizes
    (labels,) = segment(ensemble_server, volume, outputs=("labels",))
    np.testing.assert_array_equal(labels, np.argmax(expected_output(volume, ["alpha", "beta"]), axis=0))


@pytest.mark.triton
def test_sigterm_stops_cleanly_and_removes_shared_memory(tmp_path):
    repository = build_repository(tmp_path, ["alpha"])
    started = time.monotonic()
    proc, grpc_url, http_url = start_serve(repository, log_dir=tmp_path / "logs")
    print(f"start-to-ready: {time.monotonic() - started:.2f} s")
    try:
        assert segment(grpc_url, np.zeros((1, 32, 32), np.int16), outputs=("labels",))[0].shape == (1, 32, 32)
        regions = list(SHM.glob(f"mixsup_serve_{proc.pid}_*"))
        assert regions, "the python backend should map shared memory with this launch's prefix"
        assert re.search(r"ready on grpc 127\.0\.0\.1:\d+, http 127\.0\.0\.1:\d+, 3 models", launcher_output(proc))
        assert "APIs are closed" not in launcher_output(proc)  # loopback (the default) keeps them open
        index = urllib.request.Request(http_url + "/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(index, timeout=10) as response:
            assert response.status == 200
    finally:
        code = stop_serve(proc)
    assert code == 0, launcher_output(proc)
    assert not list(SHM.glob(f"mixsup_serve_{proc.pid}_*"))


@pytest.mark.triton
def test_server_dying_after_start_exits_1(tmp_path):
    proc, _, _ = start_serve(build_repository(tmp_path, ["alpha"]), log_dir=tmp_path / "logs")
    try:
        server_pid = int(re.search(r"\(pid (\d+),", launcher_output(proc)).group(1))
        os.kill(server_pid, 9)
        proc.wait(60)
    finally:
        stop_serve(proc)
    assert proc.returncode == 1
    assert "tritonserver stopped on its own" in launcher_output(proc)
    assert not list(SHM.glob(f"mixsup_serve_{proc.pid}_*"))


def write_python_model(repository, name, initialize_body):
    """A bare python-backend model whose initialize runs ``initialize_body``."""
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    (repository / name / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        f"    def initialize(self, args):\n        {initialize_body}\n"
        "    def execute(self, requests):\n        return []\n")


def run_serve(repository, *args, timeout=120):
    ports = free_ports(3)
    return subprocess.run(serve_command(repository, *ports, extra_args=args), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.triton
def test_model_that_fails_to_load_exits_3_with_the_log_tail(tmp_path):
    write_python_model(tmp_path, "broken", 'raise RuntimeError("weights are corrupt")')
    result = run_serve(tmp_path, "--log-file", str(tmp_path / "triton.log"))
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mixsup-serve: error: tritonserver exited with code") and "triton.log" in last
    assert "RuntimeError: weights are corrupt" in last  # the cause, picked out of the server log
    assert "last 20 lines of" in result.stderr and "failed to load all models" in result.stderr


@pytest.mark.triton
def test_never_ready_server_times_out_with_exit_3(tmp_path):
    write_python_model(tmp_path, "slow", "import time; time.sleep(600)")
    result = run_serve(tmp_path, "--startup-timeout", "3", "--log-file", str(tmp_path / "triton.log"))
    assert result.returncode == 3, result.stderr
    assert "not ready after 3 s" in result.stderr.strip().splitlines()[-1]
    assert "last 20 lines of" in result.stderr
