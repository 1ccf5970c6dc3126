"""``mixsup-client annotate``: a tiny exported teacher served by the real Triton server labels a phantom from its
boxes file, exactly as ONNX Runtime does in process on the same prepared inputs; the inputs themselves are checked
against an independent construction (stacks, air padding, boxes on the model grid); bad boxes exit 2."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest
from test_export_recipes import build_checkpoint
from triton_utils import start_serve, stop_serve

from mixsup.clients.annotate import labels_from_probabilities, load_boxes, prepare_annotation
from mixsup.clients.cli import main as client_main
from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.readers import read_scan
from mixsup.resample import resample_inplane
from mixsup.scan import Scan
from mixsup.training.data.cli import main as data_main

#: Canonical phantom shape and spacing: in-plane 64 x 64 at 2.0 x 2.2 mm -> 40 x 44 at the tiny 3.2 mm, so the
#: volume is resampled and the width padded to the size divisor 8.
SHAPE = (16, 64, 64)
SPACING = (2.5, 2.0, 2.2)
MODEL = "annotator"


def one_line_error(capsys):
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """(volume path, boxes path) of one phantom written by ``mixsup-data phantoms``."""
    out = tmp_path_factory.mktemp("phantoms")
    assert data_main(["phantoms", str(out), "--n", "1", "--seed", "3", "--shape", *map(str, SHAPE),
                      "--spacing", *map(str, SPACING), "-q"]) == 0
    return out / "volume-0.nii.gz", out / "boxes" / "boxes-0.json"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotator")
    build_checkpoint("teacher-student", root / "teacher.pt", seed=21)
    repo = root / "repo"
    # --device cpu: the served labels are compared with ONNX Runtime's float32 voxel for voxel.
    assert export_main([str(root / "teacher.pt"), "--repository", str(repo), "--name", MODEL, "--teacher",
                        "--device", "cpu"]) == 0
    return repo


def test_prepared_inputs_match_an_independent_construction(phantom, repository):
    volume_path, boxes_path = phantom
    contract = ModelContract.load(repository / MODEL / "1")
    scan = read_scan(volume_path)
    boxes, boxes_shape = load_boxes(boxes_path)
    inputs = prepare_annotation(scan, boxes, boxes_shape, contract)

    canonical, spacing = scan.canonical()
    assert canonical.shape == SHAPE and np.allclose(spacing, SPACING)
    model_hw = tuple(int(round(n * s / t)) for n, s, t in zip(SHAPE[1:], SPACING[1:], contract.spacing_mm))
    assert model_hw == (40, 44) and inputs.model_hw == model_hw
    hu = np.rint(resample_inplane(canonical.astype(np.float32), model_hw, order=1))
    document = json.loads(boxes_path.read_text())
    box_slices = sorted({entry[0] for entry in document["boxes"]})
    assert 0 < len(box_slices) < SHAPE[0]  # some slices without boxes
    assert inputs.slices.tolist() == box_slices
    assert inputs.image.shape == (len(box_slices), 3, 40, 48) and inputs.boxes.shape == (len(box_slices), 2, 40, 48)
    # nearest-neighbour resampling of each box: a model pixel is in a box when its centre is; a box thinner than a
    # model pixel gets the one pixel holding its centre
    scale = np.array(SHAPE[1:]) / np.array(model_hw)
    model_masks = np.zeros((2, SHAPE[0]) + model_hw, np.float32)
    thin = 0
    for z, label, y0, x0, y1, x1 in document["boxes"]:
        canonical_box = np.zeros((1,) + SHAPE[1:], np.float32)
        canonical_box[0, y0:y1, x0:x1] = 1.0
        model_box = resample_inplane(canonical_box, model_hw, order=0)[0]
        if not model_box.any():
            thin += 1
            centre = (np.array([y0 + y1, x0 + x1]) / 2 / scale).astype(int)
            model_box[tuple(centre)] = 1.0
        model_masks[label - 1, z] = np.maximum(model_masks[label - 1, z], model_box)
    assert thin  # the phantom has a lesion box thinner than a model pixel
    for row, z in enumerate(box_slices):
        for channel, source in enumerate([max(z - 1, 0), z, min(z + 1, SHAPE[0] - 1)]):
            np.testing.assert_array_equal(inputs.image[row, channel, :, :44], hu[source])
        np.testing.assert_array_equal(inputs.boxes[row, :, :, :44], model_masks[:, z])
    assert (inputs.image[:, :, :, 44:] == -1024).all() and (inputs.boxes[:, :, :, 44:] == 0).all()
    assert inputs.boxes[:, 0].sum() > 0 and inputs.boxes[:, 1].sum() > 0


@pytest.mark.triton
def test_annotate_matches_onnx_runtime(phantom, repository, tmp_path, capsys):
    volume_path, boxes_path = phantom
    output = tmp_path / "annotated.nii.gz"
    process, grpc_url, _ = start_serve(repository, log_dir=tmp_path / "logs")
    try:
        code = client_main(["annotate", str(volume_path), "--boxes", str(boxes_path), "-o", str(output),
                            "--url", grpc_url])
    finally:
        assert stop_serve(process) == 0
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"{output}: ")

    scan = read_scan(volume_path)
    written = nib.load(output)
    labels = np.asarray(written.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == scan.voxels.shape
    np.testing.assert_allclose(written.affine, scan.affine)

    contract = ModelContract.load(repository / MODEL / "1")
    boxes, boxes_shape = load_boxes(boxes_path)
    inputs = prepare_annotation(scan, boxes, boxes_shape, contract)
    graph = ort.InferenceSession(str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = graph.run(["probabilities"], {"image": inputs.image, "boxes": inputs.boxes})
    expected = labels_from_probabilities(probabilities, inputs)
    np.testing.assert_array_equal(labels, expected)

    # the rules, checked on the stored grid independently of the client: labels only inside their own boxes, and
    # none on slices without boxes
    document = json.loads(boxes_path.read_text())
    organ, lesion = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    for z, label, y0, x0, y1, x1 in document["boxes"]:
        (organ if label == 1 else lesion)[z, y0:y1, x0:x1] = True
    canonical_labels = Scan(voxels=labels, affine=scan.affine).canonical()[0]
    assert not ((canonical_labels == 1) & ~organ).any()
    assert not ((canonical_labels == 2) & ~lesion).any()
    assert (canonical_labels[~(organ | lesion).any(axis=(1, 2))] == 0).all()
    assert (labels > 0).any()  # not an empty comparison


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable boxes file"),
    ('{"frame": "stored", "shape": [16, 64, 64], "boxes": []}', "not a boxes file"),
    ('{"frame": "canonical", "shape": [16, 64], "boxes": []}', '"shape" must be [D, H, W]'),
    ('{"frame": "canonical", "shape": [16, 64, 64], "boxes": [[3, 1, 10, 10, 80, 20]]}', "lies outside"),
    ('{"frame": "canonical", "shape": [16, 64, 64], "boxes": [[3, 3, 10, 10, 20, 20]]}', "has label 3"),
    ('{"frame": "canonical", "shape": [16, 64, 64], "boxes": [[3, 1, 10.5, 10, 20, 20]]}', "integers"),
    ('{"frame": "canonical", "shape": [16, 32, 64], "boxes": []}', "canonical shape is [16, 64, 64]"),
])
def test_bad_boxes_exit_2_in_one_line(phantom, tmp_path, capsys, content, message):
    volume_path, _ = phantom
    boxes = tmp_path / "boxes.json"
    boxes.write_text(content)
    output = tmp_path / "out.nii.gz"
    # port 9 (discard): nothing serves there, and the command must not get that far
    code = client_main(["annotate", str(volume_path), "--boxes", str(boxes), "-o", str(output),
                        "--url", "127.0.0.1:9", "--connect-timeout", "1"])
    line = one_line_error(capsys)
    assert code == 2, line
    assert line.startswith("mixsup-client: error: ") and message in line
    assert not output.exists()


def test_missing_boxes_file_and_wrong_output_exit_2(phantom, tmp_path, capsys):
    volume_path, boxes_path = phantom
    assert client_main(["annotate", str(volume_path), "--boxes", str(tmp_path / "none.json"), "-o",
                        str(tmp_path / "o.nii.gz"), "--url", "127.0.0.1:9"]) == 2
    assert "no such boxes file" in one_line_error(capsys)
    assert client_main(["annotate", str(volume_path), "--boxes", str(boxes_path), "-o", str(tmp_path / "o.png"),
                        "--url", "127.0.0.1:9"]) == 2
    assert "must end in .nii or .nii.gz" in one_line_error(capsys)
