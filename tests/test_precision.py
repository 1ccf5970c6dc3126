"""Training arithmetic (mixsup.training.precision): which precision ``auto`` picks, what bfloat16 changes in the
modules, and that a run in either precision learns and records what it ran in."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from mixsup.errors import InputError
from mixsup.training.cli import main as train_main
from mixsup.training.losses import ce_dice_loss
from mixsup.training.models.unet import UNet, UNetConfig
from mixsup.training.precision import autocast, native_bfloat16, prepare_modules, resolve_precision
from mixsup.training.trainer import load_checkpoint

CPU = torch.device("cpu")


def test_auto_takes_bfloat16_only_where_the_hardware_computes_it(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) == ("bf16" if native_bfloat16(CPU) else "fp32")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    with pytest.raises(InputError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU)


class TwoHeads(nn.Module):
    """Returns a tuple, as the teacher-student student does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, {"box": y[:, :1]}


def test_bfloat16_modules_compute_in_bfloat16_and_hand_losses_float32():
    modules = prepare_modules(nn.ModuleDict({"net": TwoHeads()}), "bf16")
    assert modules["net"].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert modules["net"].conv.weight.dtype == torch.float32  # the weights the optimizer updates stay float32
    x = torch.randn(2, 3, 8, 8)
    with autocast("bf16", CPU):
        inner = modules["net"].conv(x)
        y, extra = modules["net"](x)
    assert inner.dtype == torch.bfloat16  # the convolution ran in bfloat16 ...
    assert y.dtype == extra["box"].dtype == torch.float32  # ... and the module's outputs reach the loss in float32
    plain = prepare_modules(nn.ModuleDict({"net": TwoHeads()}), "fp32")
    with autocast("fp32", CPU):
        assert plain["net"](x)[0].dtype == torch.float32
    assert plain["net"].conv.weight.is_contiguous() and not plain["net"]._forward_hooks


def test_bfloat16_step_follows_the_float32_step():
    """One U-Net step in each precision from the same weights: the loss agrees to bfloat16's precision and the
    updated weights stay close (bfloat16 is for speed; a different result would be a bug)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32) * 200, torch.randint(0, 3, (4, 32, 32))
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        modules = prepare_modules(nn.ModuleDict({"net": UNet(UNetConfig(base_channels=8, depth=3))}), precision)
        optimizer = torch.optim.SGD(modules.parameters(), lr=0.1)
        with autocast(precision, CPU):
            loss = ce_dice_loss(modules["net"](x), y)
            loss.backward()
        optimizer.step()
        results[precision] = (loss.item(), torch.cat([p.detach().flatten() for p in modules.parameters()]))
    (loss32, weights32), (loss16, weights16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert torch.allclose(weights16, weights32, atol=5e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_tiny_run_learns_in_either_precision_and_records_it(tiny_phantoms, tmp_path, precision):
    out = tmp_path / "run"
    assert train_main(["unet", "--data", str(tiny_phantoms), "--out", str(out), "--preset", "tiny", "--no-progress",
                       "--set", "epochs=3", "--set", "iterations_per_epoch=15", "--set", "learning_rate=0.01",
                       "--set", f"precision={precision}"]) == 0
    payload = load_checkpoint(out / "last.pt")
    assert payload["precision"] == precision and payload["config"]["precision"] == precision
    losses = [float(row["train_loss"]) for row in csv.DictReader((out / "log.csv").open())]
    assert losses[-1] < 0.9 * losses[0], losses


def test_unknown_precision_exits_2_in_one_line(tiny_phantoms, tmp_path, capsys):
    assert train_main(["unet", "--data", str(tiny_phantoms), "--out", str(tmp_path / "run"), "--preset", "tiny",
                       "--set", "precision=fp16"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mixsup-train: error: unknown precision 'fp16'; choose one of auto, fp32, bf16"]
