"""ASDNet (Nie et al., "ASDNet: Attention based semi-supervised deep networks for medical image segmentation",
MICCAI 2018): a segmentation network trained against a fully-convolutional confidence network.

One :meth:`ASDNetRecipe.train_step` is two alternating updates, as in the paper (and Hung et al. 2018, whose
adversarial semi-supervised scheme it builds on):

1. **Segmentation step** (optimizer ``"segmentation"``). Strong crops: multi-class cross-entropy plus the
   sample-attention Dice ``mean_n (1 - dsc_n)^beta * (1 - GD_n)`` (beta = 2, dsc detached), GD_n the sample's
   generalized Dice (Sudre et al., class weights 1 / volume^2, all classes); the paper pairs its Dice with CE,
   and CE keeps a learning signal on samples the attention weight has almost switched off. Every prediction
   (strong and unlabeled) gets the adversarial term ``lambda_adv * BCE(confidence, 1)`` (lambda_adv = 0.03):
   it needs no label. Unlabeled crops add ``lambda_semi * CE(prediction, own argmax)`` on
   the pixels whose confidence is above gamma (lambda_semi = 0.3; pixels at or below gamma contribute nothing),
   after a warm-up (below).
2. **Confidence step** (optimizer ``"confidence"``). Per-pixel BCE: one-hot ground-truth maps -> 1, the
   segmentation network's (detached) softmax maps of strong and unlabeled crops -> 0. The image stack is
   concatenated with each map, so the net judges a map against the anatomy under it.

Choices where the paper is silent or not at hand: gamma = 0.5 (the paper thresholds the confidence map but its
value is not reproduced here; 0.5 is the point where the adversary rates a pixel as more likely ground truth
than prediction); the attention's dsc_n is the soft Dice averaged over the foreground classes present in the
crop (the background Dice when none is: an absent class is no failure, see
:func:`~mixsup.training.losses.per_sample_soft_dice`); the generalized Dice gives an absent class the largest
weight of the present ones (NiftyNet / MONAI); the Dice and the masked CE are means (over samples, over
trusted pixels), not sums; the adversary uses Adam with betas (0.9, 0.99) at 0.4 x the segmentation learning
rate, Hung et al.'s ratio (1e-4 : 2.5e-4), because their absolute 1e-4 left the tiny preset's adversary at
chance level (loss 2 ln 2) after 150 steps. The semi-supervised term waits for the
first ``semi_warmup_fraction`` (0.25) of the run's steps, then switches on at full weight: until the adversary
has learnt something its confidence map selects pixels at random, and self-training on them would reinforce the
young segmenter's errors. This is Hung et al.'s schedule (semi-supervised loss from iteration 5,000 of 20,000,
without a ramp). The step is counted by the segmentation optimizer's own ``step`` state, which checkpoints keep,
so a resumed run continues the schedule. The adversarial term is not delayed, as in Hung et al.: at weight 0.03
it is small next to CE + Dice while the adversary is naive, and the two networks are meant to improve together.
Scans the manifest marks weak are used as unlabeled scans (their boxes ignored: ASDNet cannot use boxes) unless
``weak_as_unlabeled=0``.

The confidence net is called once per backward pass; the segmentation net twice in its step (strong and
unlabeled crops apart, see :func:`segment_by_kind`). The segmentation step's backward also fills the confidence
net's gradients; they are discarded because the confidence step zeroes them before its own backward. The
confidence net has no BatchNorm, so the segmentation step leaves its state entirely unchanged. Only the
segmentation net is exported.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixsup.training.losses import (
    confidence_bce,
    confident_self_training_loss,
    one_hot_targets,
    sample_attention_dice_loss,
)
from mixsup.training.models.asdnet import ConfidenceNetwork, ConfidenceNetworkConfig
from mixsup.training.models.unet import UNet, UNetConfig
from mixsup.training.recipes.base import STRONG, UNLABELED, WEAK, Batch, Recipe, network_size

NAME = "asdnet"


@dataclass(frozen=True)
class ASDNetLossWeights:
    """The hyperparameters the segmentation step needs, read from a run's options by
    :meth:`ASDNetRecipe.loss_weights`."""

    beta: float = 2.0
    lambda_adv: float = 0.03
    lambda_semi: float = 0.3
    gamma: float = 0.5
    semi_warmup_fraction: float = 0.25

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ASDNetLossWeights":
        keys = ("beta", "lambda_adv", "lambda_semi", "gamma", "semi_warmup_fraction")
        return cls(**{key: float(options[key]) for key in keys})

    def at_step(self, step: int, total_steps: int) -> "ASDNetLossWeights":
        """The weights of segmentation step ``step`` (0-based) of a run of ``total_steps``: ``lambda_semi`` is 0
        during the first ``semi_warmup_fraction`` of the steps, while the confidence map means nothing yet."""
        if step < int(self.semi_warmup_fraction * total_steps):
            return replace(self, lambda_semi=0.0)
        return self


def segmentation_step(modules: Mapping[str, nn.Module], strong: Batch, unlabeled_images: torch.Tensor | None,
                      optimizer: torch.optim.Optimizer,
                      weights: ASDNetLossWeights) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Update the segmentation net; returns the losses, every crop's image stack and its detached softmax
    (strong crops first) for the confidence step."""
    count = len(strong)
    images, logits = segment_by_kind(modules["segmentation"], strong.images, unlabeled_images)
    strong_logits = logits[:count]
    cross_entropy = F.cross_entropy(strong_logits, strong.labels)
    attention_dice = sample_attention_dice_loss(strong_logits, strong.labels, beta=weights.beta)
    probabilities = torch.softmax(logits, dim=1)
    confidence_logits = modules["confidence"](images, probabilities)
    adversarial = confidence_bce(confidence_logits, is_ground_truth=True)
    if len(images) > count:
        confidence = torch.sigmoid(confidence_logits[count:, 0])
        semi = confident_self_training_loss(logits[count:], confidence, weights.gamma)
    else:
        semi = logits.new_zeros(())
    loss = cross_entropy + attention_dice + weights.lambda_adv * adversarial + weights.lambda_semi * semi
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses = {"loss": loss.item(), "cross_entropy": cross_entropy.item(), "attention_dice": attention_dice.item(),
              "adversarial": adversarial.item(), "semi": semi.item(), "lambda_semi": weights.lambda_semi}
    return losses, images, probabilities.detach()


def segment_by_kind(network: nn.Module, strong_images: torch.Tensor,
                    unlabeled_images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the strong crops, then of the unlabeled ones, from two forward passes; returns the stacked
    images and logits.

    Two passes, not one over the concatenation, because BatchNorm would otherwise normalise the labelled crops
    with statistics of the (differently sampled) unlabeled ones: measured on the tiny preset (125 steps), one
    joint pass ended at validation liver Dice 0.10-0.17, two passes at 0.60 (strong-only U-Net: 0.65). Hung et
    al. also forward labelled and unlabeled images separately. Both passes feed one backward, which DDP allows
    because every parameter receives its summed gradient once.
    """
    strong_logits = network(strong_images)
    if unlabeled_images is None:
        return strong_images, strong_logits
    return torch.cat([strong_images, unlabeled_images]), torch.cat([strong_logits, network(unlabeled_images)])


def confidence_step(modules: Mapping[str, nn.Module], images: torch.Tensor, labels: torch.Tensor,
                    predicted_probabilities: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Update the confidence net: ground-truth maps of the strong crops (the first ``len(labels)`` images) -> 1,
    the segmentation net's maps of every crop -> 0. Predictions are detached here too, so this step cannot
    reach the segmentation net whatever the caller passes."""
    count = len(labels)
    truth = one_hot_targets(labels, predicted_probabilities.shape[1]).to(predicted_probabilities.dtype)
    logits = modules["confidence"](torch.cat([images[:count], images]),
                                   torch.cat([truth, predicted_probabilities.detach()]))
    real, fake = confidence_bce(logits[:count], True), confidence_bce(logits[count:], False)
    loss = real + fake
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"confidence": loss.item(), "confidence_real": real.item(), "confidence_fake": fake.item()}


class ASDNetRecipe(Recipe):
    NAME = NAME
    DEFAULTS: dict[str, Any] = {"beta": 2.0, "lambda_adv": 0.03, "lambda_semi": 0.3, "gamma": 0.5,
                                "semi_warmup_fraction": 0.25, "confidence_lr_scale": 0.4, "weak_as_unlabeled": 1}

    def loss_weights(self, config) -> ASDNetLossWeights:
        """The segmentation step's hyperparameters of a run (before the warm-up: see :meth:`step_weights`)."""
        return ASDNetLossWeights.from_options({key: self.option(config, key) for key in self.DEFAULTS})

    def step_weights(self, stage: str, optimizer: torch.optim.Optimizer, config) -> ASDNetLossWeights:
        """The hyperparameters of the coming segmentation step, with the semi-supervised warm-up applied: the
        step index is the number of steps ``optimizer`` (the segmentation one) has taken."""
        total_steps = self.epochs(stage, config) * config.iterations_per_epoch
        return self.loss_weights(config).at_step(optimizer_steps(optimizer), total_steps)

    def build(self, config) -> nn.ModuleDict:
        segmentation = UNet(UNetConfig(**network_size(config)))
        confidence = ConfidenceNetwork(ConfidenceNetworkConfig(
            **network_size(config), num_classes=segmentation.config.num_classes,
            hu_window=segmentation.config.hu_window))
        return nn.ModuleDict({"segmentation": segmentation, "confidence": confidence})

    def optimizers(self, stage: str, modules: nn.ModuleDict, config) -> dict[str, torch.optim.Optimizer]:
        return {
            "segmentation": torch.optim.AdamW(modules["segmentation"].parameters(), lr=config.learning_rate,
                                              weight_decay=config.weight_decay),
            "confidence": torch.optim.Adam(modules["confidence"].parameters(),
                                           lr=config.learning_rate * float(self.option(config, "confidence_lr_scale")),
                                           betas=(0.9, 0.99)),
        }

    def batch_sizes(self, stage: str, config) -> dict[str, int]:
        """Strong and unlabeled crops (and weak ones, used as unlabeled); kinds the data lacks are left out by
        the trainer, so a step may see strong crops only."""
        sizes = {STRONG: config.batch_size, UNLABELED: config.batch_size}
        if int(self.option(config, "weak_as_unlabeled")):
            sizes[WEAK] = config.batch_size
        return sizes

    def train_step(self, stage: str, modules: Mapping[str, nn.Module], batches: Mapping[str, Batch],
                   optimizers: Mapping[str, torch.optim.Optimizer], config) -> dict[str, float]:
        strong, optimizer = batches[STRONG], optimizers["segmentation"]
        losses, images, probabilities = segmentation_step(modules, strong, unlabeled_images(batches), optimizer,
                                                          self.step_weights(stage, optimizer, config))
        losses.update(confidence_step(modules, images, strong.labels, probabilities, optimizers["confidence"]))
        return losses

    def segmentation_network(self, modules: nn.ModuleDict) -> nn.Module:
        return modules["segmentation"]


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many steps ``optimizer`` has taken, from the ``step`` that Adam and AdamW keep in each parameter's state
    (0 for an optimizer that keeps none). That state is in every checkpoint the trainer writes and is loaded back
    on resume, so the count needs no bookkeeping of its own; the largest count is taken, in case a parameter
    missed a step for want of a gradient."""
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(steps, default=0)


def unlabeled_images(batches: Mapping[str, Batch]) -> torch.Tensor | None:
    """Image stacks of every batch without masks (unlabeled, and weak when it was asked for), or None."""
    images = [batches[kind].images for kind in (UNLABELED, WEAK) if kind in batches and len(batches[kind])]
    return torch.cat(images) if images else None


RECIPE = ASDNetRecipe()
