"""``mixsup-data split``: dealing masked cases into strong / weak / test / unlabeled, boxes, re-splits, LiTS folders."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mixsup.errors import InputError
from mixsup.scan import read_nifti, write_nifti
from mixsup.training.data import cli
from mixsup.training.data.boxes import PERTURBATION, boxes_from_labels, load_boxes
from mixsup.training.data.manifest import (
    Case,
    Manifest,
    case_boxes,
    load_case,
    load_dataset,
    write_manifest,
)
from mixsup.training.data.split import UNUSED, allocate_counts

N_CASES = 10
SHAPE = ("6", "48", "48")
LPS_AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


@pytest.fixture(scope="module")
def phantom_template(tmp_path_factory):
    """10 tiny phantoms; the last 3 already weak / unlabeled, so their masks lie in hidden/."""
    out = tmp_path_factory.mktemp("template") / "ds"
    assert cli.main(["phantoms", str(out), "--n", str(N_CASES), "--seed", "3", "--shape", *SHAPE,
                     "--weak-fraction", "0.2", "--unlabeled-fraction", "0.1", "-q"]) == 0
    return out


@pytest.fixture
def phantoms(phantom_template, tmp_path):
    return shutil.copytree(phantom_template, tmp_path / "ds")


def split(folder, *flags) -> int:
    return cli.main(["split", str(folder), *flags])


def true_labels(folder, case: Case) -> np.ndarray:
    """The case's real mask on the canonical grid, wherever it lies."""
    for relative in (f"segmentation-{case.case}.nii.gz", f"hidden/segmentation-{case.case}.nii.gz",
                     f"segmentation-{case.case}.nii"):
        if (folder / relative).is_file():
            return read_nifti(folder / relative).canonical()[0].astype(np.uint8)
    raise AssertionError(f"no mask for case {case.case}")


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("fractions, expected", [
    ((0.4, 0.3, 0.2, 0.1), (4, 3, 2, 1, 0)),
    ((0.35, 0.35, 0.3, 0.0), (4, 3, 3, 0, 0)),  # 3.5 / 3.5 / 3: the tie goes to strong, counts still add to 10
    ((0.25, 0.25, 0.2, 0.0), (3, 2, 2, 0, 3)),  # sum 0.7: 7 cases used, 3 left out
])
def test_counts_follow_the_fractions(phantoms, capsys, fractions, expected):
    strong, weak, test, unlabeled = fractions
    assert split(phantoms, "--strong", str(strong), "--weak", str(weak), "--test", str(test),
                 "--unlabeled", str(unlabeled)) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert f"{expected[0]} strong, {expected[1]} weak, {expected[2]} test, {expected[3]} unlabeled, {expected[4]} left out" in line
    manifest = load_dataset(phantoms)
    got = (len(manifest.strong()), len(manifest.weak()), len(manifest.test()), len(manifest.unlabeled()))
    assert got == expected[:4] and len(manifest.cases) == N_CASES - expected[4]


@pytest.mark.parametrize("n_cases", [1, 3, 7, 10, 131])
@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.2, 0.0), (1 / 3, 1 / 3, 1 / 3, 0.0), (0.05, 0.5, 0.15, 0.1), (0.0, 0.0, 0.5, 0.0)])
def test_allocated_counts_add_up_and_stay_near_the_quotas(n_cases, fractions):
    named = dict(zip(("strong", "weak", "test", "unlabeled"), fractions))
    counts = allocate_counts(n_cases, named)
    assert sum(counts.values()) == n_cases
    assert sum(v for k, v in counts.items() if k != UNUSED) == int(np.floor(sum(fractions) * n_cases + 0.5 + 1e-9))
    for kind, fraction in named.items():
        assert abs(counts[kind] - fraction * n_cases) < 1.0


# ------------------------------------------------------------------------------------------ determinism
def test_the_same_seed_gives_the_same_split_and_another_seed_another(phantom_template, tmp_path):
    flags = ["--strong", "0.4", "--weak", "0.3", "--test", "0.3", "--perturb-boxes"]
    results = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        folder = shutil.copytree(phantom_template, tmp_path / name)
        assert split(folder, *flags, "--seed", seed) == 0
        results[name] = snapshot(folder)
    assert results["a"] == results["b"]
    assert results["a"]["manifest.json"] != results["c"]["manifest.json"]
    kinds = {name: [c["supervision"] for c in json.loads(results[name]["manifest.json"])["cases"]] for name in results}
    assert kinds["a"] != kinds["c"]


# ------------------------------------------------------------------------------------------- weak boxes
def test_weak_cases_hide_the_mask_and_carry_its_boxes(phantoms):
    assert split(phantoms, "--strong", "0.3", "--weak", "0.5", "--test", "0.2", "--seed", "1") == 0
    manifest = load_dataset(phantoms)
    assert len(manifest.weak()) == 5
    for case in manifest.weak():
        assert case.segmentation is None and case.boxes == f"boxes/boxes-{case.case}.json"
        assert case.boxes_perturbed is False
        labels = true_labels(phantoms, case)
        boxes, shape = load_boxes(phantoms / case.boxes)
        assert boxes == boxes_from_labels(labels) and shape == labels.shape
        assert case_boxes(case, shape=labels.shape) == boxes
        _, loaded_labels, _ = load_case(case)
        assert loaded_labels is None  # training never sees the hidden mask
    document = json.loads((phantoms / "manifest.json").read_text())
    assert document["split"] == {"seed": 1, "fractions": {"strong": 0.3, "weak": 0.5, "test": 0.2, "unlabeled": 0.0},
                                 "perturb_boxes": False}


def test_perturbed_boxes_stay_within_the_papers_bounds_and_differ(phantoms):
    assert split(phantoms, "--strong", "0.0", "--weak", "1.0", "--test", "0.0", "--perturb-boxes", "--seed", "2") == 0
    manifest = load_dataset(phantoms)
    assert len(manifest.weak()) == N_CASES
    changed = total = 0
    for case in manifest.weak():
        assert case.boxes == f"boxes/boxes-{case.case}.perturbed.json" and case.boxes_perturbed is True
        clean = boxes_from_labels(true_labels(phantoms, case))
        assert load_boxes(phantoms / f"boxes/boxes-{case.case}.json")[0] == clean  # clean boxes kept on disk
        perturbed, shape = load_boxes(phantoms / case.boxes)
        assert len(perturbed) == len(clean)
        for old, new in zip(clean, perturbed):
            assert (new.slice, new.label) == (old.slice, old.label)
            (scale_lo, scale_hi), move = PERTURBATION[old.label]
            for lo_new, hi_new, lo, hi, size in ((new.y0, new.y1, old.y0, old.y1, shape[1]),
                                                 (new.x0, new.x1, old.x0, old.x1, shape[2])):
                centre, side = (lo + hi) / 2, hi - lo
                assert max(0, centre - side * scale_hi / 2 - move * side - 0.5) <= lo_new <= centre - side * scale_lo / 2 + move * side + 0.5
                assert centre + side * scale_lo / 2 - move * side - 0.5 <= hi_new <= min(size, centre + side * scale_hi / 2 + move * side + 0.5)
            changed += new != old
            total += 1
    assert total > 0 and changed > total // 2


# ------------------------------------------------------------------------------------------------- test
def test_test_cases_are_held_out_of_training(phantoms):
    assert split(phantoms, "--strong", "0.4", "--weak", "0.2", "--test", "0.3", "--unlabeled", "0.1") == 0
    manifest = load_dataset(phantoms)
    test_names = {c.case for c in manifest.test()}
    assert len(test_names) == 3
    training = manifest.strong() + manifest.weak() + manifest.unlabeled()
    assert test_names.isdisjoint(c.case for c in training)
    for case in manifest.test():
        assert case.boxes is None
        _, labels, _ = load_case(case)
        assert np.array_equal(labels, true_labels(phantoms, case))
    for case in manifest.unlabeled():
        assert case.segmentation is None and case.boxes is None


def test_manifest_rules_for_the_new_keys(tmp_path):
    write_nifti(tmp_path / "volume-1.nii", np.zeros((4, 4, 3), np.int16), LPS_AFFINE)
    write_nifti(tmp_path / "segmentation-1.nii", np.zeros((4, 4, 3), np.uint8), LPS_AFFINE)
    for case, message in ((Case("1", "volume-1.nii", None, None, "test"), "test case needs a segmentation"),
                          (Case("1", "volume-1.nii", "segmentation-1.nii", None, "strong", True), "weak cases only")):
        write_manifest(Manifest(cases=[case], root=tmp_path))
        with pytest.raises(InputError, match=message):
            load_dataset(tmp_path)
    # an older manifest without "split" / "boxes_perturbed" loads, hashes and writes back without them
    old = Manifest(cases=[Case("1", "volume-1.nii", "segmentation-1.nii", None, "strong")], root=tmp_path)
    write_manifest(old)
    loaded = load_dataset(tmp_path)
    assert loaded.split is None and loaded.cases[0].boxes_perturbed is None and loaded.sha256() == old.sha256()
    assert set(json.loads((tmp_path / "manifest.json").read_text())) == {"format", "version", "cases"}


# ------------------------------------------------------------------------------------------------ re-split
def test_a_split_folder_splits_again_and_the_old_manifest_is_kept(phantoms):
    assert split(phantoms, "--strong", "0.3", "--weak", "0.3", "--test", "0.2", "--seed", "1", "--perturb-boxes") == 0
    first = (phantoms / "manifest.json").read_text()
    assert len(load_dataset(phantoms).cases) == 8  # 2 left out
    assert split(phantoms, "--strong", "0.5", "--weak", "0.3", "--test", "0.2", "--seed", "9") == 0
    assert (phantoms / "manifest.json.bak").read_text() == first
    manifest = load_dataset(phantoms)
    assert len(manifest.cases) == N_CASES  # the cases the first split left out are found again
    assert (len(manifest.strong()), len(manifest.weak()), len(manifest.test())) == (5, 3, 2)
    assert manifest.split["perturb_boxes"] is False
    for case in manifest.strong() + manifest.test():  # masks now in hidden/ or hidden by the first split
        _, labels, _ = load_case(case)
        assert np.array_equal(labels, true_labels(phantoms, case))
    for case in manifest.weak():
        assert load_boxes(phantoms / case.boxes)[0] == boxes_from_labels(true_labels(phantoms, case))


def test_out_writes_a_separate_manifest_with_paths_relative_to_it(phantoms, tmp_path):
    before = (phantoms / "manifest.json").read_bytes()
    out = tmp_path / "splits" / "fold-1.json"
    assert split(phantoms, "--strong", "0.5", "--weak", "0.3", "--test", "0.2", "--out", str(out)) == 0
    assert (phantoms / "manifest.json").read_bytes() == before
    manifest = load_dataset(out)
    assert len(manifest.cases) == N_CASES and all(c.volume.startswith("../") for c in manifest.cases)
    volume, labels, _ = load_case(manifest.strong()[0])
    assert labels is not None and volume.shape == labels.shape


# ------------------------------------------------------------------------------------------------ LiTS
def test_a_lits_folder_without_manifest_splits(tmp_path):
    rng = np.random.default_rng(0)
    masks = {}
    for number in (0, 2, 5, 11, 13, 20):  # gaps, as in a real download; case 20 has no mask
        volume = rng.integers(-1000, 400, size=(24, 20, 4)).astype(np.int16)
        write_nifti(tmp_path / f"volume-{number}.nii", volume, LPS_AFFINE)
        if number != 20:
            labels = np.zeros(volume.shape, dtype=np.uint8)
            labels[3 + number % 5 : 15, 4:14, 1:4] = 1
            labels[6:9, 6:8 + number % 3, 2] = 2
            write_nifti(tmp_path / f"segmentation-{number}.nii", labels, LPS_AFFINE)
            masks[str(number)] = labels.transpose(2, 1, 0)  # canonical [D, H, W] of an LPS file
    assert split(tmp_path, "--strong", "0.4", "--weak", "0.4", "--test", "0.2", "--perturb-boxes", "--seed", "3") == 0
    assert not (tmp_path / "manifest.json.bak").exists()
    manifest = load_dataset(tmp_path)
    assert (len(manifest.strong()), len(manifest.weak()), len(manifest.test())) == (2, 2, 1)
    assert [c.case for c in manifest.unlabeled()] == ["20"]
    assert {c.case for c in manifest.cases} == {"0", "2", "5", "11", "13", "20"}
    for case in manifest.weak():
        assert case.segmentation is None and case.boxes_perturbed is True
        clean, shape = load_boxes(tmp_path / f"boxes/boxes-{case.case}.json")
        assert clean == boxes_from_labels(masks[case.case]) and shape == masks[case.case].shape
        assert (tmp_path / f"segmentation-{case.case}.nii").is_file()  # hidden by the manifest, not moved
    for case in manifest.strong() + manifest.test():
        assert case.segmentation == f"segmentation-{case.case}.nii"
        assert np.array_equal(load_case(case)[1], masks[case.case])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("flags", [
    ["--strong", "0.6", "--weak", "0.6", "--test", "0"],
    ["--strong", "-0.1", "--weak", "0.5", "--test", "0.2"],
    ["--strong", "1.5", "--weak", "0", "--test", "0"],
    ["--strong", "0", "--weak", "0", "--test", "0"],
    ["--strong", "0.5", "--weak", "0.3", "--test", "0.2", "--unlabeled", "0.1"],
])
def test_bad_fractions_exit_2_with_one_line_and_write_nothing(phantoms, capsys, flags):
    before = snapshot(phantoms)
    assert split(phantoms, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixsup-data: error:") and len(err.splitlines()) == 1
    assert snapshot(phantoms) == before


@pytest.mark.parametrize("make", ["empty", "absent", "masks_missing"])
def test_unusable_folders_exit_2(tmp_path, capsys, make):
    folder = tmp_path / "ds"
    if make != "absent":
        folder.mkdir()
    if make == "masks_missing":
        write_nifti(folder / "volume-1.nii", np.zeros((4, 4, 3), np.int16), LPS_AFFINE)
    assert split(folder, "--strong", "0.5", "--weak", "0.5", "--test", "0") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixsup-data: error:") and len(err.splitlines()) == 1
    assert not (folder / "manifest.json").exists()


def test_lesion_instances_travel_with_the_mask(phantoms):
    """Every strong or test case keeps its lesion instances, also one whose mask was hidden (a weak phantom that
    became strong); weak and unlabeled cases carry none, since their mask is out of training."""
    assert split(phantoms, "--strong", "0.5", "--weak", "0.3", "--test", "0.2", "--seed", "2") == 0
    manifest = load_dataset(phantoms)
    with_mask = [c for c in manifest.cases if c.supervision in ("strong", "test")]
    assert any(c.segmentation.startswith("hidden/") for c in with_mask)  # the case the fix is for
    for case in with_mask:
        assert case.instances == case.segmentation.replace("segmentation-", "instances-")
        assert (phantoms / case.instances).is_file()
    assert all(c.instances is None for c in manifest.cases if c.supervision in ("weak", "unlabeled"))
