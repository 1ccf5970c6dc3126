"""The trainer end to end on tiny phantoms: checkpoint content, resume (mid-stage too) and what resume refuses,
repeatability, and that a run learns at all."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.training.cli import main as train_main
from mixsup.training.losses import soft_dice_loss
from mixsup.training.recipes import get_recipe
from mixsup.training.recipes.base import STRONG, Batch
from mixsup.training.trainer import TrainConfig, load_checkpoint, seed_everything


@pytest.fixture
def phantoms(tiny_phantoms):
    return tiny_phantoms


def test_tiny_run_writes_checkpoint_with_contract(phantoms, tmp_path):
    out = tmp_path / "run"
    assert train_main(["unet", "--data", str(phantoms), "--out", str(out), "--preset", "tiny", "--no-progress"]) == 0
    payload = load_checkpoint(out / "best.pt")
    contract = ModelContract.from_dict(payload["contract"])
    assert contract.recipe == "unet" and contract.class_names == ("background", "liver", "lesion")
    assert contract.spacing_mm == (3.2, 3.2) and contract.patch_size == (48, 48)
    assert contract.anti_aliasing is True and payload["config"]["anti_aliasing"] is True
    assert payload["config"]["base_channels"] == 4 and len(payload["manifest_sha256"]) == 64
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["dice_liver"]) <= 1.0 for r in rows)


def interrupted_run(args: list[str], out: Path, at_validation: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run ``mixsup-train args --out out``, interrupted (Ctrl-C) in the ``at_validation``-th epoch's validation,
    after its training steps and before its checkpoint; returns the ``last.pt`` it left."""
    import mixsup.training.trainer as trainer

    real_scores, calls = trainer.dice_scores, []

    def interrupting_scores(pairs: list) -> dict[str, float]:
        calls.append(1)
        if len(calls) == at_validation:
            raise KeyboardInterrupt
        return real_scores(pairs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "dice_scores", interrupting_scores)
        assert train_main([*args, "--out", str(out)]) == 130
    return load_checkpoint(out / "last.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical networks (parameters and buffers)."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differing, f"differing tensors: {differing[:5]}"


def test_interrupted_run_resumes_to_identical_weights(phantoms, tmp_path, monkeypatch):
    args = ["unet", "--data", str(phantoms), "--preset", "tiny", "--no-progress"]
    assert train_main([*args, "--out", str(tmp_path / "straight")]) == 0
    assert interrupted_run(args, tmp_path / "cut", 2, monkeypatch)["epoch"] == 1
    assert train_main([*args, "--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "last.pt")]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    assert_same_weights(straight, resumed)


def test_teacher_student_resumes_mid_student_to_identical_weights(tiny_mixed_phantoms, tmp_path, monkeypatch):
    """Cut in the student's second epoch, a resumed run trains only the student (the teacher's pseudo-labels
    come back from disk) and ends where an uninterrupted run ends."""
    from mixsup.training.recipes.teacher_student import RECIPE

    args = [RECIPE.NAME, "--data", str(tiny_mixed_phantoms), "--preset", "tiny", "--no-progress",
            "--set", "teacher_epochs=1", "--set", "student_epochs=2"]
    assert train_main([*args, "--out", str(tmp_path / "straight")]) == 0
    cut = interrupted_run(args, tmp_path / "cut", 3, monkeypatch)  # validations: teacher 1, student 1, student 2
    assert (cut["stage"], cut["epoch"]) == (1, 1)

    real_step, stepped = RECIPE.train_step, []

    def recording_step(stage, modules, batches, optimizers, config):
        stepped.append(stage)
        return real_step(stage, modules, batches, optimizers, config)

    monkeypatch.setattr(RECIPE, "train_step", recording_step)
    assert train_main([*args, "--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "last.pt")]) == 0
    assert set(stepped) == {"student"}  # the teacher stage was not run again
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    stages = [(row["stage"], int(row["epoch"])) for row in csv.DictReader((tmp_path / "cut" / "log.csv").open())]
    assert stages == [("teacher", 1), ("student", 1), ("student", 2)]
    assert [row["stage"] for row in resumed["history"]] == [row["stage"] for row in straight["history"]]
    assert_same_weights(straight, resumed)


def assert_refused_in_one_line(argv: list[str], capsys: pytest.CaptureFixture, *words: str) -> None:
    """``mixsup-train argv`` exits 2 with one stderr line that names the reason."""
    capsys.readouterr()
    assert train_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


def test_resume_refuses_another_recipes_checkpoint(phantoms, tiny_checkpoint, tmp_path, capsys):
    argv = ["teacher-student", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--no-progress", "--resume", str(tiny_checkpoint)]
    assert_refused_in_one_line(argv, capsys, "recipe", "'unet'", "'teacher-student'")


def test_resume_refuses_another_data_manifest(phantoms, tiny_checkpoint, tmp_path, capsys):
    """Same files, another split (one case dropped): resuming would silently change what trains and validates."""
    other = tmp_path / "other"
    shutil.copytree(phantoms, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["cases"] = manifest["cases"][:-1]
    (other / "manifest.json").write_text(json.dumps(manifest))
    argv = ["unet", "--data", str(other), "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress",
            "--resume", str(tiny_checkpoint)]
    assert_refused_in_one_line(argv, capsys, "manifest")


def test_resume_refuses_a_checkpoint_whose_scans_were_prepared_otherwise(phantoms, tiny_checkpoint, tmp_path,
                                                                          capsys):
    """A run from before anti-aliasing existed (no key in its config) trained on unsmoothed scans: resuming it
    under today's default would feed the rest of the run smoothed ones."""
    payload = load_checkpoint(tiny_checkpoint)
    del payload["config"]["anti_aliasing"]
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    argv = ["unet", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress",
            "--resume", str(older)]
    assert_refused_in_one_line(argv, capsys, "anti_aliasing=false")
    assert train_main([*argv, "--set", "anti_aliasing=false"]) == 0


def initial_parameters(payload: dict) -> dict[str, torch.Tensor]:
    """The parameters a checkpoint's run started from: its recipe built from its config after the trainer's
    seeding, as ``train`` does before the first step."""
    seed_everything(payload["config"]["seed"])
    modules = get_recipe(payload["recipe"]).build(TrainConfig.from_dict(payload["config"]))
    return {name: parameter.detach() for name, parameter in modules.named_parameters()}


def test_same_seed_same_weights(phantoms, tmp_path):
    """Two runs of one seed end bit-identical, and not because neither trained: every parameter moved."""
    args = ["unet", "--data", str(phantoms), "--preset", "tiny", "--no-progress", "--set", "epochs=1"]
    assert train_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*args, "--out", str(tmp_path / "b")]) == 0
    payload = load_checkpoint(tmp_path / "a" / "last.pt")
    a, b = payload["state_dict"], load_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    unmoved = [name for name, initial in initial_parameters(payload).items() if torch.equal(initial, a[name])]
    assert not unmoved, f"parameters never updated: {unmoved}"


def test_loss_falls_on_a_tiny_run(phantoms, tmp_path):
    """The mean training loss of the last epoch is clearly below the first's (about 0.75x at these settings over
    seeds 0-2; a trainer that does not learn stays near 1x)."""
    out = tmp_path / "run"
    assert train_main(["unet", "--data", str(phantoms), "--out", str(out), "--preset", "tiny", "--no-progress",
                       "--set", "epochs=3", "--set", "iterations_per_epoch=15", "--set", "learning_rate=0.01"]) == 0
    losses = [float(row["train_loss"]) for row in csv.DictReader((out / "log.csv").open())]
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0], losses


def test_every_step_gets_the_runs_config(phantoms, tmp_path, monkeypatch):
    from mixsup.training.recipes.unet import RECIPE

    real_step, seen = RECIPE.train_step, []

    def recording_step(stage, modules, batches, optimizers, config):
        seen.append(config)
        return real_step(stage, modules, batches, optimizers, config)

    monkeypatch.setattr(RECIPE, "train_step", recording_step)
    args = ["unet", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress",
            "--set", "epochs=1", "--set", "iterations_per_epoch=3", "--set", "learning_rate=0.005"]
    assert train_main(args) == 0
    assert len(seen) == 3 and all(isinstance(config, TrainConfig) for config in seen)
    stored = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert all(config == TrainConfig.from_dict(stored) for config in seen)
    assert seen[0].learning_rate == 0.005 and seen[0].iterations_per_epoch == 3


def test_overrides_are_typed():
    config = TrainConfig.preset("tiny").override(["epochs=3", "learning_rate=1", "spacing_mm=[2, 2.5]"])
    assert config.epochs == 3 and config.learning_rate == 1.0 and config.spacing_mm == (2, 2.5)
    with pytest.raises(InputError):
        TrainConfig().override(["epochs=many"])
    with pytest.raises(InputError):
        TrainConfig().override(["no_such_key=1"])


def test_a_checkpoint_from_before_anti_aliasing_trained_without_it():
    older = {key: value for key, value in dataclasses.asdict(TrainConfig()).items() if key != "anti_aliasing"}
    assert TrainConfig.from_dict(older).anti_aliasing is False
    assert TrainConfig().anti_aliasing is True
    assert TrainConfig.from_dict(dataclasses.asdict(TrainConfig())).anti_aliasing is True


def test_bad_data_folder_exits_2(tmp_path, capsys):
    assert train_main(["unet", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_soft_dice_loss_hand_computed():
    # Two pixels, class 1 predicted with probability ~1 where present: Dice of class 1 is 2*1/(1+1) = 1.
    logits = torch.tensor([[[[0.0, 0.0]], [[50.0, -50.0]], [[-50.0, -50.0]]]])  # [1, 3, 1, 2]
    target = torch.tensor([[[1, 0]]])
    assert float(soft_dice_loss(logits, target, classes=[1])) == pytest.approx(0.0, abs=1e-4)
    # Predicting class 1 everywhere when only one pixel is class 1: Dice = 2*1/(2+1).
    logits = torch.tensor([[[[-50.0, -50.0]], [[50.0, 50.0]], [[-50.0, -50.0]]]])
    assert float(soft_dice_loss(logits, target, classes=[1])) == pytest.approx(1 - 2 / 3, abs=1e-4)


def _confident_logits(labels: list[int]) -> torch.Tensor:
    """[1, 3, 1, W] logits that predict ``labels`` with probability ~1."""
    confident = {0: [50.0, -50.0, -50.0], 1: [-50.0, 50.0, -50.0], 2: [-50.0, -50.0, 50.0]}
    return torch.tensor([confident[label] for label in labels]).T.reshape(1, 3, 1, len(labels))


def test_region_dice_charges_a_lesion_taken_for_background_as_missed_liver_too():
    """Truth: liver, liver, lesion, lesion. One lesion pixel predicted as liver, or as background. Class Dice
    (liver, lesion) charges the first more (it is also false liver); LiTS's regions (liver ∪ lesion, lesion) charge
    the second more (it is also missed liver), as the metric does."""
    from mixsup.training.losses import LITS_REGIONS

    target = torch.tensor([[[1, 1, 2, 2]]])
    as_liver, as_background = _confident_logits([1, 1, 1, 2]), _confident_logits([1, 1, 0, 2])
    by_classes = [float(soft_dice_loss(x, target, classes=(1, 2))) for x in (as_liver, as_background)]
    by_regions = [float(soft_dice_loss(x, target, classes=LITS_REGIONS)) for x in (as_liver, as_background)]
    assert by_classes[0] > by_classes[1]
    assert by_regions[1] > by_regions[0]
    # hand-computed: liver ∪ lesion Dice 1 and 6/7, lesion Dice 2/3 both times
    assert by_regions == pytest.approx([(0 + 1 / 3) / 2, (1 / 7 + 1 / 3) / 2], abs=1e-4)


def test_the_unet_recipe_s_region_dice_option_reaches_its_loss(monkeypatch):
    from mixsup.training.recipes import unet

    seen = []
    monkeypatch.setattr(unet, "ce_dice_loss", lambda logits, labels, classes: seen.append(classes) or logits.sum())
    config = TrainConfig.preset("tiny", options={"region_dice": True})
    modules = unet.RECIPE.build(config)
    optimizers = {"all": torch.optim.SGD(modules.parameters(), lr=0.0)}
    batch = Batch(kind=STRONG, images=torch.zeros(1, 3, 32, 32), boxes=torch.zeros(1, 2, 32, 32),
                  labels=torch.zeros(1, 32, 32, dtype=torch.long))
    for option in (True, False):
        config = TrainConfig.preset("tiny", options={"region_dice": option})
        unet.RECIPE.train_step("train", modules, {STRONG: batch}, optimizers, config)
    assert seen == [unet.LITS_REGIONS, (1, 2)]


def test_blob_dice_weighs_a_missed_small_lesion_as_much_as_a_found_large_one():
    """A 10-pixel lesion found and a 1-pixel lesion missed: the batch Dice barely notices the miss (20/21), the
    blob Dice averages the two instances (1 and 0); a neighbour found is not a false positive for an instance."""
    from mixsup.training.losses import blob_dice_loss

    truth = [2] * 10 + [0] * 5 + [2] + [0] * 4
    labels = torch.tensor([[truth]])
    instances = torch.tensor([[[1] * 10 + [0] * 5 + [2] + [0] * 4]])
    missed_small = _confident_logits([2] * 10 + [0] * 10)
    assert float(soft_dice_loss(missed_small, labels, classes=[2])) == pytest.approx(1 / 21, abs=1e-4)
    assert float(blob_dice_loss(missed_small, labels, instances)) == pytest.approx(0.5, abs=1e-4)
    assert float(blob_dice_loss(_confident_logits(truth), labels, instances)) == pytest.approx(0.0, abs=1e-4)
    # one false-positive pixel outside both lesions lowers both instances' Dice: 1 - (2/3 + 18/19) / 2
    false_positive = _confident_logits(truth[:19] + [2])
    assert float(blob_dice_loss(false_positive, labels, instances)) == pytest.approx(1 - (2 / 3 + 20 / 21) / 2,
                                                                                   abs=1e-4)
    # a crop without lesions adds nothing (the mean is over crops that hold one), and none at all gives 0
    two_crops = torch.cat([missed_small, _confident_logits([0] * 20)])
    no_lesion = torch.zeros(1, 1, 20, dtype=torch.long)
    assert float(blob_dice_loss(two_crops, torch.cat([labels, no_lesion]), torch.cat([instances, no_lesion]))) == \
        pytest.approx(0.5, abs=1e-4)
    assert float(blob_dice_loss(missed_small, no_lesion, no_lesion)) == 0.0


def test_the_unet_recipe_s_blob_weight_option_adds_the_blob_loss(monkeypatch):
    from mixsup.training.recipes import unet

    monkeypatch.setattr(unet, "ce_dice_loss", lambda logits, labels, classes: logits.sum() * 0.0)
    seen = []
    monkeypatch.setattr(unet, "blob_dice_loss", lambda logits, labels, instances: seen.append(instances) or
                        logits.sum() * 0.0 + 1.0)
    modules = unet.RECIPE.build(TrainConfig.preset("tiny"))
    optimizers = {"all": torch.optim.SGD(modules.parameters(), lr=0.0)}
    instances = torch.ones(1, 32, 32, dtype=torch.long)
    batch = Batch(kind=STRONG, images=torch.zeros(1, 3, 32, 32), boxes=torch.zeros(1, 2, 32, 32),
                  labels=torch.full((1, 32, 32), 2, dtype=torch.long), instances=instances)
    losses = [unet.RECIPE.train_step("train", modules, {STRONG: batch}, optimizers,
                                     TrainConfig.preset("tiny", options={"blob_weight": weight}))["loss"]
              for weight in (0.0, 0.5)]
    assert losses == pytest.approx([0.0, 0.5]) and len(seen) == 1 and seen[0] is instances
    without_ids = Batch(kind=STRONG, images=batch.images, boxes=batch.boxes, labels=batch.labels)
    with pytest.raises(ValueError, match="instance ids"):
        unet.RECIPE.train_step("train", modules, {STRONG: without_ids}, optimizers,
                               TrainConfig.preset("tiny", options={"blob_weight": 0.5}))


def test_config_file_then_flags(phantoms, tmp_path):
    from mixsup.training.trainer import read_config_file

    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 1\nlearning_rate = 0.01\nspacing_mm = [4.0, 4.0]\n')
    values = read_config_file(toml)
    config = TrainConfig.preset("tiny").updated(values).override(["epochs=3"])
    assert (config.epochs, config.learning_rate, config.spacing_mm) == (3, 0.01, (4.0, 4.0))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError):
        read_config_file(tmp_path / "bad.json")
    out = tmp_path / "run"
    assert train_main(["unet", "--data", str(phantoms), "--out", str(out), "--preset", "tiny", "--no-progress",
                       "--config", str(toml)]) == 0
    assert load_checkpoint(out / "last.pt")["config"]["spacing_mm"] == (4.0, 4.0)


def test_warped_boxes_cover_warped_labels(phantoms):
    """Image, labels and box masks go through one geometry: every organ pixel stays inside the organ box."""
    from mixsup.training.data.dataset import SliceSampler, load_volume
    from mixsup.training.data.manifest import load_dataset
    from mixsup.training.recipes.base import LESION_BOX, ORGAN_BOX

    volumes = [load_volume(case, (3.2, 3.2)) for case in load_dataset(phantoms).strong()]
    batch = SliceSampler(volumes, crop=32).batch(np.random.default_rng(0), 16)
    assert batch.images.shape == (16, 3, 32, 32) and batch.boxes.shape == (16, 2, 32, 32)
    organ, lesion = batch.labels > 0, batch.labels == 2
    assert organ.any()
    assert bool((batch.boxes[:, ORGAN_BOX][organ] == 1).all())
    assert bool((batch.boxes[:, LESION_BOX][lesion] == 1).all())


def test_log_header_covers_every_stage(tmp_path):
    from mixsup.training.trainer import write_log

    history = [{"stage": "teacher", "epoch": 1, "train_loss": 1.0},
               {"stage": "student", "epoch": 1, "train_loss": 0.5, "localization": 0.2}]
    write_log(tmp_path / "log.csv", history)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert rows[1]["localization"] == "0.2" and rows[0]["localization"] == ""
    assert [r["stage"] for r in rows] == ["teacher", "student"]


def test_init_from_starts_a_new_run_from_another_runs_weights(phantoms, tiny_checkpoint, tmp_path):
    """Fine-tuning: with a zero learning rate the new run keeps the given weights exactly (a run that ignored
    --init-from would hold its own random initialisation), and its checkpoint says where it started."""
    out = tmp_path / "tuned"
    argv = ["unet", "--data", str(phantoms), "--out", str(out), "--preset", "tiny", "--no-progress",
            "--set", "epochs=1", "--set", "learning_rate=0.0", "--init-from", str(tiny_checkpoint)]
    assert train_main(argv) == 0
    tuned, source = load_checkpoint(out / "last.pt"), load_checkpoint(tiny_checkpoint)
    weights = [k for k, v in source["state_dict"].items() if v.dtype.is_floating_point and "running" not in k]
    assert weights
    for key in weights:
        torch.testing.assert_close(tuned["state_dict"][key], source["state_dict"][key], rtol=0, atol=0)
    assert tuned["initialized_from"] == str(tiny_checkpoint)
    assert tuned["epoch"] == 1


def test_init_from_refuses_another_network_shape(phantoms, tiny_checkpoint, tmp_path, capsys):
    argv = ["unet", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress",
            "--set", "base_channels=6", "--init-from", str(tiny_checkpoint)]
    assert_refused_in_one_line(argv, capsys, "network differs")


def test_init_from_and_resume_exclude_each_other(phantoms, tiny_checkpoint, tmp_path, capsys):
    argv = ["unet", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--preset", "tiny", "--no-progress",
            "--init-from", str(tiny_checkpoint), "--resume", str(tiny_checkpoint)]
    assert_refused_in_one_line(argv, capsys, "exclude")
