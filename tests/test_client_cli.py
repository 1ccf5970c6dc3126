"""``mixsup-client`` and SegmentationClient: bad input and unreachable servers, then the real Triton server.

The tests that need a server share one real Triton server (``mixsup-serve``, started once for the module) whose
repository holds the ``segment`` ensemble over one tiny per-pixel ONNX network. That network only looks at each
voxel's own HU, so the labels every test expects follow from its weights in numpy (:func:`pixel_labels`), whatever
the scan's orientation, and not from anything the client computes.
"""
import csv
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cli_utils import run_cli

from mixsup.clients.cli import default_output_path
from mixsup.clients.client import SegmentationClient, normalize_url
from mixsup.clients.inputs import collect_cases
from mixsup.contract import ModelContract
from mixsup.errors import InputError, ServerUnavailable
from mixsup.postprocess import postprocess_labels
from mixsup.readers import read_scan

SPACING = (1.0, 1.0)
#: The tiny network: a 1x1 convolution over the 3 context slices (weights [class, slice]) and a softmax. Only the
#: centre slice counts: logits background 0, liver 0.1 (x - 50), lesion 0.2 (x - 100) for a voxel of x HU, so a
#: voxel is liver above 50 HU and lesion above 150 HU.
PIXEL_WEIGHT = np.array([[0, 0, 0], [0, 0.1, 0], [0, 0.2, 0]])
PIXEL_BIAS = np.array([0.0, -5.0, -20.0])
NETWORK = "pixel"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_scan(path, shape=(24, 20, 6), affine=None, seed=0):
    """A LPS-stored phantom NIfTI (bg 0 HU, liver disc 100 HU, lesion 200 HU) and its voxels."""
    affine = np.diag([-1.0, -1.0, 2.5, 1.0]) if affine is None else affine
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:2]], indexing="ij")
    plane = np.zeros(shape[:2], np.int16)
    plane[grids[0] ** 2 + grids[1] ** 2 < 0.8**2] = 100
    plane[(grids[0] - 0.2) ** 2 + grids[1] ** 2 < 0.3**2] = 200
    voxels = np.repeat(plane[:, :, None], shape[2], axis=2)
    voxels[0, 0, 0] = 100 + seed  # a stray liver voxel: post-processing must remove it
    nib.save(nib.Nifti1Image(voxels, affine), str(path))
    return voxels, affine


# -- no server needed ---------------------------------------------------------------------------------------------


def test_client_import_does_not_pull_torch():
    code = "import sys, mixsup.clients.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_missing_file_exits_2_without_output(tmp_path, capsys):
    code, _, err = run_cli(capsys, "segment", tmp_path / "nope.nii.gz", "--url", f"127.0.0.1:{free_port()}")
    assert code == 2
    assert "no such file" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, content",
    [("scan.txt", b"hello"), ("scan.nii.gz", b"\x1f\x8b not really gzip"), ("scan.nii", b"\0" * 400)],
)
def test_unreadable_input_exits_2(tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)
    code, out, err = run_cli(capsys, "segment", tmp_path / name, "--url", f"127.0.0.1:{free_port()}")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4, 2)])
def test_non_3d_input_exits_2(tmp_path, capsys, shape):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(path))
    code, _, err = run_cli(capsys, "segment", path, "--url", f"127.0.0.1:{free_port()}")
    assert code == 2 and "3D" in err
    assert not (tmp_path / "scan_seg.nii.gz").exists()


def test_unreachable_server_exits_3_without_output(tmp_path, capsys):
    write_scan(tmp_path / "scan.nii.gz")
    url = f"127.0.0.1:{free_port()}"
    code, out, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "--url", url)
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1 and url in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_health_of_unreachable_server_exits_3(capsys):
    code, _, err = run_cli(capsys, "health", "--url", f"127.0.0.1:{free_port()}")
    assert code == 3 and "cannot reach" in err and len(err.strip().splitlines()) == 1


def test_debug_prints_the_traceback(capsys):
    code, _, err = run_cli(capsys, "health", "--url", f"127.0.0.1:{free_port()}", "--debug")
    assert code == 3 and "Traceback" in err


def test_batch_with_unreachable_server_exits_3(tmp_path, capsys):
    write_scan(tmp_path / "a.nii.gz")
    code, _, _ = run_cli(capsys, "batch", tmp_path, "-o", tmp_path / "out", "--url", f"127.0.0.1:{free_port()}")
    assert code == 3
    assert not list((tmp_path / "out").glob("*_seg.nii.gz"))


@pytest.mark.parametrize("flag", [["--url", "http://localhost:8000"], ["--url", "host:notaport"], ["--jobs", "x"]])
def test_bad_flags_exit_2(tmp_path, capsys, flag):
    write_scan(tmp_path / "a.nii.gz")
    code, _, err = run_cli(capsys, "batch", tmp_path, "-o", tmp_path / "out", *flag)
    assert code == 2 and err


def test_output_must_be_nifti_and_not_the_input(tmp_path, capsys):
    write_scan(tmp_path / "scan.nii.gz")
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "-o", tmp_path / "out.png")
    assert code == 2 and ".nii" in err
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "-o", tmp_path / "scan.nii.gz")
    assert code == 2 and "overwrite the input" in err


def test_url_normalisation():
    assert normalize_url("localhost") == "localhost:8001"
    assert normalize_url("grpc://10.0.0.1:9001/") == "10.0.0.1:9001"
    assert normalize_url("[::1]:8001") == "[::1]:8001"
    for bad in ("http://x:8000", "x:0", "x:99999", ":8001"):
        with pytest.raises(InputError):
            normalize_url(bad)


def test_default_output_paths(tmp_path):
    assert default_output_path(tmp_path / "ct" / "case 1.nii.gz") == tmp_path / "ct" / "case 1_seg.nii.gz"
    assert default_output_path(tmp_path / "ct" / "x.NII") == tmp_path / "ct" / "x_seg.nii.gz"
    assert default_output_path(tmp_path / "ct" / "series7") == tmp_path / "ct" / "series7_seg.nii.gz"


def test_collect_scans_from_folder_and_list(tmp_path):
    for name in ("b.nii.gz", "a.nii", "a_seg.nii.gz", "segmentation-0.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.dcm").write_bytes(b"")
    found = collect_cases([tmp_path], output_dir=tmp_path / "out").cases
    assert [(c.case, c.path.name) for c in found] == [("a", "a.nii"), ("b", "b.nii.gz"), ("series", "series")]

    listing = tmp_path / "list.txt"
    listing.write_text("# scans\nb.nii.gz\n\n/abs/c.nii\n")
    assert [(c.case, c.path) for c in collect_cases([listing]).cases] == [
        ("b", tmp_path / "b.nii.gz"), ("c", Path("/abs/c.nii"))
    ]
    with pytest.raises(InputError):
        collect_cases([tmp_path / "empty_dir"])


# -- with the real Triton server (one for the module) ------------------------------------------------------------


def pixel_probabilities(hu: np.ndarray) -> np.ndarray:
    """The tiny network's softmax for voxels of ``hu`` HU, classes on a new last axis (float64 numpy)."""
    logits = np.asarray(hu, np.float64)[..., None] * PIXEL_WEIGHT[:, 1] + PIXEL_BIAS
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def pixel_labels(hu: np.ndarray) -> np.ndarray:
    """The raw labels the served ensemble must return for voxels of ``hu`` HU (argmax of the one network)."""
    return np.argmax(pixel_probabilities(hu), axis=-1).astype(np.uint8)


def expected_labels(hu: np.ndarray) -> np.ndarray:
    """What ``mixsup-client segment`` must write by default: the raw labels, post-processed."""
    return postprocess_labels(pixel_labels(hu))


def segment_requests(url: str) -> int:
    """Successful inferences of the ``segment`` ensemble so far, from Triton's own statistics."""
    client = grpcclient.InferenceServerClient(url=url)
    try:
        stats = client.get_inference_statistics("segment", as_json=True)
    finally:
        client.close()
    return sum(int(model["inference_stats"]["success"].get("count", 0)) for model in stats["model_stats"])


@pytest.fixture(scope="module")
def real_triton(tmp_path_factory):
    """gRPC ``HOST:PORT`` of ``mixsup-serve`` on a repository: network ``pixel`` (:data:`PIXEL_WEIGHT`, 1 mm,
    16x16 tiles) and the ``segment`` ensemble over it. Stopped by PID after the module's last test."""
    import triton_utils

    root = tmp_path_factory.mktemp("triton")
    onnx_path = triton_utils.write_pixel_network(root / "pixel.onnx", PIXEL_WEIGHT, PIXEL_BIAS)
    contract = ModelContract(spacing_mm=SPACING, patch_size=(16, 16))
    with triton_utils.serving_one_network(root, NETWORK, onnx_path, contract) as grpc_url:
        yield grpc_url


@pytest.mark.triton
def test_segment_writes_labels_on_the_input_grid(tmp_path, capsys, real_triton):
    psr = np.array([[0, 0, 1.0, 5], [-1.0, 0, 0, 6], [0, 2.5, 0, 7], [0, 0, 0, 1]])  # a permuted orientation
    voxels, affine = write_scan(tmp_path / "scan.nii.gz", shape=(24, 6, 20), affine=psr)
    requests = segment_requests(real_triton)
    code, out, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "--url", real_triton)
    assert code == 0, err
    output = tmp_path / "scan_seg.nii.gz"
    image = nib.load(str(output))
    labels = np.asanyarray(image.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == voxels.shape
    np.testing.assert_allclose(image.affine, affine)
    raw = pixel_labels(voxels)
    assert set(np.unique(raw)) == {0, 1, 2}
    assert raw[0, 0, 0] == 1 and labels[0, 0, 0] == 0  # the stray voxel was post-processed away
    assert np.array_equal(labels, expected_labels(voxels))
    assert out.count("\n") == 1 and str(output) in out and "mL" in out
    assert segment_requests(real_triton) == requests + 1


@pytest.mark.triton
def test_segment_uses_the_first_ready_server_of_several(tmp_path, capsys, real_triton):
    voxels, _ = write_scan(tmp_path / "scan.nii.gz")
    away = f"127.0.0.1:{free_port()}"
    requests = segment_requests(real_triton)
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "--url", away, "--url", real_triton,
                           "--shm", "off")
    assert code == 0, err
    assert np.array_equal(nib.load(str(tmp_path / "scan_seg.nii.gz")).get_fdata(), expected_labels(voxels))
    assert segment_requests(real_triton) == requests + 1
    code, out, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "-o", tmp_path / "x.nii.gz",
                             "--url", away, "--url", f"127.0.0.1:{free_port()}")
    assert code == 3 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.nii.gz").exists()


@pytest.mark.triton
def test_segment_without_postprocessing_and_with_probabilities(tmp_path, capsys, real_triton):
    voxels, _ = write_scan(tmp_path / "scan.nii.gz")
    out_path, prob_path = tmp_path / "labels.nii", tmp_path / "prob.nii.gz"
    code, _, err = run_cli(
        capsys, "segment", tmp_path / "scan.nii.gz", "-o", out_path, "--no-postprocess",
        "--probabilities", prob_path, "--url", real_triton,
    )
    assert code == 0, err
    labels = np.asanyarray(nib.load(str(out_path)).dataobj)
    assert labels[0, 0, 0] == 1  # not post-processed: the stray voxel stays
    assert np.array_equal(labels, pixel_labels(voxels))
    probabilities = np.asanyarray(nib.load(str(prob_path)).dataobj)
    assert probabilities.shape == voxels.shape + (3,)
    # FP16 on the wire: about three decimal digits.
    np.testing.assert_allclose(probabilities, pixel_probabilities(voxels), atol=2e-3)
    assert np.array_equal(np.argmax(probabilities, axis=-1), labels)


@pytest.mark.triton
def test_segment_resamples_to_the_contract_spacing(tmp_path, capsys, real_triton):
    # 0.5 mm in-plane against the model's 1 mm: the client halves the grid for the server and restores it after.
    half_mm = np.diag([-0.5, -0.5, 2.5, 1.0])
    voxels, _ = write_scan(tmp_path / "scan.nii.gz", shape=(48, 40, 3), affine=half_mm)
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "--url", real_triton)
    assert code == 0, err
    image = nib.load(str(tmp_path / "scan_seg.nii.gz"))
    labels = np.asanyarray(image.dataobj)
    assert labels.shape == voxels.shape
    np.testing.assert_allclose(image.affine, half_mm)
    agreement = np.mean(labels == expected_labels(voxels))
    assert agreement > 0.95


@pytest.mark.triton
def test_segment_a_dicom_folder(tmp_path, capsys, real_triton):
    write_dicom_series = pytest.importorskip("test_scan")._write_dicom_series
    series = tmp_path / "series7"
    series.mkdir()
    plane = np.zeros((20, 16), np.int16)
    plane[3:17, 2:14] = 100
    plane[6:10, 5:9] = 200
    write_dicom_series(series, np.repeat(plane[None], 4, axis=0), spacing=SPACING)
    code, out, err = run_cli(capsys, "segment", series, "--url", real_triton)
    assert code == 0, err
    output = tmp_path / "series7_seg.nii.gz"
    assert str(output) in out
    scan = read_scan(series)
    image = nib.load(str(output))
    np.testing.assert_allclose(image.affine, scan.affine)
    assert np.array_equal(np.asanyarray(image.dataobj), expected_labels(scan.voxels))
    assert np.count_nonzero(np.asanyarray(image.dataobj) == 2) == 4 * 4 * 4


@pytest.mark.triton
def test_segment_a_compressed_dicom_series_into_a_dicom_seg(tmp_path, capsys, real_triton):
    import highdicom
    from dicom_phantoms import write_series
    from pydicom.uid import JPEG2000Lossless

    series = tmp_path / "series8"
    plane = np.zeros((20, 16), np.int16)
    plane[3:17, 2:14] = 100
    plane[6:10, 5:9] = 200
    plane = np.pad(plane, ((10, 10), (10, 10)))  # JPEG 2000's default 6 resolutions need 32+ pixels a side
    write_series(series, np.repeat(plane[None], 4, axis=0), JPEG2000Lossless, spacing=SPACING)
    output = tmp_path / "labels.dcm"
    code, out, err = run_cli(capsys, "segment", series, "-o", output, "--url", real_triton)
    assert code == 0, err
    assert str(output) in out
    scan = read_scan(series)
    expected = expected_labels(scan.voxels)
    assert np.count_nonzero(expected == 2) == 4 * 4 * 4
    seg = highdicom.seg.segread(output)
    masks = seg.get_pixels_by_source_instance([frame.sop_instance_uid for frame in scan.source_record.frames], [1, 2])
    assert np.array_equal(masks[..., 0], np.isin(expected, (1, 2)).transpose(2, 1, 0))
    assert np.array_equal(masks[..., 1], (expected == 2).transpose(2, 1, 0))


@pytest.mark.triton
def test_health_of_a_ready_server(capsys, real_triton):
    code, out, _ = run_cli(capsys, "health", "--url", real_triton)
    assert code == 0 and "model 'segment' ready" in out and "versions 1" in out


@pytest.mark.triton
def test_model_not_ready_exits_3(tmp_path, capsys, real_triton):
    code, out, _ = run_cli(capsys, "health", "--url", real_triton, "--model", "no_such_model")
    assert code == 3 and "'no_such_model' not ready" in out
    write_scan(tmp_path / "scan.nii.gz")
    code, _, err = run_cli(
        capsys, "segment", tmp_path / "scan.nii.gz", "--url", real_triton, "--model", "no_such_model"
    )
    assert code == 3 and "no_such_model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "scan_seg.nii.gz").exists()
    code, _, _ = run_cli(capsys, "batch", tmp_path, "-o", tmp_path / "out", "--url", real_triton,
                         "--model", "no_such_model")
    assert code == 3
    assert not list((tmp_path / "out").glob("*_seg.nii.gz"))


@pytest.mark.triton
def test_server_errors_map_to_mixsup_errors(tmp_path, capsys, real_triton):
    # No served model rejects a 3D INT16 volume by its shape (the window step pads and clamps any size), so the real
    # rejection comes from the bare network model: Triton answers INVALID_ARGUMENT to a request for a `labels`
    # output it does not have. That model carries no contract either.
    with SegmentationClient(real_triton, model=NETWORK) as client:
        with pytest.raises(InputError, match="rejected"):
            client.segment_volume(np.zeros((2, 4, 4), np.int16))
        with pytest.raises(InputError, match="contract"):
            client.contract()
    with SegmentationClient(real_triton, model="no_such_model") as client:
        with pytest.raises(ServerUnavailable):
            client.contract()
        assert client.health()["model_ready"] is False
    write_scan(tmp_path / "scan.nii.gz")
    code, _, err = run_cli(capsys, "segment", tmp_path / "scan.nii.gz", "--url", real_triton, "--model", NETWORK)
    assert code == 2 and "contract" in err
    assert not (tmp_path / "scan_seg.nii.gz").exists()


@pytest.mark.triton
def test_batch_goes_past_bad_inputs(tmp_path, capsys, real_triton):
    source = tmp_path / "scans"
    source.mkdir()
    good = {name: write_scan(source / f"{name}.nii.gz", seed=i)[0] for i, name in enumerate(("a", "c"))}
    (source / "b.nii.gz").write_bytes(b"corrupt")
    write_scan(source / "segmentation-0.nii.gz")  # a LiTS label map: skipped
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "batch", source, "-o", out_dir, "--url", real_triton, "--jobs", "2")
    assert code == 2, err
    assert "b: bad_input" in err
    with open(out_dir / "summary.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"a", "b", "c"}
    assert rows["b"]["status"] == "bad_input" and rows["b"]["error"]
    for name, voxels in good.items():
        assert rows[name]["status"] == "ok" and float(rows[name]["liver_ml"]) > 0
        labels = np.asanyarray(nib.load(str(out_dir / f"{name}_seg.nii.gz")).dataobj)
        assert np.array_equal(labels, expected_labels(voxels))
    assert not (out_dir / "b_seg.nii.gz").exists()
    assert "3 cases" in out


@pytest.mark.triton
def test_batch_all_good_exits_0(tmp_path, capsys, real_triton):
    voxels, _ = write_scan(tmp_path / "a.nii.gz")
    listing = tmp_path / "list.txt"
    listing.write_text("a.nii.gz\n")
    requests = segment_requests(real_triton)
    code, _, err = run_cli(capsys, "batch", listing, "-o", tmp_path / "out", "--url", real_triton)
    assert code == 0, err
    labels = np.asanyarray(nib.load(str(tmp_path / "out" / "a_seg.nii.gz")).dataobj)
    assert np.array_equal(labels, expected_labels(voxels))
    assert segment_requests(real_triton) == requests + 1
