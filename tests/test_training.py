"""The baseline recipe end to end on tiny phantoms: training, checkpoint content, resume, repeatability."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.training.cli import main as train_main
from mixsup.training.losses import soft_dice_loss
from mixsup.training.trainer import TrainConfig, load_checkpoint


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
    assert payload["config"]["base_channels"] == 4 and len(payload["manifest_sha256"]) == 64
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["dice_liver"]) <= 1.0 for r in rows)


def test_interrupted_run_resumes_to_identical_weights(phantoms, tmp_path, monkeypatch):
    import mixsup.training.trainer as trainer

    args = ["unet", "--data", str(phantoms), "--preset", "tiny", "--no-progress"]
    assert train_main([*args, "--out", str(tmp_path / "straight")]) == 0

    real_scores, calls = trainer.dice_scores, []

    def interrupt_in_second_epoch(pairs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_scores(pairs)

    monkeypatch.setattr(trainer, "dice_scores", interrupt_in_second_epoch)
    assert train_main([*args, "--out", str(tmp_path / "cut")]) == 130
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(trainer, "dice_scores", real_scores)
    assert train_main([*args, "--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "last.pt")]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])


def test_same_seed_same_weights(phantoms, tmp_path):
    args = ["unet", "--data", str(phantoms), "--preset", "tiny", "--no-progress", "--set", "epochs=1"]
    assert train_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*args, "--out", str(tmp_path / "b")]) == 0
    a = load_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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


def test_two_process_distributed_run(phantoms, tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks train, rank 0 writes one checkpoint that exports."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mixsup.training.cli", "unet", "--data", str(phantoms), "--out", str(out),
               "--preset", "tiny", "--no-progress", "--set", "epochs=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = load_checkpoint(out / "last.pt")
    assert payload["world_size"] == 2 and payload["epoch"] == 1
    assert len(payload["numpy_rng"]) == 2 and payload["numpy_rng"][0] != payload["numpy_rng"][1]
    assert result.stdout.count("mixsup-train: best checkpoint") == 1  # only rank 0 reports


def test_log_header_covers_every_stage(tmp_path):
    from mixsup.training.trainer import write_log

    history = [{"stage": "teacher", "epoch": 1, "train_loss": 1.0},
               {"stage": "student", "epoch": 1, "train_loss": 0.5, "localization": 0.2}]
    write_log(tmp_path / "log.csv", history)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert rows[1]["localization"] == "0.2" and rows[0]["localization"] == ""
    assert [r["stage"] for r in rows] == ["teacher", "student"]
