"""Every recipe, trained tiny on mixed supervision, exports into one repository that the real Triton serves as a
five-member ensemble; the served probabilities are the mean of the members' own ONNX outputs."""
from __future__ import annotations

import numpy as np
import pytest
from triton_utils import start_serve, stop_serve

from mixsup.clients.client import SegmentationClient
from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.serving.runtime import create_session
from mixsup.serving.tiling import predict_volume_probabilities
from mixsup.training.cli import main as train_main
from mixsup.training.data.cli import main as data_main
from mixsup.training.recipes import RECIPES

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def mixed_phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    assert data_main(["phantoms", str(root), "--n", "6", "--seed", "11", "--shape", "8", "64", "64",
                      "--weak-fraction", "0.34", "--unlabeled-fraction", "0.17", "-q"]) == 0
    return root


@pytest.fixture(scope="module")
def repository(mixed_phantoms, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for recipe in RECIPES:
        out = tmp_path_factory.mktemp(f"run-{recipe}")
        assert train_main([recipe, "--data", str(mixed_phantoms), "--out", str(out), "--preset", "tiny",
                           "--no-progress", "--set", "epochs=1", "--set", "iterations_per_epoch=2"]) == 0
        assert export_main([str(out / "best.pt"), "--repository", str(repo),
                            "--name", recipe.replace("-", "_"), "--member", "segment"]) == 0
    return repo


def test_every_recipe_serves_in_one_ensemble(repository, tmp_path):
    names = [recipe.replace("-", "_") for recipe in RECIPES]
    process, grpc_url, _ = start_serve(repository, log_dir=tmp_path)
    try:
        volume = np.random.default_rng(5).integers(-200, 250, size=(5, 40, 56)).astype(np.int16)
        with SegmentationClient(grpc_url) as client:
            contract = client.contract()
            labels, probabilities = client.segment_volume(volume, want_probabilities=True)
    finally:
        assert stop_serve(process) == 0
    assert sorted(m["name"] for m in contract.extra["ensemble_members"]) == sorted(names)
    members = []
    for name in names:
        member = ModelContract.load(repository / name / "1" / "contract.json")
        session = create_session(repository / name / "1" / "model.onnx", device="cpu")
        members.append(predict_volume_probabilities(volume, lambda stacks: session.run(None, {"input": stacks})[0],
                                                    member.patch_size, num_classes=3,
                                                    size_divisor=member.size_divisor).astype(np.float32))
    expected = np.mean(members, axis=0)
    assert probabilities.shape == (3, *volume.shape) and labels.shape == volume.shape
    assert np.abs(probabilities.astype(np.float32) - expected).max() < 2e-3
    confident = np.sort(expected, axis=0)[-1] - np.sort(expected, axis=0)[-2] > 1e-2
    assert np.array_equal(labels[confident], expected.argmax(axis=0)[confident])
