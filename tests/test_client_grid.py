"""The client's grid handling, with a network whose answer depends on where the client put every voxel.

A per-pixel network gives the same labels whatever the client does to the grid, so skipping the reorientation,
the resampling, or swapping the in-plane spacings would pass such tests. The **shift network** here does not: the
label it gives a pixel is the class of the voxel ``ROW_SHIFT`` rows further posterior, ``COLUMN_SHIFT`` columns
further to the patient's left, in the **next slice up** (a 17x15 convolution over the superior context slice). Its
labels are the phantom shifted by a fixed distance in the patient -- 12.8 mm posterior, 11.2 mm left, one slice up --
only if the client sent the canonical grid (inferior->superior, anterior->posterior, right->left) at the model's
1.6 mm spacing. Anything else shifts them in another direction or by another distance.

The phantom is defined in patient coordinates (RAS mm), so what must reach the server and what must come back on
the input grid are computed from first principles here, not with the client's own functions. Scans have
non-square pixels (0.8 x 1.6 mm) and permuted or flipped storage orders. Only voxels whose expected value does
not change within the interpolation's reach (1.6 mm per resampling) are compared, and they must match exactly.

``test_the_checks_catch_a_broken_client`` runs the same checks on deliberately broken pipelines (no
reorientation, swapped spacings, no resampling, reversed slices, no reorientation on the way back) and requires
each to fail. The last test serves the committed ``model_repository/`` itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import mixsup.clients.pipeline as pipeline
from mixsup.clients.client import SegmentationClient
from mixsup.contract import ModelContract
from mixsup.scan import Scan

MODEL_SPACING = 1.6
ROW_SHIFT, COLUMN_SHIFT = 8, 7  # model-grid pixels: 12.8 mm posterior, 11.2 mm to the patient's left
PAD_ROWS, PAD_COLUMNS = ROW_SHIFT, COLUMN_SHIFT
#: Logits per class of the shifted HU value v: background 0, liver 0.1 (v - 50), lesion 0.2 (v - 100), i.e.
#: liver above 50 HU, lesion above 150 HU.
SLOPES = np.array([0.0, 0.1, 0.2])
BIASES = np.array([0.0, -5.0, -20.0])
NETWORK = "shift"
#: The field of view, RAS mm (x: right+, y: anterior+, z: superior+).
FOV = {"x": (-40.0, 40.0), "y": (-40.0, 40.0), "z": (0.0, 35.0)}


# -- the network --------------------------------------------------------------------------------------------------


def write_shift_network(path: Path) -> Path:
    """ONNX: ``input`` [N,3,h,w] HU -> Conv (one tap per class, on the superior slice at (+ROW_SHIFT,
    +COLUMN_SHIFT), zero padding) -> Softmax over the 3 classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kernel = np.zeros((3, 3, 2 * PAD_ROWS + 1, 2 * PAD_COLUMNS + 1), np.float32)
    kernel[:, 2, PAD_ROWS + ROW_SHIFT, PAD_COLUMNS + COLUMN_SHIFT] = SLOPES
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "weight", "bias"], ["logits"],
                             kernel_shape=list(kernel.shape[2:]), pads=[PAD_ROWS, PAD_COLUMNS] * 2),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "shift_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=[numpy_helper.from_array(kernel, "weight"),
                     numpy_helper.from_array(BIASES.astype(np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def hu_class(hu: np.ndarray) -> np.ndarray:
    """The class the network gives a shifted value of ``hu`` HU."""
    hu = np.asarray(hu, np.float64)
    return ((hu > 50).astype(np.uint8) + (hu > 150).astype(np.uint8)).astype(np.uint8)


def shift_network_labels(volume: np.ndarray) -> np.ndarray:
    """What the served ensemble answers for a canonical model-grid ``volume`` [D,H,W] (numpy reference)."""
    depth, height, width = volume.shape
    above = volume[np.minimum(np.arange(depth) + 1, depth - 1)].astype(np.float64)
    shifted = np.zeros(volume.shape)  # outside the slice: padding, which is background
    shifted[:, : height - ROW_SHIFT, : width - COLUMN_SHIFT] = above[:, ROW_SHIFT:, COLUMN_SHIFT:]
    return hu_class(shifted)


def test_the_onnx_network_is_its_reference(tmp_path):
    import onnxruntime as ort

    path = write_shift_network(tmp_path / "shift.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    volume = np.random.default_rng(0).choice([0.0, 100.0, 200.0], size=(5, 23, 31))
    stacks = volume[np.clip(np.arange(5)[:, None] + np.arange(-1, 2)[None], 0, 4)].astype(np.float32)
    probabilities = session.run(None, {"input": stacks})[0]
    assert np.array_equal(np.argmax(probabilities, axis=1), shift_network_labels(volume))


# -- the phantom and the scans -------------------------------------------------------------------------------------


def phantom_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """HU at RAS points: an L-shaped liver (100 HU) with a lesion (200 HU), background 0 HU; no mirror symmetry
    along any axis, so a flipped axis shows."""
    def box(x0, x1, y0, y1, z0, z1):
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1) & (z >= z0) & (z < z1)

    hu = np.zeros(np.broadcast(x, y, z).shape)
    hu[box(-20, 25, -15, 20, 5, 30) | box(-20, -5, -32, -15, 5, 30)] = 100.0
    hu[box(-2, 16, -4, 14, 8, 20)] = 200.0
    return hu


@dataclass(frozen=True)
class Layout:
    """How a scan is stored: for each stored axis i, j, k the world axis (0 x, 1 y, 2 z), its sign, its spacing."""

    name: str
    axes: tuple[int, int, int]
    signs: tuple[int, int, int]
    spacing: tuple[float, float, float]


LAYOUTS = [
    # DICOM-like: i -> patient left, j -> posterior, k -> superior; 0.8 mm columns, 1.6 mm rows.
    Layout("LPS", (0, 1, 2), (-1, -1, 1), (0.8, 1.6, 2.5)),
    # Permuted: i -> posterior (0.8 mm), j -> superior (slices), k -> patient right (1.6 mm).
    Layout("PSR", (1, 2, 0), (-1, 1, 1), (0.8, 2.5, 1.6)),
    # Flipped slices: i -> patient right (1.6 mm), j -> anterior (0.8 mm), k -> inferior.
    Layout("RAI", (0, 1, 2), (1, 1, -1), (1.6, 0.8, 2.5)),
]


def make_scan(layout: Layout) -> Scan:
    """The phantom sampled on ``layout``'s grid, covering :data:`FOV`."""
    affine = np.eye(4)
    shape = []
    for stored, (world, sign, spacing) in enumerate(zip(layout.axes, layout.signs, layout.spacing)):
        low, high = FOV["xyz"[world]]
        count = int(round((high - low) / spacing))
        affine[:3, stored] = 0.0
        affine[world, stored] = sign * spacing
        affine[world, 3] = low + spacing / 2 if sign > 0 else high - spacing / 2
        shape.append(count)
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3, *shape))
    return Scan(voxels=phantom_hu(x, y, z).astype(np.int16), affine=affine)


def world_centres(scan: Scan) -> np.ndarray:
    """RAS coordinates [3, i, j, k] of every voxel centre."""
    ijk = np.indices(scan.voxels.shape).reshape(3, -1).astype(np.float64)
    return (scan.affine[:3, :3] @ ijk + scan.affine[:3, 3:]).reshape((3, *scan.voxels.shape))


def canonical_axis(scan: Scan, world: int) -> tuple[float, float, int]:
    """(first centre, signed step, count) of the canonical axis along ``world`` (x: W, right->left; y: H,
    anterior->posterior; z: D, inferior->superior), read off the voxel centres."""
    coordinates = world_centres(scan)[world]
    values = np.unique(np.round(coordinates, 6))
    step = float(values[1] - values[0])
    if world in (0, 1):  # W runs toward the patient's left (x decreasing), H toward posterior (y decreasing)
        return float(values[-1]), -step, len(values)
    return float(values[0]), step, len(values)


def expected_model_volume(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """What must reach the server: (HU on the canonical grid at 1.6 mm in-plane, mask of pixels whose value no
    linear interpolation can change). Pixel centres follow the half-pixel convention (a round trip is exact)."""
    grids = []
    for world in (2, 1, 0):  # D, H, W
        first, step, count = canonical_axis(scan, world)
        if world == 2:
            grids.append((first + step * np.arange(count), 0.0))
            continue
        out = max(1, int(round(count * abs(step) / MODEL_SPACING)))
        scale = count / out
        index = (np.arange(out) + 0.5) * scale - 0.5
        grids.append((first + step * index, MODEL_SPACING))
    (z, _), (y, ry), (x, rx) = grids
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    values = phantom_hu(X, Y, Z)
    stable = np.ones(values.shape, bool)
    for dy in (-ry, 0.0, ry):
        for dx in (-rx, 0.0, rx):
            stable &= phantom_hu(X + dx, Y + dy, Z) == values
    return values, stable


def expected_labels(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """The labels the shift network must give on the scan's own grid, and the voxels where that is certain.

    The network reads 12.8 mm posterior (y - 12.8), 11.2 mm left (x - 11.2) and one slice up (z + slice spacing).
    """
    x, y, z = world_centres(scan)
    _, dz, _ = canonical_axis(scan, 2)
    shift = (-COLUMN_SHIFT * MODEL_SPACING, -ROW_SHIFT * MODEL_SPACING, dz)
    labels = hu_class(phantom_hu(x + shift[0], y + shift[1], z + shift[2]))
    # Down- and up-sampling each reach up to one model pixel.
    reach = 2 * MODEL_SPACING
    stable = np.ones(labels.shape, bool)
    for dy in (-reach, -reach / 2, 0.0, reach / 2, reach):
        for dx in (-reach, -reach / 2, 0.0, reach / 2, reach):
            stable &= hu_class(phantom_hu(x + shift[0] + dx, y + shift[1] + dy, z + shift[2])) == labels
    return labels, stable


def check_sent_volume(scan: Scan, sent: np.ndarray) -> None:
    expected, stable = expected_model_volume(scan)
    assert sent.shape == expected.shape, f"the server got a {sent.shape} volume, expected {expected.shape}"
    assert np.array_equal(sent[stable], expected[stable]), "the server got the wrong voxels"


def check_labels(scan: Scan, labels: np.ndarray) -> None:
    expected, stable = expected_labels(scan)
    assert labels.shape == scan.voxels.shape
    assert stable.mean() > 0.8 and np.count_nonzero(expected[stable] == 2) > 100  # the check has teeth
    wrong = np.count_nonzero(labels[stable] != expected[stable])
    assert wrong == 0, f"{wrong} of {np.count_nonzero(stable)} certain voxels have the wrong label"


def segment_in_process(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """The client's pipeline with the numpy reference in place of the server: (volume sent, labels back)."""
    contract = ModelContract(spacing_mm=(MODEL_SPACING, MODEL_SPACING))
    volume, restore = pipeline.prepare_volume(scan, contract)
    labels, _ = pipeline.answer_on_scan_grid(shift_network_labels(volume), None, restore, 3, postprocess=False)
    return volume, labels


# -- without a server: the checks pass on the client and fail on broken ones -----------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_the_pipeline_puts_every_voxel_where_the_network_expects_it(layout):
    scan = make_scan(layout)
    assert scan.voxels.shape[layout.axes.index(2)] == 14  # slices along the expected stored axis
    sent, labels = segment_in_process(scan)
    check_sent_volume(scan, sent)
    check_labels(scan, labels)


def _no_reorientation(monkeypatch):
    monkeypatch.setattr(Scan, "canonical", lambda self: (
        np.ascontiguousarray(self.voxels.transpose(2, 1, 0)), tuple(self.spacing[::-1])))
    monkeypatch.setattr(Scan, "from_canonical", lambda self, array: np.ascontiguousarray(
        np.moveaxis(array, (-3, -2, -1), (-1, -2, -3))))


def _swapped_spacing(monkeypatch):
    original = pipeline.inplane_shape
    monkeypatch.setattr(pipeline, "inplane_shape", lambda shape, spacing, target: original(
        shape, tuple(spacing)[::-1], target))


def _no_resampling(monkeypatch):
    monkeypatch.setattr(pipeline, "needs_resampling", lambda spacing, target: False)


def _reversed_slices(monkeypatch):
    canonical, from_canonical = Scan.canonical, Scan.from_canonical
    monkeypatch.setattr(Scan, "canonical", lambda self: (
        np.ascontiguousarray(canonical(self)[0][::-1]), canonical(self)[1]))
    monkeypatch.setattr(Scan, "from_canonical", lambda self, array: from_canonical(
        self, np.ascontiguousarray(np.flip(array, axis=-3))))


def _mirrored_on_the_way_back(monkeypatch):
    to_stored = pipeline.Restore.to_stored
    monkeypatch.setattr(pipeline.Restore, "to_stored", lambda self, canonical: to_stored(
        self, np.ascontiguousarray(np.flip(canonical, axis=-1))))


#: (breakage, whether it changes what is sent). Each one runs on every layout except where it is no breakage at all:
#: LPS storage *is* the canonical order before the transpose, so skipping the reorientation is right for it.
BREAKAGES = [
    (_no_reorientation, True), (_swapped_spacing, True), (_no_resampling, True), (_reversed_slices, True),
    (_mirrored_on_the_way_back, False),
]


@pytest.mark.parametrize("layout, breakage, on_the_way_in", [
    pytest.param(layout, breakage, way_in, id=f"{layout.name}-{breakage.__name__.strip('_')}")
    for layout in LAYOUTS for breakage, way_in in BREAKAGES
    if not (layout.name == "LPS" and breakage is _no_reorientation)
])
def test_the_checks_catch_a_broken_client(monkeypatch, layout, breakage, on_the_way_in):
    scan = make_scan(layout)
    breakage(monkeypatch)
    sent, labels = segment_in_process(scan)  # each breakage is silent: no crash, just wrong voxels
    with pytest.raises(AssertionError):
        check_labels(scan, labels)
    if on_the_way_in:
        with pytest.raises(AssertionError):
            check_sent_volume(scan, sent)
    else:
        check_sent_volume(scan, sent)


# -- through the real Triton server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shift_triton(tmp_path_factory):
    """gRPC ``HOST:PORT`` of ``mixsup-serve`` over the shift network (1.6 mm, whole slices in one tile)."""
    import triton_utils

    root = tmp_path_factory.mktemp("shift")
    contract = ModelContract(spacing_mm=(MODEL_SPACING, MODEL_SPACING), patch_size=(64, 64))
    with triton_utils.serving_one_network(root, NETWORK, write_shift_network(root / "shift.onnx"),
                                          contract) as grpc_url:
        yield grpc_url


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_served_labels_land_on_the_input_grid(shift_triton, layout):
    scan = make_scan(layout)
    sent = []
    with SegmentationClient(shift_triton) as client:
        send = client.segment_volume

        def spy(volume, want_probabilities=False):
            sent.append(np.array(volume))
            return send(volume, want_probabilities)

        client.segment_volume = spy
        result = client.segment(scan, postprocess=False)
    assert len(sent) == 1
    check_sent_volume(scan, sent[0])
    check_labels(scan, result.labels)
    np.testing.assert_array_equal(result.affine, scan.affine)


# -- the committed model repository, served as it is ---------------------------------------------------------------

COMMITTED = Path(__file__).resolve().parents[1] / "model_repository"


@pytest.mark.triton
def test_the_committed_model_repository_serves_and_segments(tmp_path, capsys):
    import triton_utils

    from mixsup.clients.cli import main
    from mixsup.metrics import dice
    from mixsup.scan import read_nifti
    from mixsup.training.data.cli import main as data_main

    bundled = ModelContract.load(COMMITTED / "unet" / "1" / "contract.json")
    # The end-to-end test's phantom (model_repository/MODEL_CARD.md reports liver Dice 0.74 on it with v11).
    assert data_main(["phantoms", str(tmp_path / "scans"), "--n", "1", "--seed", "424242",
                      "--shape", "40", "256", "256", "-q"]) == 0
    proc, grpc_url, _ = triton_utils.start_serve(COMMITTED, log_dir=tmp_path / "logs")
    try:
        with SegmentationClient(grpc_url) as client:
            assert client.health()["ready"]
            served = client.contract()
        out = tmp_path / "seg.nii.gz"
        code = main(["segment", str(tmp_path / "scans" / "volume-0.nii.gz"), "-o", str(out), "--url", grpc_url,
                     "--stats", str(tmp_path / "stats.json")])
        assert code == 0, capsys.readouterr().err
    finally:
        assert triton_utils.stop_serve(proc) == 0
    # The ensemble's contract is the bundled network's (what export wrote), so the client resamples correctly.
    assert served.spacing_mm == bundled.spacing_mm and served.class_names == bundled.class_names
    scan, predicted = read_nifti(tmp_path / "scans" / "volume-0.nii.gz"), read_nifti(out)
    truth = read_nifti(tmp_path / "scans" / "segmentation-0.nii.gz")
    assert predicted.voxels.shape == scan.voxels.shape and np.allclose(predicted.affine, scan.affine)
    # Any broken orientation or grid leaves the liver elsewhere (Dice < 0.3); the bar is test_end_to_end's.
    assert dice(np.minimum(predicted.voxels, 1), np.minimum(truth.voxels, 1), 1) >= 0.6
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["liver_ml"] > 0 and stats["lesion_count"] == len(stats["lesions"])
