"""The synthetic CT generator and the ``mixsup-data phantoms`` command."""
from __future__ import annotations

import hashlib
import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mixsup.scan import Scan, read_nifti
from mixsup.training.data import cli
from mixsup.training.data.manifest import load_case, load_dataset, read_case
from mixsup.training.data.phantoms import _Composer, draw_spacing, generate_phantom

SHAPE = (12, 64, 64)
SEEDS = range(12)


@pytest.fixture(scope="module")
def phantoms():
    return {seed: generate_phantom(seed, SHAPE) for seed in SEEDS}


def test_same_seed_gives_identical_phantoms_and_different_seeds_differ():
    a, b, c = generate_phantom(5, SHAPE), generate_phantom(5, SHAPE), generate_phantom(6, SHAPE)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.labels, b.labels) and a.spacing == b.spacing
    assert not np.array_equal(a.volume, c.volume)
    assert not np.array_equal(a.labels, c.labels)


def test_types_shape_and_spacing(phantoms):
    for phantom in phantoms.values():
        assert phantom.volume.dtype == np.int16 and phantom.volume.shape == SHAPE
        assert phantom.labels.dtype == np.uint8 and phantom.labels.shape == SHAPE
        assert set(np.unique(phantom.labels)) <= {0, 1, 2}
        assert phantom.volume.min() >= -1024 and phantom.volume.max() <= 3071
    fixed = generate_phantom(1, SHAPE, spacing=(3.0, 1.5, 1.5))
    assert fixed.spacing == (3.0, 1.5, 1.5)
    # drawn sizes are the reference grid's ranges, scaled by the matrix size
    spacings = [draw_spacing(np.random.default_rng(i)) for i in range(50)]
    assert all(1.0 <= sd <= 5.0 and 0.6 <= sh == sw <= 2.0 for sd, sh, sw in spacings)
    assert len({s[1] for s in spacings}) > 40


def test_liver_is_present_large_and_on_the_patients_right(phantoms):
    for seed, phantom in phantoms.items():
        organ = phantom.labels >= 1
        assert organ.sum() > 0.005 * organ.size, seed
        # canonical W runs patient right -> left, so the right side is at small W
        assert np.nonzero(organ)[2].mean() < SHAPE[2] / 2, seed


def test_lesions_lie_inside_the_liver_shape():
    for seed in SEEDS:
        rng = np.random.Generator(np.random.PCG64(seed))
        composer = _Composer(rng, SHAPE, draw_spacing(rng, SHAPE))
        phantom = composer.compose()
        assert not (composer.lesion & ~composer.liver).any(), seed
        assert np.array_equal(phantom.labels == 2, composer.lesion)


def test_instances_give_every_lesion_its_own_id_and_touching_lesions_occur(phantoms):
    """The generator records which lesion owns each lesion voxel, and some slices show lesions that touch (one
    8-connected component of the mask holding two ids): the interfaces the lazy recipe learns."""
    touching_cases = 0
    for seed, phantom in phantoms.items():
        assert phantom.instances.dtype == np.uint16 and phantom.instances.shape == SHAPE
        assert np.array_equal(phantom.instances > 0, phantom.labels == 2), seed
        touching = False
        for z in range(SHAPE[0]):
            components, count = ndimage.label(phantom.labels[z] == 2, structure=np.ones((3, 3)))
            ids = {(c, i) for c, i in zip(components.ravel(), phantom.instances[z].ravel()) if c}
            touching |= len(ids) > count
        touching_cases += touching
    assert touching_cases >= 2


def test_lesion_load_varies_and_tiny_lesions_occur(phantoms):
    sizes = []
    counts = []
    for phantom in phantoms.values():
        components, count = ndimage.label(phantom.labels == 2)
        counts.append(count)
        sizes.extend(np.bincount(components.ravel())[1:].tolist())
    assert 0 in counts and max(counts) >= 2
    assert min(sizes) <= 10 and max(sizes) >= 100


def test_hu_ranges_are_plausible(phantoms):
    for seed, phantom in phantoms.items():
        volume = phantom.volume
        assert volume[:, 0, :].mean() < -900, seed  # the anterior edge of the field is air
        body = volume > -500
        assert ((volume > -150) & (volume < -50)).sum() > 0.02 * body.sum(), seed  # fat
        liver_hu = volume[phantom.labels == 1]
        assert 0 < np.median(liver_hu) < 180, seed
    assert all((p.volume > 300).any() for p in phantoms.values())  # bone


def test_a_threshold_cannot_separate_the_liver(phantoms):
    """Voxels outside the liver (spleen, muscle, vessels ...) fall within the liver's own HU quartiles."""
    for seed, phantom in phantoms.items():
        liver = phantom.labels >= 1
        q25, q75 = np.percentile(phantom.volume[liver], [25, 75])
        lookalikes = ((phantom.volume >= q25) & (phantom.volume <= q75) & ~liver).sum()
        assert lookalikes > 0.05 * liver.sum(), seed


def test_cases_differ_widely(phantoms):
    spacings = {p.spacing for p in phantoms.values()}
    liver_medians = [float(np.median(p.volume[p.labels == 1])) for p in phantoms.values()]
    liver_sizes = [int((p.labels >= 1).sum()) for p in phantoms.values()]
    assert len(spacings) == len(phantoms)
    assert max(liver_medians) - min(liver_medians) > 40
    assert max(liver_sizes) > 2 * min(liver_sizes)


# --------------------------------------------------------------------------------------------- orientations
def test_every_orthogonal_orientation_round_trips_through_scan_canonical():
    canonical = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    spacing = (2.5, 0.7, 0.9)
    affine = cli.canonical_affine(spacing, (10.0, -20.0, 30.0))
    orientations = cli.all_orientations()
    assert len(set(orientations)) == 48
    for axcodes in orientations:
        stored, stored_affine = cli.to_orientation(canonical, affine, axcodes)
        assert nib.aff2axcodes(stored_affine) == axcodes
        back, back_spacing = Scan(stored, stored_affine).canonical()
        assert np.array_equal(back, canonical), axcodes
        assert np.allclose(back_spacing, spacing)
        # same world position of voxel (0, 0, 0) of the canonical array, whatever the storage
        index = np.argwhere(stored == canonical[0, 0, 0])[0]
        assert np.allclose((stored_affine @ [*index, 1])[:3], affine[:3, 3])


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["phantoms", str(out), "--n", "8", "--seed", "11", "--shape", "8", "48", "48",
            "--weak-fraction", "0.25", "--unlabeled-fraction", "0.25"]
    assert cli.main(argv) == 0
    assert "wrote 8 cases (4 strong, 2 weak, 2 unlabeled)" in capsys.readouterr().out
    manifest = load_dataset(out)
    assert [c.supervision for c in manifest.cases] == ["strong"] * 4 + ["weak"] * 2 + ["unlabeled"] * 2
    assert all(c.segmentation is None and c.boxes for c in manifest.weak())
    assert all(c.segmentation is None and c.boxes is None for c in manifest.unlabeled())
    assert json.loads((out / "manifest.json").read_text())["format"] == "mixsup-manifest"
    axcodes = set()
    for index, case in enumerate(manifest.cases):
        expected = generate_phantom(cli.case_seed(11, index), (8, 48, 48))
        volume_scan = read_nifti(out / case.volume)
        assert volume_scan.voxels.dtype == np.int16
        axcodes.add(nib.aff2axcodes(volume_scan.affine))
        volume, labels, spacing = load_case(case)
        assert np.array_equal(volume, expected.volume)
        assert np.allclose(spacing, expected.spacing)
        mask_path = out / (case.segmentation or f"{cli.HIDDEN_DIR}/segmentation-{index}.nii.gz")
        mask_scan = read_nifti(mask_path)
        assert mask_scan.voxels.dtype == np.uint8
        assert np.array_equal(mask_scan.canonical()[0], expected.labels)
        if case.segmentation:
            assert np.array_equal(labels, expected.labels)
        assert (out / f"boxes/boxes-{index}.json").is_file()
        # lesion instances beside every mask; the manifest references them for strong cases only
        assert case.instances == (f"instances-{index}.nii.gz" if case.segmentation else None)
        instances_scan = read_nifti(out / (case.instances or f"{cli.HIDDEN_DIR}/instances-{index}.nii.gz"))
        assert instances_scan.voxels.dtype == np.uint16 and np.array_equal(instances_scan.affine, mask_scan.affine)
        assert np.array_equal(instances_scan.canonical()[0], expected.instances)
        if case.segmentation:
            assert np.array_equal(read_case(case).instances, expected.instances)
    assert len(axcodes) > 1 and any(codes != ("R", "A", "S") for codes in axcodes)


def test_cli_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert cli.main(["phantoms", str(tmp_path / name), "--n", "2", "--seed", "4", "--shape", "6", "32", "32", "-q"]) == 0
    for name in ("volume-1.nii.gz", "segmentation-1.nii.gz"):
        a, b = read_nifti(tmp_path / "a" / name), read_nifti(tmp_path / "b" / name)
        assert np.array_equal(a.voxels, b.voxels) and np.array_equal(a.affine, b.affine)
    assert load_dataset(tmp_path / "a").sha256() == load_dataset(tmp_path / "b").sha256()


@pytest.mark.parametrize(
    "extra",
    [["--n", "0"], ["--n", "2", "--weak-fraction", "1.5"], ["--n", "2", "--weak-fraction", "0.6", "--unlabeled-fraction", "0.6"],
     ["--n", "1", "--shape", "1", "8", "8"], ["--n", "1", "--spacing", "1", "0", "1"]],
)
def test_cli_rejects_bad_input_with_exit_2(tmp_path, capsys, extra):
    assert cli.main(["phantoms", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixsup-data: error:") and len(err.splitlines()) == 1


def test_supervision_marks_the_last_cases():
    assert cli.assign_supervision(5, 0.4, 0.2) == ["strong", "strong", "weak", "weak", "unlabeled"]
    assert cli.assign_supervision(3, 0.0, 0.0) == ["strong"] * 3
    for n, weak, unlabeled in itertools.product((1, 7, 10), (0.0, 0.3), (0.0, 0.5)):
        kinds = cli.assign_supervision(n, weak, unlabeled)
        assert kinds.count("weak") == round(weak * n) and kinds.count("unlabeled") == round(unlabeled * n)


def _digest(phantom) -> str:
    h = hashlib.sha256()
    for array in (phantom.volume, phantom.labels, phantom.instances):
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(repr(phantom.spacing).encode())
    return h.hexdigest()


@pytest.mark.parametrize("seed, shape, spacing, expected", [
    (0, (12, 64, 64), None, "b3a00478316ddfa0bd3160854170adbcf1c0ef0e1736db404c217bff0d4fb8dd"),
    (3, (8, 48, 48), (3.0, 1.5, 1.5), "f839a3d0b39a3cc301684caf7d2c332b4303d6ddd33f7466275ed8678210b933"),
])
def test_classic_style_is_bit_identical_to_the_generator_before_styles_existed(seed, shape, spacing, expected):
    """Digests recorded from the generator as committed before the randomized style (d72e883): datasets made
    with the classic style, the default, stay reproducible."""
    assert _digest(generate_phantom(seed, shape, spacing)) == expected
    assert _digest(generate_phantom(seed, shape, spacing, style="classic")) == expected
    assert generate_phantom(seed, shape, spacing).style == "classic"
