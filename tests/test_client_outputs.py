"""The client's outputs without a server: stats (volumes, 26-connected lesions, burden), 16-bit probabilities, the
PNG preview, and the segment command's checks of the output paths."""
from __future__ import annotations

import json
import socket

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mixsup.clients.cli import main
from mixsup.clients.outputs import write_probabilities, write_stats
from mixsup.clients.preview import LESION_RGB, LIVER_RGB, choose_slices, render_preview
from mixsup.clients.result import Result
from mixsup.clients.stats import describe, segmentation_stats
from mixsup.scan import Scan

#: 0.5 x 0.8 x 2.0 mm voxels: 0.8 uL each.
AFFINE = np.array([[0.5, 0, 0, -10], [0, 0.8, 0, 20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
VOXEL_ML = 0.5 * 0.8 * 2.0 / 1000


def test_stats_count_26_connected_lesions_and_their_volumes():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:18, 2:18, 1:9] = 1  # 16 * 16 * 8 = 2048 voxels of liver (lesions included)
    labels[4:6, 4:6, 2:4] = 2  # a 2x2x2 lesion: 8 voxels
    labels[10, 10, 5] = labels[11, 11, 6] = 2  # two voxels touching at a corner: one lesion of 2 voxels
    labels[14, 4, 2] = 2  # a 1-voxel lesion
    stats = segmentation_stats(labels, AFFINE)
    assert stats.lesion_count == 3
    assert [lesion.voxels for lesion in stats.lesions] == [8, 2, 1]  # largest first
    assert stats.lesions[0].volume_ml == pytest.approx(8 * VOXEL_ML)
    assert stats.liver_ml == pytest.approx(2048 * VOXEL_ML)
    assert stats.parenchyma_ml == pytest.approx((2048 - 11) * VOXEL_ML)
    assert stats.lesion_ml == pytest.approx(11 * VOXEL_ML)
    assert stats.tumour_burden == pytest.approx(11 / 2048)
    # Centroid of the 2x2x2 lesion: voxel (4.5, 4.5, 2.5) -> RAS through the affine.
    assert stats.lesions[0].centroid_ijk == (4.5, 4.5, 2.5)
    assert stats.lesions[0].centroid_ras_mm == pytest.approx((4.5 * 0.5 - 10, 4.5 * 0.8 + 20, 2.5 * 2 + 5))
    assert "3 lesions" in describe(stats) and "burden 0.54 %" in describe(stats)


def test_stats_of_an_empty_map():
    stats = segmentation_stats(np.zeros((4, 4, 4), np.uint8), AFFINE)
    assert stats.liver_ml == 0 and stats.lesion_count == 0 and stats.tumour_burden is None
    assert json.loads(json.dumps(stats.to_dict()))["tumour_burden"] is None


def test_stats_json(tmp_path):
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[2, 2, 2] = 2
    result = Result.build(Scan(voxels=np.zeros((6, 6, 6)), affine=AFFINE), labels, model="segment")
    written = json.loads(write_stats(tmp_path / "s.json", result, ("background", "liver", "lesion")).read_text())
    assert written["lesion_count"] == 1 and written["lesions"][0]["voxels"] == 1
    assert written["liver_ml"] == pytest.approx(64 * VOXEL_ML)
    assert written["labels"] == {"0": "background", "1": "liver", "2": "lesion"} and written["model"] == "segment"


def random_probabilities(shape=(3, 5, 6, 7), seed=0):
    logits = np.random.default_rng(seed).normal(size=shape)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=0)).astype(np.float32)


def test_probabilities_nifti_are_16_bit_and_read_back_as_floats(tmp_path):
    probabilities = random_probabilities()
    path = write_probabilities(tmp_path / "p.nii.gz", probabilities, AFFINE)
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16  # 2 bytes per value on disk, like FP16
    assert image.shape == (5, 6, 7, 3)
    np.testing.assert_allclose(image.affine, AFFINE)
    read = image.get_fdata()
    np.testing.assert_allclose(read, np.moveaxis(probabilities, 0, -1), atol=0.5 / 32767 + 1e-7)


def test_probabilities_npz_are_float16(tmp_path):
    probabilities = random_probabilities()
    path = write_probabilities(tmp_path / "p.npz", probabilities, AFFINE, ("background", "liver", "lesion"))
    with np.load(path) as data:
        assert data["probabilities"].dtype == np.float16 and data["probabilities"].shape == probabilities.shape
        np.testing.assert_allclose(data["probabilities"], probabilities, atol=1e-3)
        np.testing.assert_allclose(data["affine"], AFFINE)
        assert list(data["class_names"]) == ["background", "liver", "lesion"]


def test_choose_slices_spreads_over_the_liver_and_keeps_the_biggest_lesion():
    labels = np.zeros((30, 8, 8), np.uint8)  # canonical [D, H, W]
    labels[5:25, 2:6, 2:6] = 1
    labels[7, 3:5, 3:5] = 2
    labels[20, 3, 3] = 2
    chosen = choose_slices(labels, 6)
    assert chosen == sorted(chosen, reverse=True) and len(chosen) == 6
    assert all(5 <= d < 25 for d in chosen) and 7 in chosen
    assert choose_slices(np.zeros((30, 8, 8), np.uint8), 4) == [29, 19, 10, 0]  # no liver: the whole scan
    assert choose_slices(np.zeros((2, 8, 8), np.uint8), 6) == [1, 0]


def preview_scan():
    """A scan stored i -> posterior (0.5 mm), j -> patient right (1.0 mm), k -> superior: liver on the patient's
    right, a lesion in it. The image is 40 mm (A-P) by 80 mm (R-L)."""
    affine = np.array([[0, 0, 0, 0], [-0.5, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]])
    affine[0, 1] = 1.0  # j -> +x (right)
    voxels = np.full((80, 80, 6), -50, np.int16)
    labels = np.zeros((80, 80, 6), np.uint8)
    # Patient right = large x = large j; the liver spans j 50..75 (x 50..75 mm), i 20..60.
    voxels[20:60, 50:75, 1:5] = 100
    labels[20:60, 50:75, 1:5] = 1
    labels[30:40, 55:62, 2:4] = 2
    return Scan(voxels=voxels, affine=affine), labels


def test_preview_is_radiological_and_keeps_the_physical_aspect():
    scan, labels = preview_scan()
    image = render_preview(scan, labels, header="test")
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    liver = np.all(pixels == LIVER_RGB, axis=-1)
    lesion = np.all(pixels == LESION_RGB, axis=-1)
    assert liver.any() and lesion.any()
    # 4 liver slices -> 4 tiles of 256 x 128 (80 mm wide, 40 mm high) on one row of 3 and one of 1.
    tile_w = 256
    assert image.width >= 3 * tile_w and abs(image.height - (22 + 2 * (128 + 4) + 4)) <= 1
    # Within the first tile, the liver (patient right) is drawn on the viewer's left.
    columns = np.flatnonzero(liver[:, :tile_w].any(axis=0))
    assert columns.max() < tile_w / 2


def test_segment_refuses_bad_output_names_before_reading(tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(scan))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
    for flag, name in (("--preview", "p.jpg"), ("--stats", "s.txt"), ("--probabilities", "p.png")):
        assert main(["segment", str(scan), flag, str(tmp_path / name), "--url", url]) == 2
        err = capsys.readouterr().err
        assert name in err and len(err.strip().splitlines()) == 1
    assert main(["segment", str(scan), "--stats", str(tmp_path / "x.json"), "--preview", str(tmp_path / "x.json"),
                 "--url", url]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_preview_png_on_disk(tmp_path):
    from mixsup.clients.preview import write_preview

    scan, labels = preview_scan()
    result = Result.build(scan, labels)
    path = write_preview(tmp_path / "p.png", scan, result)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
