"""ASDNet recipe: sample-attention generalized Dice, the confidence mask, the alternating adversarial steps, the
semi-supervised warm-up, and export."""
from __future__ import annotations

import math

import pytest
import torch

from mixsup.training.losses import (
    confidence_mask,
    confident_self_training_loss,
    per_sample_generalized_dice,
    per_sample_soft_dice,
    sample_attention_dice_loss,
    sample_attention_weights,
)
from mixsup.training.recipes.asdnet import (
    RECIPE,
    confidence_step,
    optimizer_steps,
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


# Two samples, four pixels each, classes (background, liver, lesion); the attention scores class 1 only.
#   sample 0: target liver on pixels 0-1, predicted liver 1.0 on pixel 0 only  -> dsc = 2*1 / (1 + 2) = 2/3
#   sample 1: target liver everywhere, predicted liver 0.25 everywhere      -> dsc = 2*1 / (1 + 4) = 2/5
# Generalized Dice over all three classes; here every class weight of a sample is equal (sample 0: background and
# liver cover 2 pixels each; sample 1: liver alone is present), absent classes taking the present classes' weight:
#   sample 0: overlaps background 2, liver 1; sums background 3 + 2, liver 1 + 2  -> GD = 2*3 / 8 = 3/4
#   sample 1: overlap liver 1; sums background 3 + 0, liver 1 + 4               -> GD = 2*1 / 8 = 1/4
PROBABILITIES = [
    [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    [[0.75, 0.75, 0.75, 0.75], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]],
]
TARGET = torch.tensor([[[1, 1, 0, 0]], [[1, 1, 1, 1]]])
DSC = (2 / 3, 2 / 5)
GD = (3 / 4, 1 / 4)
WEIGHTS = ((1 - 2 / 3) ** 2, (1 - 2 / 5) ** 2)  # 1/9, 0.36


def test_sample_attention_dice_matches_hand_computed_values():
    logits = logits_of(PROBABILITIES)
    dice = per_sample_soft_dice(logits, TARGET, classes=(1,))
    assert dice.tolist() == pytest.approx(DSC, abs=1e-5)
    assert sample_attention_weights(dice, beta=2.0).tolist() == pytest.approx(WEIGHTS, abs=1e-5)
    assert per_sample_generalized_dice(logits, TARGET).tolist() == pytest.approx(GD, abs=1e-5)
    expected = (WEIGHTS[0] * (1 - GD[0]) + WEIGHTS[1] * (1 - GD[1])) / 2  # (1/36 + 0.27) / 2
    loss = sample_attention_dice_loss(logits, TARGET, beta=2.0, classes=(1,))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # beta = 0 is the plain mean generalized Dice loss: the attention is what changes the value.
    plain = sample_attention_dice_loss(logits, TARGET, beta=0.0, classes=(1,))
    assert plain.item() == pytest.approx(1 - sum(GD) / 2, abs=1e-5)


def test_attention_dice_loss_is_the_generalized_dice_with_inverse_square_volume_weights():
    # Both samples: target background on pixels 0-2 (volume 3, weight 1/9), liver on pixel 3 (volume 1, weight 1);
    # the lesion is absent and takes the largest present weight, 1.
    target = torch.tensor([[[0, 0, 0, 1]], [[0, 0, 0, 1]]])
    probabilities = [
        # background overlap 1 + 1 + 0.5 = 2.5, sum 3 + 3; liver overlap 0.5, sum 1 + 1; no lesion predicted
        [[1.0, 1.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]],
        # background overlap 2.5, sum 2.5 + 3; liver overlap 0.5, sum 0.5 + 1; lesion predicted on 1 pixel's worth
        [[1.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.5, 0.5]],
    ]
    generalized = (2 * (2.5 / 9 + 0.5) / (6 / 9 + 2), 2 * (2.5 / 9 + 0.5) / (5.5 / 9 + 1.5 + 1))  # 7/12, 1/2
    logits = logits_of(probabilities)
    assert per_sample_generalized_dice(logits, target).tolist() == pytest.approx(generalized, abs=1e-5)
    # The attention's Dice is the liver's alone (the lesion is absent): 2 * 0.5 / (1 + 1) and 2 * 0.5 / (0.5 + 1).
    dsc = (1 / 2, 2 / 3)
    expected = sum((1 - d) ** 2 * (1 - g) for d, g in zip(dsc, generalized)) / 2
    assert sample_attention_dice_loss(logits, target, beta=2.0).item() == pytest.approx(expected, abs=1e-5)


def confident_logits(labels: torch.Tensor, margin: float = 12.0) -> torch.Tensor:
    """Logits [N, 3, h, w] of a near-perfect prediction of ``labels`` [N, h, w]: every other class at p ~ e^-12."""
    return margin * torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double()


def test_perfect_prediction_on_a_lesion_free_crop_gets_no_attention():
    liver_only = torch.zeros(16, 16, dtype=torch.long)
    liver_only[4:12, 4:12] = 1
    background_only = torch.zeros(16, 16, dtype=torch.long)
    labels = torch.stack([liver_only, background_only])
    logits = confident_logits(labels)
    dice = per_sample_soft_dice(logits, labels)
    assert dice.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    assert torch.all(sample_attention_weights(dice) < 1e-6)
    assert sample_attention_dice_loss(logits, labels).item() < 1e-6
    # An absent class is no failure only when it is not predicted: liver predicted all over a crop without
    # foreground, or a lesion in the target that the prediction misses, still draw the attention.
    liver_everywhere = confident_logits(torch.ones_like(labels[1:]))
    assert sample_attention_weights(per_sample_soft_dice(liver_everywhere, labels[1:])).item() > 0.99
    missed_lesion = liver_only.clone()
    missed_lesion[6:8, 6:8] = 2
    weight = sample_attention_weights(per_sample_soft_dice(confident_logits(liver_only[None]), missed_lesion[None]))
    # Liver: 60 pixels of the 64 predicted are liver in the target; lesion: Dice 0. dsc = (120 / 124 + 0) / 2.
    assert weight.item() == pytest.approx((1 - (2 * 60 / (64 + 60) + 0) / 2) ** 2, abs=1e-3)


def test_sample_attention_weight_carries_no_gradient():
    logits = logits_of(PROBABILITIES).requires_grad_(True)
    loss = sample_attention_dice_loss(logits, TARGET, beta=2.0, classes=(1,))
    (gradient,) = torch.autograd.grad(loss, logits)

    constant_weights = logits_of(PROBABILITIES).requires_grad_(True)
    generalized = per_sample_generalized_dice(constant_weights, TARGET)
    reference = (torch.tensor(WEIGHTS, dtype=generalized.dtype) * (1 - generalized)).mean()
    (expected,) = torch.autograd.grad(reference, constant_weights)
    assert torch.allclose(gradient, expected, atol=1e-6)
    # Had the weight been differentiated, the Dice inside it would add its own gradient.
    attached = logits_of(PROBABILITIES).requires_grad_(True)
    differentiated = ((1 - per_sample_soft_dice(attached, TARGET, (1,))) ** 2
                      * (1 - per_sample_generalized_dice(attached, TARGET))).mean()
    assert not torch.allclose(gradient, torch.autograd.grad(differentiated, attached)[0], atol=1e-6)
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
    config = config.updated({"options": {"lambda_adv": 0.5, "lambda_semi": 2.0, "semi_warmup_fraction": 0.0}})
    for batches in ({STRONG: strong, UNLABELED: unlabeled}, {STRONG: strong}):
        before = {name: snapshot(module) for name, module in modules.items()}
        losses = RECIPE.train_step("train", dict(modules.items()), batches, optimizers, config)
        assert all(not same(module, before[name]) for name, module in modules.items())
        assert {"loss", "semi", "adversarial", "confidence"} <= set(losses)
        # The step weighs its terms with the options of the config it is given.
        expected = (losses["cross_entropy"] + losses["attention_dice"] + 0.5 * losses["adversarial"]
                    + 2.0 * losses["semi"])
        assert losses["loss"] == pytest.approx(expected, rel=1e-5) and losses["lambda_semi"] == 2.0
    assert losses["semi"] == 0.0  # the strong-only step has no unlabeled term
    weak = Batch(WEAK, images=unlabeled.images[:1], boxes=unlabeled.boxes[:1])
    assert unlabeled_images({STRONG: strong, UNLABELED: unlabeled, WEAK: weak}).shape[0] == 3
    assert unlabeled_images({STRONG: strong}) is None


def warmup_setup(lambda_semi: float):
    """:func:`tiny_setup` for a run of 2 epochs x 4 steps whose first quarter (2 steps) is the semi-supervised
    warm-up; gamma 0 trusts every pixel, so the semi-supervised term is never empty."""
    config, modules, optimizers, strong, unlabeled = tiny_setup()
    config = config.updated({"options": {"gamma": 0.0, "lambda_semi": lambda_semi, "semi_warmup_fraction": 0.25}})
    assert RECIPE.epochs("train", config) * config.iterations_per_epoch == 8
    return config, modules, optimizers, {STRONG: strong, UNLABELED: unlabeled}


def test_semi_supervised_term_waits_for_the_warmup():
    runs = {lambda_semi: warmup_setup(lambda_semi) for lambda_semi in (0.0, 5.0)}
    for step in range(3):
        losses = {}
        for lambda_semi, (config, modules, optimizers, batches) in runs.items():
            losses[lambda_semi] = RECIPE.train_step("train", dict(modules.items()), batches, optimizers, config)
        without, with_semi = (snapshot(runs[key][1]["segmentation"]) for key in (0.0, 5.0))
        # During the warm-up the semi-supervised weight changes nothing; after it, it does.
        identical = all(torch.allclose(without[k].float(), with_semi[k].float(), atol=1e-7) for k in without)
        assert identical == (step < 2)
        assert losses[5.0]["semi"] > 0 and losses[5.0]["lambda_semi"] == (5.0 if step >= 2 else 0.0)
    weights = RECIPE.loss_weights(runs[5.0][0])
    assert [weights.at_step(step, 8).lambda_semi for step in range(4)] == [0.0, 0.0, 5.0, 5.0]


def test_warmup_count_survives_a_resume_from_checkpointed_states():
    config, modules, optimizers, batches = warmup_setup(5.0)
    for _ in range(2):
        RECIPE.train_step("train", dict(modules.items()), batches, optimizers, config)
    assert optimizer_steps(optimizers["segmentation"]) == 2
    # What the trainer does on resume: fresh modules and optimizers, then the checkpointed states loaded.
    resumed = RECIPE.build(config)
    resumed.load_state_dict(modules.state_dict())
    resumed_optimizers = RECIPE.optimizers("train", resumed, config)
    for name, optimizer in resumed_optimizers.items():
        optimizer.load_state_dict(optimizers[name].state_dict())
    losses = RECIPE.train_step("train", dict(resumed.items()), batches, resumed_optimizers, config)
    assert losses["lambda_semi"] == 5.0
    fresh = RECIPE.optimizers("train", resumed, config)
    assert RECIPE.train_step("train", dict(resumed.items()), batches, fresh, config)["lambda_semi"] == 0.0


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
    assert 0.0 < float(row["lambda_semi"]) < 0.5  # 4 steps: the first is the warm-up, the other 3 weigh 0.5

    assert export_main([str(out / "best.pt"), "--repository", str(repository), "--name", "asdnet"]) == 0
    model = onnx.load(str(repository / "asdnet" / "1" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input"]
    assert ModelContract.load(repository / "asdnet" / "1" / "contract.json").recipe == "asdnet"
