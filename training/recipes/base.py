"""What a training method gives the trainer, and what the trainer gives it.

The trainer (``mixsup.training.trainer``) owns the loop: data, augmentation, seeding, distributed wrapping,
validation, the CSV log, checkpoints and resuming. A recipe owns the method: its networks, optimizers, the
kinds of batches it wants, one training step, and what its stages do at their end. Export and validation use
only :meth:`Recipe.segmentation_network`, so auxiliary heads (localization branch, detection unit, confidence
net) never leave training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mixsup.training.trainer import StageContext, TrainConfig

#: Kinds of supervision a batch can carry, as the manifest names them.
STRONG, WEAK, UNLABELED = "strong", "weak", "unlabeled"
#: Box-mask channels of :attr:`Batch.boxes`.
ORGAN_BOX, LESION_BOX = 0, 1


@dataclass
class Batch:
    """Augmented 2.5D crops of one supervision kind; every tensor is on the same [h, w] grid.

    ``images`` float32 [N, context_slices, h, w] in raw HU (the network windows them itself).
    ``labels`` int64 [N, h, w] (0 background, 1 liver, 2 lesion): strong batches only, else None.
    ``boxes`` float32 [N, 2, h, w]: filled organ-box and lesion-box masks of the centre slice (channels
    ORGAN_BOX, LESION_BOX); derived from the mask for strong cases, from the boxes file for weak ones, zeros for
    unlabeled ones. Boxes are warped with the image, so after a rotation they are the rotated rectangles.
    ``soft_labels`` float32 [N, C, h, w] or None: per-class pseudo-label probabilities that a previous stage
    wrote for weak cases (teacher-student), warped with the image.
    ``instances`` int64 [N, h, w] or None: lesion instance ids beside ``labels`` (0 outside lesions), so lesions
    that touch stay apart (the lazy recipe's interfaces); None where unknown.
    """

    kind: str
    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    instances: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.kind, move(self.images), move(self.boxes), move(self.labels), move(self.soft_labels),
                     move(self.instances))


class Recipe:
    """Base class of the training methods. Subclasses set ``NAME`` and override what they need.

    A step receives modules that may be wrapped in DistributedDataParallel; call them, never reach into
    ``.module`` except through :func:`unwrap`.
    """

    NAME: str = ""
    #: Stages run in order; each has its own epochs (:meth:`epochs`) and its own checkpoint state, so a run
    #: interrupted in a later stage resumes there.
    STAGES: tuple[str, ...] = ("train",)
    #: The method's hyperparameters and their defaults; users override them with ``--set key=value``.
    DEFAULTS: dict[str, Any] = {}

    def option(self, config: "TrainConfig", key: str) -> Any:
        """A hyperparameter of this method: the user's value if given, else the default."""
        return config.options.get(key, self.DEFAULTS[key])

    def epochs(self, stage: str, config: "TrainConfig") -> int:
        """Epochs of ``stage``: the method's ``<stage>_epochs`` option where it has one set above 0, else
        ``config.epochs`` (so ``--set epochs=N`` still scales every stage of a run)."""
        key = f"{stage}_epochs"
        own = int(self.option(config, key)) if key in self.DEFAULTS else 0
        return own if own > 0 else config.epochs

    def build(self, config: "TrainConfig") -> nn.ModuleDict:
        """Every network of the method, by name (e.g. ``{"segmentation": ..., "detection": ...}``)."""
        raise NotImplementedError

    def optimizers(self, stage: str, modules: nn.ModuleDict, config: "TrainConfig") -> dict[str, torch.optim.Optimizer]:
        """Optimizers of ``stage`` by name. Default: one AdamW over every parameter."""
        return {"all": torch.optim.AdamW(modules.parameters(), lr=config.learning_rate,
                                         weight_decay=config.weight_decay)}

    def batch_sizes(self, stage: str, config: "TrainConfig") -> dict[str, int]:
        """How many crops of each supervision kind one step of ``stage`` wants. Default: strong only."""
        return {STRONG: config.batch_size}

    def train_step(self, stage: str, modules: Mapping[str, nn.Module], batches: Mapping[str, Batch],
                   optimizers: Mapping[str, torch.optim.Optimizer], config: "TrainConfig") -> dict[str, float]:
        """One step: forward, backward, optimizer steps (the recipe zeroes and steps its own optimizers, so an
        adversarial method can alternate). ``config`` is the run's config: the step reads the method's
        hyperparameters from it with :meth:`option`, so no recipe keeps them as state. Returns the losses to log;
        ``"loss"`` is the one reported."""
        raise NotImplementedError

    def segmentation_network(self, modules: nn.ModuleDict) -> nn.Module:
        """The network export writes and validation scores: raw HU [N, context, h, w] -> logits [N, C, h, w].
        It must expose ``config`` (a dataclass) so a checkpoint can rebuild it."""
        raise NotImplementedError

    def validation_network(self, stage: str, modules: nn.ModuleDict) -> nn.Module | None:
        """What to score on the validation cases at the end of each epoch of ``stage``: a module taking
        ``(images, boxes)`` -> logits, or None to score :meth:`segmentation_network` on images alone."""
        return None

    def end_stage(self, stage: str, modules: nn.ModuleDict, context: "StageContext") -> None:
        """Runs once when ``stage`` finishes (rank 0 first, then all ranks wait), e.g. to write pseudo-labels."""


def mixed_batch_sizes(batch_size: int, weak_fraction: float) -> dict[str, int]:
    """Strong and weak crops of one step: ``weak_fraction`` of ``batch_size`` weak (rounded), at least one strong."""
    weak = min(max(int(round(batch_size * weak_fraction)), 0), batch_size - 1)
    return {STRONG: batch_size - weak, WEAK: weak} if weak else {STRONG: batch_size}


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or the module itself."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def network_size(config: "TrainConfig") -> dict[str, int]:
    """The run settings every recipe's networks are built with: input stack depth, width and depth."""
    return {"in_slices": config.context_slices, "base_channels": config.base_channels, "depth": config.depth}
