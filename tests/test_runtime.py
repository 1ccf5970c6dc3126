"""ONNX Runtime sessions and execution-provider choice (mixsup.serving.runtime), and the helpers the Triton
adapters use to run dynamically batched requests (mixsup.serving.triton.common)."""
import numpy as np
import onnxruntime as ort
import pytest
from triton_utils import pixel_network_reference, write_pixel_network

from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.repository import ONNXRUNTIME, write_network
from mixsup.serving.runtime import (
    CPU,
    CUDA,
    OPENVINO,
    TENSORRT,
    OpenVinoSession,
    choose_providers,
    create_session,
    openvino_installed,
    uses_openvino,
)
from mixsup.serving.triton.common import (
    NetworkRunner,
    model_parameters,
    network_beside,
    one_line,
    open_session,
    parse_ints,
    predict_grouped,
)

GPU_PROVIDERS = [TENSORRT, CUDA, CPU]


def test_cpu_only_host():
    assert choose_providers([CPU]) == [CPU]
    assert choose_providers([CPU, "AzureExecutionProvider"], "auto") == [CPU]
    assert choose_providers(GPU_PROVIDERS, "cpu") == [CPU]


def test_auto_prefers_tensorrt_then_cuda_and_keeps_cpu_last():
    providers = choose_providers(GPU_PROVIDERS, "auto", trt_cache_dir="/cache/trt", fp16=True)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [TENSORRT, CUDA, CPU]
    assert providers[0][1] == {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                               "trt_engine_cache_path": "/cache/trt"}
    assert choose_providers([CUDA, CPU], "auto") == [CUDA, CPU]


def test_explicit_devices():
    assert choose_providers(GPU_PROVIDERS, "cuda") == [CUDA, CPU]
    providers = choose_providers(GPU_PROVIDERS, "tensorrt")
    assert providers[0] == (TENSORRT, {"trt_fp16_enable": False}) and providers[1:] == [CUDA, CPU]


@pytest.mark.parametrize("available, device", [([CPU], "cuda"), ([CPU], "tensorrt"), ([CUDA, CPU], "tensorrt"),
                                               (GPU_PROVIDERS, "gpu")])
def test_unavailable_or_unknown_device_is_a_clear_error(available, device):
    with pytest.raises(ValueError, match=device):
        choose_providers(available, device)


@pytest.fixture
def pixel_net(tmp_path):
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(0, 0.01, (3, 3)), rng.normal(0, 1, 3)
    return write_pixel_network(tmp_path / "net.onnx", weight, bias), weight, bias


def test_cpu_session_runs_the_model(pixel_net):
    path, weight, bias = pixel_net
    session = create_session(path, device="cpu", intra_op_threads=1)
    assert session.get_providers() == [CPU]
    tiles = np.random.default_rng(0).uniform(-200, 250, (2, 3, 8, 8)).astype(np.float32)
    (probs,) = session.run(None, {"input": tiles})
    np.testing.assert_allclose(probs, pixel_network_reference(tiles, weight, bias), atol=1e-5)


def test_openvino_is_auto_on_a_cpu_host_only_and_never_replaces_an_explicit_device():
    assert uses_openvino("auto", [CPU], openvino=True)
    assert not uses_openvino("auto", [CPU], openvino=False)  # not installed: ONNX Runtime's CPU provider
    assert not uses_openvino("auto", [CUDA, CPU], openvino=True)  # a GPU host keeps its GPU
    assert not uses_openvino("auto", GPU_PROVIDERS, openvino=True)
    assert not uses_openvino("cpu", [CPU], openvino=True)  # "cpu" is ONNX Runtime's exact float32, always
    assert uses_openvino(OPENVINO, GPU_PROVIDERS, openvino=True)
    with pytest.raises(ValueError, match="OpenVINO is not installed"):
        uses_openvino(OPENVINO, [CPU], openvino=False)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        uses_openvino("gpu", [CPU], openvino=True)


@pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed (the serve extra installs it)")
def test_openvino_session_runs_the_model_like_onnxruntime(pixel_net):
    path, weight, bias = pixel_net
    session = create_session(path, device=OPENVINO, intra_op_threads=1)
    assert isinstance(session, OpenVinoSession)
    assert [t.name for t in session.get_inputs()] == ["input"]
    assert [t.name for t in session.get_outputs()] == ["probabilities"]
    assert session.precision in ("bf16", "f32") and session.get_providers() == [f"openvino ({session.precision})"]
    reference = create_session(path, device="cpu")
    for shape in [(2, 3, 8, 8), (5, 3, 16, 24)]:  # dynamic batch and size
        tiles = np.random.default_rng(0).uniform(-200, 250, shape).astype(np.float32)
        (probs,) = session.run(None, {"input": tiles})
        (by_name,) = session.run(["probabilities"], {"input": tiles})
        assert probs.dtype == np.float32 and probs.shape == shape
        np.testing.assert_array_equal(probs, by_name)
        # bfloat16 keeps 8 significant bits: probabilities agree to about 1%
        np.testing.assert_allclose(probs, reference.run(None, {"input": tiles})[0], atol=0.02)
        np.testing.assert_allclose(probs, pixel_network_reference(tiles, weight, bias), atol=0.02)
    with pytest.raises(ValueError, match="no tensor .labels."):
        session.run(["labels"], {"input": tiles})


def test_create_session_on_unavailable_device_fails(pixel_net):
    if CUDA in ort.get_available_providers():
        pytest.skip("this host has CUDA")
    with pytest.raises(ValueError, match="cuda"):
        create_session(pixel_net[0], device="cuda")


@pytest.mark.gpu
def test_cuda_session_matches_cpu(pixel_net, tmp_path):
    if CUDA not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider (install onnxruntime-gpu on a CUDA host)")
    path, weight, bias = pixel_net
    session = create_session(path, device="cuda", trt_cache_dir=tmp_path / "trt")
    assert session.get_providers()[0] in (TENSORRT, CUDA)
    tiles = np.random.default_rng(0).uniform(-200, 250, (4, 3, 32, 32)).astype(np.float32)
    (probs,) = session.run(None, {"input": tiles})
    np.testing.assert_allclose(probs, pixel_network_reference(tiles, weight, bias), atol=1e-4)


def test_predict_grouped_runs_each_shape_once_and_splits_back():
    calls = []

    def predict(batch):
        calls.append(batch.shape)
        return batch * 2

    batches = [np.full((n, 3, h, h), i, np.float32) for i, (n, h) in enumerate([(2, 4), (1, 8), (3, 4)])]
    results = predict_grouped(predict, batches)
    assert sorted(calls) == [(1, 3, 8, 8), (5, 3, 4, 4)]
    for batch, result in zip(batches, results):
        np.testing.assert_array_equal(result, batch * 2)


def test_predict_grouped_reports_a_failing_group_per_request():
    def predict(batch):
        if batch.shape[-1] == 8:
            raise RuntimeError("boom")
        return batch

    results = predict_grouped(predict, [np.zeros((1, 3, 4, 4)), np.zeros((2, 3, 8, 8)), np.zeros((1, 3, 8, 8))])
    assert isinstance(results[0], np.ndarray)
    assert all(isinstance(r, RuntimeError) for r in results[1:])


def test_adapter_helpers():
    config = {"parameters": {"ROI": {"string_value": "160, 128"}, "EMPTY": {}}}
    assert model_parameters(config) == {"ROI": "160, 128", "EMPTY": ""}
    assert parse_ints("160, 128") == (160, 128)
    assert one_line(InputError("volume is empty\nmore")) == "volume is empty"
    assert one_line(ValueError("bad\nmore")) == "ValueError: bad"


def test_window_step_finds_the_python_network_beside_it_with_that_models_settings(pixel_net, tmp_path):
    """The window step runs its network in its own process only where the repository holds that network as a
    python-backend ONNX model, opened with that model's parameters at the version Triton serves (the highest);
    a network of a native runtime, or one not beside the window (a localized cloud repository), is None."""
    path, weight, bias = pixel_net
    repo = tmp_path / "repo"
    contract = ModelContract(patch_size=(8, 8))
    write_network(repo, "own", path, contract, device="cpu", intra_op_threads=1)
    write_network(repo, "native", path, contract, runtime=ONNXRUNTIME)
    assert network_beside(repo / "native_window", "native") is None
    assert network_beside(tmp_path / "elsewhere" / "own_window", "own") is None
    version_dir, parameters = network_beside(repo / "own_window", "own")
    assert version_dir == repo / "own" / "1"
    assert (parameters["DEVICE"], parameters["INTRA_OP_THREADS"]) == ("cpu", "1")
    # its own TensorRT engine cache: the network model builds the same engine at the same time
    assert parameters["TRT_CACHE_DIR"] == str(version_dir / "trt_cache" / "window")
    (repo / "own" / "2").mkdir()
    (repo / "own" / "2" / "model.onnx").write_bytes(path.read_bytes())
    (repo / "own" / "3").mkdir()  # a version without a model is not one Triton serves
    assert network_beside(repo / "own_window", "own")[0] == repo / "own" / "2"

    run = NetworkRunner(ModelContract.load(version_dir), open_session(version_dir, parameters))
    assert run.session.get_providers() == [CPU]
    run.warm_up()
    stacks = np.random.default_rng(1).uniform(-200, 250, (2, 3, 8, 8))
    probabilities = run(stacks)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, pixel_network_reference(stacks, weight, bias), atol=1e-5)


def test_serving_code_never_imports_torch():
    """What runs inside Triton's python backend (or launches it) must not need torch or tritonclient there.
    mixsup.repository is export-side (it builds configs with tritonclient's ModelConfig) and is not listed; a window
    step that runs its network in step reads that network's config with it, at load, not at import."""
    import subprocess
    import sys

    code = (
        "import sys, types\n"
        "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils')\n"
        "import mixsup.serving.cli, mixsup.serving.launcher, mixsup.serving.tiling\n"
        "import mixsup.serving.fuse, mixsup.serving.runtime\n"
        "import mixsup.serving.triton.network, mixsup.serving.triton.window, mixsup.serving.triton.fuse\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'tritonclient' not in sys.modules, 'tritonclient was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
