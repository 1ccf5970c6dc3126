"""The independent evaluation phantoms are deterministic, truthfully oriented, well labelled and varied."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mixsup.scan import read_nifti

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SHAPE = (16, 96, 96)
SEEDS = range(10)


@pytest.fixture(scope="module")
def phantoms(benchmark_module):
    return benchmark_module("independent_phantoms")


@pytest.fixture(scope="module")
def cases(phantoms):
    return [phantoms.generate(seed, SHAPE) for seed in SEEDS]


def _world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of a mask's voxels, straight from the affine."""
    ijk = np.argwhere(mask)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_same_seed_same_case_other_seed_other_case(phantoms):
    first, again, other = (phantoms.make_case(seed, SHAPE) for seed in (7, 7, 8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].dtype == np.int16 and first[1].dtype == np.uint8 and first[2].shape == (4, 4)
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


def test_affines_are_truthful_in_every_storage_order(cases):
    assert len({c.info["axcodes"] for c in cases}) >= 3  # LPS-like, RAS, flipped slices, transposed in-plane
    for case in cases:
        assert nib.aff2axcodes(case.affine) == tuple(case.info["axcodes"])
        assert sorted(case.hu.shape) == sorted(SHAPE)
        body = case.hu > -500
        liver = case.labels > 0
        # The liver lies on the patient's right (RAS x larger than the body's centre), by the affine alone...
        assert _world(case.affine, liver)[:, 0].mean() > _world(case.affine, body)[:, 0].mean() + 10
        # ...and after nibabel reorients the stored arrays to RAS, at larger indices along the first axis.
        ras = nib.as_closest_canonical(nib.Nifti1Image(case.labels, case.affine))
        ras_hu = nib.as_closest_canonical(nib.Nifti1Image(case.hu, case.affine))
        assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
        lab, vol = np.asanyarray(ras.dataobj), np.asanyarray(ras_hu.dataobj)
        assert np.argwhere(lab > 0)[:, 0].mean() > np.argwhere(vol > -500)[:, 0].mean()


def test_labels_are_liver_and_lesions_inside_it(cases):
    for case in cases:
        assert set(np.unique(case.labels)) <= {0, 1, 2}
        liver = case.labels == 1
        assert liver.sum() > 0
        components, n = ndimage.label(case.labels == 2)
        near_liver = ndimage.binary_dilation(liver)
        for index in range(1, n + 1):  # every lesion is bordered by parenchyma: it lies within the liver
            assert (near_liver & (components == index)).any()


def test_cases_vary_in_phase_lesions_spacing_and_mimics(cases, phantoms):
    phases = {c.info["phase"] for c in cases}
    assert len(phases) >= 3
    liver_hu = [float(np.median(c.hu[c.labels == 1])) for c in cases]
    assert max(liver_hu) - min(liver_hu) > 40  # non-contrast/arterial livers are 50+ HU below portal ones
    counts = [len(c.info.get("lesion_kinds", [])) for c in cases]
    assert 0 in counts and max(counts) >= 3
    assert len({k for c in cases for k in c.info.get("lesion_kinds", [])}) >= 3
    assert any(_homogeneous_neighbour(c) for c in cases)
    spacings = [phantoms.draw_plan(np.random.default_rng(s), (48, 512, 512))[3].spacing for s in range(40)]
    in_plane, slices = [s[1] for s in spacings], [s[0] for s in spacings]
    assert 0.55 <= min(in_plane) < 0.7 and 0.85 < max(in_plane) <= 0.95
    assert min(slices) < 1.5 and max(slices) > 4


def _homogeneous_neighbour(case) -> bool:
    """A non-liver region touching the liver, within 40 HU of it (smoothed), at least a third of its volume."""
    liver = case.labels > 0
    median = np.median(case.hu[case.labels == 1])
    smooth = ndimage.gaussian_filter(case.hu.astype(np.float32), 1.0)
    similar = (case.labels == 0) & (np.abs(smooth - median) < 40)
    components, _ = ndimage.label(similar)
    touching = np.unique(components[ndimage.binary_dilation(liver, iterations=2) & similar])
    sizes = ndimage.sum(similar, components, touching[touching > 0])
    return bool(len(sizes)) and sizes.max() >= liver.sum() / 3


def test_cli_writes_readable_lits_pairs(phantoms, tmp_path, capsys):
    assert phantoms.main([str(tmp_path), "--n", "2", "--seed", "3", "--shape", "8", "48", "48"]) == 0
    assert "case 1: seed 4" in capsys.readouterr().out
    for i, seed in enumerate((3, 4)):
        volume, seg = read_nifti(tmp_path / f"volume-{i}.nii.gz"), read_nifti(tmp_path / f"segmentation-{i}.nii.gz")
        hu, labels, affine = phantoms.make_case(seed, (8, 48, 48))
        np.testing.assert_array_equal(volume.voxels, hu)
        np.testing.assert_array_equal(seg.voxels, labels)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
        assert volume.voxels.dtype == np.int16 and seg.voxels.dtype == np.uint8


@pytest.mark.parametrize("args", [["--n", "0"], ["--shape", "8", "2", "48"], ["--seed", "x"]])
def test_cli_bad_arguments_exit_2(phantoms, tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exc:
        phantoms.main([str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("independent_phantoms: error:")
    assert not (tmp_path / "out").exists()


def test_script_runs_standalone_and_rejects_bad_usage(tmp_path):
    script = BENCHMARKS / "independent_phantoms.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--n", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--n must be at least 1" in done.stderr
