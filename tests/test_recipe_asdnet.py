"""ASDNet recipe: sample-attention Dice, the confidence mask, the alternating adversarial steps, and export."""
from __future__ import annotations

import math

import pytest
import torch

from mixsup.training.losses import (
    confidence_mask,
    confident_self_training_loss,
    per_sample_soft_dice,
    sample_attention_dice_loss,
    sample_attention_weights,
)
from mixsup.training.recipes.asdnet import (
    RECIPE,
    confidence_step,
    segment_by_kind,
    segmentation_step,
    unlabeled_images,
)
from mixsup.training.recipes.base import STRONG, UNLABELED, WEAK, Batch
from mixsup.training.trainer import TrainConfig


def logits_of(probabilities: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax over the class axis is exactly ``probabilities`` [N][C][pixels] (up to 1e-12)."""
    p = torch.tensor(probabilities, dtype=torch.float64).unsqueeze(2)  # [N, C, 1, W]
    return p.clamp_min(1e-12).log()


# Two samples, four pixels each, classes (background, liver, lesion); only class 1 is scored.
#   sample 0: target liver on pixels 0-1, predicted liver 1.0 on pixel 0 only  -> dsc = 2*1 / (1 + 2) = 2/3
#   sample 1: target liver everywhere, predicted liver 0.25 everywhere      -> dsc = 2*1 / (1 + 4) = 2/5
PROBABILITIES = [
    [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    [[0.75, 0.75, 0.75, 0.75], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]],
]
TARGET = torch.tensor([[[1, 1, 0, 0]], [[1, 1, 1, 1]]])
DSC = (2 / 3, 2 / 5)
WEIGHTS = ((1 - 2 / 3) ** 2, (1 - 2 / 5) ** 2)  # 1/9, 0.36


def test_sample_attention_dice_matches_hand_computed_values():
    logits = logits_of(PROBABILITIES)
    dice = per_sample_soft_dice(logits, TARGET, classes=(1,))
    assert dice.tolist() == pytest.approx(DSC, abs=1e-5)
    assert sample_attention_weights(dice, beta=2.0).tolist() == pytest.approx(WEIGHTS, abs=1e-5)
    expected = (WEIGHTS[0] * (1 - DSC[0]) + WEIGHTS[1] * (1 - DSC[1])) / 2  # (1/27 + 0.216) / 2
    loss = sample_attention_dice_loss(logits, TARGET, beta=2.0, classes=(1,))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # beta = 0 is the plain mean Dice loss: the attention is what changes the value.
    plain = sample_attention_dice_loss(logits, TARGET, beta=0.0, classes=(1,))
    assert plain.item() == pytest.approx(1 - sum(DSC) / 2, abs=1e-5)


def test_sample_attention_weight_carries_no_gradient():
    logits = logits_of(PROBABILITIES).requires_grad_(True)
    loss = sample_attention_dice_loss(logits, TARGET, beta=2.0, classes=(1,))
    (gradient,) = torch.autograd.grad(loss, logits)

    constant_weights = logits_of(PROBABILITIES).requires_grad_(True)
    dice = per_sample_soft_dice(constant_weights, TARGET, classes=(1,))
    reference = (torch.tensor(WEIGHTS, dtype=dice.dtype) * (1 - dice)).mean()
    (expected,) = torch.autograd.grad(reference, constant_weights)
    assert torch.allclose(gradient, expected, atol=1e-6)
    # Had the weight been differentiated, d/dx of (1-d)^3 = 3 (1-d)^2 is three times the detached gradient.
    assert not torch.allclose(gradient, 3 * expected, atol=1e-6)
    assert not sample_attention_weights(per_sample_soft_dice(logits, TARGET, (1,))).requires_grad


def test_confidence_mask_selects_exactly_the_voxels_above_gamma():
    gamma = 0.5
    confidence = torch.tensor([[[0.2, 0.5, 0.51, 0.7], [0.4999, 1.0, 0.0, 0.5]]])
    expected = torch.tensor([[[False, False, True, True], [False, True, False, False]]])
    assert torch.equal(confidence_mask(confidence, gamma), expected)


def test_self_training_loss_uses_only_confident_voxels_and_own_argmax():
    gamma = 0.5
    confidence = torch.tensor([[[0.2, 0.5, 0.51, 0.7]]])  # confident: pixels 2 and 3 only
    probabilities = [[[0.7, 0.1, 0.2, 0.1], [0.2, 0.8, 0.1, 0.3], [0.1, 0.1, 0.7, 0.6]]]
    logits = logits_of(probabilities).requires_grad_(True)  # [1, 3, 1, 4]
    loss = confident_self_training_loss(logits, confidence, gamma)
    # argmax of pixels 2 and 3 is the lesion class, at p = 0.7 and 0.6.
    assert loss.item() == pytest.approx((-math.log(0.7) - math.log(0.6)) / 2, abs=1e-6)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert torch.all(gradient[..., :2] == 0) and torch.all(gradient[..., 2:].abs().sum(1) > 0)
    # Nothing trusted: no loss at all (not a NaN from an empty mean).
    assert confident_self_training_loss(logits, torch.full_like(confidence, gamma), gamma).item() == 0.0


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    config = TrainConfig.preset("tiny", depth=2, options={"gamma": 0.4})
    modules = RECIPE.build(config)
    optimizers = RECIPE.optimizers("train", modules, config)
    strong = Batch(STRONG, images=torch.empty(2, 3, 16, 16).uniform_(-300, 300), boxes=torch.zeros(2, 2, 16, 16),
                   labels=torch.randint(0, 3, (2, 16, 16)))
    unlabeled = Batch(UNLABELED, images=torch.empty(2, 3, 16, 16).uniform_(-300, 300),
                      boxes=torch.zeros(2, 2, 16, 16))
    return config, modules, optimizers, strong, unlabeled


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_options_reach_the_step_and_optimizers_split_the_networks():
    config, modules, optimizers, _, _ = tiny_setup()
    weights = RECIPE.loss_weights(config)
    assert weights.gamma == 0.4 and weights.lambda_adv == 0.03 and weights.beta == 2.0
    assert not hasattr(RECIPE, "weights")  # read from the config in each step, not kept on the recipe
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    seg = ids(p for g in optimizers["segmentation"].param_groups for p in g["params"])
    conf = ids(p for g in optimizers["confidence"].param_groups for p in g["params"])
    assert seg == ids(modules["segmentation"].parameters()) and conf == ids(modules["confidence"].parameters())
    assert set(RECIPE.batch_sizes("train", config)) == {STRONG, UNLABELED, WEAK}
    no_weak = TrainConfig.preset("tiny", options={"weak_as_unlabeled": 0})
    assert set(RECIPE.batch_sizes("train", no_weak)) == {STRONG, UNLABELED}


def test_segmentation_step_leaves_confidence_network_unchanged():
    config, modules, optimizers, strong, unlabeled = tiny_setup()
    confidence_before, segmentation_before = snapshot(modules["confidence"]), snapshot(modules["segmentation"])
    losses, images, probabilities = segmentation_step(modules, strong, unlabeled.images,
                                                      optimizers["segmentation"], RECIPE.loss_weights(config))
    assert same(modules["confidence"], confidence_before)
    assert not same(modules["segmentation"], segmentation_before)
    assert images.shape[0] == 4 and probabilities.shape == (4, 3, 16, 16) and not probabilities.requires_grad
    assert all(math.isfinite(v) for v in losses.values()) and losses["adversarial"] > 0


def test_confidence_step_leaves_segmentation_network_unchanged():
    _, modules, optimizers, strong, unlabeled = tiny_setup()
    images = torch.cat([strong.images, unlabeled.images])
    # Predictions still attached to the segmentation graph: the step itself must cut them off.
    probabilities = torch.softmax(modules["segmentation"](images), dim=1)
    segmentation_before, confidence_before = snapshot(modules["segmentation"]), snapshot(modules["confidence"])
    losses = confidence_step(modules, images, strong.labels, probabilities, optimizers["confidence"])
    assert same(modules["segmentation"], segmentation_before)
    assert all(p.grad is None for p in modules["segmentation"].parameters())
    assert not same(modules["confidence"], confidence_before)
    assert losses["confidence"] == pytest.approx(losses["confidence_real"] + losses["confidence_fake"], rel=1e-6)


def test_unlabeled_crops_do_not_change_the_strong_crops_batch_statistics():
    _, modules, _, strong, unlabeled = tiny_setup()
    network = modules["segmentation"].train()
    alone = network(strong.images)
    images, logits = segment_by_kind(network, strong.images, unlabeled.images * 3 + 500)
    assert torch.equal(images[:2], strong.images) and logits.shape == (4, 3, 16, 16)
    assert torch.allclose(logits[:2], alone, atol=1e-6)


def test_train_step_updates_both_networks_with_or_without_unlabeled_crops():
    config, modules, optimizers, strong, unlabeled = tiny_setup()
    config = config.updated({"options": {"lambda_adv": 0.5, "lambda_semi": 2.0}})
    for batches in ({STRONG: strong, UNLABELED: unlabeled}, {STRONG: strong}):
        before = {name: snapshot(module) for name, module in modules.items()}
        losses = RECIPE.train_step("train", dict(modules.items()), batches, optimizers, config)
        assert all(not same(module, before[name]) for name, module in modules.items())
        assert {"loss", "semi", "adversarial", "confidence"} <= set(losses)
        # The step weighs its terms with the options of the config it is given.
        expected = (losses["cross_entropy"] + losses["attention_dice"] + 0.5 * losses["adversarial"]
                    + 2.0 * losses["semi"])
        assert losses["loss"] == pytest.approx(expected, rel=1e-5)
    assert losses["semi"] == 0.0  # the strong-only step has no unlabeled term
    weak = Batch(WEAK, images=unlabeled.images[:1], boxes=unlabeled.boxes[:1])
    assert unlabeled_images({STRONG: strong, UNLABELED: unlabeled, WEAK: weak}).shape[0] == 3
    assert unlabeled_images({STRONG: strong}) is None


def test_exported_network_has_no_confidence_parameters(tmp_path):
    from mixsup.contract import ModelContract
    from mixsup.export.onnx_export import export_onnx, max_parity_error
    from mixsup.training.models.unet import UNet

    config, modules, _, _, _ = tiny_setup()
    # What export does: rebuild from the stored config, load the whole state, keep the segmentation network.
    rebuilt = RECIPE.build(TrainConfig.from_dict(__import__("dataclasses").asdict(config)))
    rebuilt.load_state_dict(modules.state_dict())
    network = RECIPE.segmentation_network(rebuilt).eval()
    assert isinstance(network, UNet) and network.config.base_channels == config.base_channels
    confidence_ids = {id(p) for p in rebuilt["confidence"].parameters()}
    assert confidence_ids and not confidence_ids & {id(p) for p in network.parameters()}
    assert set(network.state_dict()) == set(UNet(network.config).state_dict())
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in UNet(network.config).parameters())
    contract = ModelContract(patch_size=(16, 16), spacing_mm=config.spacing_mm, recipe="asdnet")
    path = export_onnx(network, contract, tmp_path / "model.onnx")
    probe = torch.empty(1, 3, 16, 16).uniform_(-500, 500).numpy()
    assert max_parity_error(network, path, probe) < 1e-4


@pytest.fixture(scope="module")
def mixed_phantoms(tmp_path_factory):
    from mixsup.training.data.cli import main as data_main

    root = tmp_path_factory.mktemp("asdnet-phantoms")
    assert data_main(["phantoms", str(root), "--n", "4", "--seed", "3", "--shape", "8", "64", "64",
                      "--weak-fraction", "0.25", "--unlabeled-fraction", "0.25", "-q"]) == 0
    return root


def test_tiny_run_trains_on_unlabeled_scans_and_exports(mixed_phantoms, tmp_path, monkeypatch):
    import csv

    import onnx

    import mixsup.training.recipes as recipes
    from mixsup.contract import ModelContract
    from mixsup.export.cli import main as export_main
    from mixsup.training.cli import main as train_main
    from mixsup.training.trainer import load_checkpoint

    if "asdnet" not in recipes.RECIPES:  # until the recipe is registered
        monkeypatch.setattr(recipes, "RECIPES", (*recipes.RECIPES, "asdnet"))
    out, repository = tmp_path / "run", tmp_path / "repo"
    assert train_main(["asdnet", "--data", str(mixed_phantoms), "--out", str(out), "--preset", "tiny",
                       "--no-progress", "--set", "epochs=1", "--set", "lambda_semi=0.5"]) == 0
    payload = load_checkpoint(out / "best.pt")
    assert payload["recipe"] == "asdnet" and payload["config"]["options"]["lambda_semi"] == 0.5
    assert any(key.startswith("confidence.") for key in payload["state_dict"])  # training keeps the adversary
    (row,) = csv.DictReader((out / "log.csv").open())
    assert 0.0 <= float(row["dice_liver"]) <= 1.0 and float(row["semi"]) > 0.0  # unlabeled crops were used

    assert export_main([str(out / "best.pt"), "--repository", str(repository), "--name", "asdnet"]) == 0
    model = onnx.load(str(repository / "asdnet" / "1" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input"]
    assert ModelContract.load(repository / "asdnet" / "1" / "contract.json").recipe == "asdnet"
