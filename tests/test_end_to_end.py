"""The whole path with real parts: the bundled network in a fresh model repository, the real Triton server
started through ``mixsup-serve``, ``mixsup-client segment`` on a phantom the model never saw, Dice checked
against the phantom's own label, and the server stopped by its PID."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from triton_utils import start_serve, stop_serve

from mixsup.clients.cli import main as client_main
from mixsup.contract import ModelContract
from mixsup.metrics import dice
from mixsup.postprocess import largest_component
from mixsup.repository import write_ensemble, write_network
from mixsup.scan import read_nifti
from mixsup.training.data.cli import main as data_main

BUNDLED = Path(__file__).resolve().parents[1] / "model_repository" / "unet" / "1"

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def served_bundled_model(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    contract = ModelContract.load(BUNDLED / "contract.json")
    write_network(repository, "unet", BUNDLED / "model.onnx", contract)
    write_ensemble(repository)
    process, grpc_url, _ = start_serve(repository, log_dir=tmp_path_factory.mktemp("logs"))
    yield grpc_url
    assert stop_serve(process) == 0


def test_segment_unseen_phantom(served_bundled_model, tmp_path, capsys):
    # Seed 424242 is far from the seeds the bundled model was trained on (model_repository/MODEL_CARD.md).
    assert data_main(["phantoms", str(tmp_path / "scans"), "--n", "1", "--seed", "424242",
                      "--shape", "40", "256", "256"]) == 0
    scan_path, label_path = tmp_path / "scans" / "volume-0.nii.gz", tmp_path / "scans" / "segmentation-0.nii.gz"
    out = tmp_path / "out" / "seg.nii.gz"
    assert client_main(["segment", str(scan_path), "-o", str(out), "--url", served_bundled_model]) == 0
    assert str(out) in capsys.readouterr().out

    scan, predicted, truth = read_nifti(scan_path), read_nifti(out), read_nifti(label_path)
    assert predicted.voxels.shape == scan.voxels.shape and np.allclose(predicted.affine, scan.affine)
    assert predicted.voxels.dtype == np.uint8 and set(np.unique(predicted.voxels)) <= {0, 1, 2}
    p, t = predicted.voxels, truth.voxels
    # A bar any broken orientation, grid mapping or tiling fails (they leave the liver elsewhere: Dice < 0.3).
    # The accuracy target (global liver Dice >= 0.85 over held-out scans) is measured by
    # benchmarks/evaluate_served_model.py; this small-body case is among the hardest (0.74 with v11, MODEL_CARD.md).
    assert dice(np.minimum(p, 1), np.minimum(t, 1), 1) >= 0.6
    # Post-processed: the organ is one component and every lesion lies inside it.
    organ = p > 0
    assert np.array_equal(largest_component(organ), organ)


def test_bad_input_leaves_server_serving(served_bundled_model, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    assert client_main(["segment", str(broken), "--url", served_bundled_model]) == 2
    assert not list(tmp_path.glob("*_seg.nii.gz"))
    assert client_main(["health", "--url", served_bundled_model]) == 0
