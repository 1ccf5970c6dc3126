"""The domain-randomized generator style: every drawn range shows up in the images, the anatomy real scans carry
around the liver is there, labels stay honest (and the ``mixed`` style and the CLI's ``--style``)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from mixsup.training.data import cli
from mixsup.training.data.phantoms import REFERENCE_SHAPE, draw_style, generate_phantom
from mixsup.training.data.randomized import (
    IN_PLANE_MM,
    LIVER_HU,
    LIVER_TISSUES,
    NOISE_STD_HU,
    SLICE_MM,
    TISSUE_ID,
    TISSUES,
    _RandomizedComposer,
    draw_randomized_spacing,
)

SHAPE = (16, 96, 96)
SEEDS = range(32)


def _composed(seed: int, shape: tuple[int, int, int] = SHAPE):
    """The case ``generate_phantom(seed, shape, style="randomized")`` gives, with the composer that drew it."""
    composer = _RandomizedComposer(np.random.Generator(np.random.PCG64(seed)), shape, None)
    return composer, composer.compose()


@pytest.fixture(scope="module")
def cases():
    return {seed: _composed(seed) for seed in SEEDS}


def _tissue(phantom, name: str) -> np.ndarray:
    return phantom.tissues == TISSUE_ID[name]


def test_same_seed_gives_identical_cases_and_the_composer_is_what_generate_phantom_runs(cases):
    a, b = generate_phantom(5, SHAPE, style="randomized"), generate_phantom(5, SHAPE, style="randomized")
    for field in ("volume", "labels", "instances", "tissues"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert np.array_equal(getattr(a, field), getattr(cases[5][1], field)), field
    assert a.spacing == b.spacing and a.style == "randomized"
    other = generate_phantom(6, SHAPE, style="randomized")
    assert not np.array_equal(a.volume, other.volume) and not np.array_equal(a.labels, other.labels)


def test_types_labels_and_instances(cases):
    for seed, (_, phantom) in cases.items():
        assert phantom.volume.dtype == np.int16 and phantom.volume.shape == SHAPE
        assert phantom.labels.dtype == np.uint8 and set(np.unique(phantom.labels)) <= {0, 1, 2}
        assert phantom.tissues.dtype == np.uint8 and phantom.tissues.max() < len(TISSUES)
        assert phantom.instances.dtype == np.uint16
        assert np.array_equal(phantom.instances > 0, phantom.labels == 2), seed
        assert (phantom.labels >= 1).sum() > 0.003 * phantom.labels.size, seed  # the liver is always in view
    lesion_counts = [int(p.instances.max()) for _, p in cases.values()]
    assert 0 in lesion_counts and max(lesion_counts) >= 6


def test_spacing_covers_the_reference_ranges_and_keeps_the_field_of_view_across_matrices(cases):
    reference = [draw_randomized_spacing(np.random.default_rng(i)) for i in range(200)]
    assert all(SLICE_MM[0] <= sd <= SLICE_MM[1] and IN_PLANE_MM[0] <= sh == sw <= IN_PLANE_MM[1]
               for sd, sh, sw in reference)
    in_plane = sorted(s[1] for s in reference)
    slices = sorted(s[0] for s in reference)
    assert in_plane[0] < 0.6 and in_plane[-1] > 3.0 and slices[0] < 1.0 and slices[-1] > 6.5
    # a case on a smaller matrix has proportionally larger voxels: the same field of view in mm
    for _, phantom in cases.values():
        sd, sh, _ = (s * n / r for s, n, r in zip(phantom.spacing, SHAPE, REFERENCE_SHAPE))
        assert SLICE_MM[0] - 1e-3 <= sd <= SLICE_MM[1] + 1e-3 and IN_PLANE_MM[0] - 1e-3 <= sh <= IN_PLANE_MM[1] + 1e-3
    fixed = generate_phantom(1, SHAPE, spacing=(3.0, 1.5, 1.5), style="randomized")
    assert fixed.spacing == (3.0, 1.5, 1.5)


def test_liver_intensity_spreads_over_its_range(cases):
    medians = [float(np.median(p.volume[_tissue(p, "liver")])) for _, p in cases.values()]
    assert min(medians) < LIVER_HU[0] + 15 and max(medians) > LIVER_HU[1] - 25
    # most of the range is used, not just its ends
    assert len(set(np.digitize(medians, np.linspace(*LIVER_HU, 6)))) >= 6


def test_soft_tissue_is_sometimes_brighter_sometimes_equal_sometimes_darker_than_the_liver(cases):
    """Muscle and mesentery, darker than an enhanced liver in every real contrast phase, must take every relation
    to it: otherwise "brighter than its surroundings" stays a shortcut to the liver."""
    for name in ("body_wall_muscle", "visceral_soft_tissue"):
        relations = {"brighter": 0, "equal": 0, "darker": 0}
        for _, phantom in cases.values():
            mask = _tissue(phantom, name)
            if mask.sum() < 30:
                continue
            delta = float(np.median(phantom.volume[mask]) - np.median(phantom.volume[_tissue(phantom, "liver")]))
            relations["brighter" if delta > 15 else "darker" if delta < -15 else "equal"] += 1
        assert min(relations.values()) >= 3, (name, relations)


def test_a_threshold_cannot_separate_the_liver_in_most_cases(cases):
    """Large non-liver regions fall within the liver's own HU quartiles (the issue's failure mode)."""
    hard = 0
    for _, phantom in cases.values():
        liver = phantom.labels >= 1
        q25, q75 = np.percentile(phantom.volume[liver], [25, 75])
        lookalikes = ((phantom.volume >= q25) & (phantom.volume <= q75) & ~liver).sum()
        hard += lookalikes > 0.2 * liver.sum()
    assert hard >= 0.6 * len(cases)


def test_noise_std_is_drawn_over_its_range_and_shows_in_the_air(cases):
    drawn, measured = [], []
    for composer, phantom in cases.values():
        assert NOISE_STD_HU[0] <= composer.noise_std <= NOISE_STD_HU[1]
        # away from the body the image is air plus noise; slices are independent, so z differences show it
        air = ndimage.binary_erosion(_tissue(phantom, "air"), iterations=2)
        both = air[1:] & air[:-1]
        if both.sum() > 500:
            drawn.append(composer.noise_std)
            measured.append(float(np.diff(phantom.volume.astype(np.float32), axis=0)[both].std()) / np.sqrt(2))
    assert min(c.noise_std for c, _ in cases.values()) < 10 and max(c.noise_std for c, _ in cases.values()) > 32
    assert len(drawn) >= 15 and stats.spearmanr(drawn, measured)[0] > 0.8


def test_coverage_sometimes_cuts_the_liver_and_sometimes_holds_it_whole(cases):
    cut = whole = 0
    for _, phantom in cases.values():
        slices = np.nonzero((phantom.labels >= 1).any(axis=(1, 2)))[0]
        touches = slices[0] == 0 or slices[-1] == SHAPE[0] - 1
        cut += bool(touches)
        whole += not touches
    assert cut >= 8 and whole >= 5, (cut, whole)


def test_gas_bowel_and_ribs_appear_and_gas_lies_at_the_liver_edge(cases):
    gas_cases = rib_cases = gas_near_liver = 0
    for _, phantom in cases.values():
        gas = _tissue(phantom, "bowel_gas") & (phantom.volume < -500)
        gas_cases += gas.sum() > 5
        rib_cases += (_tissue(phantom, "rib") & (phantom.volume > 300)).sum() > 5
        distance = ndimage.distance_transform_edt(phantom.labels == 0, sampling=phantom.spacing)
        gas_near_liver += (gas & (distance < 20.0)).sum() > 0
        # all gas lies inside the body: it is surrounded by tissue in-plane, never the outside air
        outside = ndimage.binary_fill_holes(phantom.tissues != TISSUE_ID["air"], structure=np.ones((1, 3, 3)))
        assert not (gas & ~outside).any()
    assert gas_cases >= 12 and rib_cases >= 16 and gas_near_liver >= 6, (gas_cases, rib_cases, gas_near_liver)


def test_heart_lies_above_the_liver_dome(cases):
    above = 0
    for seed, (_, phantom) in cases.items():
        heart, liver = _tissue(phantom, "heart"), phantom.labels >= 1
        columns = heart.any(axis=0) & liver.any(axis=0)
        if heart.sum() < 20 or not columns.any():
            continue
        z = np.arange(SHAPE[0])[:, None, None]
        lowest_heart = np.where(heart, z, SHAPE[0]).min(axis=0)[columns]
        highest_liver = np.where(liver, z, -1).max(axis=0)[columns]
        assert (lowest_heart > highest_liver).all(), seed
        above += 1
    assert above >= 6


def test_hilum_vessels_gallbladder_and_ivc_are_drawn_and_labelled_as_in_annotations(cases):
    seen = {name: 0 for name in ("gallbladder_wall", "bile", "portal_vein", "portal_branch", "hepatic_vein", "ivc")}
    for _, phantom in cases.values():
        for name in seen:
            mask = _tissue(phantom, name)
            seen[name] += mask.sum() > 0
            assert (phantom.labels[mask] == (1 if name in LIVER_TISSUES else 0)).all(), name
    assert min(seen.values()) >= 8, seen


def test_bodies_range_from_sparse_to_crowded(cases):
    organs = ("spleen", "stomach_wall", "pancreas", "kidney_cortex", "bowel_wall")
    counts = [sum(_tissue(p, name).any() for name in organs) for _, p in cases.values()]
    assert min(counts) <= 2 and max(counts) == len(organs)
    assert sum(_tissue(p, "lookalike").any() for _, p in cases.values()) >= 12


def test_lesions_lie_inside_the_liver_shape():
    """Every lesion voxel was liver (parenchyma or its vessels) or an earlier lesion when the lesion was drawn."""
    for seed in range(12):
        composer = _RandomizedComposer(np.random.Generator(np.random.PCG64(seed)), SHAPE, None)
        draw_lesions, before = composer._add_lesions, {}

        def snapshot_then_draw():
            before["tissue"] = composer.tissue.copy()
            draw_lesions()

        composer._add_lesions = snapshot_then_draw
        phantom = composer.compose()
        lesion = phantom.labels == 2
        assert np.isin(before["tissue"][lesion], [TISSUE_ID[n] for n in LIVER_TISSUES]).all(), seed
        assert np.array_equal(phantom.instances > 0, lesion)


def test_lesions_are_hypo_iso_and_hyperdense(cases):
    kinds = set()
    for _, phantom in cases.values():
        liver = float(np.median(phantom.volume[_tissue(phantom, "liver")]))
        for lesion_id in range(1, int(phantom.instances.max()) + 1):
            mask = (phantom.instances == lesion_id) & _tissue(phantom, "lesion")
            if mask.sum() >= 20:
                delta = float(np.median(phantom.volume[mask])) - liver
                kinds.add("hyper" if delta > 15 else "hypo" if delta < -15 else "iso")
    assert kinds == {"hyper", "hypo", "iso"}


# ------------------------------------------------------------------------------------------ mixed and CLI
def test_mixed_draws_about_a_third_classic_and_reproduces_that_style():
    styles = [draw_style(seed) for seed in range(300)]
    assert 0.22 < styles.count("classic") / len(styles) < 0.38
    for seed in (0, 1, 2, 3):
        mixed = generate_phantom(seed, (8, 48, 48), style="mixed")
        plain = generate_phantom(seed, (8, 48, 48), style=draw_style(seed))
        assert mixed.style == draw_style(seed) and np.array_equal(mixed.volume, plain.volume)
    with pytest.raises(ValueError):
        generate_phantom(0, (8, 48, 48), style="synthseg")


def test_cli_style_flag_and_summary(tmp_path, capsys):
    small = ["--shape", "6", "32", "32"]
    assert cli.main(["phantoms", str(tmp_path / "r"), "--n", "2", *small, "--style", "randomized"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(" randomized " in line for line in lines[:2])
    assert cli.main(["phantoms", str(tmp_path / "c"), "--n", "1", "--shape", "6", "32", "32"]) == 0
    assert " classic " in capsys.readouterr().out.splitlines()[0]
    assert cli.main(["phantoms", str(tmp_path / "m"), "--n", "8", "--seed", "2", "--shape", "6", "32", "32",
                     "--style", "mixed"]) == 0
    out = capsys.readouterr().out
    assert " classic " in out and " randomized " in out
    with pytest.raises(SystemExit) as refused:  # argparse refuses an unknown choice itself
        cli.main(["phantoms", str(tmp_path / "x"), "--n", "1", "--style", "other"])
    assert refused.value.code == 2
