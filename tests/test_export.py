"""mixsup-export: checkpoint -> ONNX with the HU window inside, contract beside it, repository entries."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.training.trainer import load_checkpoint, network_from_checkpoint


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
    for entry in ["unet_window", "fuse", "segment"]:
        assert (repository / entry / "config.pbtxt").is_file()
    segment = (repository / "segment" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in segment and "unet_window" in segment


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
