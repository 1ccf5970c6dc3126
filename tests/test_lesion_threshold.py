"""A contract's ``lesion_threshold``: lesion wherever p(lesion) exceeds it inside the argmax's organ-or-lesion region,
decided the same way by the server's window and fuse steps and by the client's mean over test spacings."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_client_cli import PIXEL_BIAS, PIXEL_WEIGHT, write_scan
from test_repository import parameters, read_config
from triton_utils import write_pixel_network

from mixsup.clients.client import SegmentationClient
from mixsup.clients.pipeline import mean_answer_on_scan_grid, prepare_volume
from mixsup.contract import LESION_THRESHOLD_PARAMETER, ModelContract
from mixsup.errors import InputError
from mixsup.export.cli import main as export_main
from mixsup.labels import decide_labels, first_max_index
from mixsup.readers import read_scan
from mixsup.repository import write_ensemble, write_network
from mixsup.serving.fuse import fuse_probabilities

#: Under the pixel network's p(lesion) of about 0.0066 on its 100 HU liver disc: the whole disc becomes lesion.
THRESHOLD = 0.005


def probabilities(*pixels: tuple[float, float, float]) -> np.ndarray:
    return np.asarray(pixels, dtype=np.float32).T


def test_decide_labels_moves_only_the_lesion_inside_the_argmaxs_region():
    p = probabilities((0.5, 0.1, 0.4),    # argmax background: stays so, whatever p(lesion)
                      (0.2, 0.45, 0.35),  # argmax liver, p(lesion) over 0.3: lesion
                      (0.1, 0.65, 0.25),  # argmax liver, p(lesion) under 0.3: liver
                      (0.1, 0.2, 0.7))    # argmax lesion: stays lesion
    assert decide_labels(p).tolist() == [0, 1, 1, 2]
    assert decide_labels(p, 0.3).tolist() == [0, 2, 1, 2]
    assert decide_labels(p.astype(np.float16), 0.3).tolist() == [0, 2, 1, 2]
    # Above the argmax's share a threshold also takes lesion back to liver.
    assert decide_labels(p, 0.75).tolist() == [0, 1, 1, 1]
    assert np.array_equal(decide_labels(p), first_max_index(p))


def test_fused_members_decide_with_the_threshold():
    a, b = (probabilities(pixel).reshape(3, 1, 1, 1) for pixel in ((0.2, 0.6, 0.2), (0.2, 0.4, 0.4)))
    assert fuse_probabilities([a, b], [1.0, 1.0])[0].ravel().tolist() == [1]
    assert fuse_probabilities([a, b], [1.0, 1.0], 0.25)[0].ravel().tolist() == [2]  # mean p(lesion) 0.3


def test_contract_keeps_the_threshold_and_checks_it():
    contract = ModelContract(lesion_threshold=0.3)
    assert ModelContract.from_json(contract.to_json()).lesion_threshold == 0.3
    assert "lesion_threshold" not in ModelContract().to_dict()  # older readers see the contract they know
    for bad in (0.0, 1.0, "0.3"):
        with pytest.raises(InputError, match="lesion_threshold"):
            ModelContract.from_dict({**contract.to_dict(), "lesion_threshold": bad})
    with pytest.raises(InputError, match="three classes"):
        ModelContract(class_names=("background", "liver"), lesion_threshold=0.3).replace()


def test_window_and_fuse_steps_carry_the_threshold(tmp_path):
    """The window step decides a lone member's labels, the fuse step an ensemble's: with the first member's."""
    onnx_path = write_pixel_network(tmp_path / "net.onnx", np.eye(3), np.zeros(3))
    repository = tmp_path / "repository"
    write_network(repository, "a", onnx_path, ModelContract(lesion_threshold=0.3))
    write_network(repository, "b", onnx_path, ModelContract())
    assert parameters(read_config(repository / "a_window" / "config.pbtxt"))[LESION_THRESHOLD_PARAMETER] == "0.3"
    assert LESION_THRESHOLD_PARAMETER not in parameters(read_config(repository / "b_window" / "config.pbtxt"))
    write_ensemble(repository, [("a", 1.0), ("b", 1.0)])
    assert parameters(read_config(repository / "fuse" / "config.pbtxt"))[LESION_THRESHOLD_PARAMETER] == "0.3"
    write_ensemble(repository, [("b", 1.0), ("a", 1.0)])
    assert LESION_THRESHOLD_PARAMETER not in parameters(read_config(repository / "fuse" / "config.pbtxt"))


def test_export_writes_the_threshold_into_the_contract(tiny_checkpoint, tmp_path, capsys):
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "unet",
                        "--lesion-threshold", "0.3"]) == 0
    assert ModelContract.load(tmp_path / "unet" / "1" / "contract.json").lesion_threshold == 0.3
    capsys.readouterr()
    assert export_main([str(tiny_checkpoint), "--repository", str(tmp_path), "--name", "other",
                        "--lesion-threshold", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lesion-threshold" in err[0]
    assert not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def threshold_triton(tmp_path_factory):
    """``mixsup-serve`` with the pixel network at 1 mm, its contract naming :data:`THRESHOLD` and two test
    spacings, and the ``segment`` ensemble over it."""
    import triton_utils

    root = tmp_path_factory.mktemp("triton_threshold")
    onnx_path = write_pixel_network(root / "pixel.onnx", PIXEL_WEIGHT, PIXEL_BIAS)
    contract = ModelContract(spacing_mm=(1.0, 1.0), patch_size=(16, 16), test_spacings_mm=(0.8, 1.25),
                             lesion_threshold=THRESHOLD)
    with triton_utils.serving_one_network(root, "pixel", onnx_path, contract) as grpc_url:
        yield grpc_url


@pytest.mark.triton
def test_server_and_client_decide_with_the_contracts_threshold(tmp_path, threshold_triton):
    write_scan(tmp_path / "scan.nii.gz", shape=(40, 36, 3), affine=np.diag([-0.7, -0.7, 2.5, 1.0]))
    scan = read_scan(tmp_path / "scan.nii.gz")
    with SegmentationClient(threshold_triton) as client:
        contract = client.contract()
        assert contract.lesion_threshold == THRESHOLD
        # The server's own labels (one request, what --single-scale writes): its probabilities, thresholded.
        answers = []
        for spacing in contract.run_spacings_mm:
            volume, restore = prepare_volume(scan, contract, spacing)
            labels, served = client.segment_volume(volume, want_probabilities=True)
            assert np.array_equal(labels, decide_labels(served, THRESHOLD))
            assert (labels != first_max_index(served)).any()
            answers.append((served, restore))
        # The client's mean over the test spacings: decided with the same threshold.
        segmented = client.segment(scan, postprocess=False)
    expected = mean_answer_on_scan_grid(answers, False, postprocess=False, lesion_threshold=THRESHOLD)[0]
    argmax = mean_answer_on_scan_grid(answers, False, postprocess=False)[0]
    assert np.array_equal(segmented.labels, expected)
    assert (expected == 2).sum() > 2 * (argmax == 2).sum()  # the liver disc became lesion


def test_threshold_sweep_moves_the_lesion_and_never_the_liver(benchmark_module, tmp_path):
    """benchmarks/lesion_threshold.py on a network whose p(lesion) is 0.376 wherever it says liver (argmax never
    lesion): thresholds up to 0.35 turn the liver into lesion, from 0.4 on nothing changes; its argmax row is the
    served path's."""
    sweep = benchmark_module("lesion_threshold")
    evaluate = benchmark_module("evaluate_served_model")
    onnx_path = write_pixel_network(tmp_path / "net.onnx", np.array([[0, 0, 0], [0, 0.1, 0], [0, 0.1, 0]]),
                                    np.array([0.0, -5.0, -5.5]))
    # Two test spacings, as the bundled model's three: labels decided on the mean on the scan's grid, where the
    # liver region is the argmax's exactly (one spacing's labels are resampled, which moves edges a little).
    write_network(tmp_path / "repository", "pixel", onnx_path, ModelContract(
        spacing_mm=(1.0, 1.0), patch_size=(16, 16), test_spacings_mm=(1.0, 1.25)))
    network = tmp_path / "repository" / "pixel"
    cases = evaluate.own_phantoms(tmp_path / "cases", 2, 5, (8, 64, 64), "classic")
    counts = sweep.sweep(network, cases)
    assert (counts[:, :, :3] == counts[0, :, :3]).all()  # liver: the argmax's region whatever the threshold
    lesion = dict(zip(sweep.THRESHOLDS, counts[:, :, 3:5].sum(axis=(1, 2))))  # voxels called lesion
    assert lesion[0.15] >= lesion[0.35] > 0 == lesion[0.4] == lesion[None]
    served = evaluate.labels_in_process(read_scan(cases[0][0]), network)
    truth = read_scan(cases[0][1])
    predicted = dataclasses.replace(truth, voxels=served).canonical()[0]
    false_liver = benchmark_module("false_liver")
    expected = false_liver.paired_counts(false_liver.liver_errors(predicted, truth.canonical()[0], 1.0))
    assert counts[0, 0].tolist() == expected
