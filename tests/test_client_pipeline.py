"""Scan grid <-> model grid in the client (mixsup.clients.pipeline), no server involved."""
import nibabel as nib
import numpy as np
import pytest

from mixsup.clients.pipeline import (
    Restore,
    mean_answer_on_scan_grid,
    mean_labels_canonical,
    needs_resampling,
    prepare_volume,
    restore_labels,
    restore_mean_probabilities,
    restore_probabilities,
)
from mixsup.contract import ModelContract
from mixsup.errors import InputError, MixsupError
from mixsup.metrics import dice
from mixsup.resample import resample_inplane
from mixsup.scan import Scan, to_int16_hu


def lps_affine(spacing):
    """Stored axes i -> patient left, j -> posterior, k -> superior (DICOM's LPS order)."""
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def psr_affine(spacing):
    """A permuted orientation: i -> posterior, j -> superior, k -> patient right."""
    affine = np.zeros((4, 4))
    affine[1, 0] = -spacing[0]
    affine[2, 1] = spacing[1]
    affine[0, 2] = spacing[2]
    affine[:3, 3] = (10.0, -20.0, 30.0)
    affine[3, 3] = 1.0
    return affine


def blob_scan(affine, shape, inplane_axes=None, seed=0):
    """A phantom: background 0 HU, a large disc of liver (100 HU) holding a large lesion (200 HU), plus noise.

    The discs span every slice along the axis not in ``inplane_axes``. Symmetric contrasts keep the threshold
    "model" below unbiased under linear resampling, so what is measured is the pipeline, not the threshold.
    """
    inplane_axes = inplane_axes or (0, 1)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    rows, cols = grids[inplane_axes[0]], grids[inplane_axes[1]]
    voxels = np.zeros(shape)
    voxels[rows**2 + cols**2 < 0.9**2] = 100.0
    voxels[(rows - 0.3) ** 2 + (cols + 0.1) ** 2 < 0.4**2] = 200.0
    voxels += np.random.default_rng(seed).normal(0, 3, shape)
    return Scan(voxels=voxels.astype(np.float32), affine=affine)


def threshold_model(volume):
    """A stand-in network: liver above 50 HU, lesion above 150 HU."""
    return ((volume > 50).astype(np.uint8) + (volume > 150).astype(np.uint8)).astype(np.uint8)


@pytest.mark.parametrize("make_affine", [lps_affine, psr_affine])
def test_round_trip_without_resampling_is_exact(make_affine):
    spacing = (0.8, 2.5, 1.25)  # anisotropic
    scan = blob_scan(make_affine(spacing), (20, 12, 16))
    canonical, canonical_spacing = scan.canonical()
    contract = ModelContract(spacing_mm=canonical_spacing[1:])
    volume, restore = prepare_volume(scan, contract)
    assert volume.dtype == np.int16 and volume.shape == canonical.shape
    assert not restore.resampled
    assert np.array_equal(volume, np.rint(canonical).astype(np.int16))

    labels = restore_labels(threshold_model(volume), restore, num_classes=3)
    assert labels.dtype == np.uint8 and labels.shape == scan.voxels.shape
    assert np.array_equal(labels, threshold_model(np.rint(scan.voxels)))


def test_the_model_sees_the_canonical_order():
    # A marker at the patient's superior-anterior-right corner sits at canonical [D-1, 0, 0].
    scan = blob_scan(psr_affine((1.0, 2.0, 1.0)), (6, 5, 7))
    assert nib.aff2axcodes(scan.affine) == ("P", "S", "R")
    scan.voxels[:] = 0
    scan.voxels[0, -1, -1] = 999  # i=0 most anterior, j=-1 most superior, k=-1 most right
    volume, _ = prepare_volume(scan, ModelContract(spacing_mm=(1.0, 1.0)))
    assert volume[-1, 0, 0] == 999 and np.count_nonzero(volume) == 1


@pytest.mark.parametrize("make_affine", [lps_affine, psr_affine])
def test_resampled_round_trip_keeps_a_large_blob(make_affine):
    if make_affine is lps_affine:
        spacing, shape, inplane_axes = (0.8, 0.8, 2.0), (128, 128, 4), (0, 1)
    else:
        spacing, shape, inplane_axes = (0.8, 2.0, 0.8), (128, 4, 128), (0, 2)  # PSR: in-plane are i and k
    scan = blob_scan(make_affine(spacing), shape, inplane_axes)
    volume, restore = prepare_volume(scan, ModelContract(spacing_mm=(1.6, 1.6)))
    assert restore.resampled
    assert volume.dtype == np.int16 and volume.shape == (4, 64, 64)

    labels = restore_labels(threshold_model(volume), restore, num_classes=3)
    assert labels.shape == scan.voxels.shape
    truth = threshold_model(scan.voxels)
    assert dice(labels, truth, 1) > 0.98
    assert dice(labels, truth, 2) > 0.98


def test_probabilities_come_back_on_the_stored_grid():
    scan = blob_scan(lps_affine((0.8, 0.8, 2.0)), (32, 32, 4))
    volume, restore = prepare_volume(scan, ModelContract(spacing_mm=(1.6, 1.6)))
    labels = threshold_model(volume)
    one_hot = np.stack([labels == c for c in range(3)]).astype(np.float16)
    probabilities = restore_probabilities(one_hot, restore)
    assert probabilities.dtype == np.float32 and probabilities.shape == (3,) + scan.voxels.shape
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-3)
    assert np.array_equal(np.argmax(probabilities, axis=0), restore_labels(labels, restore, 3))


def test_spacing_within_one_percent_is_not_resampled():
    assert not needs_resampling((0.795, 0.8), (0.8, 0.8))
    assert needs_resampling((0.78, 0.8), (0.8, 0.8))
    scan = blob_scan(lps_affine((0.795, 0.805, 2.0)), (16, 16, 3))
    volume, restore = prepare_volume(scan, ModelContract(spacing_mm=(0.8, 0.8)))
    assert not restore.resampled and volume.shape == (3, 16, 16)


def test_hu_are_rounded_and_clipped_to_int16():
    voxels = np.array([10.6, -10.6, 1e6, -1e6, 0.4, 7, 8, 9], dtype=np.float64).reshape(2, 2, 2)
    scan = Scan(voxels=voxels, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    volume, _ = prepare_volume(scan, ModelContract(spacing_mm=(1.0, 1.0)))
    assert volume.dtype == np.int16
    assert sorted(volume.ravel().tolist()) == [-32768, -11, 0, 7, 8, 9, 11, 32767]


def test_non_finite_voxels_are_bad_input():
    voxels = np.zeros((2, 2, 2), np.float32)
    voxels[0, 0, 0] = np.nan
    with pytest.raises(InputError):
        prepare_volume(Scan(voxels=voxels, affine=np.eye(4)), ModelContract(spacing_mm=(1.0, 1.0)))


def test_labels_of_the_wrong_shape_are_a_server_error():
    scan = blob_scan(lps_affine((1.0, 1.0, 1.0)), (8, 8, 4))
    _, restore = prepare_volume(scan, ModelContract(spacing_mm=(1.0, 1.0)))
    with pytest.raises(MixsupError):
        restore_labels(np.zeros((4, 8, 9), np.uint8), restore, 3)


def whole_slice_restore(labels, canonical_hw, num_classes):
    """The restore's definition, computed the slow way: every class's one-hot interpolated over whole slices."""
    from mixsup.resample import resample_inplane

    classes = np.arange(num_classes).reshape(-1, 1, 1)
    smooth = np.stack([resample_inplane((s[None] == classes).astype(np.float32), canonical_hw) for s in labels])
    return smooth, np.argmax(smooth, axis=1).astype(np.uint8)


@pytest.mark.parametrize("model_hw, canonical_hw", [((30, 40), (71, 93)), ((64, 64), (29, 35)), ((17, 9), (17, 40))])
def test_restore_resamples_only_around_the_foreground_and_matches_whole_slices(model_hw, canonical_hw):
    """Labels in a small region of some slices: the windowed restore equals the whole-slice definition (up to
    exact ties between classes, where float rounding may pick either) and leaves everything else background."""
    rng = np.random.default_rng(sum(model_hw))
    labels = np.zeros((5, *model_hw), np.uint8)
    labels[1:3, 4:12, 3:7] = rng.integers(0, 3, (2, 8, 4))
    labels[3, 5, 5] = 2
    restore = Restore(affine=psr_affine((0.8, 2.0, 0.8)), stored_shape=(canonical_hw[0], 5, canonical_hw[1]),
                      canonical_shape=(5, *canonical_hw), model_shape=(5, *model_hw))
    stored = restore_labels(labels, restore, 3)
    smooth, expected = whole_slice_restore(labels, canonical_hw, 3)
    top = np.sort(smooth, axis=1)
    tie = restore.to_stored((top[:, -1] - top[:, -2] < 1e-6).astype(np.uint8)).astype(bool)
    assert np.array_equal(stored[~tie], restore.to_stored(expected)[~tie])
    assert (stored > 0).any()
    empty_slices = np.zeros((5, *canonical_hw), np.uint8)
    empty_slices[[0, 4]] = 1
    assert stored[restore.to_stored(empty_slices).astype(bool)].max() == 0


def soft_probabilities(volume):
    """A stand-in network's probabilities: smooth in HU, so a resampled grid changes them a little."""
    liver = 1 / (1 + np.exp(-(volume.astype(np.float32) - 50) / 10))
    lesion = 1 / (1 + np.exp(-(volume.astype(np.float32) - 150) / 10))
    return np.stack([1 - liver, liver - lesion, lesion]).astype(np.float16)


def test_contract_test_spacings_round_trip_and_name_the_spacings_a_client_runs():
    contract = ModelContract(spacing_mm=(1.6, 1.6), test_spacings_mm=(1.3, 1.6, 2.0))
    assert ModelContract.from_json(contract.to_json()) == contract
    assert contract.run_spacings_mm == ((1.3, 1.3), (1.6, 1.6), (2.0, 2.0))
    assert ModelContract(spacing_mm=(1.5, 1.2)).run_spacings_mm == ((1.5, 1.2),)
    assert "test_spacings_mm" not in ModelContract().to_dict()  # older readers still load a single-scale contract
    for bad in ([0.0], [-1.0], ["1.3"], [float("inf")]):
        with pytest.raises(InputError, match="test_spacings_mm"):
            ModelContract.from_dict({**ModelContract().to_dict(), "test_spacings_mm": bad})


def test_contract_anti_aliasing_round_trips_and_older_contracts_lack_it():
    contract = ModelContract(anti_aliasing=True)
    assert ModelContract.from_json(contract.to_json()) == contract and contract.to_dict()["anti_aliasing"] is True
    assert "anti_aliasing" not in ModelContract().to_dict()
    assert ModelContract.from_dict({**ModelContract().to_dict()}).anti_aliasing is False
    with pytest.raises(InputError, match="anti_aliasing"):
        ModelContract.from_dict({**ModelContract().to_dict(), "anti_aliasing": "yes"})


def test_prepare_volume_smooths_before_downsampling_where_the_contract_says_so():
    scan = blob_scan(psr_affine((0.7, 2.0, 0.7)), (96, 4, 96), inplane_axes=(0, 2))
    canonical, _ = scan.canonical()
    plain, _ = prepare_volume(scan, ModelContract(spacing_mm=(1.6, 1.6)))
    smoothed, restore = prepare_volume(scan, ModelContract(spacing_mm=(1.6, 1.6), anti_aliasing=True))
    expected = resample_inplane(canonical, restore.model_shape[1:], dtype=np.float32, anti_aliasing=True)
    np.testing.assert_array_equal(smoothed, to_int16_hu(expected))
    assert smoothed.shape == plain.shape and np.abs(smoothed.astype(int) - plain).max() > 5


def test_prepare_volume_at_another_spacing():
    scan = blob_scan(lps_affine((0.8, 0.8, 2.0)), (40, 40, 3))
    contract = ModelContract(spacing_mm=(1.6, 1.6))
    volume, restore = prepare_volume(scan, contract, (1.0, 2.0))
    assert volume.shape == (3, 32, 16) and restore.model_shape == (3, 32, 16)


def test_mean_of_several_spacings_is_the_dense_mean_of_each_restored_map():
    """The windowed labels equal the argmax of the dense mean (ties aside), the probabilities are that mean, and
    the mean differs from any one spacing's answer."""
    scan = blob_scan(psr_affine((0.7, 2.0, 0.7)), (48, 5, 48), inplane_axes=(0, 2))
    contract = ModelContract(spacing_mm=(1.6, 1.6), test_spacings_mm=(1.3, 1.6, 2.0))
    answers = []
    for spacing in contract.run_spacings_mm:
        volume, restore = prepare_volume(scan, contract, spacing)
        answers.append((soft_probabilities(volume), restore))
    assert len({restore.model_shape for _, restore in answers}) == 3
    mean = restore_mean_probabilities(answers)
    each = [restore_probabilities(*answer) for answer in answers]
    np.testing.assert_allclose(mean, sum(each) / 3, atol=1e-5)
    restore = answers[0][1]
    canonical = mean_labels_canonical(answers)
    expected = np.argmax(mean, axis=0)
    top = np.sort(mean, axis=0)
    tie = top[-1] - top[-2] < 1e-5
    stored = restore.to_stored(canonical)
    assert np.array_equal(stored[~tie], expected[~tie])
    assert set(np.unique(stored)) == {0, 1, 2}
    labels, probabilities = mean_answer_on_scan_grid(answers, want_probabilities=True, postprocess=False)
    assert np.array_equal(labels, stored) and np.array_equal(probabilities, mean)
    assert labels.shape == scan.voxels.shape
    assert mean_answer_on_scan_grid(answers, want_probabilities=False)[1] is None
    assert not any(np.allclose(mean, one, atol=1e-3) for one in each)
