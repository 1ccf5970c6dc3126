"""The training loop every recipe runs: sample, step, validate, log, checkpoint. Read it top to bottom.

A recipe (:class:`mixsup.training.recipes.base.Recipe`) supplies the method: networks, optimizers, the kinds of
batches a step wants, the step itself, what happens at the end of a stage. This module owns everything else:
presets and config files, seeding, data, distributed training (``torchrun`` -> DistributedDataParallel; gloo on
CPU, nccl on GPU), validation, the CSV log, and checkpoints that carry the model contract so a run resumes in the
stage and epoch it stopped in.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tomllib
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mixsup.contract import ModelContract
from mixsup.errors import InputError
from mixsup.files import atomic_path
from mixsup.resample import resample_inplane
from mixsup.stacks import padded_stack_batches
from mixsup.training.data.dataset import (
    Augmentation,
    SliceSampler,
    Volume,
    load_volume,
    produced_ahead,
)
from mixsup.training.data.lesion_synthesis import LesionSynthesis
from mixsup.training.data.manifest import Manifest, find_mask, load_case
from mixsup.training.onnx_weights import exported_onnx_path, load_exported_weights
from mixsup.training.precision import autocast, prepare_modules, resolve_precision
from mixsup.training.recipes.base import STRONG, Recipe

CHECKPOINT_FORMAT = "mixsup-checkpoint"
CHECKPOINT_VERSION = 2
PSEUDO_LABELS_DIR = "pseudo_labels"


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in the checkpoint so a run can be repeated or resumed."""

    recipe: str = "unet"
    base_channels: int = 16
    depth: int = 4
    spacing_mm: tuple[float, float] = (1.6, 1.6)
    crop: int = 128  # what the bundled model was trained with; a step costs (128/160)^2 of a 160 crop
    patch_size: int = 160
    #: Neighbouring axial slices the network sees, centre slice included (odd): its z-context, written into the
    #: model contract so that serving feeds the same stacks. 5 was measured and not kept: the false liver on
    #: liver-free slices did not fall and lesions did (benchmarks/results/context_5).
    context_slices: int = 3
    #: Smooth each scan before downsampling it in-plane to ``spacing_mm`` (written into the model contract, so the
    #: client prepares scans the same way): a 0.7 mm scan's pixel noise then averages out on the 1.6 mm grid
    #: instead of being sampled. Checkpoints from before the field trained without it (:meth:`from_dict`).
    anti_aliasing: bool = True
    batch_size: int = 16
    #: Of the crops not centred on a lesion, the share centred on the organ (the rest lie anywhere). 0.5 (more
    #: crops of liver-free slices) was measured and not kept: lesions fell in the recipes benchmark and the
    #: bundled model's false liver on those slices did not (benchmarks/results/foreground_fraction_0.5).
    foreground_fraction: float = 0.8
    #: Share of strong crops that get 1-3 synthetic lesions pasted into their liver (training.data.lesion_synthesis):
    #: lesions no run can memorise. 0.5 lifted held-out lesion Dice where a long schedule memorises a small pool and
    #: lowered it at the bundled model's scale (benchmarks/results/synthetic_lesions), so the default stays 0.
    synthetic_lesions: float = 0.0
    #: Share of the lesion-centred crops centred on a lesion instance drawn uniformly (SliceSampler), so that small
    #: lesions are seen as often as large ones; 0 draws a lesion slice uniformly. 0.5 was measured for the bundled
    #: model and not kept: more small lesions found, liver and lesion Dice lower (MODEL_CARD.md).
    lesion_instance_fraction: float = 0.0
    epochs: int = 30
    iterations_per_epoch: int = 50
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    validation_cases: int = 2
    seed: int = 0
    threads: int = 0  # 0: torch's default
    #: auto | fp32 | bf16: bfloat16 autocast of the training steps, float32 weights and losses
    #: (mixsup.training.precision); auto takes bf16 where the device computes it natively. Validation runs float32.
    precision: str = "auto"
    #: The recipe's own hyperparameters (its ``DEFAULTS`` overridden by the user).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.context_slices < 1 or self.context_slices % 2 != 1:
            raise InputError(f"config context_slices: need a positive odd number, got {self.context_slices}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(cls(**PRESETS[name]), **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config stored in a checkpoint; one from before ``anti_aliasing`` existed trained without it."""
        return cls().updated({"anti_aliasing": False, **values})

    def updated(self, values: dict[str, Any], option_names: Sequence[str] = ()) -> "TrainConfig":
        """Apply ``values`` with type checks; keys in ``option_names`` (or under ``options``) go to options."""
        types = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        options = dict(self.options)
        for key, value in values.items():
            if key == "options" and isinstance(value, dict):
                options.update(value)
                continue
            if key in option_names and key not in types:
                options[key] = value
                continue
            if key not in types:
                known = sorted([*types, *option_names])
                raise InputError(f"unknown config key {key!r}; known: {', '.join(known)}")
            current = getattr(self, key)
            if isinstance(current, tuple):
                value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(current)
            elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, type(current)):
                raise InputError(f"config {key}: expected {type(current).__name__}, got {value!r}")
            changes[key] = value
        return dataclasses.replace(self, **changes, options=options)

    def override(self, assignments: Sequence[str], option_names: Sequence[str] = ()) -> "TrainConfig":
        """Apply ``key=value`` strings from the command line (values parsed as JSON where possible)."""
        values: dict[str, Any] = {}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise InputError(f"bad override {assignment!r}: expected KEY=VALUE")
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw
        return self.updated(values, option_names)


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: for tests and smoke runs, not for accuracy.
    # One thread: tiny convolutions gain nothing from a second one and lose a lot when the cores are busy.
    "tiny": dict(base_channels=4, depth=3, spacing_mm=(3.2, 3.2), crop=48, patch_size=48, batch_size=4,
                 epochs=2, iterations_per_epoch=4, validation_cases=1, threads=1),
    "default": {},
}


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or TOML file of config keys (recipe options may sit at top level or under ``options``)."""
    if not path.is_file():
        raise InputError(f"{path}: no such config file")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> Distributed:
    """Join the process group ``torchrun`` describes in the environment; a plain run stays single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Distributed(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Distributed(rank=dist.get_rank(), world_size=world_size, device=device)


def seed_everything(seed: int, rank: int = 0) -> np.random.Generator:
    """Same weights on every rank (torch seed), different crops per rank (numpy stream per rank)."""
    torch.manual_seed(seed)
    return np.random.default_rng([seed, rank])


def distribute(modules: nn.ModuleDict, parallel: Distributed) -> dict[str, nn.Module]:
    """Each trainable network wrapped in DDP when distributed. Unused parameters are allowed because mixed
    supervision skips networks per batch kind (a weak batch never reaches MSDN's segmentation decoder)."""
    if parallel.world_size == 1:
        return dict(modules.items())
    wrapped: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if any(p.requires_grad for p in module.parameters()):
            ids = [parallel.device.index] if parallel.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        wrapped[name] = module
    return wrapped


@torch.no_grad()
def predict_volume(logits_fn: Callable[..., torch.Tensor], hu: np.ndarray, boxes: np.ndarray | None = None,
                   context_slices: int = 3, batch_size: int = 8, size_divisor: int = 16,
                   device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Labels for a whole canonical volume, slice by slice on full padded slices (no tiling needed here).

    ``logits_fn(images)`` or, when ``boxes`` ([2,D,H,W] box masks) is given, ``logits_fn(images, boxes)``.
    """
    height, width = hu.shape[1:]
    labels = np.empty(hu.shape, dtype=np.uint8)
    for batch, stacks, box_masks in padded_stack_batches(hu, context_slices, batch_size, size_divisor, boxes):
        inputs = [torch.from_numpy(stacks).to(device)]
        if box_masks is not None:
            inputs.append(torch.from_numpy(box_masks).to(device))
        logits = logits_fn(*inputs)
        # max().indices, not argmax(): the same first-maximum labels, 10x faster over dim 1 on CPU (torch 2.13)
        labels[batch] = logits.max(dim=1).indices[:, :height, :width].cpu().numpy().astype(np.uint8)
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
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)


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
    if payload.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                         f"(this mixsup reads version {CHECKPOINT_VERSION})")
    return payload


def check_resumable(payload: dict, path: Path, recipe_name: str, manifest: Manifest, config: TrainConfig) -> None:
    """Refuse a checkpoint of another recipe (its networks and stages do not fit this run), of another data
    manifest (the resumed run would train and validate on a different split than the epochs before it), or whose
    scans were prepared otherwise (``anti_aliasing``: the rest of the run would see other inputs, and its contract
    would describe only the last epochs)."""
    if payload.get("recipe") != recipe_name:
        raise InputError(f"{path}: checkpoint of recipe {payload.get('recipe')!r} cannot resume a {recipe_name!r} run")
    if payload.get("manifest_sha256") != manifest.sha256():
        raise InputError(f"{path}: checkpoint was trained on another data manifest than {manifest.root} "
                         f"(sha256 {str(payload.get('manifest_sha256'))[:12]}, now {manifest.sha256()[:12]}); "
                         "resume with the same --data")
    before = TrainConfig.from_dict(payload.get("config", {})).anti_aliasing
    if before != config.anti_aliasing:
        raise InputError(f"{path}: checkpoint was trained with anti_aliasing={str(before).lower()}; resume with "
                         f"--set anti_aliasing={str(before).lower()}")


def load_initial_weights(modules: nn.ModuleDict, path: Path, recipe_name: str,
                         calibration: Callable[[], torch.Tensor]) -> None:
    """Load a checkpoint's weights into a new run's ``modules``: same recipe, same network shapes, or a one-line
    refusal (a partial load would silently train half a network from scratch).

    ``path`` may also be an ONNX export (a file, or a Triton model folder such as ``model_repository/unet``) of
    a ``unet`` run's network: its BatchNorm statistics are measured on ``calibration()``'s slices
    (:mod:`mixsup.training.onnx_weights`). Other recipes train modules that an export leaves out.
    """
    onnx_path = exported_onnx_path(path)
    if onnx_path is not None:
        if recipe_name != "unet":
            raise InputError(f"{path}: an exported network can initialise a 'unet' run only; a {recipe_name!r} "
                             "run trains modules the export left out")
        load_exported_weights(modules["segmentation"], onnx_path, calibration())
        return
    payload = load_checkpoint(path)
    if payload.get("recipe") != recipe_name:
        raise InputError(f"{path}: weights of recipe {payload.get('recipe')!r} cannot initialise a {recipe_name!r} run")
    own = modules.state_dict()
    theirs = payload["state_dict"]
    mismatched = sorted(k for k in own.keys() | theirs.keys()
                        if k not in own or k not in theirs or own[k].shape != theirs[k].shape)
    if mismatched:
        raise InputError(f"{path}: its network differs from this run's ({len(mismatched)} tensors, e.g. "
                         f"{mismatched[0]!r}); use the same base_channels, depth and recipe options")
    modules.load_state_dict(theirs)


#: How many training crops measure an exported network's BatchNorm statistics (``--init-from`` an ONNX model).
CALIBRATION_CROPS = 32


def calibration_slices(volumes: Sequence[Volume], config: TrainConfig) -> torch.Tensor:
    """Crops drawn as training draws them, from a generator of their own: the run's random stream is untouched."""
    sampler = SliceSampler(volumes, crop=config.crop, context_slices=config.context_slices,
                           foreground_fraction=config.foreground_fraction)
    return sampler.batch(np.random.default_rng(config.seed), CALIBRATION_CROPS).images


def network_from_checkpoint(payload: dict) -> nn.Module:
    """The exportable segmentation network of a checkpoint, rebuilt from its config, in eval mode."""
    from mixsup.training.recipes import get_recipe

    recipe = get_recipe(payload["recipe"])
    modules = recipe.build(TrainConfig.from_dict(payload["config"]))
    modules.load_state_dict(payload["state_dict"])
    return recipe.segmentation_network(modules).eval()


def split_validation(manifest: Manifest, count: int) -> tuple[list, list]:
    """The last ``count`` strong cases validate (never the manifest's test cases); the rest train."""
    strong = manifest.strong()
    if len(strong) < 2 and count > 0:
        raise InputError(f"{manifest.root}: need at least 2 strong cases to train and validate, found {len(strong)}")
    count = min(count, len(strong) - 1)
    return strong[: len(strong) - count], strong[len(strong) - count:]


@dataclass
class StageContext:
    """What a recipe's ``end_stage`` may use: the training volumes by kind, where to leave soft labels, the
    hidden masks to measure them against, and where to log what it measured."""

    out: Path
    config: TrainConfig
    device: torch.device
    volumes_by_kind: dict[str, list[Volume]]
    manifest: Manifest | None = None

    def volumes(self, kind: str) -> list[Volume]:
        return self.volumes_by_kind.get(kind, [])

    def hidden_labels(self, case: str, shape: Sequence[int]) -> np.ndarray | None:
        """The mask a dataset keeps out of training for ``case`` (``hidden/`` of a phantom split), on the
        training grid of ``shape`` [D, h, w]; None where there is none. For measuring a stage's output (e.g.
        pseudo-label Dice), never for training."""
        if self.manifest is None:
            return None
        return hidden_labels(self.manifest, case, shape)

    def save_soft_labels(self, case: str, probabilities: np.ndarray) -> Path:
        """Keep per-class probabilities float16 [C,D,H,W] for ``case`` on disk, where a resumed run finds them;
        after the stage every rank attaches them to its volumes (:func:`attach_soft_labels`)."""
        path = self.out / PSEUDO_LABELS_DIR / f"{case}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, probabilities.astype(np.float16))
        return path

    def log_stage_result(self, name: str, values: dict[str, Any]) -> None:
        """Keep a measurement of the stage in ``<out>/<name>.json`` and say it in one line."""
        with atomic_path(self.out / f"{name}.json", ".json") as tmp:
            tmp.write_text(json.dumps(values, indent=2) + "\n")
        print(f"{name}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in values.items()), flush=True)


def hidden_labels(manifest: Manifest, case: str, shape: Sequence[int]) -> np.ndarray | None:
    """``case``'s mask if the dataset has one (referenced or hidden), read as training reads masks (checked to lie
    on the volume's grid) and resampled in-plane (nearest) to ``shape`` [D, h, w]; None if it has none."""
    found = next((c for c in manifest.cases if c.case == case), None)
    relative = None if found is None else find_mask(manifest.root, found)
    if relative is None:
        return None
    _, labels, _ = load_case(dataclasses.replace(found, segmentation=relative, instances=None), manifest.root)
    return resample_inplane(labels, shape[1:], order=0)


def validation_score(scores: dict[str, float]) -> float:
    """What picks the best epoch: the mean of liver and lesion Dice, so a checkpoint that has forgotten lesions
    never wins on liver alone."""
    return float(np.mean([scores["dice_liver"], scores["dice_lesion"]]))


def epoch_score(row: dict[str, Any]) -> float:
    """:func:`validation_score` of a log row, or its negated training loss when nothing was validated."""
    return validation_score(row) if np.isfinite(row["dice_liver"]) else -row["train_loss"]


#: Weight of the running value in the moving average of epoch scores that picks the best epoch (nnU-Net's 0.9 for
#: its checkpoint_best). A few validation cases make one epoch's lesion Dice swing by tenths, and the maximum of
#: noisy scores is mostly noise: on the recipes benchmark's U-Net rows the raw maximum picked epochs whose held-out
#: lesion Dice was lower than the smoothed choice's (benchmarks/results/checkpoint_selection.json).
SCORE_SMOOTHING = 0.9


def smoothed_scores(history: list[dict[str, Any]], stage: str) -> list[float]:
    """The exponential moving average of :func:`epoch_score` over ``stage``'s rows of ``history``, one value per
    epoch; the first epoch's score starts it."""
    smoothed: list[float] = []
    for row in history:
        if row["stage"] == stage:
            score = epoch_score(row)
            smoothed.append(score if not smoothed else SCORE_SMOOTHING * smoothed[-1] + (1 - SCORE_SMOOTHING) * score)
    return smoothed


def competes_for_best(epoch: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (1-based) of a stage of ``epochs`` may become its best checkpoint: only the second
    half of the schedule, where the one-cycle learning rate anneals.

    The moving average starts at the first epoch's score. In a fine-tune (``--init-from``) that is the starting
    model's score, and the schedule's high learning rate then unsettles the weights for a while, so the average
    rarely climbs back above its start: two 60-epoch fine-tunes of the bundled model kept epoch 1 (the starting
    weights plus one epoch) as best.pt. A run from scratch is still far from its best in its first half.
    """
    return epoch > epochs // 2


def best_stage_path(out: Path, stage: str) -> Path:
    """Where the best epoch of a stage that is not the last is kept, so the stage ends with it (a teacher
    annotates with its best weights, not its last) even across a resume."""
    return out / f"best_{stage}.pt"


def attach_soft_labels(volumes_by_kind: dict[str, list[Volume]], out: Path) -> None:
    """Give each volume the soft labels an earlier stage saved for it, if any."""
    for volumes in volumes_by_kind.values():
        for volume in volumes:
            path = out / PSEUDO_LABELS_DIR / f"{volume.case}.npy"
            if path.is_file():
                volume.soft_labels = np.load(path)


def make_schedulers(optimizers: dict[str, torch.optim.Optimizer], total_steps: int) -> dict[str, Any]:
    return {name: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                       total_steps=max(1, total_steps), pct_start=0.1)
            for name, optimizer in optimizers.items()}


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite the CSV log from the whole history: stages may log different loss terms, so the header is the
    union of every row's keys (in first-seen order)."""
    fieldnames = list(dict.fromkeys(key for row in history for key in row))
    with atomic_path(path, ".csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(history)


def train(recipe: Recipe, manifest: Manifest, out: Path, config: TrainConfig, resume: Path | None = None,
          progress: bool = True, init_from: Path | None = None) -> Path:
    """Train ``recipe`` on ``manifest``; writes ``last.pt``, ``best.pt`` and ``log.csv`` into ``out``.

    ``resume`` continues a run where it stopped (weights, optimizers, schedule, RNG); ``init_from`` starts a new
    run (fresh optimizers and schedule, epoch 0) from another run's weights: fine-tuning.
    """
    if resume is not None and init_from is not None:
        raise InputError("--resume and --init-from exclude each other: resume continues a run, init-from starts one")
    parallel = init_distributed()
    precision = resolve_precision(config.precision, parallel.device)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    rng = seed_everything(config.seed, parallel.rank)
    resumed = load_checkpoint(resume) if resume is not None else None
    if resumed is not None:  # before the data loads: a wrong checkpoint fails in a second, not after minutes
        check_resumable(resumed, resume, recipe.NAME, manifest, config)

    # Data: every supervision kind the manifest has, in memory at the model's spacing.
    train_cases, validation_cases = split_validation(manifest, config.validation_cases)
    to_volume = lambda case: load_volume(case, config.spacing_mm, config.anti_aliasing)  # noqa: E731
    volumes_by_kind = {STRONG: [to_volume(c) for c in train_cases]}
    for kind, cases in (("weak", manifest.weak()), ("unlabeled", manifest.unlabeled())):
        if cases:
            volumes_by_kind[kind] = [to_volume(c) for c in cases]
    validation: list[Volume] = [to_volume(c) for c in validation_cases]
    attach_soft_labels(volumes_by_kind, out)

    modules = prepare_modules(recipe.build(config), precision).to(parallel.device)
    if parallel.is_main:
        print(f"training steps in {precision} (precision {config.precision!r})", flush=True)
    wrapped = distribute(modules, parallel)
    segmentation = recipe.segmentation_network(modules)
    contract = ModelContract(patch_size=(config.patch_size, config.patch_size), spacing_mm=config.spacing_mm,
                             context_slices=config.context_slices, anti_aliasing=config.anti_aliasing,
                             recipe=recipe.NAME)
    state = {"stage": 0, "epoch": 0, "best_score": -float("inf"), "history": []}
    if init_from is not None:
        load_initial_weights(modules, init_from, recipe.NAME, lambda: calibration_slices(volumes_by_kind[STRONG],
                                                                                          config))
    if resumed is not None:
        modules.load_state_dict(resumed["state_dict"])
        rng.bit_generator.state = resumed["numpy_rng"][parallel.rank % len(resumed["numpy_rng"])]
        torch.set_rng_state(resumed["torch_rng"])
        state = {key: resumed[key] for key in state}

    log_path = out / "log.csv"
    for stage_index, stage in enumerate(recipe.STAGES):
        if stage_index < state["stage"]:
            continue
        epochs = recipe.epochs(stage, config)
        optimizers = recipe.optimizers(stage, modules, config)
        schedulers = make_schedulers(optimizers, epochs * config.iterations_per_epoch)
        if resumed is not None and resumed["stage"] == stage_index:
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(resumed["optimizers"][name])
                schedulers[name].load_state_dict(resumed["schedulers"][name])
        sizes = {kind: n for kind, n in recipe.batch_sizes(stage, config).items() if volumes_by_kind.get(kind)}
        synthesis = LesionSynthesis(probability=config.synthetic_lesions)
        samplers = {kind: SliceSampler(volumes_by_kind[kind], crop=config.crop, context_slices=config.context_slices,
                                       augmentation=Augmentation(),
                                       foreground_fraction=config.foreground_fraction,
                                       lesion_instance_fraction=config.lesion_instance_fraction,
                                       lesion_synthesis=synthesis)
                    for kind in sizes}
        validator = recipe.validation_network(stage, modules)

        for epoch in range(state["epoch"], epochs):
            started = time.perf_counter()
            for module in modules.values():
                module.train()
            losses: list[dict[str, float]] = []
            # The next batch is cropped in a worker thread while this one trains: on a GPU host the CPU would
            # otherwise idle during each step. On 2 CPU cores both compete for the same cores (measured: within
            # noise of the plain loop, with the same batches and losses).
            steps = tqdm(produced_ahead(lambda: {kind: samplers[kind].batch(rng, n) for kind, n in sizes.items()},
                                        config.iterations_per_epoch),
                         total=config.iterations_per_epoch, desc=f"{stage} {epoch + 1}/{epochs}",
                         disable=not (progress and parallel.is_main), leave=False)
            for sampled in steps:
                batches = {kind: batch.to(parallel.device) for kind, batch in sampled.items()}
                # The whole step in autocast, backward and update included: the recipes own their steps, and
                # autocast only changes the ops of the forward pass (backward follows the forward's dtypes).
                with autocast(precision, parallel.device):
                    losses.append(recipe.train_step(stage, wrapped, batches, optimizers, config))
                for scheduler in schedulers.values():
                    scheduler.step()
                steps.set_postfix(loss=f"{np.mean([l['loss'] for l in losses[-20:]]):.3f}")

            rng_states = gather_rng_states(rng, parallel)
            if parallel.is_main:
                for module in modules.values():
                    module.eval()
                scored = segmentation if validator is None else validator
                pairs = [(predict_volume(scored, v.hu, None if validator is None else v.boxes,
                                         context_slices=config.context_slices, size_divisor=2**config.depth,
                                         device=parallel.device), v.labels)
                         for v in validation]
                scores = dice_scores(pairs) if pairs else {"dice_liver": float("nan"), "dice_lesion": float("nan")}
                mean_losses = {k: float(np.mean([l[k] for l in losses])) for k in losses[0]}
                row = {"stage": stage, "epoch": epoch + 1, "train_loss": mean_losses.pop("loss"), **scores,
                       "seconds": round(time.perf_counter() - started, 2), **mean_losses}
                state["history"].append(row)
                write_log(log_path, state["history"])
                print(f"{stage} epoch {epoch + 1}: loss {row['train_loss']:.4f}  val Dice liver "
                      f"{row['dice_liver']:.4f} lesion {row['dice_lesion']:.4f}  ({row['seconds']:.0f} s)", flush=True)
                # Only the exported network's stage competes for best.pt: a teacher's Dice with boxes is no
                # measure of the student. An earlier stage keeps its own best in best_<stage>.pt.
                last_stage = stage_index == len(recipe.STAGES) - 1
                # An epoch outside the annealing half does not compete: its score counts as -inf.
                score = (smoothed_scores(state["history"], stage)[-1] if competes_for_best(epoch + 1, epochs)
                         else -float("inf"))
                state["epoch"] = epoch + 1
                payload = {
                    "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "recipe": recipe.NAME,
                    "config": asdict(config), "network_config": asdict(segmentation.config),
                    "state_dict": modules.state_dict(),
                    "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                    "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                    "numpy_rng": rng_states, "torch_rng": torch.get_rng_state(),
                    "stage": stage_index, "epoch": epoch + 1,
                    "best_score": max(state["best_score"], score) if last_stage else state["best_score"],
                    "history": state["history"], "contract": contract.to_dict(),
                    "manifest_sha256": manifest.sha256(), "validation_cases": [c.case for c in validation_cases],
                    "world_size": parallel.world_size, "precision": precision,
                    "initialized_from": None if init_from is None else str(init_from),
                }
                save_checkpoint(out / "last.pt", payload)
                if last_stage and score > state["best_score"]:
                    state["best_score"] = score
                    save_checkpoint(out / "best.pt", payload)
                if not last_stage and score > stage_best_score(state["history"][:-1], stage, epochs):
                    save_checkpoint(best_stage_path(out, stage), payload)
            parallel.barrier()

        if stage_index < len(recipe.STAGES) - 1 and best_stage_path(out, stage).is_file():
            modules.load_state_dict(load_checkpoint(best_stage_path(out, stage))["state_dict"])
        if parallel.is_main:
            recipe.end_stage(stage, modules, StageContext(out, config, parallel.device, volumes_by_kind, manifest))
        parallel.barrier()
        attach_soft_labels(volumes_by_kind, out)
        state["stage"], state["epoch"] = stage_index + 1, 0
        resumed = None
    return out / "best.pt"


def stage_best_score(history: list[dict[str, Any]], stage: str, epochs: int) -> float:
    """The best :func:`smoothed_scores` value logged so far in ``stage`` (of ``epochs`` epochs) by an epoch that
    :func:`competes_for_best` (-inf before the first)."""
    rows = [row for row in history if row["stage"] == stage]
    return max((score for row, score in zip(rows, smoothed_scores(history, stage))
                if competes_for_best(row["epoch"], epochs)), default=-float("inf"))


def gather_rng_states(rng: np.random.Generator, parallel: Distributed) -> list[dict]:
    """Every rank's numpy RNG state (rank order), so a resumed job draws the crops it would have drawn."""
    if parallel.world_size == 1:
        return [rng.bit_generator.state]
    states: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(states, rng.bit_generator.state)
    return states
