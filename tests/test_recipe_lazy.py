"""The lazy-labels recipe: its loss, its lazy labels, its network split, and a tiny run that exports."""
from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixsup.training.losses import IGNORE_INDEX, indicated_weighted_cross_entropy
from mixsup.training.recipes.base import LESION_BOX, ORGAN_BOX, STRONG, WEAK, Batch
from mixsup.training.recipes.lazy import (
    RECIPE,
    LazySettings,
    TaskTargets,
    interface_map,
    multi_task_losses,
    placed_ellipses,
    rough_regions_from_boxes,
    rough_regions_from_mask,
)
from mixsup.training.trainer import TrainConfig

SIZE = 16


def tiny_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return RECIPE.build(TrainConfig(base_channels=2, depth=2))["network"]


def strong_batch(n: int = 2) -> Batch:
    """An organ square with two lesions one pixel apart (so the interface map is not empty)."""
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    labels[:, 2:14, 2:14] = 1
    labels[:, 4:9, 4:7] = 2
    labels[:, 4:9, 8:11] = 2
    boxes = torch.zeros(n, 2, SIZE, SIZE)
    boxes[:, ORGAN_BOX, 2:14, 2:14] = 1
    boxes[:, LESION_BOX, 4:9, 4:11] = 1
    images = torch.linspace(-300, 300, n * 3 * SIZE * SIZE).reshape(n, 3, SIZE, SIZE)
    return Batch(STRONG, images, boxes, labels)


def weak_batch(n: int = 2) -> Batch:
    boxes = torch.zeros(n, 2, SIZE, SIZE)
    boxes[:, ORGAN_BOX, 1:13, 3:15] = 1
    boxes[:, LESION_BOX, 5:10, 6:12] = 1
    images = torch.linspace(250, -250, n * 3 * SIZE * SIZE).reshape(n, 3, SIZE, SIZE)
    return Batch(WEAK, images, boxes)


def segmentation_only_parameters(network) -> list[torch.nn.Parameter]:
    """What only the segmentation and separation tasks reach: residual sub-blocks, heads, separation branch."""
    return [*network.segmenter.segmentation_path.parameters(), *network.segmenter.head.parameters(),
            *network.separation_path.parameters(), *network.separation_head.parameters()]


# ------------------------------------------------------------------------------------------ the loss
def test_weighted_cross_entropy_matches_hand_computed_value():
    # Pixel a: target 0 with p = (1/4, 1/2, 1/4) -> CE ln 4. Pixel b: target 2 with p = (1/4, 1/4, 1/2) -> CE ln 2.
    # Pixel c is unknown; sample 1 has no label. Weights (1, 1, 3): (1 ln 4 + 3 ln 2) / (1 + 3) = 5/4 ln 2.
    logits = torch.zeros(2, 3, 1, 3)
    logits[0, :, 0, 0] = torch.log(torch.tensor([1.0, 2.0, 1.0]))
    logits[0, :, 0, 1] = torch.log(torch.tensor([1.0, 1.0, 2.0]))
    logits[0, :, 0, 2] = torch.tensor([5.0, -5.0, 0.0])
    logits[1] = torch.randn(3, 1, 3)
    target = torch.tensor([[[0, 2, IGNORE_INDEX]], [[1, 1, 0]]])
    loss = indicated_weighted_cross_entropy(logits, target, torch.tensor([1.0, 1.0, 3.0]), torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(1.25 * math.log(2.0), rel=1e-6)


def test_indicator_matches_torch_on_labelled_samples_and_gives_absent_ones_no_gradient():
    torch.manual_seed(1)
    logits = torch.randn(3, 3, 5, 5, requires_grad=True)
    target = torch.randint(0, 3, (3, 5, 5))
    weights = torch.tensor([0.5, 1.0, 4.0])
    loss = indicated_weighted_cross_entropy(logits, target, weights, torch.tensor([True, False, True]))
    expected = F.cross_entropy(logits[[0, 2]], target[[0, 2]], weight=weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0 and torch.count_nonzero(logits.grad[0]) > 0

    logits.grad = None
    nothing = indicated_weighted_cross_entropy(logits, target, weights, torch.zeros(3))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_indicator_zeroes_absent_tasks_even_where_targets_exist():
    """Samples marked as missing the mask contribute nothing to the separation and segmentation terms."""
    torch.manual_seed(2)
    outputs = {"detection": torch.randn(4, 3, 6, 6), "segmentation": torch.randn(4, 3, 6, 6),
               "separation": torch.randn(4, 2, 6, 6)}
    maps = dict(detection=torch.randint(0, 3, (4, 6, 6)), separation=torch.randint(0, 2, (4, 6, 6)),
                segmentation=torch.randint(0, 3, (4, 6, 6)))
    settings = LazySettings()
    mixed = multi_task_losses(outputs, TaskTargets(**maps, has_rough=torch.ones(4, dtype=torch.bool),
                                                   has_mask=torch.tensor([True, True, False, False])), settings)
    first_two = {name: value[:2] for name, value in outputs.items()}
    alone = multi_task_losses(first_two, TaskTargets(**{k: v[:2] for k, v in maps.items()},
                                                     has_rough=torch.ones(2, dtype=torch.bool),
                                                     has_mask=torch.ones(2, dtype=torch.bool)), settings)
    for task in ("segmentation", "separation"):
        assert mixed[task].item() == pytest.approx(alone[task].item(), rel=1e-6)
    assert mixed["detection"].item() != pytest.approx(alone["detection"].item(), rel=1e-6)


def test_weak_batch_has_zero_segmentation_loss_and_no_gradient_on_segmentation_parameters():
    network = tiny_network()
    losses = RECIPE.losses(network, {WEAK: weak_batch()}, RECIPE.settings(TrainConfig()))
    assert losses["segmentation"].item() == 0.0 and losses["separation"].item() == 0.0
    assert losses["detection"].item() > 0.0
    losses["loss"].backward()
    for parameter in segmentation_only_parameters(network):
        assert parameter.grad is None or torch.count_nonzero(parameter.grad) == 0
    shared = [*network.detection_head.parameters(), *network.segmenter.encoder.parameters(),
              *network.segmenter.shared.parameters()]
    assert sum(int(torch.count_nonzero(p.grad)) for p in shared if p.grad is not None) > 0


def test_weak_samples_change_nothing_in_a_mixed_batch_segmentation_term():
    """In eval mode (no batch statistics) the segmentation term and its gradient on the segmentation-only
    parameters are the same with or without the weak crops in the batch."""
    network = tiny_network().eval()
    strong, weak = strong_batch(), weak_batch()

    def segmentation_term(batches):
        network.zero_grad(set_to_none=True)
        losses = RECIPE.losses(network, batches, RECIPE.settings(TrainConfig()))
        (losses["segmentation"] + losses["separation"]).backward()
        return losses, [p.grad.clone() for p in segmentation_only_parameters(network)]

    mixed, mixed_grads = segmentation_term({STRONG: strong, WEAK: weak})
    alone, alone_grads = segmentation_term({STRONG: strong})
    assert mixed["segmentation"].item() == pytest.approx(alone["segmentation"].item(), rel=1e-6)
    assert mixed["separation"].item() == pytest.approx(alone["separation"].item(), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(mixed_grads, alone_grads))


def test_train_step_updates_the_network_and_reports_every_task():
    config = TrainConfig(base_channels=2, depth=2, options={"detection_weight": 2.0, "segmentation_weight": 0.5})
    network_modules = RECIPE.build(config)
    assert not hasattr(network_modules["network"], "settings")  # the step reads them from its config
    optimizers = RECIPE.optimizers("train", network_modules, config)
    before = [p.detach().clone() for p in network_modules.parameters()]
    logged = RECIPE.train_step("train", network_modules, {STRONG: strong_batch(), WEAK: weak_batch()}, optimizers,
                               config)
    assert set(logged) == {"loss", "detection", "separation", "segmentation"}
    assert all(math.isfinite(v) for v in logged.values())
    expected = 2.0 * logged["detection"] + logged["separation"] + 0.5 * logged["segmentation"]
    assert logged["loss"] == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, network_modules.parameters()))


def test_batch_sizes_mix_strong_and_weak():
    config = TrainConfig(batch_size=8)
    assert RECIPE.batch_sizes("train", config) == {STRONG: 4, WEAK: 4}
    assert RECIPE.batch_sizes("train", dataclasses.replace(config, options={"weak_fraction": 0.0})) == {STRONG: 8}
    assert RECIPE.batch_sizes("train", dataclasses.replace(config, options={"weak_fraction": 1.0}))[STRONG] == 1


# ------------------------------------------------------------------------------------------ lazy labels
def test_rough_regions_from_boxes_place_an_organ_core_and_a_lesion_ellipse_with_an_unknown_rest():
    organ = np.zeros((50, 50), dtype=bool)
    organ[10:40, 5:45] = True  # 30 x 40, centre (24.5, 24.5), half sides (15, 20)
    lesion = np.zeros_like(organ)
    lesion[30:36, 30:40] = True
    target = rough_regions_from_boxes(organ, lesion, organ_core=(0.0, -0.55), organ_core_radius=0.25,
                                      lesion_shrink=0.6, background_margin=2)

    y, x = np.mgrid[:50, :50]
    organ_core = ((y - 24.5) / (0.25 * 15)) ** 2 + ((x - (24.5 - 0.55 * 20)) / (0.25 * 20)) ** 2 <= 1
    lesion_ellipse = ((y - 32.5) / (0.6 * 3)) ** 2 + ((x - 34.5) / (0.6 * 5)) ** 2 <= 1
    np.testing.assert_array_equal(target == 2, lesion_ellipse)
    np.testing.assert_array_equal(target == 1, organ_core & ~lesion)
    # The rest of the box, its centre included, is unknown.
    rest = organ & ~organ_core & ~lesion_ellipse
    assert rest[24, 24] and np.all(target[rest] == IGNORE_INDEX)
    # Background: certain beyond the margin, unknown within it.
    assert np.all(target[8:10, 5:45] == IGNORE_INDEX) and np.all(target[:8] == 0) and np.all(target[42:] == 0)
    assert np.all(target[10:40, :3] == 0) and np.all(target[10:40, 47:] == 0)


def test_organ_core_is_left_out_where_the_crop_cuts_the_side_it_depends_on():
    """A box cut by the crop's left, top or bottom border has an unknown left edge or vertical centre, so its core
    would land off target; cut on the right only, the core moves toward the left edge it is anchored to."""
    lesion = np.zeros((40, 40), dtype=bool)
    for cut in (np.s_[5:35, 0:30], np.s_[0:30, 5:35], np.s_[10:40, 5:35]):
        organ = np.zeros_like(lesion)
        organ[cut] = True
        assert not (rough_regions_from_boxes(organ, lesion) == 1).any(), cut
    organ = np.zeros_like(lesion)
    organ[5:35, 10:40] = True
    core = rough_regions_from_boxes(organ, lesion) == 1
    assert core.any() and np.nonzero(core)[1].max() < 25


def phantom_box_crops(shape: tuple[int, int, int], spacing_mm: float, crop: int, n_cases: int = 12,
                      n_crops: int = 400, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(box masks [2, h, w] bool, labels [h, w]) of training crops (the trainer's sampler and augmentation) of
    generated phantoms, with boxes derived from their masks; crops without an organ box are left out."""
    from mixsup.resample import inplane_shape, resample_inplane
    from mixsup.training.data.boxes import boxes_from_labels
    from mixsup.training.data.cli import case_seed
    from mixsup.training.data.dataset import Augmentation, SliceSampler, Volume, box_masks
    from mixsup.training.data.phantoms import generate_phantom

    volumes = []
    for index in range(n_cases):
        phantom = generate_phantom(case_seed(seed, index), shape)
        out_hw = inplane_shape(shape[1:], phantom.spacing[1:], (spacing_mm, spacing_mm))
        on_grid = [resample_inplane(a, out_hw, order=0)
                   for a in (phantom.volume, phantom.labels, box_masks(boxes_from_labels(phantom.labels), shape))]
        volumes.append(Volume(hu=on_grid[0], labels=on_grid[1], boxes=on_grid[2]))
    sampler = SliceSampler(volumes, crop=crop, augmentation=Augmentation())
    rng = np.random.default_rng(seed)
    crops = [sampler.sample(rng) for _ in range(n_crops)]
    return [(c["boxes"] >= 0.5, c["labels"]) for c in crops if (c["boxes"][ORGAN_BOX] >= 0.5).any()]


def wrong_label_fractions(crops: list[tuple[np.ndarray, np.ndarray]], rough=rough_regions_from_boxes) -> dict:
    """Per class (1 organ, 2 lesion) and for both ("all"): the share of the pixels ``rough(organ box, lesion box)``
    labels with that class whose true label differs, and how many pixels it labels."""
    wrong, labelled = np.zeros(3), np.zeros(3)
    for boxes, labels in crops:
        target = rough(boxes[ORGAN_BOX], boxes[LESION_BOX])
        for label in (1, 2):
            marked = target == label
            labelled[label] += marked.sum()
            wrong[label] += (marked & (labels != label)).sum()
    fractions = {label: (wrong[label] / max(labelled[label], 1), int(labelled[label])) for label in (1, 2)}
    fractions["all"] = (wrong.sum() / max(labelled.sum(), 1), int(labelled.sum()))
    return fractions


def test_box_rough_regions_are_mostly_right_on_phantoms():
    """On training crops of phantoms (tiny preset: 3.2 mm, 48 px crops) at most a few % of the organ and lesion
    pixels of the box-derived rough regions are wrong; the box's centred inscribed ellipse (the old organ rule)
    was wrong on about a fifth, because a slice of the liver is not an ellipse centred in its box."""
    crops = phantom_box_crops((12, 64, 64), 3.2, 48)
    fractions = wrong_label_fractions(crops)
    assert fractions["all"][0] < 0.04 and fractions[1][0] < 0.04 and fractions[2][0] < 0.04, fractions
    assert fractions[1][1] > 1000 and fractions[2][1] > 1000, fractions  # still a label worth training on
    centred = wrong_label_fractions(crops, lambda organ, _: np.where(placed_ellipses(organ, 0.5), 1, 0))
    assert centred[1][0] > 0.15, centred


def test_inner_ellipse_stays_inside_a_rotated_box():
    y, x = np.mgrid[:60, :60] - 29.5
    angle = np.deg2rad(30)
    u, v = np.cos(angle) * y + np.sin(angle) * x, -np.sin(angle) * y + np.cos(angle) * x
    box = (np.abs(u) <= 18) & (np.abs(v) <= 8)
    inside = placed_ellipses(box, shrink=1.0)
    assert not np.any(inside & ~box)
    assert np.all(inside[(u / 18) ** 2 + (v / 8) ** 2 <= 0.8])
    assert inside.sum() < 0.85 * box.sum()  # an ellipse, not the box (pi/4 of it)


def test_rough_regions_from_mask_erode_every_class():
    labels = np.zeros((60, 60), dtype=np.int64)
    labels[5:55, 5:55] = 1
    labels[15:35, 15:35] = 2
    labels[44:47, 44:47] = 2  # a 3 x 3 lesion, thinner than the margin
    target = rough_regions_from_mask(labels, margin=3.0, organ_shrink=0.5, lesion_shrink=0.6)
    known = target != IGNORE_INDEX
    np.testing.assert_array_equal(target[known], labels[known])  # never wrong
    # Every pixel within 3 px of a different class is unknown (checked on both sides of each border) ...
    assert np.all(target[5:8, 10:50] == IGNORE_INDEX) and np.all(target[2:5, 10:50] == IGNORE_INDEX)
    assert np.all(target[15:18, 20:30] == IGNORE_INDEX) and np.all(target[12:15, 20:30] == IGNORE_INDEX)
    # ... and the pixels just beyond are labelled.
    assert np.all(target[1, 10:50] == 0) and np.all(target[8, 40:50] == 1) and np.all(target[18, 20:30] == 2)
    # A component thinner than the margin keeps its core: margin = 0.4 x its depth (2) < 1 keeps it all.
    assert np.all(target[44:47, 44:47] == 2)


def test_interface_map_marks_exactly_the_contact_of_touching_lesions():
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[2:18, 2:18] = 1
    labels[5:12, 4:9] = 2
    labels[5:12, 10:15] = 2  # one liver column (9) between the two lesions
    expected = np.zeros_like(labels)
    expected[5:12, 8] = 1
    expected[5:12, 10] = 1
    np.testing.assert_array_equal(interface_map(labels, radius=2.0), expected)

    apart = labels.copy()
    apart[5:12, 9:12] = 1  # now four columns apart
    assert not interface_map(apart, radius=2.0).any()
    merged = labels.copy()
    merged[5:12, 9] = 2  # one instance: no interface inside it
    assert not interface_map(merged, radius=2.0).any()


def test_interface_map_separates_touching_lesions_by_their_instances():
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[2:18, 2:18] = 1
    labels[5:12, 4:14] = 2  # two lesions side by side: one 8-connected component
    instances = np.zeros_like(labels)
    instances[5:12, 4:9] = 3
    instances[5:12, 9:14] = 7
    assert not interface_map(labels, radius=1.0).any()  # without instances: one lesion, no interface
    expected = np.zeros_like(labels)
    expected[5:12, 8:10] = 1  # the contact columns on both sides
    np.testing.assert_array_equal(interface_map(labels, radius=1.0, instances=instances), expected)
    # Instance ids outside the lesion label are ignored.
    instances[0, 0] = 5
    np.testing.assert_array_equal(interface_map(labels, radius=1.0, instances=instances), expected)


@pytest.fixture(scope="module")
def strong_phantoms(tmp_path_factory):
    from mixsup.training.data.cli import main as data_main

    root = tmp_path_factory.mktemp("lazy-strong-phantoms")
    assert data_main(["phantoms", str(root), "--n", "6", "--seed", "3", "--shape", "8", "64", "64", "-q"]) == 0
    return root


def test_touching_phantom_lesions_get_interfaces_through_the_data_pipeline(strong_phantoms):
    """The phantoms' lesion instances reach the crops: touching lesions, one connected component of the mask,
    give interface pixels that connected components never would."""
    from mixsup.training.data.dataset import Augmentation, SliceSampler, load_volume
    from mixsup.training.data.manifest import load_dataset
    from mixsup.training.recipes.lazy import task_targets

    volumes = [load_volume(case, (3.2, 3.2)) for case in load_dataset(strong_phantoms).strong()]
    assert all(v.instances is not None and np.array_equal(v.instances > 0, v.labels == 2) for v in volumes)
    assert all(v.instances.dtype == np.uint8 for v in volumes)  # a case's few lesions, held compactly
    touching = sum(int(interface_map(v.labels[z], instances=v.instances[z]).sum())
                   for v in volumes for z in range(v.labels.shape[0]) if not interface_map(v.labels[z]).any())
    assert touching > 0

    sampler = SliceSampler(volumes, crop=32, augmentation=Augmentation())
    batch = sampler.batch(np.random.default_rng(0), 16)
    assert batch.instances is not None and batch.instances.shape == batch.labels.shape
    assert torch.equal(batch.instances > 0, batch.labels == 2)  # one geometry for labels and instances
    _, targets = task_targets({STRONG: batch}, LazySettings())
    for index in range(len(batch)):
        expected = interface_map(batch.labels[index].numpy(), instances=batch.instances[index].numpy())
        np.testing.assert_array_equal(targets.separation[index].numpy(), expected)


def test_task_targets_give_weak_crops_only_rough_regions():
    from mixsup.training.recipes.lazy import task_targets

    strong, weak = strong_batch(), weak_batch()
    images, targets = task_targets({STRONG: strong, WEAK: weak}, LazySettings())
    assert images.shape[0] == 4 and targets.has_mask.tolist() == [True, True, False, False]
    assert targets.has_rough.all()
    expected_rough = rough_regions_from_boxes(weak.boxes[0, ORGAN_BOX].numpy() > 0,
                                              weak.boxes[0, LESION_BOX].numpy() > 0)
    np.testing.assert_array_equal(targets.detection[2].numpy(), expected_rough)
    assert (targets.segmentation[2:] == IGNORE_INDEX).all() and (targets.separation[2:] == IGNORE_INDEX).all()
    torch.testing.assert_close(targets.segmentation[:2], strong.labels)
    assert targets.separation[0, 4:9, 6].eq(1).all() and targets.separation[0, 4:9, 8].eq(1).all()
    assert targets.separation[0].sum() == 10


# ------------------------------------------------------------------------------------------ export
def test_segmentation_network_excludes_detection_and_separation():
    network = tiny_network().eval()
    segmenter = RECIPE.segmentation_network(torch.nn.ModuleDict({"network": network}))
    excluded = {id(p) for module in (network.detection_head, network.separation_path, network.separation_head)
                for p in module.parameters()}
    assert excluded and not excluded & {id(p) for p in segmenter.parameters()}
    assert not any(key.startswith(("detection", "separation")) for key in segmenter.state_dict())
    assert dataclasses.is_dataclass(segmenter.config)

    called = []
    for module in (network.detection_head, network.separation_path, network.separation_head):
        module.register_forward_hook(lambda *_: called.append(1))
    images = strong_batch().images
    with torch.no_grad():
        exported = segmenter(images)
        assert not called
        full = network(images)
    torch.testing.assert_close(exported, full["segmentation"])
    assert exported.shape == (2, 3, SIZE, SIZE)


@pytest.fixture(scope="module")
def weak_phantoms(tmp_path_factory):
    from mixsup.training.data.cli import main as data_main

    root = tmp_path_factory.mktemp("lazy-phantoms")
    assert data_main(["phantoms", str(root), "--n", "4", "--seed", "3", "--shape", "8", "64", "64",
                      "--weak-fraction", "0.5", "-q"]) == 0
    return root


def test_tiny_run_trains_and_exports(weak_phantoms, tmp_path, monkeypatch):
    import onnxruntime

    import mixsup.training.recipes as recipes
    from mixsup.export.cli import main as export_main
    from mixsup.training.cli import main as train_main
    from mixsup.training.trainer import load_checkpoint

    if "lazy" not in recipes.RECIPES:  # until the recipe is registered
        monkeypatch.setattr(recipes, "RECIPES", (*recipes.RECIPES, "lazy"))
    out = tmp_path / "run"
    assert train_main(["lazy", "--data", str(weak_phantoms), "--out", str(out), "--preset", "tiny",
                       "--no-progress"]) == 0
    payload = load_checkpoint(out / "best.pt")
    assert payload["recipe"] == "lazy" and payload["config"]["options"]["lesion_class_weight"] == 3.0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["detection"]) > 0 and float(r["segmentation"]) > 0 for r in rows)

    repository = tmp_path / "repo"
    assert export_main([str(out / "best.pt"), "--repository", str(repository), "--name", "lazy"]) == 0
    session = onnxruntime.InferenceSession(str(repository / "lazy" / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).uniform(-1000, 400, (1, 3, 48, 48)).astype(np.float32)
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: probe})
    assert probabilities.shape == (1, 3, 48, 48)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
