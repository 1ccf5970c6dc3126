"""``context_slices`` (the 2.5D network's z-context) reaches every stage from one training setting: each recipe's
networks, the sampler's crops, validation, the teacher's pseudo-labels, the checkpoint's contract and what export
writes for serving. An odd count is the only kind with a centre slice; anything else is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_utils import start_serve, stop_serve

from mixsup.clients.client import SegmentationClient
from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.export.cli import main as export_main
from mixsup.export.onnx_export import onnx_probabilities, torch_probabilities
from mixsup.repository import read_config
from mixsup.serving.runtime import create_session
from mixsup.serving.tiling import predict_volume_probabilities
from mixsup.training.cli import main as train_main
from mixsup.training.recipes import RECIPES, get_recipe
from mixsup.training.trainer import TrainConfig, load_checkpoint, network_from_checkpoint

PATCH = 32


@pytest.mark.parametrize("count", [0, 2, 4, -3])
def test_even_or_non_positive_context_is_refused(count):
    with pytest.raises(InputError, match="context_slices"):
        TrainConfig.preset("tiny", context_slices=count)


def test_refused_on_the_command_line_in_one_line(tiny_phantoms, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["unet", "--data", str(tiny_phantoms), "--out", str(out), "--preset", "tiny",
                       "--set", "context_slices=4", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "context_slices" in error and len(error.splitlines()) == 1
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipes_exported_network_takes_the_configured_stack(recipe):
    config = TrainConfig.preset("tiny", recipe=recipe, context_slices=5)
    segmentation = get_recipe(recipe).segmentation_network(get_recipe(recipe).build(config)).eval()
    with torch.no_grad():
        assert segmentation(torch.zeros(1, 5, PATCH, PATCH)).shape == (1, 3, PATCH, PATCH)
        with pytest.raises(RuntimeError):
            segmentation(torch.zeros(1, 3, PATCH, PATCH))


@pytest.fixture(scope="module")
def five_slice_export(tiny_mixed_phantoms, tmp_path_factory):
    """A tiny teacher-student trained on 5-slice stacks and exported with its ensemble: (run folder, repository)."""
    out, repository = tmp_path_factory.mktemp("run-5"), tmp_path_factory.mktemp("repository-5")
    assert train_main(["teacher-student", "--data", str(tiny_mixed_phantoms), "--out", str(out), "--preset", "tiny",
                       "--set", "context_slices=5", "--set", f"patch_size={PATCH}", "--no-progress"]) == 0
    assert export_main([str(out / "best.pt"), "--repository", str(repository), "--name", "five"]) == 0
    return out, repository


def test_five_slice_teacher_student_trains_and_exports_five_slices(five_slice_export):
    """Both stages and the pseudo-labels between them run on 5-slice stacks (a 3-slice crop would not fit the
    first convolution), and export hands serving a 5-channel input in the ONNX graph, the Triton config and the
    window step's parameters."""
    out, repository = five_slice_export
    assert list((out / "pseudo_labels").glob("*"))
    payload = load_checkpoint(out / "best.pt")
    assert ModelContract.from_dict(payload["contract"]).context_slices == 5
    assert ModelContract.load(repository / "five" / "1").context_slices == 5
    assert [list(t.dims) for t in read_config(repository / "five" / "config.pbtxt").input] == [[5, -1, -1]]
    window = read_config(repository / "five_window" / "config.pbtxt")
    assert int(window.parameters["CONTEXT_SLICES"].string_value) == 5
    hu = np.random.default_rng(0).uniform(-300, 350, (2, 5, PATCH, PATCH)).astype(np.float32)
    reference = torch_probabilities(network_from_checkpoint(payload), hu)
    assert np.abs(onnx_probabilities(repository / "five" / "1" / "model.onnx", hu) - reference).max() <= 1e-4


@pytest.mark.triton
def test_triton_serves_the_five_slice_model_in_slabs(five_slice_export, tmp_path):
    """The real server, fed in 4-slice slabs (so every slab border needs a 2-slice halo on either side), returns
    what the exported network computes in process on the whole volume's 5-slice stacks."""
    _, repository = five_slice_export
    volume = np.random.default_rng(3).integers(-200, 250, size=(11, 40, 48)).astype(np.int16)
    process, grpc_url, _ = start_serve(repository, log_dir=tmp_path)
    try:
        with SegmentationClient(grpc_url, slab_slices=4) as client:
            assert client.contract().context_slices == 5
            _, served = client.segment_volume(volume, want_probabilities=True)
    finally:
        assert stop_serve(process) == 0
    contract = ModelContract.load(repository / "five" / "1")
    session = create_session(repository / "five" / "1" / "model.onnx", device="cpu")
    expected = predict_volume_probabilities(volume, lambda stacks: session.run(None, {"input": stacks})[0],
                                            contract.patch_size, num_classes=3, context_slices=5,
                                            size_divisor=contract.size_divisor)
    assert served.shape == (3, *volume.shape)
    assert np.abs(served.astype(np.float32) - expected).max() < 2e-3
