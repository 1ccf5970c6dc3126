"""--init-from an ONNX export: the folded BatchNorms are unfolded so that the network computes the export exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.export.onnx_export import export_onnx
from mixsup.training.cli import main as train_main
from mixsup.training.models.unet import UNet, UNetConfig
from mixsup.training.onnx_weights import exported_onnx_path, load_exported_weights
from mixsup.training.trainer import load_checkpoint, load_initial_weights, network_from_checkpoint

CONFIG = UNetConfig(base_channels=4, depth=2)


def hu_slices(seed: int, count: int = 4, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-300, 300, (count, 3, size, size)).astype(np.float32))


def trained_looking_unet(seed: int = 0, config: UNetConfig = CONFIG) -> UNet:
    """A U-Net whose BatchNorms hold statistics and affine parts far from their initial values, so that folding
    them matters."""
    torch.manual_seed(seed)
    network = UNet(config)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5), module.running_var.uniform_(0.3, 2.0)
                module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.3)
    return network.eval()


def export(network: UNet, folder: Path) -> Path:
    return export_onnx(network, ModelContract(patch_size=(32, 32), spacing_mm=(1.6, 1.6)), folder / "1" / "model.onnx")


def onnx_probabilities(path: Path, slices: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: slices.numpy()})[0]


def test_loaded_network_computes_the_export_exactly(tmp_path):
    """In eval mode on unseen slices, and in training mode on the slices that measured the statistics (batch
    statistics equal to the running ones there); a network that kept identity BatchNorms would fail both."""
    original = trained_looking_unet()
    path = export(original, tmp_path / "unet")
    calibration, unseen = hu_slices(1), hu_slices(2)
    loaded = UNet(CONFIG)
    load_exported_weights(loaded, path, calibration)
    with torch.no_grad():
        np.testing.assert_allclose(torch.softmax(loaded.eval()(unseen), 1).numpy(), onnx_probabilities(path, unseen),
                                   atol=1e-5)
        np.testing.assert_allclose(torch.softmax(loaded.train()(calibration), 1).numpy(),
                                   onnx_probabilities(path, calibration), atol=1e-4)
        assert not torch.equal(loaded.encoder.blocks[0][0].weight, original.encoder.blocks[0][0].weight)  # folded


def test_another_network_is_refused(tmp_path):
    path = export(trained_looking_unet(config=UNetConfig(base_channels=6, depth=2)), tmp_path / "wide")
    with pytest.raises(InputError, match="network differs"):
        load_exported_weights(UNet(CONFIG), path, hu_slices(1))


def test_a_model_folder_names_its_newest_version(tmp_path):
    for version in (1, 3, 2):
        (tmp_path / "unet" / str(version)).mkdir(parents=True)
        (tmp_path / "unet" / str(version) / "model.onnx").write_bytes(b"")
    assert exported_onnx_path(tmp_path / "unet") == tmp_path / "unet" / "3" / "model.onnx"
    assert exported_onnx_path(tmp_path / "run.pt") is None  # a checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no <version>/model.onnx"):
        exported_onnx_path(tmp_path / "empty")


def test_only_a_unet_run_starts_from_an_export(tmp_path):
    """The other recipes train modules (a teacher, a detection unit) that an export leaves out."""
    path = export(trained_looking_unet(), tmp_path / "unet")
    with pytest.raises(InputError, match="'unet' run only"):
        load_initial_weights(torch.nn.ModuleDict({"segmentation": UNet(CONFIG)}), path, "lazy", lambda: hu_slices(1))


def test_mixsup_train_init_from_a_model_folder(tiny_phantoms, tiny_checkpoint, tmp_path):
    """With a zero learning rate the convolutions keep the export's folded weights and the head its own: the run
    started from the export, not from its random initialisation."""
    source = network_from_checkpoint(load_checkpoint(tiny_checkpoint))
    export(source, tmp_path / "repository" / "unet")
    out = tmp_path / "tuned"
    assert train_main(["unet", "--data", str(tiny_phantoms), "--out", str(out), "--preset", "tiny", "--no-progress",
                       "--set", "epochs=1", "--set", "learning_rate=0.0",
                       "--init-from", str(tmp_path / "repository" / "unet")]) == 0
    tuned = load_checkpoint(out / "last.pt")["state_dict"]
    conv, bn = source.encoder.blocks[0][0], source.encoder.blocks[0][1]
    folded = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None, None, None]
    torch.testing.assert_close(tuned["segmentation.encoder.blocks.0.0.weight"], folded.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(tuned["segmentation.head.weight"], source.head.weight.detach(), rtol=0, atol=0)
