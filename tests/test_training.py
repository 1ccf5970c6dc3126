"""The baseline recipe end to end on tiny phantoms: training, checkpoint content, resume, repeatability."""
from __future__ import annotations

import csv

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
