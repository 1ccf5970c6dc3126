"""Dataset folders: LiTS naming without a manifest, manifest validation, and loading cases."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mixsup.errors import InputError
from mixsup.scan import write_nifti
from mixsup.training.data.boxes import boxes_from_labels, save_boxes
from mixsup.training.data.manifest import (
    Case,
    Manifest,
    case_boxes,
    lesion_components,
    load_case,
    load_dataset,
    read_case,
    write_manifest,
)

# LPS storage as a DICOM-derived NIfTI has it; i -> patient left, j -> posterior, k -> superior
LPS_AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


def tiny_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 400, size=(16, 12, 5)).astype(np.int16)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:9, 2:8, 1:4] = 1
    labels[4:6, 3:5, 2] = 2
    return volume, labels


@pytest.fixture
def lits_folder(tmp_path):
    """A LiTS-like folder as downloaded: .nii files, gaps in the numbering, one case without a mask."""
    for number, with_mask in ((3, True), (10, True), (7, False)):
        volume, labels = tiny_case(number)
        write_nifti(tmp_path / f"volume-{number}.nii", volume, LPS_AFFINE)
        if with_mask:
            write_nifti(tmp_path / f"segmentation-{number}.nii", labels, LPS_AFFINE)
    (tmp_path / "notes.txt").write_text("not a case")
    return tmp_path


def test_lits_folder_without_manifest_loads(lits_folder):
    manifest = load_dataset(lits_folder)
    assert [c.case for c in manifest.cases] == ["3", "7", "10"]  # numeric, not lexical, order
    assert [c.case for c in manifest.strong()] == ["3", "10"]
    assert [c.case for c in manifest.unlabeled()] == ["7"] and manifest.weak() == []
    volume, labels, spacing = load_case(manifest.cases[0])
    raw_volume, raw_labels = tiny_case(3)
    # canonical [D, H, W] of an LPS file is a plain transpose: D = k (superior), H = j (posterior), W = i (left)
    assert volume.dtype == np.int16 and labels.dtype == np.uint8
    assert volume.shape == (5, 12, 16) and np.allclose(spacing, (2.5, 0.8, 0.8))
    assert np.array_equal(volume, raw_volume.transpose(2, 1, 0))
    assert np.array_equal(labels, raw_labels.transpose(2, 1, 0))
    assert load_case(manifest.cases[1])[1] is None


def test_strong_case_without_boxes_file_gets_boxes_from_its_mask(lits_folder):
    case = load_dataset(lits_folder).strong()[0]
    _, labels, _ = load_case(case)
    assert case.boxes is None
    assert case_boxes(case, labels) == boxes_from_labels(labels)
    assert case_boxes(load_dataset(lits_folder).unlabeled()[0]) is None


def test_boxes_file_makes_a_maskless_case_weak(lits_folder):
    volume, labels = tiny_case(7)
    save_boxes(lits_folder / "boxes" / "boxes-7.json", boxes_from_labels(labels.transpose(2, 1, 0)), (5, 12, 16))
    manifest = load_dataset(lits_folder)
    weak = manifest.weak()
    assert [c.case for c in weak] == ["7"]
    assert case_boxes(weak[0], shape=(5, 12, 16))
    with pytest.raises(InputError, match="case 7"):
        case_boxes(weak[0], shape=(5, 12, 17))


def test_manifest_round_trip_and_hash(lits_folder):
    manifest = load_dataset(lits_folder)
    write_manifest(manifest)
    again = load_dataset(lits_folder)
    assert again.cases == manifest.cases and again.sha256() == manifest.sha256()
    document = json.loads((lits_folder / "manifest.json").read_text())
    assert document["format"] == "mixsup-manifest" and document["version"] == 1
    assert document["cases"][0] == {"case": "3", "volume": "volume-3.nii", "segmentation": "segmentation-3.nii",
                                    "boxes": None, "supervision": "strong"}
    # the manifest decides: hiding case 10's mask makes it unlabeled and changes the hash
    document["cases"][2].update(segmentation=None, supervision="unlabeled")
    (lits_folder / "manifest.json").write_text(json.dumps(document))
    changed = load_dataset(lits_folder)
    assert [c.case for c in changed.strong()] == ["3"] and changed.sha256() != manifest.sha256()


def test_cases_without_instances_get_each_slices_lesion_components(lits_folder):
    """Real LiTS folders have no instances file: every lesion component of a slice is its own instance."""
    case = load_dataset(lits_folder).strong()[0]
    assert case.instances is None
    data = read_case(case)
    assert data.instances.dtype == np.int32 and np.array_equal(data.instances > 0, data.labels == 2)
    for z in range(data.labels.shape[0]):
        assert np.array_equal(data.instances[z] > 0, lesion_components(data.labels[z]) > 0)
    two = np.zeros((2, 6, 6), dtype=np.uint8)
    two[0, 1:3, 1:3] = two[0, 4:6, 4:6] = two[1, 1:3, 1:3] = 2  # two apart in slice 0, one in slice 1
    components = lesion_components(two)
    assert len(np.unique(components[0])) == 3 and len(np.unique(components[1])) == 2
    assert set(np.unique(components[1])) - {0} != set(np.unique(components[0])) - {0}  # ids unique over slices


def test_instances_file_is_read_on_the_volume_grid_and_checked(lits_folder):
    volume, labels = tiny_case(3)
    instances = np.where(labels == 2, 4, 0).astype(np.uint16)
    instances[4, 3:5, 2] = 9  # a second lesion touching the first: one component, two ids
    write_nifti(lits_folder / "instances-3.nii", instances, LPS_AFFINE)
    manifest = load_dataset(lits_folder)  # LiTS naming: the instances file beside the mask is picked up
    case = manifest.strong()[0]
    assert case.instances == "instances-3.nii" and manifest.strong()[1].instances is None
    assert np.array_equal(read_case(case).instances, instances.transpose(2, 1, 0))
    write_manifest(manifest)
    document = json.loads((lits_folder / "manifest.json").read_text())
    assert document["cases"][0]["instances"] == "instances-3.nii" and "instances" not in document["cases"][2]
    assert load_dataset(lits_folder).cases == manifest.cases

    write_nifti(lits_folder / "instances-3.nii", np.where(labels > 0, 1, 0).astype(np.uint16), LPS_AFFINE)
    with pytest.raises(InputError, match="case 3: instances must be"):
        read_case(case)
    write_nifti(lits_folder / "instances-3.nii", instances, np.diag([-0.8, -0.8, 3.0, 1.0]))
    with pytest.raises(InputError, match="case 3: instances affine"):
        read_case(case)
    _write_manifest_cases(lits_folder, [Case("7", "volume-7.nii", None, None, "unlabeled", instances="instances-3.nii")])
    with pytest.raises(InputError, match="case 7: \"instances\" belongs to cases with a segmentation"):
        load_dataset(lits_folder)


def _write_manifest_cases(root, cases):
    write_manifest(Manifest(cases=cases, root=root))


@pytest.mark.parametrize(
    "case, message",
    [
        (Case("3", "volume-3.nii", None, None, "strong"), "case 3: strong supervision needs a segmentation"),
        (Case("3", "volume-3.nii", "segmentation-99.nii", None, "strong"), "case 3: missing file"),
        (Case("3", "volume-99.nii", "segmentation-3.nii", None, "strong"), "case 3: missing file"),
        (Case("3", "volume-3.nii", "segmentation-3.nii", None, "weak"), "case 3: weak supervision needs boxes"),
        (Case("3", "volume-3.nii", None, None, "mask"), "case 3: supervision 'mask'"),
        (Case("7", "volume-7.nii", "segmentation-3.nii", None, "unlabeled"), "case 7: an unlabeled case"),
    ],
)
def test_manifest_problems_are_one_line_input_errors(lits_folder, case, message):
    _write_manifest_cases(lits_folder, [case])
    with pytest.raises(InputError, match=message) as caught:
        load_dataset(lits_folder)
    assert "\n" not in str(caught.value)


def test_malformed_manifests_are_input_errors(lits_folder):
    for text in ("{", json.dumps({"format": "other"}), json.dumps({"format": "mixsup-manifest", "version": 9, "cases": []}),
                 json.dumps({"format": "mixsup-manifest", "version": 1, "cases": [{"case": 3}]})):
        (lits_folder / "manifest.json").write_text(text)
        with pytest.raises(InputError):
            load_dataset(lits_folder)


def test_segmentation_on_another_grid_is_rejected(tmp_path):
    volume, labels = tiny_case(1)
    write_nifti(tmp_path / "volume-1.nii.gz", volume, LPS_AFFINE)
    write_nifti(tmp_path / "segmentation-1.nii.gz", labels[:, :, :4], LPS_AFFINE)
    write_nifti(tmp_path / "volume-2.nii.gz", volume, LPS_AFFINE)
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] = 1.0
    write_nifti(tmp_path / "segmentation-2.nii.gz", labels, shifted)
    manifest = load_dataset(tmp_path)
    with pytest.raises(InputError, match="case 1: segmentation shape"):
        load_case(manifest.cases[0])
    with pytest.raises(InputError, match="case 2: segmentation affine"):
        load_case(manifest.cases[1])


def test_unexpected_label_values_are_rejected(tmp_path):
    volume, labels = tiny_case(1)
    labels[0, 0, 0] = 7
    write_nifti(tmp_path / "volume-1.nii", volume, LPS_AFFINE)
    write_nifti(tmp_path / "segmentation-1.nii", labels, LPS_AFFINE)
    with pytest.raises(InputError, match=r"values \[7\]"):
        load_case(load_dataset(tmp_path).cases[0])


def test_float_volumes_become_int16_hu(tmp_path):
    volume, _ = tiny_case(2)
    write_nifti(tmp_path / "volume-0.nii", volume.astype(np.float32) + 0.4, LPS_AFFINE)
    loaded, labels, _ = load_case(load_dataset(tmp_path).cases[0])
    assert loaded.dtype == np.int16 and labels is None
    assert np.array_equal(loaded, volume.transpose(2, 1, 0))


def test_non_finite_volumes_are_input_errors(tmp_path):
    volume, _ = tiny_case(2)
    corrupt = volume.astype(np.float32)
    corrupt[0, 0, 0] = np.nan
    write_nifti(tmp_path / "volume-0.nii", corrupt, LPS_AFFINE)
    with pytest.raises(InputError, match="NaN"):
        load_case(load_dataset(tmp_path).cases[0])


@pytest.mark.parametrize("names, message", [((), "no volume-N"), (("segmentation-4.nii",), "no matching volume-4"),
                                            (("volume-4.nii", "volume-4.nii.gz"), "keep one")])
def test_bad_lits_folders_are_input_errors(tmp_path, names, message):
    volume, _ = tiny_case(0)
    for name in names:
        write_nifti(tmp_path / name, volume, LPS_AFFINE)
    with pytest.raises(InputError, match=message):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="no such dataset folder"):
        load_dataset(tmp_path / "absent")
