"""mixsup-export: checkpoint -> ONNX (fp32, fp16), TorchScript or TensorRT with the HU window inside, contract
beside it, repository entries; the python-backend configs served by the real Triton."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from triton_utils import start_serve, stop_serve
from tritonclient.grpc import model_config_pb2

from mixsup.clients.client import SegmentationClient
from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.export.onnx_export import onnx_probabilities, torch_probabilities
from mixsup.export.tensorrt_export import tensorrt_unavailable_reason
from mixsup.export.torchscript_export import torchscript_probabilities
from mixsup.repository import write_config
from mixsup.serving.runtime import create_session
from mixsup.serving.tiling import predict_volume_probabilities
from mixsup.training.trainer import load_checkpoint, network_from_checkpoint

# TorchScript is what Triton's pytorch_libtorch backend loads; torch's notices that it is deprecated are not news.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def read_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def files_under(root):
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} if root.exists() else {}


def raw_hu(seed, shapes):
    """Raw-HU stacks of several shapes, well beyond the HU window on both sides."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1100, 1500, (n, 3, h, w)).astype(np.float32) for n, h, w in shapes]


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    assert export_main([str(tiny_checkpoint), "--repository", str(repo), "--name", "unet"]) == 0
    return repo


def test_onnx_matches_pytorch(repository, tiny_checkpoint):
    network = network_from_checkpoint(load_checkpoint(tiny_checkpoint))
    session = ort.InferenceSession(str(repository / "unet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    # A size other than the export's example and the patch: height and width are dynamic.
    hu = np.random.default_rng(3).uniform(-1100, 1500, size=(3, 3, 56, 72)).astype(np.float32)
    (onnx_probabilities,) = session.run(["probabilities"], {"input": hu})
    with torch.no_grad():
        torch_probabilities = torch.softmax(network(torch.from_numpy(hu)), dim=1).numpy()
    assert np.abs(onnx_probabilities - torch_probabilities).max() <= 1e-4
    assert np.allclose(onnx_probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_graph_takes_raw_hu(repository):
    session = ort.InferenceSession(str(repository / "unet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    above_window = np.full((1, 3, 48, 48), 250.0, np.float32)
    (at_top,) = session.run(None, {"input": above_window})
    (far_above,) = session.run(None, {"input": above_window + 2000.0})
    assert np.array_equal(at_top, far_above)  # clipping to [-200, 250] happens inside the graph


def test_contract_and_entries(repository, tiny_checkpoint):
    contract = ModelContract.load(repository / "unet" / "1" / "contract.json")
    assert contract.opset == 17 and contract.patch_size == (48, 48) and contract.recipe == "unet"
    assert contract.checkpoint.startswith(f"{tiny_checkpoint.name} sha256:")
    for entry in ["unet_window", "segment"]:
        assert (repository / entry / "config.pbtxt").is_file()
    assert not (repository / "fuse").exists()  # one network: its window step gives the labels
    segment = (repository / "segment" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in segment and "unet_window" in segment


def test_test_spacings_reach_the_network_and_ensemble_contracts(tiny_checkpoint, tmp_path):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "net",
                        "--test-spacings", "1.3", "1.6", "2"]) == 0
    network = ModelContract.load(tmp_path / "net" / "1" / "contract.json")
    ensemble = ModelContract.from_json(read_config(tmp_path / "segment" / "config.pbtxt")
                                       .parameters["contract"].string_value)
    for contract in (network, ensemble):
        assert contract.test_spacings_mm == (1.3, 1.6, 2.0)
        assert contract.run_spacings_mm == ((1.3, 1.3), (1.6, 1.6), (2.0, 2.0))


def test_bad_checkpoint_exits_2_and_writes_nothing(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    repo = tmp_path / "repo"
    assert export_main([str(bogus), "--repository", str(repo), "--name", "x"]) == 2
    assert not repo.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_patch_size_must_fit_the_network(tiny_checkpoint, tmp_path):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path / "r"), "--name", "x",
                        "--patch-size", "50"]) == 2


# ------------------------------------------------------------------------------------------ formats, precisions


@pytest.fixture(scope="module")
def network(tiny_checkpoint):
    return network_from_checkpoint(load_checkpoint(tiny_checkpoint))


def test_fp16_onnx_is_half_size_and_close_to_fp32(tiny_checkpoint, network, tmp_path):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "half",
                        "--precision", "fp16", "--no-ensemble"]) == 0
    path = tmp_path / "half" / "1" / "model.onnx"
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]  # convolution kernels
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    # the contract's boundary is unchanged: float32 raw HU in, float32 probabilities out
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    assert ModelContract.load(path.parent).precision == "fp16"
    config = read_config(tmp_path / "half" / "config.pbtxt")
    assert config.backend == "python" and config.input[0].data_type == model_config_pb2.TYPE_FP32
    for hu in raw_hu(5, [(2, 48, 48), (1, 64, 40)]):
        half, full = onnx_probabilities(path, hu), torch_probabilities(network, hu)
        assert 0 < np.abs(half - full).max() <= 1e-2  # not bit-identical: the math really is float16
        assert np.allclose(half.sum(axis=1), 1.0, atol=1e-3)
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "full", "--no-ensemble"]) == 0
    assert path.stat().st_size < 0.6 * (tmp_path / "full" / "1" / "model.onnx").stat().st_size


def test_torchscript_export(tiny_checkpoint, network, tmp_path):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "ts",
                        "--format", "torchscript"]) == 0
    version = tmp_path / "ts" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["contract.json", "model.pt"]  # no python adapter
    contract = ModelContract.load(version)
    assert (contract.opset, contract.precision, contract.recipe) == (None, "fp32", "unet")
    config = read_config(tmp_path / "ts" / "config.pbtxt")
    assert (config.platform, config.max_batch_size) == ("pytorch_libtorch", 16)
    assert [s.model_name for s in read_config(tmp_path / "segment" / "config.pbtxt").ensemble_scheduling.step] == [
        "ts_window"]
    above_window = np.full((1, 3, 48, 48), 250.0, np.float32)
    at_top = torchscript_probabilities(version / "model.pt", above_window)
    assert np.array_equal(at_top, torchscript_probabilities(version / "model.pt", above_window + 2000.0))
    for hu in raw_hu(6, [(3, 56, 72), (1, 32, 96)]):
        scripted = torchscript_probabilities(version / "model.pt", hu)
        assert np.abs(scripted - torch_probabilities(network, hu)).max() <= 1e-4


def test_native_onnxruntime_with_tensorrt_accelerator(tiny_checkpoint, tmp_path):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "ort",
                        "--backend", "onnxruntime", "--tensorrt-accelerator", "--precision", "fp16"]) == 0
    config = read_config(tmp_path / "ort" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/tmp/mixsup_trt_cache/ort",
        "trt_profile_min_shapes": "input:1x3x8x8", "trt_profile_opt_shapes": "input:8x3x48x48",
        "trt_profile_max_shapes": "input:16x3x512x512"}
    # TensorRT gets the float32 graph and makes its own fp16 kernels; the contract says what runs
    weights = [t for t in onnx.load(str(tmp_path / "ort" / "1" / "model.onnx")).graph.initializer if len(t.dims) == 4]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in weights)
    assert ModelContract.load(tmp_path / "ort" / "1").precision == "fp16"
    assert not (tmp_path / "ort" / "1" / "model.py").exists()


def test_tensorrt_without_tensorrt_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a CUDA GPU are here: the engine path runs instead of this error")
    repository = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--repository", str(repository), "--name", "trt",
                        "--format", "tensorrt", "--precision", "fp16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mixsup-export: error: --format tensorrt needs TensorRT and a CUDA GPU")
    assert not repository.exists()


def run_engine(plan_path, input_name: str, hu: np.ndarray) -> np.ndarray:
    """Run a serialized TensorRT engine on CUDA (torch tensors hold the buffers) and return its probabilities."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    context.set_input_shape(input_name, hu.shape)
    source = torch.from_numpy(hu).cuda().contiguous()
    output_name = next(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                       if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT)
    result = torch.empty(tuple(context.get_tensor_shape(output_name)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(input_name, source.data_ptr())
    context.set_tensor_address(output_name, result.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return result.cpu().numpy()


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 1e-2)])
def test_tensorrt_engine_matches_onnx(tiny_checkpoint, tmp_path, precision, tolerance):
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(f"TensorRT engine path: {reason}")
    repository = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--repository", str(repository), "--name", "trt",
                        "--format", "tensorrt", "--precision", precision]) == 0
    config = read_config(repository / "trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    onnx_repository = tmp_path / "onnx"
    assert export_main([str(tiny_checkpoint), "--repository", str(onnx_repository), "--name", "net"]) == 0
    for hu in raw_hu(7, [(1, 48, 48), (4, 64, 96)]):
        expected = onnx_probabilities(onnx_repository / "net" / "1" / "model.onnx", hu)
        got = run_engine(repository / "trt" / "1" / "model.plan", "input", hu)
        assert np.abs(got - expected).max() <= tolerance


def test_taken_name_is_refused_unless_replace(tiny_checkpoint, tmp_path, capsys):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "net"]) == 0
    before = files_under(tmp_path)
    capsys.readouterr()
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "net",
                        "--format", "torchscript"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "already exists" in line and "--replace" in line
    assert files_under(tmp_path) == before
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "net",
                        "--format", "torchscript", "--replace"]) == 0
    assert sorted(p.name for p in (tmp_path / "net" / "1").iterdir()) == ["contract.json", "model.pt"]
    assert read_config(tmp_path / "net" / "config.pbtxt").platform == "pytorch_libtorch"


@pytest.mark.parametrize("flags", [["--format", "torchscript", "--precision", "fp16"],
                                   ["--tensorrt-accelerator"],
                                   ["--format", "torchscript", "--backend", "python"],
                                   ["--backend", "python", "--tensorrt-accelerator"],
                                   ["--trt-cache-dir", "/cache"],
                                   ["--format", "pmml"], ["--precision", "int8"],
                                   ["--test-spacings", "0"], ["--test-spacings", "1.3", "-2"],
                                   ["--teacher", "--test-spacings", "1.3"]])
def test_meaningless_flags_exit_2(tiny_checkpoint, tmp_path, capsys, flags):
    repository = tmp_path / "repo"
    try:
        code = export_main([str(tiny_checkpoint), "--repository", str(repository), "--name", "x", *flags])
    except SystemExit as exc:  # argparse's own refusal of an unknown choice (usage line + error line)
        code = exc.code
    else:
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert code == 2
    assert not repository.exists()


# ------------------------------------------------------------------------------------------ the real server


@pytest.mark.triton
def test_python_backend_configs_load_and_answer_in_triton(tiny_checkpoint, network, tmp_path):
    """The configs that run here (ONNX Runtime in the python backend, fp32 and fp16) load in the real Triton,
    answer on the network models directly and through the ensemble over both. ``--device cpu``: the answers
    are compared with ONNX Runtime's float32 in process. One window step runs its network in its own process
    (what export writes), the other calls it over BLS (what a native runtime's network gets)."""
    repository = tmp_path / "repo"
    for name, precision in [("full", "fp32"), ("half", "fp16")]:
        assert export_main([str(tiny_checkpoint), "--repository", str(repository), "--name", name,
                            "--precision", precision, "--member", "segment", "--device", "cpu"]) == 0
    over_bls = read_config(repository / "half_window" / "config.pbtxt")
    over_bls.parameters["NETWORK_IN_STEP"].string_value = "false"
    write_config(repository / "half_window" / "config.pbtxt", over_bls)
    tiles = raw_hu(8, [(3, 48, 48)])[0]
    volume = np.random.default_rng(9).integers(-300, 400, size=(4, 40, 56)).astype(np.int16)
    process, grpc_url, _ = start_serve(repository, log_dir=tmp_path / "logs")
    try:
        served = {}
        with grpcclient.InferenceServerClient(grpc_url) as client:
            for name in ("full", "half"):
                request = grpcclient.InferInput("input", list(tiles.shape), "FP32")
                request.set_data_from_numpy(tiles)
                served[name] = client.infer(name, [request]).as_numpy("probabilities")
        with SegmentationClient(grpc_url) as segmenter:
            labels, probabilities = segmenter.segment_volume(volume, want_probabilities=True)
    finally:
        assert stop_serve(process) == 0
    log = "\n".join(path.read_text(errors="replace") for path in (tmp_path / "logs").iterdir())
    assert "full_window: full runs in this step" in log and "half_window: half runs" not in log
    expected = torch_probabilities(network, tiles)
    assert np.abs(served["full"] - expected).max() <= 1e-4
    assert np.abs(served["half"] - expected).max() <= 1e-2
    members = []
    for name in ("full", "half"):
        session = create_session(repository / name / "1" / "model.onnx", device="cpu")
        contract = ModelContract.load(repository / name / "1")
        members.append(predict_volume_probabilities(volume, lambda t: session.run(None, {"input": t})[0], (48, 48),
                                                    num_classes=3, size_divisor=contract.size_divisor)
                       .astype(np.float32))
    assert labels.shape == volume.shape and probabilities.shape == (3, *volume.shape)
    assert np.abs(probabilities.astype(np.float32) - np.mean(members, axis=0)).max() < 2e-3
