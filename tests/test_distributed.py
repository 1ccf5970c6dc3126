"""Distributed training with ``torchrun``: two CPU processes (gloo) that must end with the same weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mixsup.training.trainer import load_checkpoint

PROBE = Path(__file__).with_name("ddp_probe.py")


def test_two_process_run_keeps_ranks_in_sync(tiny_phantoms, tmp_path):
    """Both ranks train on different crops (a numpy stream per rank) yet end with identical, trained weights:
    only DDP's gradient averaging does that. Rank 0 alone writes the checkpoint and reports."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(PROBE), "unet", "--data", str(tiny_phantoms), "--out", str(out), "--preset", "tiny",
               "--no-progress", "--set", "epochs=1", "--set", "iterations_per_epoch=3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rank0, rank1 = (json.loads((out / f"weights-rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["init"] == rank1["init"]  # same torch seed on every rank
    assert rank0["trained"] != rank0["init"]  # the ranks did step
    assert rank0["trained"] == rank1["trained"], "the ranks' weights diverged: gradients were not averaged"
    payload = load_checkpoint(out / "last.pt")
    assert payload["world_size"] == 2 and payload["epoch"] == 1
    assert len(payload["numpy_rng"]) == 2 and payload["numpy_rng"][0] != payload["numpy_rng"][1]
    assert result.stdout.count("mixsup-train: best checkpoint") == 1  # only rank 0 reports
