"""Every recipe exports its segmentation path only: no parameter of a stripped head is in the exported ONNX or
TorchScript graph, and PyTorch, ONNX Runtime and TorchScript agree on raw-HU inputs of several shapes.

Checkpoints here are built, not trained: each recipe's networks at the tiny size with every parameter and
BatchNorm statistic moved off its initial value by a seeded draw, so parameter values are unique (a value check
can tell a head from the segmentation path) and eval-mode BatchNorm is not the identity.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.export.onnx_export import onnx_probabilities, torch_probabilities
from mixsup.export.torchscript_export import torchscript_probabilities
from mixsup.training.recipes import RECIPES, get_recipe
from mixsup.training.trainer import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, TrainConfig, network_from_checkpoint

# TorchScript is what Triton's pytorch_libtorch backend loads; torch's notices that it is deprecated are not news.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

PATCH = 32
#: Modules that training uses and export must leave behind, per recipe.
STRIPPED = {
    "unet": lambda modules: [],
    "teacher-student": lambda modules: [modules["teacher"], modules["student"].localization],
    "msdn": lambda modules: [modules["msdn"].detection_decoder, modules["msdn"].detection_projections,
                             modules["msdn"].detection_unit],
    "lazy": lambda modules: [modules["network"].detection_head, modules["network"].separation_path,
                             modules["network"].separation_head],
    "asdnet": lambda modules: [modules["confidence"]],
}
#: Modules outside the plain encoder-decoder that the exported graph must keep: MSDN's sSE gates read the
#: detection encoder's features.
KEPT = {"msdn": lambda modules: [modules["msdn"].segmentation.detection_encoder, modules["msdn"].segmentation.gates]}
#: Raw-HU parity inputs: batch, height, width (multiples of the tiny nets' divisor, 8).
SHAPES = [(1, 32, 32), (3, 48, 64), (2, 56, 40)]


def build_checkpoint(recipe_name: str, path, seed: int = 0) -> nn.ModuleDict:
    """A checkpoint of ``recipe_name``'s tiny networks with perturbed parameters; returns the networks."""
    recipe = get_recipe(recipe_name)
    config = TrainConfig.preset("tiny", recipe=recipe_name, patch_size=PATCH)
    torch.manual_seed(seed)
    modules = recipe.build(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in modules.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        for module in modules.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        # The segmentation path's statistics from data, as training leaves them: with the drawn ones its
        # activations fade layer by layer and every pixel gets the same probabilities.
        segmentation = recipe.segmentation_network(modules).train()
        for module in segmentation.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches below
        for _ in range(2):
            segmentation(torch.empty(4, 3, PATCH, PATCH).uniform_(-300, 350, generator=generator))
        for module in segmentation.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    contract = ModelContract(patch_size=(PATCH, PATCH), spacing_mm=config.spacing_mm, recipe=recipe_name)
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "recipe": recipe_name,
                "config": asdict(config), "state_dict": modules.state_dict(), "contract": contract.to_dict()}, path)
    return modules.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{recipe: (networks, checkpoint, repository)}, each recipe exported as ONNX (``<name>``) and TorchScript
    (``<name>_ts``)."""
    root = tmp_path_factory.mktemp("recipes")
    repository = root / "repo"
    result = {}
    for index, recipe in enumerate(RECIPES):
        checkpoint = root / f"{recipe}.pt"
        modules = build_checkpoint(recipe, checkpoint, seed=index)
        name = recipe.replace("-", "_")
        for args in ([], ["--format", "torchscript", "--name", f"{name}_ts"]):
            assert export_main([str(checkpoint), "--repository", str(repository), "--name", name,
                                "--no-ensemble", *args]) == 0
        result[recipe] = modules, checkpoint, repository
    return result


def paths(repository, recipe):
    name = recipe.replace("-", "_")
    return repository / name / "1" / "model.onnx", repository / f"{name}_ts" / "1" / "model.pt"


def parameter_count(modules) -> int:
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


def folded_parameter_count(network: nn.Module) -> int:
    """Parameters of ``network`` once each BatchNorm is folded into the bias-free convolution before it (the ONNX
    exporter does this in eval mode): the BatchNorm's weight and bias (2C) become the convolution's bias (C)."""
    batch_norm_channels = sum(m.num_features for m in network.modules() if isinstance(m, nn.BatchNorm2d))
    return parameter_count([network]) - batch_norm_channels


def contains(tensors, wanted: torch.Tensor) -> bool:
    return any(t.shape == wanted.shape and torch.equal(t, wanted) for t in tensors)


@pytest.mark.parametrize("recipe", RECIPES)
def test_stripped_heads_are_not_exported(exported, recipe):
    modules, checkpoint, repository = exported[recipe]
    onnx_path, torchscript_path = paths(repository, recipe)
    segmentation = get_recipe(recipe).segmentation_network(modules)
    stripped, kept = STRIPPED[recipe](modules), KEPT.get(recipe, lambda m: [])(modules)

    # Every parameter of the recipe is either on the segmentation path or in a named stripped head.
    exported_ids = {id(p) for p in segmentation.parameters()}
    stripped_ids = {id(p) for module in stripped for p in module.parameters()}
    assert not exported_ids & stripped_ids
    assert exported_ids | stripped_ids == {id(p) for p in modules.parameters()}
    assert {id(p) for module in kept for p in module.parameters()} <= exported_ids
    if recipe != "unet":
        assert parameter_count(stripped) > 0

    # TorchScript holds exactly the segmentation path's parameters: none of a stripped head, all of the kept.
    scripted = list(torch.jit.load(str(torchscript_path)).parameters())
    assert sum(p.numel() for p in scripted) == parameter_count([segmentation])
    assert not any(contains(scripted, p) for module in stripped for p in module.parameters())
    assert all(contains(scripted, p) for module in kept for p in module.parameters())

    # The ONNX graph holds the segmentation path's parameters after BatchNorm folding, and no stripped one.
    graph = onnx.load(str(onnx_path)).graph
    initializers = [torch.from_numpy(numpy_helper.to_array(tensor).copy()) for tensor in graph.initializer]
    assert sum(t.numel() for t in initializers) == folded_parameter_count(segmentation)
    assert not any(contains(initializers, p.detach()) for module in stripped for p in module.parameters())


@pytest.mark.parametrize("recipe", RECIPES)
def test_pytorch_onnx_torchscript_agree_on_raw_hu(exported, recipe):
    _, checkpoint, repository = exported[recipe]
    onnx_path, torchscript_path = paths(repository, recipe)
    network = network_from_checkpoint(torch.load(checkpoint, weights_only=False))
    rng = np.random.default_rng(7)
    for batch, height, width in SHAPES:
        hu = rng.uniform(-1100, 1500, (batch, 3, height, width)).astype(np.float32)
        hu[0, :, :4] = -3024.0  # padding value of many scanners, far below the window
        reference = torch_probabilities(network, hu)
        for name, output in [("onnx", onnx_probabilities(onnx_path, hu)),
                             ("torchscript", torchscript_probabilities(torchscript_path, hu))]:
            assert output.shape == (batch, 3, height, width), name
            assert np.abs(output - reference).max() <= 1e-4, (name, height, width)
        assert np.allclose(reference.sum(axis=1), 1.0, atol=1e-5)
        # not a trivial agreement: the probabilities vary across pixels
        assert reference.std(axis=(0, 2, 3)).max() > 1e-3
