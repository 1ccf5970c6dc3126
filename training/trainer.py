"""The training loop every recipe runs: sample, step, validate, log, checkpoint. Read it top to bottom.

A recipe (``mixsup.training.recipes``) supplies the network and its loss; this module owns everything else:
presets, seeding, the CSV log, checkpoints that carry the model contract, and resuming.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.training.data.dataset import Augmentation, SliceSampler, Volume, load_volume, stack_indices
from mixsup.training.data.manifest import Manifest

CHECKPOINT_FORMAT = "mixsup-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in the checkpoint so a run can be repeated or resumed."""

    recipe: str = "unet"
    base_channels: int = 16
    depth: int = 4
    spacing_mm: tuple[float, float] = (1.6, 1.6)
    crop: int = 160
    patch_size: int = 160
    batch_size: int = 16
    epochs: int = 30
    iterations_per_epoch: int = 50
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    validation_cases: int = 2
    seed: int = 0
    threads: int = 0  # 0: torch's default

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(cls(**PRESETS[name]), **overrides)

    def override(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``key=value`` strings (values parsed as JSON where possible) with type checks."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or key not in types:
                raise InputError(f"bad override {assignment!r}; known keys: {', '.join(sorted(types))}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            current = getattr(self, key)
            if isinstance(current, tuple):
                value = tuple(value) if isinstance(value, list) else (value,) * len(current)
            elif isinstance(current, float) and isinstance(value, int):
                value = float(value)
            if not isinstance(value, type(current)):
                raise InputError(f"override {key}: expected {type(current).__name__}, got {raw!r}")
            changes[key] = value
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: for tests and smoke runs, not for accuracy.
    "tiny": dict(base_channels=4, depth=3, spacing_mm=(3.2, 3.2), crop=48, patch_size=48, batch_size=4,
                 epochs=2, iterations_per_epoch=4, validation_cases=1),
    "default": {},
}


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@torch.no_grad()
def predict_volume(network: torch.nn.Module, hu: np.ndarray, context_slices: int = 3, batch_size: int = 8,
                   size_divisor: int = 16) -> np.ndarray:
    """Labels for a whole canonical volume, slice by slice on full padded slices (no tiling needed here)."""
    network.eval()
    depth, height, width = hu.shape
    pad_h, pad_w = (-height) % size_divisor, (-width) % size_divisor
    padded = np.pad(hu, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1024).astype(np.float32)
    labels = np.empty(hu.shape, dtype=np.uint8)
    for start in range(0, depth, batch_size):
        stop = min(depth, start + batch_size)
        stacks = np.stack([padded[stack_indices(depth, z, context_slices)] for z in range(start, stop)])
        logits = network(torch.from_numpy(stacks))
        labels[start:stop] = logits.argmax(dim=1)[:, :height, :width].numpy().astype(np.uint8)
    return labels


def dice_scores(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Global Dice over cases: liver as LiTS counts it (liver ∪ lesion), and lesion."""
    from mixsup.metrics import GlobalDice

    liver, lesion = GlobalDice([1]), GlobalDice([2])
    for predicted, truth in pairs:
        liver.update(np.minimum(predicted, 1), np.minimum(truth, 1))
        lesion.update(predicted, truth)
    return {"dice_liver": liver.result()[1], "dice_lesion": lesion.result()[2]}


def save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a mixsup checkpoint")
    return payload


def split_validation(manifest: Manifest, count: int) -> tuple[list, list]:
    strong = manifest.strong()
    if len(strong) < 2 and count > 0:
        raise InputError(f"{manifest.root}: need at least 2 strong cases to train and validate, found {len(strong)}")
    count = min(count, len(strong) - 1)
    return strong[: len(strong) - count], strong[len(strong) - count:]


def train(recipe, manifest: Manifest, out: Path, config: TrainConfig, resume: Path | None = None,
          progress: bool = True) -> Path:
    """Train ``recipe`` on ``manifest``; writes ``last.pt``, ``best.pt`` and ``log.csv`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    rng = seed_everything(config.seed)
    train_cases, validation_cases = split_validation(manifest, config.validation_cases)
    to_volume = lambda case: load_volume(case, config.spacing_mm)  # noqa: E731
    sampler = SliceSampler([to_volume(c) for c in train_cases], crop=config.crop, augmentation=Augmentation())
    validation: list[Volume] = [to_volume(c) for c in validation_cases]

    network = recipe.build_network(config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=total_steps,
                                                    pct_start=0.1)
    start_epoch, best, history = 0, -1.0, []
    if resume is not None:
        state = load_checkpoint(resume)
        network.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, history = state["epoch"], state["best_score"], state["history"]

    contract = ModelContract(patch_size=(config.patch_size, config.patch_size), spacing_mm=config.spacing_mm,
                             recipe=recipe.NAME)
    log_path = out / "log.csv"
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        network.train()
        losses = []
        steps = tqdm(range(config.iterations_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                     disable=not progress, leave=False)
        for _ in steps:
            images, labels = sampler.batch(rng, config.batch_size)
            loss = recipe.loss(network, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            steps.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        pairs = [(predict_volume(network, v.hu, size_divisor=2**config.depth), v.labels) for v in validation]
        scores = dice_scores(pairs) if pairs else {"dice_liver": float("nan"), "dice_lesion": float("nan")}
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **scores,
               "seconds": time.perf_counter() - started}
        history.append(row)
        with log_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  val Dice liver {row['dice_liver']:.4f} "
              f"lesion {row['dice_lesion']:.4f}  ({row['seconds']:.0f} s)", flush=True)
        score = scores["dice_liver"] if np.isfinite(scores["dice_liver"]) else -float(np.mean(losses))
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "recipe": recipe.NAME,
            "config": asdict(config), "network_config": asdict(network.config), "state_dict": network.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "epoch": epoch + 1, "best_score": max(best, score), "history": history,
            "contract": contract.to_dict(), "manifest_sha256": manifest.sha256(),
            "validation_cases": [c.case for c in validation_cases],
        }
        save_checkpoint(out / "last.pt", payload)
        if score > best:
            best = score
            save_checkpoint(out / "best.pt", payload)
    return out / "best.pt"
