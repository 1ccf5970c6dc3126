"""The Python API for services, against the real Triton server: ``SegmentationClient(url).segment(scan)`` and its
asyncio twin ``AsyncSegmentationClient`` (``tritonclient.grpc.aio``).

The server is the per-pixel network of test_client_cli (labels follow from each voxel's HU), so the expected
labels come from numpy and the expected stats are counted here with scipy, independently of cc3d.
"""
from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from dicom_phantoms import write_series
from scipy import ndimage
from test_client_cli import NETWORK, expected_labels, pixel_labels, real_triton, segment_requests, write_scan

from mixsup.clients.aio import AsyncSegmentationClient
from mixsup.clients.client import SegmentationClient
from mixsup.clients.result import Result
from mixsup.errors import InputError, ServerUnavailable
from mixsup.readers import read_scan

__all__ = ["real_triton"]  # the module's server fixture, shared with test_client_cli

pytestmark = pytest.mark.triton

#: A permuted storage order (i -> posterior, j -> superior, k -> patient right) with 2.5 mm slices.
PSR = np.array([[0, 0, 1.0, 5], [-1.0, 0, 0, 6], [0, 2.5, 0, 7], [0, 0, 0, 1]])


def free_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def check_result(result: Result, voxels: np.ndarray, affine: np.ndarray) -> None:
    """Labels, affine and stats of ``result`` against what the pixel network must give for ``voxels``."""
    expected = expected_labels(voxels)
    assert isinstance(result, Result) and result.model == "segment" and result.postprocessed
    assert result.labels.dtype == np.uint8 and np.array_equal(result.labels, expected)
    np.testing.assert_allclose(result.affine, affine)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    lesion = expected == 2
    _, lesion_count = ndimage.label(lesion, structure=np.ones((3, 3, 3)))
    stats = result.stats
    assert stats.liver_ml == pytest.approx(np.count_nonzero(expected) * voxel_ml)
    assert stats.lesion_ml == pytest.approx(np.count_nonzero(lesion) * voxel_ml)
    assert stats.lesion_count == lesion_count >= 1
    assert stats.tumour_burden == pytest.approx(np.count_nonzero(lesion) / np.count_nonzero(expected))


def test_segment_a_scan_a_path_and_a_dicom_folder(tmp_path, real_triton):
    voxels, affine = write_scan(tmp_path / "scan.nii.gz", shape=(24, 6, 20), affine=PSR)
    requests = segment_requests(real_triton)
    with SegmentationClient(real_triton) as client:
        from_path = client.segment(tmp_path / "scan.nii.gz")
        from_scan = client.segment(read_scan(tmp_path / "scan.nii.gz"))
        raw = client.segment(str(tmp_path / "scan.nii.gz"), postprocess=False, probabilities=True)
    check_result(from_path, voxels, affine)
    assert np.array_equal(from_scan.labels, from_path.labels) and from_scan.stats == from_path.stats
    assert from_path.probabilities is None
    assert not raw.postprocessed and np.array_equal(raw.labels, pixel_labels(voxels))
    assert raw.probabilities.shape == (3, *voxels.shape) and raw.probabilities.dtype == np.float32
    assert segment_requests(real_triton) == requests + 3

    plane = np.zeros((20, 16), np.int16)
    plane[3:17, 2:14] = 100
    plane[6:10, 5:9] = 200
    write_series(tmp_path / "series", np.repeat(plane[None], 4, axis=0), spacing=(1.0, 1.0))
    scan = read_scan(tmp_path / "series")
    with SegmentationClient(real_triton) as client:
        check_result(client.segment(tmp_path / "series"), scan.voxels, scan.affine)


def write_scan_path(tmp_path):
    write_scan(tmp_path / "ok.nii.gz")
    return tmp_path / "ok.nii.gz"


def test_errors_of_the_sync_api(tmp_path, real_triton):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a scan")
    with SegmentationClient(real_triton) as client:
        with pytest.raises(InputError, match="bad.nii.gz"):
            client.segment(tmp_path / "bad.nii.gz")
    with SegmentationClient(free_url(), connect_timeout_s=5) as client:
        with pytest.raises(ServerUnavailable, match="cannot reach"):
            client.segment(write_scan_path(tmp_path))


def test_the_async_client_segments_concurrently(tmp_path, real_triton):
    scans = {}
    for index, affine in enumerate((None, PSR, np.diag([1.0, -1.0, 2.0, 1.0]))):
        shape = (24, 6, 20) if affine is PSR else (24, 20, 6)
        scans[index] = write_scan(tmp_path / f"s{index}.nii.gz", shape=shape, affine=affine, seed=index)
    requests = segment_requests(real_triton)

    # Made outside the loop, as a service's startup code might: the channel is opened inside it, on first use.
    client = AsyncSegmentationClient(real_triton)

    async def main():
        async with client:
            health = await client.health()
            contract = await client.contract()
            results = await asyncio.gather(*(client.segment(tmp_path / f"s{index}.nii.gz") for index in scans))
            with_probabilities = await client.segment(tmp_path / "s0.nii.gz", probabilities=True)
            raw = await client.segment_volume(np.full((2, 4, 4), 120, np.int16))
        return health, contract, results, with_probabilities, raw

    health, contract, results, with_probabilities, raw = asyncio.run(main())
    assert health["ready"] and health["versions"] == ["1"]
    assert contract.spacing_mm == (1.0, 1.0)
    for index, result in enumerate(results):
        check_result(result, *scans[index])
    assert with_probabilities.probabilities.shape == (3, 24, 20, 6)
    assert np.array_equal(raw, np.ones((2, 4, 4), np.uint8))
    assert segment_requests(real_triton) == requests + 5


def test_errors_of_the_async_api(tmp_path, real_triton):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a scan")
    path = write_scan_path(tmp_path)

    async def expect(error, url, model, scan):
        async with AsyncSegmentationClient(url, model=model, connect_timeout_s=5) as client:
            with pytest.raises(error) as caught:
                await client.segment(scan)
        return str(caught.value)

    async def main():
        unreachable = await expect(ServerUnavailable, free_url(), "segment", path)
        no_contract = await expect(InputError, real_triton, NETWORK, path)
        no_model = await expect(ServerUnavailable, real_triton, "no_such_model", path)
        bad_scan = await expect(InputError, real_triton, "segment", tmp_path / "bad.nii.gz")
        return unreachable, no_contract, no_model, bad_scan

    unreachable, no_contract, no_model, bad_scan = asyncio.run(main())
    assert "cannot reach" in unreachable and "contract" in no_contract and "no_such_model" in no_model
    assert "bad.nii.gz" in bad_scan
    for message in (unreachable, no_contract, no_model, bad_scan):
        assert "\n" not in message


def test_a_long_volume_goes_in_slabs_with_the_same_answer(real_triton):
    """Slabs of 4 slices (plus the 2.5D halo) give bit for bit the labels and probabilities of one request: the
    pixel network reads each slice's neighbours, so a slab without its halo would differ at every seam."""
    volume = np.random.default_rng(3).integers(-100, 300, size=(11, 12, 10)).astype(np.int16)
    requests = segment_requests(real_triton)
    with SegmentationClient(real_triton) as whole, SegmentationClient(real_triton, slab_slices=4) as slabbed:
        expected = whole.segment_volume(volume, want_probabilities=True)
        labels, probabilities = slabbed.segment_volume(volume, want_probabilities=True)
        assert np.array_equal(slabbed.segment_volume(volume), expected[0])
    assert np.array_equal(labels, expected[0]) and np.array_equal(probabilities, expected[1])
    assert segment_requests(real_triton) == requests + 1 + 3 + 3  # 11 slices: 4 + 4 + 3

    async def main():
        async with AsyncSegmentationClient(real_triton, slab_slices=5) as client:
            return await client.segment_volume(volume, want_probabilities=True)

    labels, probabilities = asyncio.run(main())
    assert np.array_equal(labels, expected[0]) and np.array_equal(probabilities, expected[1])


def test_the_asyncio_client_sends_a_long_scan_in_slabs(tmp_path, real_triton):
    """``segment`` of the asyncio client cuts a scan longer than ``slab_slices`` as the sync client does (it used to
    send any scan whole, so a long one was not bounded in server memory), with the same labels."""
    write_scan(tmp_path / "scan.nii.gz", shape=(24, 20, 11))  # 11 slices along z
    with SegmentationClient(real_triton) as client:
        expected = client.segment(tmp_path / "scan.nii.gz")
    requests = segment_requests(real_triton)

    async def main():
        async with AsyncSegmentationClient(real_triton, slab_slices=4) as client:
            return await client.segment(tmp_path / "scan.nii.gz")

    result = asyncio.run(main())
    assert np.array_equal(result.labels, expected.labels) and result.stats == expected.stats
    assert segment_requests(real_triton) == requests + 3  # 11 slices: 4 + 4 + 3


def test_slab_plan_keeps_every_slice_once_with_its_halo():
    from mixsup.clients.slabs import slab_plan

    assert slab_plan(5, 8) == [slab_plan(5, 5)[0]] and slab_plan(5, 8)[0].send == slice(0, 5)
    slabs = slab_plan(10, 4, halo=2)
    assert [(s.send.start, s.send.stop, s.keep.start, s.keep.stop) for s in slabs] == [
        (0, 6, 0, 4), (2, 10, 4, 8), (6, 10, 8, 10)]
    assert [s.kept_in_answer for s in slabs] == [slice(0, 4), slice(2, 6), slice(2, 4)]


def test_shared_memory_gives_the_grpc_answer_and_leaves_nothing_behind(real_triton):
    from pathlib import Path

    from mixsup.clients.shm import is_loopback, wants_shared_memory

    volume = np.random.default_rng(4).integers(-100, 300, size=(6, 12, 10)).astype(np.int16)
    with SegmentationClient(real_triton, shared_memory="off") as plain, \
            SegmentationClient(real_triton, shared_memory="on") as shared:
        expected = plain.segment_volume(volume, want_probabilities=True)
        labels, probabilities = shared.segment_volume(volume, want_probabilities=True)
        regions = sorted(p.name for p in Path("/dev/shm").glob("mixsup_client_*"))
        assert len(regions) == 2  # input and output, kept registered for the next request
        # Smaller requests reuse them (registering a pair per request grows tritonserver's memory).
        assert np.array_equal(shared.segment_volume(volume), expected[0])
        assert np.array_equal(shared.segment_volume(volume[:4]), plain.segment_volume(volume[:4]))
        assert sorted(p.name for p in Path("/dev/shm").glob("mixsup_client_*")) == regions
        # A larger one replaces them: still one pair.
        taller = np.concatenate([volume, volume])
        assert np.array_equal(shared.segment_volume(taller), plain.segment_volume(taller))
        assert len(list(Path("/dev/shm").glob("mixsup_client_*"))) == 2
        assert shared._use_shared_memory  # it did not fall back
    assert np.array_equal(labels, expected[0]) and np.array_equal(probabilities, expected[1])
    assert not list(Path("/dev/shm").glob("mixsup_client_*"))  # closing the client removed them
    assert [is_loopback(u) for u in ("127.0.0.1:8001", "localhost:1", "[::1]:8001", "10.0.0.5:8001", "triton:8001")] \
        == [True, True, True, False, False]
    assert wants_shared_memory("auto", "127.0.0.1:8001") and not wants_shared_memory("auto", "triton:8001")
    assert wants_shared_memory("on", "triton:8001") and not wants_shared_memory("off", "127.0.0.1:8001")


def test_probabilities_leave_the_server_only_when_the_request_asks_for_them(real_triton):
    """Triton asks every ensemble step for all its outputs, so the fuse step goes by the request parameter: a
    plain request for labels gets no probabilities copied out; the clients set the parameter when they want them."""
    import tritonclient.grpc as grpcclient

    from mixsup.clients.protocol import request_parameters

    volume = np.random.default_rng(5).integers(-100, 300, size=(5, 12, 10)).astype(np.int16)
    request = grpcclient.InferInput("volume", list(volume.shape), "INT16")
    request.set_data_from_numpy(volume)
    both = [grpcclient.InferRequestedOutput(name) for name in ("labels", "probabilities")]
    with grpcclient.InferenceServerClient(real_triton) as raw:
        unasked = raw.infer("segment", [request], outputs=both)
        asked = raw.infer("segment", [request], outputs=both, parameters=request_parameters(True))
    assert unasked.as_numpy("probabilities") is None
    assert np.array_equal(unasked.as_numpy("labels"), asked.as_numpy("labels"))
    assert asked.as_numpy("probabilities").shape == (3, *volume.shape)
    assert request_parameters(False) is None
