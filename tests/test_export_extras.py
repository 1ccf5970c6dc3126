"""Models beside the ensembles: MSDN's detections (``--keep-detection``), ASDNet's confidence map
(``--keep-confidence``) and the teacher as a box-prompted annotator (``--teacher``). Each is checked against the
PyTorch networks of its checkpoint, computed here from the recipe's own modules (for detection: the unit's
decode on the training anchors and a greedy NMS written below, independently of the exported graph)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from test_export_recipes import build_checkpoint
from triton_utils import start_serve, stop_serve
from tritonclient.grpc import model_config_pb2

from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.repository import list_networks, read_ensemble
from mixsup.training.models.msdn import decode_boxes, image_anchors

FP32, INT64 = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT64
#: The default --max-detections (the repository fixture leaves it out).
MAX_DETECTIONS = 100
#: Raw-HU shapes (batch, height, width): other sizes than the export's 32 x 32 example.
SHAPES = [(2, 32, 32), (1, 48, 40)]


def read_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def tensors(entries):
    return [(t.name, t.data_type, list(t.dims)) for t in entries]


def raw_hu(seed, batch, height, width):
    return np.random.default_rng(seed).uniform(-1100, 1500, (batch, 3, height, width)).astype(np.float32)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def one_line_error(capsys):
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{recipe: (modules, checkpoint)} for msdn, asdnet and teacher-student at the tiny size."""
    root = tmp_path_factory.mktemp("extras")
    result = {}
    for seed, recipe in enumerate(["msdn", "asdnet", "teacher-student"]):
        path = root / f"{recipe}.pt"
        modules = build_checkpoint(recipe, path, seed=10 + seed)
        if recipe == "msdn":
            # RetinaNet's prior bias puts every score near 0.01, under the 0.05 threshold: nothing would be detected
            # and the comparison would be empty. Without it the scores spread around 0.5. The organ class's logits
            # (channels anchor * 2 + 0) are made 1.2 x the lesion class's - 0.2: both classes score high on the same
            # anchors, without ties, and only an NMS that keeps classes apart keeps the boxes of both.
            with torch.no_grad():
                classify = modules["msdn"].detection_unit.classify
                classify.bias.zero_()
                classify.weight[0::2] = 1.2 * classify.weight[1::2]
                classify.bias[0::2] = -0.2
            payload = torch.load(path, weights_only=False)
            payload["state_dict"] = modules.state_dict()
            torch.save(payload, path)
        result[recipe] = modules.eval(), path
    return result


@pytest.fixture(scope="module")
def repository(checkpoints, tmp_path_factory):
    """msdn (+ msdn_detection), asdnet (+ asdnet_confidence) in ``segment``; the annotator ``teacher``. On
    ONNX Runtime's float32 (``--device cpu``): the tests compare the served answers with it to 1e-5."""
    repo = tmp_path_factory.mktemp("repo")
    assert export_main([str(checkpoints["msdn"][1]), "--repository", str(repo), "--name", "msdn",
                        "--keep-detection", "--device", "cpu"]) == 0
    assert export_main([str(checkpoints["asdnet"][1]), "--repository", str(repo), "--name", "asdnet",
                        "--keep-confidence", "--member", "segment", "--device", "cpu"]) == 0
    assert export_main([str(checkpoints["teacher-student"][1]), "--repository", str(repo), "--name", "teacher",
                        "--teacher", "--device", "cpu"]) == 0
    return repo


# ------------------------------------------------------------------------------------------ MSDN detections


def reference_nms(boxes, scores, iou_threshold, score_threshold):
    """Greedy NMS of one class: indices kept, highest score first; a box is dropped when its IoU with a kept one
    exceeds the threshold."""
    kept = []
    for index in np.argsort(-scores, kind="stable"):
        if scores[index] <= score_threshold:
            break
        box = boxes[index]
        suppressed = False
        for other in kept:
            top_left = np.maximum(box[:2], boxes[other][:2])
            bottom_right = np.minimum(box[2:], boxes[other][2:])
            intersection = np.prod(np.clip(bottom_right - top_left, 0, None))
            union = np.prod(box[2:] - box[:2]) + np.prod(boxes[other][2:] - boxes[other][:2]) - intersection
            if intersection > 0 and intersection / union > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(index)
    return kept


def reference_detections(msdn, hu, count, pre_nms=1000, iou_threshold=0.5, score_threshold=0.05, anchor_size=8.0):
    """The detection unit's boxes per slice from PyTorch: decode on the recipe's anchors, clip to the slice, drop
    the ones clipping left thinner than 0.01 px, the ``pre_nms`` best (anchor, class) pairs, NMS per class, the
    ``count`` best over both classes, padded."""
    with torch.no_grad():
        windowed = msdn.segmentation.window(torch.from_numpy(hu))
        raw = msdn.detect(msdn.detection_encoder(windowed))
        height, width = hu.shape[-2:]
        anchors = image_anchors(height, width, msdn.detection_strides, anchor_size)
        boxes = decode_boxes(raw["box_deltas"], anchors).numpy()
        scores = torch.sigmoid(raw["class_logits"]).numpy()
    boxes = np.minimum(np.clip(boxes, 0, None), np.array([width, height, width, height], np.float32))
    thin = (boxes[..., 2:] - boxes[..., :2]).min(axis=-1) < 1e-2
    scores = np.where(thin[..., None], -1.0, scores).astype(np.float32)
    result_boxes = np.zeros((len(hu), count, 4), np.float32)
    result_scores = np.zeros((len(hu), count), np.float32)
    result_classes = np.full((len(hu), count), -1, np.int64)
    for item in range(len(hu)):
        flat = scores[item].reshape(-1)  # anchor-major, class-minor
        top = np.argsort(-flat, kind="stable")[:pre_nms]
        anchor, label = top // scores.shape[2], top % scores.shape[2]
        detections = []
        for class_index in range(scores.shape[2]):
            members = np.nonzero(label == class_index)[0]
            for kept in reference_nms(boxes[item][anchor[members]], flat[top[members]], iou_threshold,
                                      score_threshold):
                position = members[kept]
                detections.append((flat[top[position]], boxes[item][anchor[position]], class_index))
        detections.sort(key=lambda d: -d[0])
        for row, (score, box, class_index) in enumerate(detections[:count]):
            result_boxes[item, row], result_scores[item, row], result_classes[item, row] = box, score, class_index
    return result_boxes, result_scores, result_classes


def test_detection_matches_pytorch_decode_and_nms(checkpoints, repository):
    modules, _ = checkpoints["msdn"]
    graph = session(repository / "msdn_detection" / "1" / "model.onnx")
    for seed, (batch, height, width) in enumerate(SHAPES):
        hu = raw_hu(seed, batch, height, width)
        probabilities, boxes, scores, classes = graph.run(
            ["probabilities", "detection_boxes", "detection_scores", "detection_classes"], {"input": hu})
        expected_boxes, expected_scores, expected_classes = reference_detections(modules["msdn"], hu, MAX_DETECTIONS)
        assert boxes.shape == (batch, MAX_DETECTIONS, 4) and classes.dtype == np.int64
        np.testing.assert_array_equal(classes, expected_classes)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
        np.testing.assert_allclose(boxes, expected_boxes, atol=1e-3)
        with torch.no_grad():
            expected = torch.softmax(modules["msdn"].segmentation(torch.from_numpy(hu)), dim=1).numpy()
        assert np.abs(probabilities - expected).max() <= 1e-4
        # not an empty comparison: real boxes of both classes, some of them the same box (per-class NMS)
        assert (classes >= 0).all() and set(np.unique(classes)) == {0, 1}
        assert (boxes[:, :, 2:] > boxes[:, :, :2]).all()
        for item in range(batch):
            organ = {tuple(box) for box in boxes[item][classes[item] == 0].round(3)}
            assert organ & {tuple(box) for box in boxes[item][classes[item] == 1].round(3)}


def test_detection_pads_to_a_fixed_count(checkpoints, tmp_path):
    """Few detections (a high threshold): the rest of the rows are padding, shapes stay fixed."""
    assert export_main([str(checkpoints["msdn"][1]), "--repository", str(tmp_path), "--name", "msdn",
                        "--no-ensemble", "--keep-detection", "--max-detections", "20", "--score-threshold", "0.97",
                        "--nms-iou", "0.1"]) == 0
    hu = raw_hu(4, 1, 32, 32)
    boxes, scores, classes = session(tmp_path / "msdn_detection" / "1" / "model.onnx").run(
        ["detection_boxes", "detection_scores", "detection_classes"], {"input": hu})
    expected = reference_detections(checkpoints["msdn"][0]["msdn"], hu, 20, iou_threshold=0.1, score_threshold=0.97)
    np.testing.assert_array_equal(classes, expected[2])
    np.testing.assert_allclose(scores, expected[1], atol=1e-5)
    np.testing.assert_allclose(boxes, expected[0], atol=1e-3)
    padding = classes == -1
    assert padding.any() and (scores[padding] == 0).all() and (boxes[padding] == 0).all()
    assert (scores[~padding] > 0.97).all() and 0 < (~padding).sum() < 20


def test_detection_entry_and_contract(repository):
    config = read_config(repository / "msdn_detection" / "config.pbtxt")
    assert (config.backend, config.max_batch_size) == ("python", 16) and config.HasField("dynamic_batching")
    assert tensors(config.input) == [("input", FP32, [3, -1, -1])]
    assert tensors(config.output) == [("probabilities", FP32, [3, -1, -1]),
                                      ("detection_boxes", FP32, [MAX_DETECTIONS, 4]),
                                      ("detection_scores", FP32, [MAX_DETECTIONS]),
                                      ("detection_classes", INT64, [MAX_DETECTIONS])]
    assert "mixsup.serving.triton.onnx_model import" in (repository / "msdn_detection" / "1" / "model.py").read_text()
    contract = ModelContract.load(repository / "msdn_detection" / "1")
    assert contract.kind == "detection" and contract.size_divisor == 8
    assert [(t.name, t.dtype, t.shape) for t in contract.extra_outputs] == [
        ("detection_boxes", "float32", ("N", MAX_DETECTIONS, 4)),
        ("detection_scores", "float32", ("N", MAX_DETECTIONS)),
        ("detection_classes", "int64", ("N", MAX_DETECTIONS))]
    assert "0 liver, 1 lesion" in contract.extra_outputs[2].description
    assert contract.extra["detection"]["anchor_size"] == 8.0 and contract.extra["detection"]["strides"] == [4, 2, 1]
    # the config carries the contract for a client's one get_model_config call
    assert ModelContract.from_json(config.parameters["contract"].string_value) == contract
    # beside the ensemble, not in it
    assert list_networks(repository) == ["asdnet", "msdn"]
    assert read_ensemble(repository, "segment") == [("msdn", 1.0), ("asdnet", 1.0)]


# ------------------------------------------------------------------------------------------ ASDNet confidence


def test_confidence_matches_pytorch(checkpoints, repository):
    modules, _ = checkpoints["asdnet"]
    config = read_config(repository / "asdnet_confidence" / "config.pbtxt")
    assert tensors(config.output) == [("probabilities", FP32, [3, -1, -1]), ("confidence", FP32, [1, -1, -1])]
    assert ModelContract.load(repository / "asdnet_confidence" / "1").kind == "confidence"
    graph = session(repository / "asdnet_confidence" / "1" / "model.onnx")
    for seed, (batch, height, width) in enumerate(SHAPES):
        hu = raw_hu(seed + 20, batch, height, width)
        probabilities, confidence = graph.run(["probabilities", "confidence"], {"input": hu})
        with torch.no_grad():
            expected_probabilities = torch.softmax(modules["segmentation"](torch.from_numpy(hu)), dim=1)
            expected = torch.sigmoid(modules["confidence"](torch.from_numpy(hu), expected_probabilities)).numpy()
        assert confidence.shape == (batch, 1, height, width)
        assert np.abs(confidence - expected).max() <= 1e-4
        assert np.abs(probabilities - expected_probabilities.numpy()).max() <= 1e-4
        assert expected.std() > 1e-3  # a map, not a constant


# ------------------------------------------------------------------------------------------ the teacher


def test_teacher_annotator_matches_pytorch(checkpoints, repository):
    modules, _ = checkpoints["teacher-student"]
    teacher = modules["teacher"]
    graph = session(repository / "teacher" / "1" / "model.onnx")
    for seed, (batch, height, width) in enumerate(SHAPES):
        hu = raw_hu(seed + 30, batch, height, width)
        boxes = np.zeros((batch, 2, height, width), np.float32)
        boxes[:, 0, 4:28, 6:30] = 1.0  # organ box
        boxes[:, 1, 10:18, 12:20] = 1.0  # lesion box inside it
        (probabilities,) = graph.run(["probabilities"], {"image": hu, "boxes": boxes})
        with torch.no_grad():
            expected = torch.softmax(teacher(torch.from_numpy(hu), torch.from_numpy(boxes)), dim=1).numpy()
        assert probabilities.shape == (batch, 3, height, width)
        assert np.abs(probabilities - expected).max() <= 1e-4
        # the boxes are wired in: other boxes, other answer
        (unprompted,) = graph.run(["probabilities"], {"image": hu, "boxes": np.zeros_like(boxes)})
        assert np.abs(unprompted - probabilities).max() > 1e-3


def test_teacher_entry_contract_and_config(repository):
    config = read_config(repository / "teacher" / "config.pbtxt")
    assert config == text_format.Parse(text_format.MessageToString(config), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("teacher", "python", 16)
    assert tensors(config.input) == [("image", FP32, [3, -1, -1]), ("boxes", FP32, [2, -1, -1])]
    assert tensors(config.output) == [("probabilities", FP32, [3, -1, -1])]
    contract = ModelContract.from_json(config.parameters["contract"].string_value)
    assert contract == ModelContract.load(repository / "teacher" / "1")
    assert (contract.kind, contract.input_name, contract.recipe, contract.size_divisor) == (
        "annotator", "image", "teacher-student", 8)
    assert [(t.name, t.dtype, t.shape) for t in contract.extra_inputs] == [("boxes", "float32", ("N", 2, "h", "w"))]
    assert contract.extra["teacher_box_input"] is False
    assert sorted(p.name for p in (repository / "teacher" / "1").iterdir()) == ["contract.json", "model.onnx",
                                                                                "model.py"]
    assert not (repository / "teacher_window").exists()
    assert "teacher" not in json.dumps(read_ensemble(repository, "segment"))


# ------------------------------------------------------------------------------------------ refusals, replacing


@pytest.mark.parametrize("recipe, flags", [("asdnet", ["--keep-detection"]), ("msdn", ["--keep-confidence"]),
                                           ("msdn", ["--teacher"]),
                                           ("teacher-student", ["--teacher", "--precision", "fp16"]),
                                           ("teacher-student", ["--teacher", "--member", "segment"]),
                                           ("msdn", ["--max-detections", "5"]),
                                           ("msdn", ["--keep-detection", "--max-detections", "0"]),
                                           ("msdn", ["--keep-detection", "--score-threshold", "1.5"])])
def test_wrong_recipe_or_flags_exit_2_and_write_nothing(checkpoints, tmp_path, capsys, recipe, flags):
    repo = tmp_path / "repo"
    assert export_main([str(checkpoints[recipe][1]), "--repository", str(repo), "--name", "x", *flags]) == 2
    assert one_line_error(capsys).startswith("mixsup-export: error: ")
    assert not repo.exists()


def test_replace_without_keep_drops_the_stale_extra(checkpoints, tmp_path):
    checkpoint = str(checkpoints["msdn"][1])
    assert export_main([checkpoint, "--repository", str(tmp_path), "--name", "m", "--keep-detection"]) == 0
    assert (tmp_path / "m_detection").is_dir()
    assert export_main([checkpoint, "--repository", str(tmp_path), "--name", "m", "--keep-detection"]) == 2
    assert export_main([checkpoint, "--repository", str(tmp_path), "--name", "m", "--replace"]) == 0
    assert not (tmp_path / "m_detection").exists()  # no detection model of the previous export left behind
    assert read_ensemble(tmp_path, "segment") == [("m", 1.0)]


def test_annotator_cannot_take_an_ensemble_members_place(checkpoints, tmp_path, capsys):
    assert export_main([str(checkpoints["asdnet"][1]), "--repository", str(tmp_path), "--name", "a"]) == 0
    capsys.readouterr()
    assert export_main([str(checkpoints["teacher-student"][1]), "--repository", str(tmp_path), "--name", "a",
                        "--teacher", "--replace"]) == 2
    assert "member of ensemble 'segment'" in one_line_error(capsys)
    assert ModelContract.load(tmp_path / "a" / "1").kind == "segmentation"


# ------------------------------------------------------------------------------------------ the serving adapter


@pytest.fixture
def onnx_model_module(monkeypatch):
    """mixsup.serving.triton.onnx_model outside Triton: its backend module replaced by an empty stand-in."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.delitem(sys.modules, "mixsup.serving.triton.onnx_model", raising=False)
    import mixsup.serving.triton.onnx_model as module

    return module


def test_adapter_batches_requests_of_one_shape(onnx_model_module):
    calls = []

    def run(feeds):
        calls.append({name: value.shape for name, value in feeds.items()})
        return {"sum": feeds["a"] + feeds["b"], "first": feeds["a"][:, :1]}

    rng = np.random.default_rng(0)
    feeds = [{"a": rng.random((n, 2, h)), "b": rng.random((n, 2, h))} for n, h in [(1, 4), (2, 4), (1, 5)]]
    results = onnx_model_module.run_grouped(run, feeds)
    assert calls == [{"a": (3, 2, 4), "b": (3, 2, 4)}, {"a": (1, 2, 5), "b": (1, 2, 5)}]
    for feed, result in zip(feeds, results):
        np.testing.assert_array_equal(result["sum"], feed["a"] + feed["b"])
        np.testing.assert_array_equal(result["first"], feed["a"][:, :1])
    bad = onnx_model_module.run_grouped(run, [{"a": np.zeros((2, 2, 4)), "b": np.zeros((1, 2, 4))}])
    assert isinstance(bad[0], ValueError)


# ------------------------------------------------------------------------------------------ the real server


@pytest.mark.triton
def test_models_beside_the_ensemble_answer_in_triton(checkpoints, repository, tmp_path):
    """Triton loads the detection, confidence and annotator models beside ``segment`` and answers as ONNX
    Runtime does in process, every output."""
    hu = raw_hu(40, 2, 32, 32)
    boxes = np.zeros((2, 2, 32, 32), np.float32)
    boxes[:, 0, 2:30, 4:28], boxes[:, 1, 8:16, 8:20] = 1.0, 1.0
    requests = {"msdn_detection": {"input": hu}, "asdnet_confidence": {"input": hu},
                "teacher": {"image": hu, "boxes": boxes}}
    process, grpc_url, _ = start_serve(repository, log_dir=tmp_path / "logs")
    try:
        served = {}
        with grpcclient.InferenceServerClient(grpc_url) as client:
            for model, feeds in requests.items():
                inputs = []
                for name, value in feeds.items():
                    inputs.append(grpcclient.InferInput(name, list(value.shape), "FP32"))
                    inputs[-1].set_data_from_numpy(value)
                result = client.infer(model, inputs)
                outputs = [o.name for o in client.get_model_metadata(model).outputs]
                served[model] = {name: result.as_numpy(name) for name in outputs}
    finally:
        assert stop_serve(process) == 0
    for model, feeds in requests.items():
        graph = session(repository / model / "1" / "model.onnx")
        names = [o.name for o in graph.get_outputs()]
        assert sorted(served[model]) == sorted(names)
        for name, expected in zip(names, graph.run(names, feeds)):
            assert served[model][name].dtype == expected.dtype, (model, name)
            np.testing.assert_allclose(served[model][name], expected, atol=1e-5, err_msg=f"{model} {name}")
