"""Multi-scale test-time augmentation in the clients, against the real Triton server: a model whose contract names
test spacings is asked once per spacing, and the answer is the mean of the probabilities on the scan's grid.

The network is test_client_cli's per-pixel one. The expected answer is the mean of the server's own answers at each
spacing, asked for one by one here, so the device's precision (bfloat16 under OpenVINO) cancels out.
"""
from __future__ import annotations

import asyncio

import nibabel as nib
import numpy as np
import pytest
from cli_utils import run_cli
from test_client_cli import PIXEL_BIAS, PIXEL_WEIGHT, pixel_labels, segment_requests, write_scan

from mixsup.clients.aio import AsyncSegmentationClient
from mixsup.clients.client import SegmentationClient
from mixsup.clients.pipeline import answer_on_scan_grid, mean_answer_on_scan_grid, prepare_volume
from mixsup.contract import ModelContract
from mixsup.readers import read_scan

pytestmark = pytest.mark.triton

TEST_SPACINGS = (0.8, 1.0, 1.25)


@pytest.fixture(scope="module")
def multiscale_triton(tmp_path_factory):
    """gRPC ``HOST:PORT`` of ``mixsup-serve`` with the pixel network at 1 mm, its contract naming
    :data:`TEST_SPACINGS`, and the ``segment`` ensemble over it."""
    import triton_utils

    root = tmp_path_factory.mktemp("triton_multiscale")
    onnx_path = triton_utils.write_pixel_network(root / "pixel.onnx", PIXEL_WEIGHT, PIXEL_BIAS)
    contract = ModelContract(spacing_mm=(1.0, 1.0), patch_size=(16, 16), test_spacings_mm=TEST_SPACINGS)
    with triton_utils.serving_one_network(root, "pixel", onnx_path, contract) as grpc_url:
        yield grpc_url


def expected_answer(client: SegmentationClient, path, postprocess: bool):
    """The mean over the test spacings of the server's probabilities, each asked for on its own grid here."""
    scan = read_scan(path)
    contract = client.contract()
    answers = []
    for spacing in contract.run_spacings_mm:
        volume, restore = prepare_volume(scan, contract, spacing)
        answers.append((client.segment_volume(volume, want_probabilities=True)[1], restore))
    return mean_answer_on_scan_grid(answers, want_probabilities=True, postprocess=postprocess)


def test_the_clients_average_the_test_spacings_on_the_scan_grid(tmp_path, multiscale_triton):
    # 0.7 mm in-plane: every test spacing is a different grid, none the scan's own.
    voxels, _ = write_scan(tmp_path / "scan.nii.gz", shape=(40, 36, 3), affine=np.diag([-0.7, -0.7, 2.5, 1.0]))
    before = segment_requests(multiscale_triton)
    with SegmentationClient(multiscale_triton) as client:
        assert client.contract().test_spacings_mm == TEST_SPACINGS
        raw = client.segment(tmp_path / "scan.nii.gz", postprocess=False, probabilities=True)
        final = client.segment(tmp_path / "scan.nii.gz")
        assert segment_requests(multiscale_triton) == before + 2 * len(TEST_SPACINGS)
        labels, probabilities = expected_answer(client, tmp_path / "scan.nii.gz", postprocess=False)
        final_expected = expected_answer(client, tmp_path / "scan.nii.gz", postprocess=True)[0]
    assert raw.labels.shape == voxels.shape and raw.probabilities.shape == (3, *voxels.shape)
    assert np.array_equal(raw.probabilities, probabilities) and np.array_equal(raw.labels, labels)
    assert np.array_equal(final.labels, final_expected)
    assert set(np.unique(raw.labels)) == {0, 1, 2}
    assert (raw.labels != final.labels).any()  # the stray voxel: post-processing happened after the mean
    # Resampled three ways, the discs keep their place: away from their edges the labels are the pixel network's.
    assert np.mean(raw.labels == pixel_labels(voxels)) > 0.9

    async def segment_async():
        async with AsyncSegmentationClient(multiscale_triton) as client:
            return await client.segment(tmp_path / "scan.nii.gz")

    assert np.array_equal(asyncio.run(segment_async()).labels, final.labels)


def test_single_scale_asks_once_at_the_training_spacing(tmp_path, capsys, multiscale_triton):
    voxels, _ = write_scan(tmp_path / "scan.nii.gz", shape=(40, 36, 3), affine=np.diag([-0.7, -0.7, 2.5, 1.0]))
    scan = read_scan(tmp_path / "scan.nii.gz")
    before = segment_requests(multiscale_triton)
    with SegmentationClient(multiscale_triton, single_scale=True) as client:
        single = client.segment(scan)
        volume, restore = prepare_volume(scan, client.contract())
        expected = answer_on_scan_grid(client.segment_volume(volume), None, restore, 3)[0]
    assert np.array_equal(single.labels, expected)
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "-o", tmp_path / "cli.nii.gz",
                           "--url", multiscale_triton, "--single-scale")
    assert code == 0, err
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "cli.nii.gz")).dataobj), single.labels)
    assert segment_requests(multiscale_triton) == before + 3  # segment, segment_volume, the CLI: once each
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "-o", tmp_path / "multi.nii.gz",
                           "--url", multiscale_triton)
    assert code == 0, err
    assert segment_requests(multiscale_triton) == before + 3 + len(TEST_SPACINGS)
    assert not np.array_equal(np.asanyarray(nib.load(str(tmp_path / "multi.nii.gz")).dataobj), single.labels)
