"""Writing Triton model-repository entries (mixsup.repository); configs are parsed with Triton's own schema."""
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from triton_utils import write_pixel_network
from tritonclient.grpc import model_config_pb2

from mixsup.contract import ModelContract, TensorSpec
from mixsup.errors import InputError
from mixsup.repository import (
    LIBTORCH,
    ONNXRUNTIME,
    PYTHON,
    RUNTIMES,
    TENSORRT_PLAN,
    ShapeProfile,
    TensorRTAccelerator,
    list_ensembles,
    list_networks,
    read_ensemble,
    write_auxiliary,
    write_ensemble,
    write_network,
)

COMMITTED = Path(__file__).resolve().parents[1] / "model_repository"
KIND = model_config_pb2.ModelInstanceGroup.Kind.Value

FP32, FP16, INT16, UINT8, INT64 = (model_config_pb2.DataType.Value(t) for t in ("TYPE_FP32", "TYPE_FP16",
                                                                                "TYPE_INT16", "TYPE_UINT8",
                                                                                "TYPE_INT64"))


def read_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def parameters(config):
    return {key: value.string_value for key, value in config.parameters.items()}


@pytest.fixture
def onnx_file(tmp_path):
    return write_pixel_network(tmp_path / "net.onnx", np.eye(3), np.zeros(3))


@pytest.fixture
def contract():
    return ModelContract(patch_size=(32, 48), recipe="unet", checkpoint="ck.pt")


def test_network_entry(tmp_path, onnx_file, contract):
    repo = tmp_path / "repo"
    write_network(repo, "student", onnx_file, contract, instance_count=2, max_batch_size=16, device="cpu")
    version = repo / "student" / "1"
    assert (version / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert ModelContract.load(version) == contract
    assert "from mixsup.serving.triton.network import TritonPythonModel" in (version / "model.py").read_text()
    config = read_config(repo / "student" / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("student", "python", 16)
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", FP32, [3, -1, -1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probabilities", FP32, [3, -1, -1])]
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    assert parameters(config)["DEVICE"] == "cpu"


def test_window_entry(tmp_path, onnx_file, contract):
    write_network(tmp_path, "student", onnx_file, contract, overlap=0.5, batch_size=4, sigma_scale=0.25)
    assert "mixsup.serving.triton.window import TritonPythonModel" in (
        tmp_path / "student_window" / "1" / "model.py").read_text()
    config = read_config(tmp_path / "student_window" / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("student_window", "python", 0)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("volume", INT16, [-1, -1, -1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probabilities", FP16, [-1] * 4),
                                                                             ("labels", UINT8, [-1] * 3)]
    params = parameters(config)
    assert params["NETWORK"] == "student" and params["ROI"] == "32,48"
    assert (float(params["OVERLAP"]), int(params["BATCH_SIZE"]), float(params["SIGMA_SCALE"])) == (0.5, 4, 0.25)
    assert (int(params["NUM_CLASSES"]), int(params["CONTEXT_SLICES"])) == (3, 3)
    assert params["NETWORK_IN_STEP"] == "true"  # a python-runtime network runs in the window step's process
    write_network(tmp_path, "busy", onnx_file, contract, instance_count=3)
    assert read_config(tmp_path / "busy_window" / "config.pbtxt").instance_group[0].count == 3


def test_external_onnx_data_is_copied(tmp_path):
    model = onnx.load(str(write_pixel_network(tmp_path / "net.onnx", np.eye(3), np.zeros(3))))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    write_network(tmp_path / "repo", "ext", tmp_path / "ext.onnx", ModelContract())
    assert (tmp_path / "repo" / "ext" / "1" / "ext.onnx.data").read_bytes() == (tmp_path / "ext.onnx.data").read_bytes()
    onnx.checker.check_model(str(tmp_path / "repo" / "ext" / "1" / "model.onnx"))  # resolves its external data


def test_ensemble(tmp_path, onnx_file, contract):
    write_network(tmp_path, "a", onnx_file, contract)
    write_network(tmp_path, "b", onnx_file, contract.replace(patch_size=(64, 64), recipe="msdn"))
    write_ensemble(tmp_path, [("a", 1.0), ("b", 3.0)])

    fuse = read_config(tmp_path / "fuse" / "config.pbtxt")
    assert (fuse.backend, fuse.max_batch_size) == ("python", 0)
    assert [(t.name, t.data_type, len(t.dims)) for t in fuse.input] == [("probabilities_0", FP16, 4),
                                                                       ("probabilities_1", FP16, 4)]
    assert [(t.name, t.data_type) for t in fuse.output] == [("labels", UINT8), ("probabilities", FP16)]
    assert [float(w) for w in parameters(fuse)["WEIGHTS"].split(",")] == [1.0, 3.0]
    assert "mixsup.serving.triton.fuse import" in (tmp_path / "fuse" / "1" / "model.py").read_text()

    segment = read_config(tmp_path / "segment" / "config.pbtxt")
    assert (segment.platform, segment.max_batch_size) == ("ensemble", 0)
    assert [(t.name, t.data_type, list(t.dims)) for t in segment.input] == [("volume", INT16, [-1, -1, -1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in segment.output] == [
        ("labels", UINT8, [-1, -1, -1]), ("probabilities", FP16, [-1, -1, -1, -1])]
    steps = segment.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["a_window", "b_window", "fuse"]
    assert dict(steps[1].input_map) == {"volume": "volume"}
    assert dict(steps[1].output_map) == {"probabilities": "probabilities_1"}
    assert dict(steps[2].input_map) == {"probabilities_0": "probabilities_0", "probabilities_1": "probabilities_1"}
    assert dict(steps[2].output_map) == {"labels": "labels", "probabilities": "probabilities"}
    assert (tmp_path / "segment" / "1").is_dir()

    shared = ModelContract.from_json(parameters(segment)["contract"])
    assert shared.class_names == contract.class_names and shared.spacing_mm == contract.spacing_mm
    members = shared.extra["ensemble_members"]
    assert [(m["name"], m["weight"], m["patch_size"], m["recipe"]) for m in members] == [
        ("a", 1.0, [32, 48], "unet"), ("b", 3.0, [64, 64], "msdn")]


def test_contract_with_quotes_survives_the_config(tmp_path, onnx_file):
    tricky = ModelContract(recipe='say "hi" \\ back\nslash', class_names=("bg", "lèber", "lesion"))
    write_network(tmp_path, "a", onnx_file, tricky)
    write_ensemble(tmp_path)
    assert ModelContract.from_json(parameters(read_config(tmp_path / "segment" / "config.pbtxt"))["contract"]
                                   ).recipe == tricky.recipe


def test_default_members_are_every_network(tmp_path, onnx_file, contract):
    for name in ("b", "a"):
        write_network(tmp_path, name, onnx_file, contract)
    assert list_networks(tmp_path) == ["a", "b"]
    write_ensemble(tmp_path, name="both")
    config = read_config(tmp_path / "both" / "config.pbtxt")
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["a_window", "b_window", "both_fuse"]
    assert parameters(read_config(tmp_path / "both_fuse" / "config.pbtxt"))["WEIGHTS"] == "1.0,1.0"
    assert list_networks(tmp_path) == ["a", "b"]  # fuse, windows and ensembles are not networks


@pytest.mark.parametrize("field, value", [("class_names", ("background", "kidney", "tumour")),
                                          ("spacing_mm", (0.8, 0.8)), ("context_slices", 5)])
def test_members_must_agree(tmp_path, onnx_file, contract, field, value):
    write_network(tmp_path, "a", onnx_file, contract)
    write_network(tmp_path, "b", onnx_file, contract.replace(**{field: value}))
    with pytest.raises(InputError, match=field):
        write_ensemble(tmp_path)


def test_bad_ensembles(tmp_path, onnx_file, contract):
    with pytest.raises(InputError, match="no networks"):
        write_ensemble(tmp_path)
    write_network(tmp_path, "a", onnx_file, contract)
    with pytest.raises(InputError, match="missing"):
        write_ensemble(tmp_path, [("a", 1.0), ("missing", 1.0)])
    with pytest.raises(InputError, match="positive"):
        write_ensemble(tmp_path, [("a", 0.0)])
    with pytest.raises(InputError, match="twice"):
        write_ensemble(tmp_path, [("a", 1.0), ("a", 2.0)])


@pytest.mark.parametrize("name, options", [("bad/name", {}), ("x_window", {}), ("fuse", {}),
                                           ("ok", {"batch_size": 32, "max_batch_size": 16}),
                                           ("ok", {"overlap": 1.0})])
def test_bad_network_entries(tmp_path, onnx_file, contract, name, options):
    with pytest.raises(InputError):
        write_network(tmp_path, name, onnx_file, contract, **options)


def test_missing_onnx(tmp_path, contract):
    with pytest.raises(InputError, match="no such ONNX"):
        write_network(tmp_path, "a", tmp_path / "nope.onnx", contract)


def test_adapter_modules_exist():
    for module in ("network", "window", "fuse"):
        assert importlib.util.find_spec(f"mixsup.serving.triton.{module}") is not None


def test_repository_survives_version_control(tmp_path, onnx_file, contract):
    """git keeps files, not folders: every version folder Triton needs must hold a file."""
    written, shipped = tmp_path / "written", tmp_path / "shipped"
    write_network(written, "a", onnx_file, contract)
    write_ensemble(written)
    for path in written.rglob("*"):
        if path.is_file():
            target = shipped / path.relative_to(written)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    for model in ["a", "a_window", "segment"]:
        assert (shipped / model / "1").is_dir(), model
    assert not (shipped / "fuse").exists()  # one member: its window step gives the labels


# ---------------------------------------------------------------------------------------------- config kinds


@pytest.fixture
def model_files(tmp_path, onnx_file):
    """A network file per runtime. Plan and TorchScript files are opaque bytes: only their configs are checked
    here (neither backend is in the bundled server)."""
    plan, torchscript = tmp_path / "net.plan", tmp_path / "net.pt"
    plan.write_bytes(b"serialized engine")
    torchscript.write_bytes(b"torchscript archive")
    return {PYTHON: onnx_file, ONNXRUNTIME: onnx_file, TENSORRT_PLAN: plan, LIBTORCH: torchscript}


def write_every_kind(repo, model_files, contract):
    """One network per runtime, one with the TensorRT accelerator, and the ensemble over all of them."""
    for runtime in RUNTIMES:
        write_network(repo, runtime, model_files[runtime], contract, runtime=runtime)
    accelerator = TensorRTAccelerator(precision="fp16", max_workspace_size_bytes=1 << 28,
                                      engine_cache_path="/cache/ort_trt",
                                      profile=ShapeProfile(batch=(1, 4, 8), side=(32, 48, 512)))
    write_network(repo, "ort_trt", model_files[ONNXRUNTIME], contract, runtime=ONNXRUNTIME, accelerator=accelerator)
    write_ensemble(repo)


def test_every_written_config_parses_back_as_written_by_protobuf(tmp_path, model_files, contract):
    write_every_kind(tmp_path, model_files, contract)
    configs = sorted(tmp_path.rglob("config.pbtxt"))
    assert len(configs) == 2 * (len(RUNTIMES) + 1) + 2  # networks, their windows, fuse, segment
    for path in configs:
        text = path.read_text(encoding="utf-8")
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        # Byte for byte what protobuf's own text writer makes of the parsed message: no hand-made template.
        assert text == text_format.MessageToString(config, as_utf8=True)


def test_native_runtime_configs(tmp_path, model_files, contract):
    write_every_kind(tmp_path, model_files, contract)
    expected = {ONNXRUNTIME: ("onnxruntime_onnx", "model.onnx", "KIND_AUTO"),
                TENSORRT_PLAN: ("tensorrt_plan", "model.plan", "KIND_GPU"),
                LIBTORCH: ("pytorch_libtorch", "model.pt", "KIND_AUTO"),
                "ort_trt": ("onnxruntime_onnx", "model.onnx", "KIND_GPU")}
    for name, (platform, filename, kind) in expected.items():
        config = read_config(tmp_path / name / "config.pbtxt")
        assert (config.platform, config.backend, config.max_batch_size) == (platform, "", 16)
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", FP32, [3, -1, -1])]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probabilities", FP32, [3, -1, -1])]
        assert config.instance_group[0].kind == KIND(kind) and config.HasField("dynamic_batching")
        version = tmp_path / name / "1"
        assert sorted(p.name for p in version.iterdir()) == sorted(["contract.json", filename])  # no model.py
        assert (version / filename).read_bytes() == model_files[ONNXRUNTIME if name == "ort_trt" else name].read_bytes()
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator or name == "ort_trt"
    # the window step calls every native runtime the same way: over BLS
    for name in expected:
        window = parameters(read_config(tmp_path / f"{name}_window" / "config.pbtxt"))
        assert (window["NETWORK"], window["NETWORK_IN_STEP"]) == (name, "false")
    write_network(tmp_path, "busy", model_files[ONNXRUNTIME], contract, runtime=ONNXRUNTIME, instance_count=3)
    assert read_config(tmp_path / "busy_window" / "config.pbtxt").instance_group[0].count == 1


def test_tensorrt_accelerator_parameters(tmp_path, model_files, contract):
    write_every_kind(tmp_path, model_files, contract)
    config = read_config(tmp_path / "ort_trt" / "config.pbtxt")
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 28),
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/cache/ort_trt",
        "trt_profile_min_shapes": "input:1x3x32x32", "trt_profile_opt_shapes": "input:4x3x48x48",
        "trt_profile_max_shapes": "input:8x3x512x512"}


def test_bad_runtime_options(tmp_path, onnx_file, contract):
    with pytest.raises(InputError, match="unknown network runtime"):
        write_network(tmp_path, "a", onnx_file, contract, runtime="tensorflow")
    with pytest.raises(InputError, match="accelerator"):
        write_network(tmp_path, "a", onnx_file, contract, runtime=PYTHON, accelerator=TensorRTAccelerator())
    with pytest.raises(InputError, match="precision"):
        write_network(tmp_path, "a", onnx_file, contract, runtime=ONNXRUNTIME,
                      accelerator=TensorRTAccelerator(precision="int4"))
    with pytest.raises(InputError, match="no such TorchScript"):
        write_network(tmp_path, "a", tmp_path / "missing.pt", contract, runtime=LIBTORCH)
    assert not (tmp_path / "a").exists()


def test_taken_name_needs_replace(tmp_path, onnx_file, model_files, contract):
    write_network(tmp_path, "a", onnx_file, contract)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="already exists.*--replace"):
        write_network(tmp_path, "a", model_files[LIBTORCH], contract, runtime=LIBTORCH)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    write_network(tmp_path, "a", model_files[LIBTORCH], contract, runtime=LIBTORCH, replace=True)
    # the python runtime's files are gone, not left beside the new model
    assert sorted(p.name for p in (tmp_path / "a" / "1").iterdir()) == ["contract.json", "model.pt"]
    assert read_config(tmp_path / "a" / "config.pbtxt").platform == "pytorch_libtorch"


def test_replace_leaves_foreign_folders_alone(tmp_path, onnx_file, contract):
    (tmp_path / "a" / "1").mkdir(parents=True)
    (tmp_path / "a" / "1" / "keep.txt").write_text("not written by mixsup")
    with pytest.raises(InputError, match="not a network entry"):
        write_network(tmp_path, "a", onnx_file, contract, replace=True)
    assert (tmp_path / "a" / "1" / "keep.txt").is_file()


def test_committed_repository_is_what_the_writer_writes(tmp_path):
    """Regenerating model_repository/ from its own model and contract changes no config's meaning."""
    bundled = COMMITTED / "unet" / "1"
    write_network(tmp_path, "unet", bundled / "model.onnx", ModelContract.load(bundled))
    write_ensemble(tmp_path)
    for model in ["unet", "unet_window", "segment"]:
        assert read_config(COMMITTED / model / "config.pbtxt") == read_config(tmp_path / model / "config.pbtxt"), model
    assert not (COMMITTED / "fuse").exists() and not (tmp_path / "fuse").exists()


# ---------------------------------------------------------------------------------- ensembles read back, extras


def test_read_ensemble_is_what_was_written(tmp_path, onnx_file, contract):
    for name in ("a", "b", "c"):
        write_network(tmp_path, name, onnx_file, contract)
    write_ensemble(tmp_path, [("b", 2.5), ("a", 1.0)])
    write_ensemble(tmp_path, [("c", 0.25), ("a", 1.0)], name="folds")
    write_ensemble(tmp_path, [("c", 0.25)], name="alone")
    assert read_ensemble(tmp_path, "segment") == [("b", 2.5), ("a", 1.0)]
    assert list_ensembles(tmp_path) == {"alone": [("c", 0.25)], "folds": [("c", 0.25), ("a", 1.0)],
                                        "segment": [("b", 2.5), ("a", 1.0)]}
    # one member: the ensemble is its window step alone (its weight kept in the contract), and no fuse step
    steps = read_config(tmp_path / "alone" / "config.pbtxt").ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["c_window"] and not (tmp_path / "alone_fuse").exists()
    assert read_ensemble(tmp_path, "nothing") is None
    with pytest.raises(InputError, match="not an ensemble"):
        read_ensemble(tmp_path, "a")
    # the fuse step's weights are what Triton applies: an edited fuse is what read_ensemble reports
    fuse = tmp_path / "folds_fuse" / "config.pbtxt"
    fuse.write_text(fuse.read_text().replace('"0.25,1.0"', '"0.25,1.0,2.0"'))
    with pytest.raises(InputError, match="2 members but 3 weights"):
        read_ensemble(tmp_path, "folds")
    # rewriting an ensemble with one member removes the fuse step it had
    write_ensemble(tmp_path, [("a", 1.0)], name="folds")
    assert not (tmp_path / "folds_fuse").exists() and read_ensemble(tmp_path, "folds") == [("a", 1.0)]


def test_committed_ensemble_reads_back():
    assert read_ensemble(COMMITTED, "segment") == [("unet", 1.0)]


@pytest.fixture
def annotator_contract():
    return ModelContract(kind="annotator", input_name="image", size_divisor=16, recipe="teacher-student",
                         extra_inputs=(TensorSpec("boxes", "float32", ("N", 2, "h", "w"), "box masks"),))


def test_annotator_entry(tmp_path, onnx_file, contract, annotator_contract):
    write_network(tmp_path, "net", onnx_file, contract)
    write_ensemble(tmp_path)
    write_auxiliary(tmp_path, "annotator", onnx_file, annotator_contract, instance_count=2)
    config = read_config(tmp_path / "annotator" / "config.pbtxt")
    assert (config.backend, config.max_batch_size, config.instance_group[0].count) == ("python", 16, 2)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("image", FP32, [3, -1, -1]),
                                                                          ("boxes", FP32, [2, -1, -1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probabilities", FP32, [3, -1, -1])]
    assert ModelContract.from_json(parameters(config)["contract"]) == annotator_contract
    assert ModelContract.load(tmp_path / "annotator" / "1") == annotator_contract
    assert "mixsup.serving.triton.onnx_model import" in (tmp_path / "annotator" / "1" / "model.py").read_text()
    # beside the ensembles, never in one
    assert list_networks(tmp_path) == ["net"] and list_networks(tmp_path, "annotator") == ["annotator"]
    with pytest.raises(InputError, match="only segmentation networks join an ensemble|no 'annotator_window'"):
        write_ensemble(tmp_path, [("net", 1.0), ("annotator", 1.0)])
    with pytest.raises(InputError, match="already exists"):
        write_auxiliary(tmp_path, "annotator", onnx_file, annotator_contract)
    with pytest.raises(InputError, match="write_network"):
        write_auxiliary(tmp_path, "other", onnx_file, contract)


def test_network_extras_sit_beside_their_network(tmp_path, onnx_file, contract):
    detection = contract.replace(kind="detection", extra_outputs=(
        TensorSpec("detection_boxes", "float32", ("N", 7, 4)), TensorSpec("detection_classes", "int64", ("N", 7))))
    with pytest.raises(InputError, match="after a network"):
        write_auxiliary(tmp_path, "net_detection", onnx_file, detection)  # no network yet
    write_network(tmp_path, "net", onnx_file, contract)
    with pytest.raises(InputError, match="<network>_detection"):
        write_auxiliary(tmp_path, "net_extra", onnx_file, detection)
    write_auxiliary(tmp_path, "net_detection", onnx_file, detection)
    config = read_config(tmp_path / "net_detection" / "config.pbtxt")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("probabilities", FP32, [3, -1, -1]), ("detection_boxes", FP32, [7, 4]), ("detection_classes", INT64, [7])]
    assert list_networks(tmp_path) == ["net"]
    # the name is taken as a whole: a re-export needs --replace and then leaves no extra of the old one behind
    with pytest.raises(InputError, match="already exists"):
        write_network(tmp_path, "net", onnx_file, contract, replace=False)
    write_network(tmp_path, "net", onnx_file, contract, replace=True)
    assert not (tmp_path / "net_detection").exists()


@pytest.mark.parametrize("name", ["x_detection", "x_confidence", "x_fuse", "segment"])
def test_names_of_the_repositorys_own_entries_are_refused(tmp_path, onnx_file, contract, name):
    with pytest.raises(InputError, match="clash"):
        write_network(tmp_path, name, onnx_file, contract)


def test_segmentation_contract_stays_readable_by_format_1_readers(annotator_contract):
    """Fields added after format 1 are written only when used, so a segmentation network's contract has exactly
    the keys an older client knows, and the others round-trip."""
    format_1_keys = {"class_names", "patch_size", "spacing_mm", "context_slices", "hu_window", "input_name",
                     "input_layout", "input_units", "output_name", "output", "opset", "precision", "recipe",
                     "checkpoint", "extra", "format_version"}
    assert set(ModelContract(recipe="unet").to_dict()) == format_1_keys
    assert ModelContract.from_json(annotator_contract.to_json()) == annotator_contract
    assert {"kind", "extra_inputs", "size_divisor"} <= set(annotator_contract.to_dict())
    with pytest.raises(InputError, match="unknown kind"):
        ModelContract.from_dict({"kind": "classifier"})
    with pytest.raises(InputError, match="repeat"):
        ModelContract.from_dict({"extra_inputs": [{"name": "input", "dtype": "float32", "shape": ["N"]}]})
