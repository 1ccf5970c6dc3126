"""MSDN: dilations, dropout after every stage, binary sSE, the detection unit's two towers, anchors and box coding,
focal loss by hand, matching, the segmentation loss (Dice with background, optional CE), which networks a weak batch
trains, the exported segmentation path, and a tiny run end to end."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mixsup.training.losses import anchor_detection_loss, sigmoid_focal_loss, soft_dice_loss
from mixsup.training.models.msdn import (
    ANCHORS_PER_POSITION,
    MSDN,
    DetectionGate,
    MSDNConfig,
    SegmentationPath,
    decode_boxes,
    dilation_pattern,
    encode_boxes,
    grid_anchors,
    image_anchors,
)
from mixsup.training.recipes.base import STRONG, WEAK, Batch
from mixsup.training.recipes.msdn import (
    IGNORED,
    NEGATIVE,
    POSITIVE,
    RECIPE,
    boxes_from_box_masks,
    detection_targets,
    match_anchors,
)
from mixsup.training.trainer import TrainConfig

SIDE = 32  # crop side of the hand-made batches (a multiple of 2**depth)


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core machine torch's thread pool spinning against other jobs made these steps 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**options) -> TrainConfig:
    return TrainConfig.preset("tiny", recipe="msdn", options=options)


def hand_batch(kind: str, count: int = 2, seed: int = 0) -> Batch:
    """Crops with an organ box around a bright disc and a lesion box inside it (labels for strong crops only)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, SIDE, SIDE, generator=generator) * 30 - 100
    images[:, :, 6:26, 4:24] += 180
    boxes = torch.zeros(count, 2, SIDE, SIDE)
    boxes[:, 0, 6:26, 4:24] = 1
    boxes[:, 1, 10:16, 8:14] = 1
    labels = None
    if kind == STRONG:
        labels = torch.zeros(count, SIDE, SIDE, dtype=torch.long)
        labels[:, 6:26, 4:24] = 1
        labels[:, 10:16, 8:14] = 2
    return Batch(kind, images=images, boxes=boxes, labels=labels)


def segmentation_step(config: TrainConfig, batch: Batch) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One strong-only training step of a fresh network: its logged losses, and the segmentation logits and labels
    the step's loss saw (caught by a forward hook, so a test can recompute the loss by hand)."""
    modules = RECIPE.build(config)
    seen: list[torch.Tensor] = []
    modules["msdn"].register_forward_hook(lambda m, args, out: seen.append(out["segmentation"].detach()))
    losses = RECIPE.train_step("train", dict(modules.items()), {STRONG: batch},
                               RECIPE.optimizers("train", modules, config), config)
    return losses, seen[0], batch.labels


def stage_blocks(network: MSDN) -> list[nn.Module]:
    """Every stage of both U-Nets: both encoders (with the bottleneck) and both decoders."""
    return [*network.segmentation.segmentation_encoder.blocks, *network.segmentation.decoder.blocks,
            *network.detection_encoder.blocks, *network.detection_decoder.blocks]


def tower_convs(network: MSDN) -> list[nn.Conv2d]:
    """The detection unit's 3x3 convs at the unit's width (the towers' layers; the heads change the width)."""
    width = network.detection_projections[0].out_channels
    return [m for m in network.detection_unit.modules() if isinstance(m, nn.Conv2d)
            and m.kernel_size == (3, 3) and m.in_channels == m.out_channels == width]


def gradients(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def has_gradient(module: nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in gradients(module))


# ------------------------------------------------------------------------------------------------ networks
def test_dilation_pattern_is_the_papers_for_nine_stages_and_scaled_for_others():
    assert dilation_pattern(4) == [1, 2, 2, 2, 4, 2, 2, 2, 1]
    assert dilation_pattern(3) == [1, 2, 2, 4, 2, 2, 1]
    assert dilation_pattern(1) == [1, 4, 1]


@pytest.mark.parametrize("depth", [3, 4])
def test_every_stage_is_two_dilated_convs_with_the_pattern(depth):
    network = MSDN(MSDNConfig(base_channels=2, depth=depth))
    for encoder, decoder in ((network.segmentation.segmentation_encoder, network.segmentation.decoder),
                             (network.detection_encoder, network.detection_decoder)):
        stages = [*encoder.blocks, *decoder.blocks]
        convs = [[m for m in block if isinstance(m, nn.Conv2d)] for block in stages]
        assert [len(c) for c in convs] == [2] * (2 * depth + 1)
        assert [c[0].dilation[0] for c in convs] == [c[1].dilation[0] for c in convs] == dilation_pattern(depth)
        assert all(sum(isinstance(m, nn.BatchNorm2d) for m in block) == 2 for block in stages)


def test_sse_gate_passes_features_where_detection_fires_and_zeroes_them_where_it_does_not():
    gate = DetectionGate(detection_channels=4)
    features = torch.randn(2, 6, 8, 8)
    detection = torch.ones(2, 4, 8, 8)
    with torch.no_grad():
        gate.squeeze.weight.fill_(10.0)  # logit 40 on an all-ones detection map: sigmoid ~ 1
        gate.squeeze.bias.zero_()
        assert torch.allclose(gate(features, detection), features, atol=1e-6)
        gate.squeeze.weight.fill_(-10.0)  # logit -40: sigmoid ~ 0
        assert gate(features, detection).abs().max() < 1e-12
        # In between, one weight per pixel, the same for every channel.
        gate.squeeze.weight.fill_(0.0)
        gate.squeeze.bias.fill_(math.log(3.0))  # sigmoid = 0.75
        assert torch.allclose(gate(features, detection), 0.75 * features)


def test_gates_sit_after_every_encoder_stage_and_the_bottleneck_and_feed_the_next_stage():
    path = MSDN(MSDNConfig(base_channels=2, depth=3)).segmentation.eval()
    assert len(path.gates) == len(path.segmentation_encoder.blocks) == 4
    seen: dict[str, list] = {"gate": [], "block": []}
    hooks = [gate.register_forward_hook(lambda m, args, out: seen["gate"].append((args, out))) for gate in path.gates]
    hooks += [block.register_forward_hook(lambda m, args, out: seen["block"].append((args[0], out)))
              for block in path.segmentation_encoder.blocks]
    with torch.no_grad():
        path(torch.randn(1, 3, 16, 16) * 100)
    for hook in hooks:
        hook.remove()
    assert [out.shape[-1] for _, out in seen["gate"]] == [16, 8, 4, 2]
    for index, ((segmentation, detection), out) in enumerate(seen["gate"]):
        assert segmentation is seen["block"][index][1]  # the segmentation encoder's stage output is gated ...
        weight = torch.sigmoid(path.gates[index].squeeze(detection))
        assert torch.allclose(out, segmentation * weight)  # ... by a one-channel map from the detection feature
        if index + 1 < len(path.gates):  # ... and the gated feature is what the next stage pools
            assert torch.equal(seen["block"][index + 1][0], nn.functional.max_pool2d(out, 2))


def test_dropout_follows_every_stage_of_both_unets_with_the_configured_rate():
    for options, rate in (({}, 0.1), ({"dropout": 0.3}, 0.3)):  # 0.1 by default
        network = RECIPE.build(tiny_config(**options))["msdn"]
        blocks = stage_blocks(network)
        assert len(blocks) == 2 * (2 * network.config.depth + 1)
        for block in blocks:
            dropouts = [m for m in block.modules() if isinstance(m, nn.Dropout)]
            assert len(dropouts) == 1 and dropouts[0].p == rate
            assert isinstance(list(block)[-1], nn.Dropout)  # after the stage's convs, not between them


def test_dropout_perturbs_training_but_eval_and_the_export_are_deterministic():
    images = torch.randn(2, 3, SIDE, SIDE) * 150

    def two_passes(rate: float, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        network = RECIPE.segmentation_network(RECIPE.build(tiny_config(dropout=rate))).train(train)
        with torch.no_grad():
            return network(images), network(images)

    first, second = two_passes(0.5, train=True)
    assert (first - second).abs().max() > 1e-4  # dropout draws a new mask every training pass
    assert torch.equal(*two_passes(0.0, train=True))  # ... and is the only source of that randomness
    assert torch.equal(*two_passes(0.5, train=False))  # eval (validation, export): dropout is off


# ------------------------------------------------------------------------------------------------ anchors
@pytest.mark.parametrize("height,width,stride", [(6, 6, 8), (12, 5, 4), (48, 48, 1)])
def test_anchor_count_is_positions_times_nine(height, width, stride):
    anchors = grid_anchors(height, width, stride, base_size=8.0 * stride)
    assert ANCHORS_PER_POSITION == 9
    assert anchors.shape == (height * width * 9, 4)
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).reshape(height * width, 9, 2)
    # Nine anchors per feature pixel, all centred on it, position-major (row, then column).
    assert torch.allclose(centres[:, 0], centres[:, 8])
    assert torch.allclose(centres[width + 1, 0], torch.tensor([1.5 * stride, 1.5 * stride]))
    sides = (anchors[:9, 2:] - anchors[:9, :2])
    areas = (sides[:, 0] * sides[:, 1]).reshape(3, 3)
    expected = torch.tensor([(8.0 * stride * 2 ** (k / 3)) ** 2 for k in range(3)])
    assert torch.allclose(areas, expected[:, None].expand(3, 3), rtol=1e-5)  # 3 scales x 3 ratios, area per scale
    assert sorted(torch.round(sides[:3, 1] / sides[:3, 0], decimals=4).tolist()) == [0.5, 1.0, 2.0]


def test_detection_unit_outputs_one_prediction_per_anchor_of_every_decoder_scale():
    network = MSDN(MSDNConfig(base_channels=2, depth=3))
    outputs = network(None, torch.zeros(2, 3, SIDE, SIDE))
    anchors = image_anchors(SIDE, SIDE, network.detection_strides, 8.0)
    assert network.detection_strides == [4, 2, 1]
    assert anchors.shape[0] == 9 * sum((SIDE // s) ** 2 for s in (4, 2, 1))
    assert outputs["class_logits"].shape == (2, anchors.shape[0], 2)
    assert outputs["box_deltas"].shape == (2, anchors.shape[0], 4)
    assert "segmentation" not in outputs


def test_one_detection_unit_is_shared_by_all_decoder_scales():
    network = MSDN(MSDNConfig(base_channels=2, depth=3)).eval()  # eval: no dropout between the two passes
    units = [m for m in network.modules() if type(m).__name__ == "DetectionUnit"]
    assert len(units) == 1
    # Its weights act on every scale: changing the class head's bias moves the logits of every anchor.
    windowed = network.segmentation.window(torch.zeros(1, 3, SIDE, SIDE))
    with torch.no_grad():
        before = network.detect(network.detection_encoder(windowed))["class_logits"]
        network.detection_unit.classify.bias.add_(1.0)
        after = network.detect(network.detection_encoder(windowed))["class_logits"]
    assert torch.allclose(after - before, torch.ones_like(before), atol=1e-5)


def test_detection_unit_has_a_classification_tower_and_a_separate_box_tower():
    network = MSDN(MSDNConfig(base_channels=2, depth=3)).eval()
    convs = tower_convs(network)
    assert len(convs) == 8
    # Each tower layer feeds exactly one head: perturbing it moves the class logits or the box deltas, never both.
    windowed = network.segmentation.window(torch.randn(1, 3, SIDE, SIDE) * 150)
    with torch.no_grad():
        features = network.detection_encoder(windowed)
        reference = network.detect(features)
        moved = []
        for conv in convs:
            conv.bias.add_(1.0)
            outputs = network.detect(features)
            conv.bias.sub_(1.0)
            moved.append(tuple(not torch.allclose(outputs[key], reference[key]) for key in ("class_logits",
                                                                                             "box_deltas")))
    assert sorted(moved) == [(False, True)] * 4 + [(True, False)] * 4
    for tower in (network.detection_unit.class_tower, network.detection_unit.box_tower):
        assert [type(m) for m in tower] == [nn.Conv2d, nn.ReLU] * 4  # RetinaNet's subnets: 4 x (conv3x3 + ReLU)


def test_detection_width_defaults_to_sixteen_base_channels_and_is_an_option():
    for options, width in (({}, 16 * 4), ({"detection_width": 24}, 24)):
        config = tiny_config(**options)
        network = RECIPE.build(config)["msdn"]
        assert config.base_channels == 4
        assert {(c.in_channels, c.out_channels) for c in tower_convs(network)} == {(width, width)}
        assert len(tower_convs(network)) == 8
        assert all(p.out_channels == width for p in network.detection_projections)
    assert MSDNConfig().tower_channels == 256  # the paper's (RetinaNet's) width at the default 16 base channels


def test_box_encoding_round_trips_and_matches_the_standard_formula():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 2.0, 12.0, 18.0]])
    boxes = torch.tensor([[5.0, 0.0, 15.0, 20.0], [3.0, 5.0, 9.0, 7.0]])
    deltas = encode_boxes(boxes, anchors)
    # Box 0: centre (10, 10) vs anchor (5, 5) with side 10 -> (0.5, 0.5); size (10, 20) / (10, 10).
    assert torch.allclose(deltas[0], torch.tensor([0.5, 0.5, 0.0, math.log(2.0)]))
    assert torch.allclose(decode_boxes(deltas, anchors), boxes, atol=1e-5)
    random_boxes = torch.rand(50, 2) * 40
    random_boxes = torch.cat([random_boxes, random_boxes + 1 + torch.rand(50, 2) * 30], dim=1)
    random_anchors = grid_anchors(5, 10, 4, 16.0)[:50]
    assert torch.allclose(decode_boxes(encode_boxes(random_boxes, random_anchors), random_anchors), random_boxes,
                          atol=1e-4)


# ------------------------------------------------------------------------------------------------ losses
def test_focal_loss_matches_hand_computed_values():
    logits = torch.tensor([0.0, 2.0, -1.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    p0, p1, p2 = 0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    expected = torch.tensor([
        0.25 * (1 - p0) ** 2 * -math.log(p0),        # positive: alpha (1 - p)^2 (-log p)
        0.75 * p1 ** 2 * -math.log(1 - p1),          # negative: (1 - alpha) p^2 (-log(1 - p))
        0.25 * (1 - p2) ** 2 * -math.log(p2),
    ])
    assert torch.allclose(sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0), expected, atol=1e-6)
    assert math.isclose(expected[0].item(), 0.25 * 0.25 * math.log(2.0), rel_tol=1e-6)
    # gamma = 0 and alpha = 0.5 is half the binary cross-entropy.
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=0.0), 0.5 * bce)


def test_detection_loss_skips_ignored_anchors_and_normalises_by_positives():
    class_logits = torch.tensor([[[0.0, 0.0], [2.0, -1.0], [5.0, 5.0], [0.0, 0.0]]])
    class_targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    box_deltas = torch.tensor([[[0.5, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [9.0] * 4, [0.0, 0.0, 0.0, 2.0]]])
    box_targets = torch.zeros(1, 4, 4)
    state = torch.tensor([[POSITIVE, NEGATIVE, IGNORED, POSITIVE]])
    losses = anchor_detection_loss(class_logits, box_deltas, class_targets, box_targets, state, beta=1.0)
    counted = torch.tensor([0, 1, 3])
    focal = sigmoid_focal_loss(class_logits[0, counted], class_targets[0, counted]).sum() / 2
    smooth_l1 = (0.5 * 0.5**2 + (2.0 - 0.5)) / 2  # |0.5| < beta: 0.5 x^2; |2| >= beta: |x| - 0.5
    assert torch.isclose(losses["classification"], focal)
    assert math.isclose(losses["regression"].item(), smooth_l1, rel_tol=1e-6)
    assert torch.isclose(losses["loss"], focal + smooth_l1)


# ------------------------------------------------------------------------------------------------ targets
def test_boxes_come_from_connected_components_of_each_box_mask_channel():
    masks = torch.zeros(2, 20, 20)
    masks[0, 2:18, 3:15] = 1
    masks[1, 4:7, 5:9] = 1
    masks[1, 10:12, 10:13] = 1  # a second lesion box, not touching the first
    boxes, classes = boxes_from_box_masks(masks)
    found = sorted(zip(classes.tolist(), boxes.tolist()))
    assert found == [(0, [3.0, 2.0, 15.0, 18.0]), (1, [5.0, 4.0, 9.0, 7.0]), (1, [10.0, 10.0, 13.0, 12.0])]
    # A rotated rectangle (as rotation augmentation leaves it) gives its axis-aligned extent.
    diamond = torch.zeros(2, 20, 20)
    for row in range(5, 15):
        half = 5 - abs(row - 9.5) + 0.5
        diamond[0, row, int(10 - half):int(10 + half)] = 1
    (box,), _ = boxes_from_box_masks(diamond)
    assert box.tolist() == [5.0, 5.0, 15.0, 15.0]
    assert boxes_from_box_masks(torch.zeros(2, 8, 8))[0].shape == (0, 4)


def test_anchor_matching_uses_retinanet_thresholds():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # IoU 1     -> positive
        [0.0, 0.0, 10.0, 6.0],    # IoU 0.6   -> positive
        [0.0, 0.0, 10.0, 4.5],    # IoU 0.45  -> ignored
        [0.0, 0.0, 10.0, 3.0],    # IoU 0.3   -> negative
        [20.0, 20.0, 30.0, 30.0],  # no overlap -> negative
    ])
    matched, state = match_anchors(anchors, box, positive_iou=0.5, negative_iou=0.4)
    assert state.tolist() == [POSITIVE, POSITIVE, IGNORED, NEGATIVE, NEGATIVE]
    assert matched.tolist()[:2] == [0, 0]
    # A box no anchor covers at 0.5 still claims its best anchor (Detectron2's low-quality matches).
    _, state = match_anchors(anchors[2:], box)
    assert state.tolist() == [POSITIVE, NEGATIVE, NEGATIVE]
    _, state = match_anchors(anchors, torch.zeros(0, 4))
    assert state.tolist() == [NEGATIVE] * 5


def test_detection_targets_are_one_hot_on_positives_with_encoded_boxes():
    anchors = image_anchors(SIDE, SIDE, [4, 2, 1], 8.0)
    batch = hand_batch(WEAK, count=1)
    class_targets, box_targets, state = detection_targets(anchors, batch.boxes, 2, 0.5, 0.4)
    positive = state[0] == POSITIVE
    assert positive.any() and (class_targets[0][~positive] == 0).all()
    assert torch.equal(class_targets[0][positive].sum(dim=1), torch.ones(int(positive.sum())))
    organ = torch.tensor([4.0, 6.0, 24.0, 26.0])
    organ_anchors = positive & (class_targets[0, :, 0] == 1)
    decoded = decode_boxes(box_targets[0][organ_anchors], anchors[organ_anchors])
    assert torch.allclose(decoded, organ.expand_as(decoded), atol=1e-4)


# ------------------------------------------------------------------------------------------------ training
def test_weak_batch_trains_the_detection_net_only():
    config = tiny_config()
    modules = RECIPE.build(config)
    network = modules["msdn"]
    optimizers = RECIPE.optimizers("train", modules, config)
    segmentation_only = [network.segmentation.segmentation_encoder, network.segmentation.decoder,
                         network.segmentation.head, network.segmentation.gates]
    before = {name: p.detach().clone() for name, p in network.named_parameters()}

    losses = RECIPE.train_step("train", dict(modules.items()), {WEAK: hand_batch(WEAK)}, optimizers, config)
    assert math.isfinite(losses["loss"]) and math.isnan(losses["dice"])
    for module in segmentation_only:
        assert all(g is None or not g.any() for g in gradients(module))
    assert has_gradient(network.detection_unit) and has_gradient(network.detection_decoder)
    assert has_gradient(network.detection_encoder)
    unchanged = {n for n, p in network.named_parameters() if torch.equal(p, before[n])}
    assert {n for n, _ in network.segmentation.decoder.named_parameters(prefix="segmentation.decoder")} <= unchanged
    assert not {n for n, _ in network.detection_unit.named_parameters(prefix="detection_unit")} <= unchanged

    # A strong batch reaches the segmentation decoder (so the check above can fail).
    losses = RECIPE.train_step("train", dict(modules.items()), {STRONG: hand_batch(STRONG), WEAK: hand_batch(WEAK)},
                               optimizers, config)
    assert has_gradient(network.segmentation.decoder) and has_gradient(network.detection_unit)
    assert {"loss", "dice", "focal", "smooth_l1"} <= set(losses) and 0.0 < losses["dice"] <= 1.0


def test_strong_batch_alone_trains_both_nets_and_options_reach_the_loss():
    config = tiny_config(detection_weight=0.0)
    modules = RECIPE.build(config)
    network = modules["msdn"]
    assert RECIPE.settings(config).detection_weight == 0.0
    assert not hasattr(network, "detection_settings")  # the step reads them from its config
    assert RECIPE.batch_sizes("train", config) == {STRONG: config.batch_size, WEAK: config.batch_size}
    losses = RECIPE.train_step("train", dict(modules.items()), {STRONG: hand_batch(STRONG)},
                               RECIPE.optimizers("train", modules, config), config)
    assert math.isclose(losses["loss"], losses["dice"], rel_tol=1e-6)  # detection weighted out
    assert has_gradient(network.segmentation.decoder) and has_gradient(network.detection_encoder)
    assert not has_gradient(network.detection_unit)


def test_segmentation_dice_counts_background_as_a_class():
    torch.manual_seed(0)
    losses, logits, labels = segmentation_step(tiny_config(detection_weight=0.0), hand_batch(STRONG))
    with_background = soft_dice_loss(logits, labels, (0, 1, 2)).item()
    assert not math.isclose(with_background, soft_dice_loss(logits, labels, (1, 2)).item(), rel_tol=1e-3)
    assert math.isclose(losses["dice"], with_background, rel_tol=1e-5)
    assert math.isclose(losses["loss"], with_background, rel_tol=1e-5)  # ce_weight 0 by default: Dice only


def test_ce_weight_adds_pixel_cross_entropy_to_the_segmentation_loss():
    torch.manual_seed(0)
    losses, logits, labels = segmentation_step(tiny_config(detection_weight=0.0, ce_weight=0.5), hand_batch(STRONG))
    cross_entropy = nn.functional.cross_entropy(logits, labels).item()
    assert cross_entropy > 0.1
    assert math.isclose(losses["loss"], losses["dice"] + 0.5 * cross_entropy, rel_tol=1e-5)
    assert math.isclose(losses["dice"], soft_dice_loss(logits, labels, (0, 1, 2)).item(), rel_tol=1e-5)
    assert math.isclose(losses["ce"], cross_entropy, rel_tol=1e-5)  # logged unweighted


def test_detection_loss_decreases_on_a_repeated_weak_batch():
    torch.manual_seed(0)
    config = tiny_config()
    modules = RECIPE.build(config)
    optimizers = {"all": torch.optim.Adam(modules.parameters(), lr=3e-3)}
    batch = hand_batch(WEAK)
    losses = [RECIPE.train_step("train", dict(modules.items()), {WEAK: batch}, optimizers, config)["loss"]
              for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------------------------------ export
def test_exported_segmentation_path_needs_the_detection_encoder_but_not_the_unit():
    config = tiny_config()
    modules = RECIPE.build(config)
    rebuilt = RECIPE.build(TrainConfig.from_dict(dataclasses.asdict(config)))
    rebuilt.load_state_dict(modules.state_dict())
    network = RECIPE.segmentation_network(rebuilt).eval()
    dual = rebuilt["msdn"]
    assert isinstance(network, SegmentationPath) and network.config.depth == config.depth
    exported = {id(p) for p in network.parameters()}
    for part in (dual.detection_unit, dual.detection_decoder, dual.detection_projections):
        assert not exported & {id(p) for p in part.parameters()}
    assert {id(p) for p in dual.detection_encoder.parameters()} <= exported
    assert not any(key.startswith(("detection_unit", "detection_decoder")) for key in network.state_dict())

    images = torch.randn(2, 3, SIDE, SIDE) * 150
    with torch.no_grad():
        reference = network(images)
        for parameter in dual.detection_unit.parameters():
            parameter.add_(1.0)
        assert torch.equal(network(images), reference)  # the unit is not on the exported path
        for parameter in dual.detection_encoder.parameters():
            parameter.mul_(1.5)
        assert (network(images) - reference).abs().max() > 1e-4  # the encoder is, through the gates


def test_exported_segmentation_path_goes_through_onnx(tmp_path):
    from mixsup.contract import ModelContract
    from mixsup.export.onnx_export import export_onnx, max_parity_error

    network = RECIPE.segmentation_network(RECIPE.build(tiny_config())).eval()
    contract = ModelContract(patch_size=(SIDE, SIDE), spacing_mm=(3.2, 3.2), recipe="msdn")
    path = export_onnx(network, contract, tmp_path / "model.onnx")
    probe = torch.empty(1, 3, SIDE + 8, SIDE).uniform_(-500, 500).numpy()  # other sizes than the example too
    assert max_parity_error(network, path, probe) < 1e-4


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_run_trains_and_exports(tmp_path):
    import mixsup.training.trainer as trainer
    from mixsup.training.recipes import RECIPES

    if RECIPE.NAME not in RECIPES:
        pytest.skip("msdn is not registered in mixsup.training.recipes.RECIPES yet")
    from mixsup.export.cli import main as export_main
    from mixsup.training.cli import main as train_main
    from mixsup.training.data.cli import main as data_main

    data, run, repository = tmp_path / "data", tmp_path / "run", tmp_path / "repo"
    assert data_main(["phantoms", str(data), "--n", "6", "--seed", "3", "--shape", "16", "96", "96",
                      "--weak-fraction", "0.5", "-q"]) == 0
    assert train_main([RECIPE.NAME, "--data", str(data), "--out", str(run), "--preset", "tiny", "--no-progress",
                       "--set", "threads=1"]) == 0
    payload = trainer.load_checkpoint(run / "last.pt")
    assert payload["recipe"] == RECIPE.NAME and payload["config"]["options"]["focal_gamma"] == 2.0
    rows = payload["history"]  # the detection and Dice terms are logged every epoch
    assert len(rows) == 2 and all(math.isfinite(r["dice"]) and math.isfinite(r["focal"]) for r in rows)
    assert export_main([str(run / "best.pt"), "--repository", str(repository), "--name", "msdn"]) == 0
    assert (repository / "msdn" / "1" / "model.onnx").is_file()
