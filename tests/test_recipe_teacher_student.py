"""Teacher-student recipe: O2L attention, soft pseudo-labels, the localization branch, the loss, the stages."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixsup.training.losses import (
    one_hot_targets,
    segmentation_localization_loss,
    soft_dice_loss,
    weighted_soft_cross_entropy,
)
from mixsup.training.models.teacher_student import (
    LocalizationBranch,
    O2LAttention,
    StudentUNet,
    TeacherUNet,
    resize_masks,
)
from mixsup.training.models.unet import UNet, UNetConfig
from mixsup.training.recipes.base import STRONG, WEAK, Batch
from mixsup.training.recipes.teacher_student import (
    RECIPE,
    localization_targets,
    pseudo_labels,
)

TINY = UNetConfig(base_channels=4, depth=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**changes):
    from mixsup.training.trainer import TrainConfig

    return TrainConfig.preset("tiny", **changes)


def box_masks(n: int, size: int, organ=(4, 28, 6, 30), lesion=(10, 16, 12, 20)) -> torch.Tensor:
    boxes = torch.zeros(n, 2, size, size)
    boxes[:, 0, organ[0]:organ[1], organ[2]:organ[3]] = 1
    boxes[:, 1, lesion[0]:lesion[1], lesion[2]:lesion[3]] = 1
    return boxes


def randomize_batchnorm(module: torch.nn.Module) -> None:
    for norm in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
            norm.running_mean.uniform_(-1.0, 1.0)
            norm.running_var.uniform_(0.5, 2.0)


# ----------------------------------------------------------------------------------------------- O2L attention
def test_o2l_with_zero_boxes_is_a_uniform_rescaling_by_the_formula():
    attention = O2LAttention(channels=5)
    features = torch.randn(2, 5, 8, 8)
    zero_boxes = torch.zeros(2, 2, 32, 32)

    # Fresh BatchNorm (shift 0): each gate is sigmoid(0) = 1/2, so f -> f * 1.5 * 1.5 everywhere.
    attention.train()
    torch.testing.assert_close(attention(features, zero_boxes), 2.25 * features)

    # Trained statistics: gate k is the BN's constant sigmoid(beta - gamma * mean / sqrt(var + eps)), per channel.
    randomize_batchnorm(attention)
    attention.eval()
    scale = torch.ones(5)
    for gate in (attention.organ, attention.lesion):
        norm = gate.norm
        constant = norm.bias - norm.weight * norm.running_mean / torch.sqrt(norm.running_var + norm.eps)
        scale = scale * (1 + torch.sigmoid(constant))
    out = attention(features, zero_boxes)
    torch.testing.assert_close(out, scale.detach().view(1, 5, 1, 1) * features)
    assert scale.std() > 0.01  # the constant differs per channel, so the check above is not a global one


def test_o2l_with_a_box_rescales_inside_and_outside_differently():
    attention = O2LAttention(channels=3).eval()
    randomize_batchnorm(attention)
    with torch.no_grad():
        for gate in (attention.organ, attention.lesion):
            gate.conv.weight.fill_(1.0)
    features = torch.ones(1, 3, 16, 16)
    boxes = box_masks(1, 16, organ=(2, 14, 2, 14), lesion=(6, 9, 6, 9))
    ratio = attention(features, boxes) / features
    assert not torch.allclose(ratio[0, 0, 7, 7], ratio[0, 0, 0, 0])  # lesion centre vs outside every box
    assert not torch.allclose(ratio[0, 0, 3, 3], ratio[0, 0, 0, 0])  # organ only vs outside


def test_box_masks_are_bilinearly_downsampled_per_scale():
    boxes = torch.zeros(1, 2, 8, 8)
    boxes[0, 0, 0:3, 0:2] = 1  # a 2x2 block averages to 1, a block half inside to 1/2
    small = resize_masks(boxes, (4, 4))
    assert small[0, 0, 0, 0] == 1.0 and small[0, 0, 1, 0] == 0.5 and small[0, 0, 0, 1] == 0.0


# ------------------------------------------------------------------------------------------- boxes as input
def test_teacher_output_depends_on_boxes_and_student_segmentation_does_not():
    teacher, student = TeacherUNet(TINY).eval(), StudentUNet(TINY).eval()
    assert len(teacher.attention) == TINY.depth  # one O2L module per encoder scale above the bottleneck
    hu = torch.randn(2, 3, 32, 32) * 200
    with torch.no_grad():
        a = teacher(hu, box_masks(2, 32))
        b = teacher(hu, box_masks(2, 32, lesion=(20, 26, 4, 10)))
        no_boxes = teacher(hu, torch.zeros(2, 2, 32, 32))
    assert not torch.allclose(a, b) and not torch.allclose(a, no_boxes)
    network = RECIPE.segmentation_network(torch.nn.ModuleDict({"teacher": teacher, "student": student}))
    assert list(inspect.signature(network.forward).parameters) == ["hu"]

    # Through the training loss: other boxes change only the localization term.
    labels = torch.randint(0, 3, (2, 32, 32))
    weights = torch.tensor([0.1, 0.1, 1.0])
    losses = [RECIPE.student_losses(student, {STRONG: Batch(STRONG, hu, boxes, labels)}, weights, alpha=1.0)
              for boxes in (box_masks(2, 32), box_masks(2, 32, lesion=(20, 26, 4, 10)))]
    assert torch.equal(losses[0]["segmentation"], losses[1]["segmentation"])
    assert not torch.allclose(losses[0]["localization"], losses[1]["localization"])


# ------------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_are_soft_probabilities_from_the_teacher():
    teacher = TeacherUNet(TINY)
    randomize_batchnorm(teacher)
    teacher.train()
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 150, size=(5, 20, 27)).astype(np.int16)  # H, W not multiples of 8: padded then cropped
    boxes = np.zeros((2, 5, 20, 27), dtype=np.uint8)
    boxes[0, :, 3:17, 4:22] = 1
    boxes[1, 2, 8:12, 9:14] = 1
    probabilities = pseudo_labels(teacher, hu, boxes, batch_slices=2)

    assert probabilities.shape == (3, 5, 20, 27) and probabilities.dtype == np.float16
    as_float = probabilities.astype(np.float32)
    np.testing.assert_allclose(as_float.sum(axis=0), 1.0, atol=2e-3)
    assert ((as_float > 0.05) & (as_float < 0.95)).mean() > 0.5  # soft, not one-hot
    assert teacher.training  # mode restored

    # Slice 0 by hand: edge slice replicated, air padding to 24 x 32, the slice's own boxes.
    stack = np.pad(hu[[0, 0, 1]], ((0, 0), (0, 4), (0, 5)), constant_values=-1024).astype(np.float32)
    box = np.pad(boxes[:, 0], ((0, 0), (0, 4), (0, 5))).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(teacher.eval()(torch.from_numpy(stack)[None], torch.from_numpy(box)[None]), 1)
    np.testing.assert_allclose(as_float[:, 0], expected[0, :, :20, :27].numpy(), atol=1e-3)


def test_end_of_teacher_stage_writes_soft_labels_of_every_weak_case():
    modules = RECIPE.build(tiny_config())
    volumes = [SimpleNamespace(case=str(i), hu=np.full((3, 16, 16), 40 * i, np.int16),
                               boxes=np.zeros((2, 3, 16, 16), np.uint8)) for i in range(2)]
    saved, asked, logged = {}, [], {}
    hidden = {"0": np.zeros((3, 16, 16), np.uint8)}  # case 1 has no hidden mask: it is not scored

    class Context:
        def volumes(self, kind):
            asked.append(kind)
            return volumes

        def save_soft_labels(self, case, probabilities):
            saved[case] = probabilities

        def hidden_labels(self, case, shape):
            assert tuple(shape) == (3, 16, 16)
            return hidden.get(case)

        def log_stage_result(self, name, values):
            logged[name] = values

    RECIPE.end_stage("student", modules, Context())
    assert not saved and not logged
    RECIPE.end_stage("teacher", modules, Context())
    assert asked == [WEAK] and sorted(saved) == ["0", "1"]
    assert all(p.shape == (3, 3, 16, 16) and p.dtype == np.float16 for p in saved.values())
    # The pseudo-labels' Dice against the hidden mask, from their argmax: an all-background truth scores 1 for a
    # class exactly when the teacher predicts none of it.
    quality = logged["pseudo_label_quality"]
    predicted = saved["0"].astype(np.float32).argmax(axis=0)
    assert quality["weak_cases_scored"] == 1
    assert quality["dice_liver"] == (1.0 if not (predicted > 0).any() else 0.0)
    assert quality["dice_lesion"] == (1.0 if not (predicted == 2).any() else 0.0)


# ------------------------------------------------------------------------------------- localization branch
def test_localization_branch_pixel_shuffles_each_scale_to_full_resolution():
    branch = LocalizationBranch([8, 4], num_classes=3)  # scales 2 and 1
    coarse, fine = torch.zeros(1, 8, 4, 4), torch.zeros(1, 4, 8, 8)
    base = branch([coarse, fine])
    coarse[0, :, 1, 2] = 1.0  # one coarse position feeds exactly its 2x2 block at full resolution
    changed = (branch([coarse, fine]) - base).abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_localization_targets_from_boxes():
    boxes = torch.zeros(1, 2, 2, 3)
    boxes[0, 0] = torch.tensor([[1.0, 1.0, 0.4], [1.0, 0.6, 0.0]])
    boxes[0, 1] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.7]])
    assert localization_targets(boxes).tolist() == [[[1, 2, 0], [1, 1, 2]]]


def test_exported_network_has_no_localization_branch():
    config = tiny_config()
    modules = RECIPE.build(config)
    student = modules["student"].eval()
    network = RECIPE.segmentation_network(modules)
    assert isinstance(network, UNet) and network.config == UNetConfig(base_channels=4, depth=3)
    assert any("localization" in name for name, _ in student.named_parameters())
    assert not any("localization" in name for name in network.state_dict())
    assert set(network.state_dict()) == set(UNet(network.config).state_dict())
    hu = torch.randn(2, 3, 32, 32) * 200
    with torch.no_grad():
        out = network(hu)
        torch.testing.assert_close(out, student(hu)[0])
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32)

    # What export does: rebuild from the config, load the whole state, take the segmentation network.
    rebuilt = RECIPE.build(config)
    rebuilt.load_state_dict(modules.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(RECIPE.segmentation_network(rebuilt).eval()(hu), out)


def test_exported_network_goes_through_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from mixsup.contract import ModelContract
    from mixsup.export.onnx_export import export_onnx, max_parity_error

    network = RECIPE.segmentation_network(RECIPE.build(tiny_config())).eval()
    path = export_onnx(network, ModelContract(patch_size=(32, 32), spacing_mm=(3.2, 3.2)), tmp_path / "m.onnx")
    inputs = np.random.default_rng(1).normal(0, 200, size=(2, 3, 32, 48)).astype(np.float32)
    assert max_parity_error(network, path, inputs) < 1e-4


# ---------------------------------------------------------------------------------------------------- losses
def test_weighted_cross_entropy_by_hand_on_two_pixels():
    weights = torch.tensor([0.1, 0.1, 1.0])  # background, liver, lesion
    # pixel 0: logits equal -> p = 1/3 each; pixel 1: logits (0, ln 2, 0) -> p(liver) = 2/4
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]]).T.reshape(1, 3, 1, 2)
    labels = torch.tensor([[[2, 1]]])  # lesion, liver
    hard = weighted_soft_cross_entropy(logits, one_hot_targets(labels, 3), weights)
    expected_hard = (1.0 * math.log(3) + 0.1 * math.log(2)) / (1.0 + 0.1)
    assert hard.item() == pytest.approx(expected_hard, rel=1e-6)
    assert F.cross_entropy(logits, labels, weight=weights).item() == pytest.approx(expected_hard, rel=1e-6)

    # Soft target on pixel 0: half background, half lesion.
    soft = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 2)
    expected_soft = (0.1 * 0.5 * math.log(3) + 1.0 * 0.5 * math.log(3) + 0.1 * math.log(2)) / (0.05 + 0.5 + 0.1)
    assert weighted_soft_cross_entropy(logits, soft, weights).item() == pytest.approx(expected_soft, rel=1e-6)

    # CE_seg + alpha * CE_loc: localization logits (ln 3, 0, 0) on both pixels, box classes (organ, background).
    # The weights are the localization term's only: CE_seg is the plain mean over pixels (Eq. 4).
    localization = torch.tensor([[math.log(3.0), 0.0, 0.0]] * 2).T.reshape(1, 3, 1, 2)
    box_classes = torch.tensor([[[1, 0]]])
    expected_loc = (0.1 * math.log(5) + 0.1 * math.log(5 / 3)) / 0.2  # p = 1/5 and 3/5
    expected_seg = (0.5 * math.log(3) + 0.5 * math.log(3) + math.log(2)) / 2
    for alpha in (1.0, 0.5):
        losses = segmentation_localization_loss(logits, soft, localization, box_classes, weights, alpha)
        assert losses["segmentation"].item() == pytest.approx(expected_seg, rel=1e-6)
        assert losses["localization"].item() == pytest.approx(expected_loc, rel=1e-6)
        assert losses["loss"].item() == pytest.approx(expected_seg + alpha * expected_loc, rel=1e-6)


def test_student_segmentation_loss_is_minimised_by_the_soft_target_itself():
    """A soft pseudo-label (0, 0.8, 0.2) must train the student towards exactly those probabilities. With the
    class weights (0.1, 0.1, 1.0) on this term, as before, the optimum was p(lesion) = 0.2 / (0.08 + 0.2) ~ 0.71."""
    target = torch.tensor([0.0, 0.8, 0.2]).reshape(1, 3, 1, 1)
    logits = torch.log(target.clamp_min(1e-6)).requires_grad_(True)
    localization, box_classes = torch.zeros(1, 3, 1, 1), torch.tensor([[[1]]])
    losses = segmentation_localization_loss(logits, target, localization, box_classes, torch.tensor([0.1, 0.1, 1.0]))
    losses["segmentation"].backward()
    assert logits.grad.abs().max().item() < 1e-5  # a stationary point: the target is the optimum


def test_student_dice_weight_adds_the_baselines_soft_dice_against_the_same_targets():
    """``student_dice_weight`` (off by default, as in the paper) adds the baseline U-Net's batch soft Dice of
    liver and lesion; with one-hot targets it is exactly the baseline's term, and a soft target counts its
    probabilities. A student that never predicts the lesion pays for it through this term, not only through CE."""
    labels = torch.randint(0, 3, (2, 8, 8))
    logits = torch.randn(2, 3, 8, 8)
    localization, box_classes = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
    weights = torch.tensor([0.1, 0.1, 1.0])
    hard = one_hot_targets(labels, 3)
    plain = segmentation_localization_loss(logits, hard, localization, box_classes, weights)
    assert "dice" not in plain
    with_dice = segmentation_localization_loss(logits, hard, localization, box_classes, weights, dice_weight=0.5)
    assert with_dice["dice"].item() == pytest.approx(soft_dice_loss(logits, labels, (1, 2)).item(), rel=1e-6)
    assert with_dice["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * with_dice["dice"].item(), rel=1e-6)

    soft = torch.softmax(torch.randn(2, 3, 8, 8), dim=1)
    p = torch.softmax(logits, dim=1)
    expected = 1 - np.mean([(2 * (p[:, c] * soft[:, c]).sum() / (p[:, c].sum() + soft[:, c].sum())).item()
                            for c in (1, 2)])
    dice = segmentation_localization_loss(logits, soft, localization, box_classes, weights, dice_weight=1.0)["dice"]
    assert dice.item() == pytest.approx(expected, rel=1e-4)

    # The option reaches the step: same student and batch, the loss grows by the Dice term.
    student = StudentUNet(TINY)
    batch = {STRONG: Batch(STRONG, torch.randn(2, 3, 32, 32) * 200, box_masks(2, 32), torch.randint(0, 3, (2, 32, 32)))}
    config = tiny_config()
    assert RECIPE.option(config, "student_dice_weight") == 0.0
    losses = {}
    for weight in (0.0, 1.0):
        snapshot = StudentUNet(TINY)
        snapshot.load_state_dict(student.state_dict())
        optimizer = torch.optim.SGD(snapshot.parameters(), lr=0.0)
        losses[weight] = RECIPE.train_step("student", {"student": snapshot}, batch, {"student": optimizer},
                                           dataclasses.replace(config, options={"student_dice_weight": weight}))
    assert "dice" not in losses[0.0] and losses[1.0]["dice"] > 0
    assert losses[1.0]["loss"] == pytest.approx(losses[0.0]["loss"] + losses[1.0]["dice"], rel=1e-5)


def test_recipe_defaults_are_the_papers():
    config = tiny_config()
    assert RECIPE.STAGES == ("teacher", "student")
    assert RECIPE.option(config, "alpha") == 1.0
    assert RECIPE.localization_weights(config).tolist() == pytest.approx([0.1, 0.1, 1.0])
    overridden = dataclasses.replace(config, options={"alpha": 0.25, "localization_weight_lesion": 2.0})
    assert RECIPE.option(overridden, "alpha") == 0.25
    assert RECIPE.localization_weights(overridden).tolist() == pytest.approx([0.1, 0.1, 2.0])
    # The paper's teacher sees the boxes only through O2L attention: its input is the 3 slices alone.
    assert RECIPE.build(config)["teacher"].encoder.blocks[0][0].in_channels == 3
    assert RECIPE.epochs("teacher", config) == RECIPE.epochs("student", config) == config.epochs
    own = dataclasses.replace(config, options={"teacher_epochs": 5})
    assert (RECIPE.epochs("teacher", own), RECIPE.epochs("student", own)) == (5, config.epochs)
    student = RECIPE.build(overridden)["student"]
    assert not hasattr(student, "alpha") and not hasattr(student, "class_weights")  # the step reads the config


def test_teacher_takes_boxes_as_input_channels_only_when_asked():
    """The SCN ablation: box masks stacked onto the slices. Without it the boxes still steer the teacher (through
    O2L attention), and both variants rebuild from their config as export does."""
    hu, boxes = torch.randn(1, 3, 32, 32) * 200, box_masks(1, 32)
    for box_input, channels in ((False, 3), (True, 5)):
        config = dataclasses.replace(tiny_config(), options={"teacher_box_input": box_input})
        teacher = RECIPE.build(config)["teacher"].eval()
        assert teacher.encoder.blocks[0][0].in_channels == channels
        with torch.no_grad():
            assert not torch.allclose(teacher(hu, boxes), teacher(hu, torch.zeros_like(boxes)))


# ---------------------------------------------------------------------------------------------------- stages
def test_each_stage_trains_only_its_network():
    config = dataclasses.replace(tiny_config(), options={"alpha": 0.25})
    modules = RECIPE.build(config)
    hu, boxes = torch.randn(2, 3, 32, 32) * 200, box_masks(2, 32)
    strong = Batch(STRONG, hu, boxes, labels=torch.randint(0, 3, (2, 32, 32)))
    weak = Batch(WEAK, hu, boxes, soft_labels=torch.softmax(torch.randn(2, 3, 32, 32), 1))
    assert RECIPE.batch_sizes("teacher", config) == {STRONG: 4}
    assert RECIPE.batch_sizes("student", config) == {STRONG: 2, WEAK: 2}

    for stage, trained, frozen in (("teacher", "teacher", "student"), ("student", "student", "teacher")):
        before = {k: v.clone() for k, v in modules.state_dict().items()}
        optimizers = RECIPE.optimizers(stage, modules, config)
        batches = {STRONG: strong} if stage == "teacher" else {STRONG: strong, WEAK: weak}
        logged = RECIPE.train_step(stage, modules, batches, optimizers, config)
        assert math.isfinite(logged["loss"])
        if stage == "student":  # the config's alpha weighs the localization term
            assert logged["loss"] == pytest.approx(logged["segmentation"] + 0.25 * logged["localization"], rel=1e-5)
        after = modules.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(frozen + "."))
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(trained + "."))

    with pytest.raises(ValueError, match="soft_labels"):
        RECIPE.student_losses(modules["student"], {WEAK: Batch(WEAK, hu, boxes)},
                              RECIPE.localization_weights(config), 1.0)


def test_validation_scores_the_teacher_with_boxes_then_the_student():
    modules = RECIPE.build(tiny_config())
    assert RECIPE.validation_network("teacher", modules) is modules["teacher"]
    assert RECIPE.validation_network("student", modules) is None


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_run_trains_both_stages_and_exports(tmp_path, monkeypatch):
    import mixsup.training.recipes as recipes
    from mixsup.export.cli import main as export_main
    from mixsup.training.cli import main as train_main
    from mixsup.training.data.cli import main as data_main
    from mixsup.training.trainer import load_checkpoint

    if RECIPE.NAME not in recipes.RECIPES:  # runs before the recipe is registered, too
        monkeypatch.setattr(recipes, "RECIPES", (*recipes.RECIPES, RECIPE.NAME))
    data, run, repository = tmp_path / "data", tmp_path / "run", tmp_path / "repo"
    assert data_main(["phantoms", str(data), "--n", "6", "--seed", "3", "--shape", "16", "96", "96",
                      "--weak-fraction", "0.5", "-q"]) == 0
    # The teacher's validation peaks in its second epoch of three, the first that may compete (scores replaced):
    # the student must learn from the pseudo-labels of that teacher, not of its last epoch.
    import mixsup.training.trainer as trainer

    real_scores, real_save, teacher_states = trainer.dice_scores, trainer.save_checkpoint, {}

    def teacher_peaks_second(pairs):
        scores = real_scores(pairs)
        epoch = len(teacher_states) + 1
        return {key: (1.0 if epoch == 2 else 0.0) for key in scores} if epoch <= 3 else scores

    def recording_save(path, payload):
        if payload["stage"] == 0 and path.name == "last.pt":
            teacher_states[payload["epoch"]] = {k: v.clone() for k, v in payload["state_dict"].items()
                                                if k.startswith("teacher.")}
        real_save(path, payload)

    monkeypatch.setattr(trainer, "dice_scores", teacher_peaks_second)
    monkeypatch.setattr(trainer, "save_checkpoint", recording_save)
    # More teacher epochs than the run's 2: its learning-rate schedule must span its own epochs, or it overruns.
    assert train_main([RECIPE.NAME, "--data", str(data), "--out", str(run), "--preset", "tiny", "--no-progress",
                       "--set", "teacher_epochs=3"]) == 0
    final = load_checkpoint(run / "last.pt")["state_dict"]
    assert sorted(teacher_states) == [1, 2, 3]
    assert all(torch.equal(final[k], teacher_states[2][k]) for k in teacher_states[2])
    assert any(not torch.equal(final[k], teacher_states[3][k]) for k in teacher_states[3])
    quality = json.loads((run / "pseudo_label_quality.json").read_text())
    assert quality["weak_cases_scored"] == 3 and 0.0 <= quality["dice_liver"] <= 1.0
    payload = load_checkpoint(run / "best.pt")
    assert payload["recipe"] == RECIPE.NAME and payload["stage"] == 1  # best.pt comes from the student stage
    history = load_checkpoint(run / "last.pt")["history"]
    assert [row["stage"] for row in history] == ["teacher"] * 3 + ["student"] * 2
    written = sorted(path.stem for path in (run / "pseudo_labels").glob("*.npy"))
    assert written == ["3", "4", "5"]  # the weak cases
    soft = np.load(run / "pseudo_labels" / "3.npy").astype(np.float32)
    np.testing.assert_allclose(soft.sum(axis=0), 1.0, atol=2e-3)
    assert export_main([str(run / "best.pt"), "--repository", str(repository), "--name", "teacher_student"]) == 0
    assert (repository / "teacher_student" / "1" / "model.onnx").is_file()
