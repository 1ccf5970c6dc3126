"""``mixsup-client batch`` against the real Triton server: an archive with corrupt scans, a server killed and
restarted mid-run, a server gone for good, two servers, and re-runs that must not repeat work.

Servers here run the per-pixel network of test_client_cli, so every label map is checked against numpy. The
restart tests start ``mixsup-serve`` on ports they choose, kill ``tritonserver`` itself with SIGKILL (a crash, not
a clean stop) and start a new server on the same ports while the batch runs in its own process.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import triton_utils
from dicom_phantoms import PATIENT_ID, PATIENT_NAME, write_series
from pydicom.uid import JPEG2000Lossless
from test_client_cli import (
    NETWORK,
    PIXEL_BIAS,
    PIXEL_WEIGHT,
    SPACING,
    expected_labels,
    real_triton,
    run_cli,
    segment_requests,
    write_scan,
)
from test_dicom import check_seg

from mixsup.contract import ModelContract
from mixsup.readers import read_scan

__all__ = ["real_triton"]  # the module's server fixture, shared with test_client_cli

pytestmark = pytest.mark.triton


def scan_at(path: Path, **kwargs) -> np.ndarray:
    """test_client_cli's phantom written at ``path`` (folders made); its voxels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_scan(path, **kwargs)[0]


def summary_rows(out_dir: Path) -> dict[str, dict[str, str]]:
    path = out_dir / "summary.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def labels_of(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def dicom_plane() -> np.ndarray:
    plane = np.zeros((20, 16), np.int16)
    plane[3:17, 2:14] = 100
    plane[6:10, 5:9] = 200
    return plane


# -- an archive with bad scans --------------------------------------------------------------------------------------


def test_an_archive_with_corrupt_scans(tmp_path, capsys, real_triton):
    archive = tmp_path / "archive"
    good = {
        "p1/ct": scan_at(archive / "p1" / "ct.nii.gz", seed=1),
        "p2/ct": scan_at(archive / "p2" / "ct.nii.gz", seed=2),
    }
    write_series(archive / "p3" / "study" / "portal", np.repeat(dicom_plane()[None], 4, axis=0), spacing=SPACING)
    write_series(archive / "p3" / "study" / "report", np.repeat(dicom_plane()[None], 2, axis=0), modality="MR")
    (archive / "p4").mkdir()
    (archive / "p4" / "ct.nii.gz").write_bytes(b"\x1f\x8b corrupt")
    broken_series = archive / "p5" / "series"
    broken_series.mkdir(parents=True)
    (broken_series / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    out_dir = tmp_path / "out"
    requests = segment_requests(real_triton)

    code, out, err = run_cli(capsys, "batch", archive, "-o", out_dir, "--url", real_triton, "--jobs", "2",
                             "--stats", "--preview", "--no-progress")
    assert code == 2, err
    rows = summary_rows(out_dir)
    assert set(rows) == {"p1/ct", "p2/ct", "p3/study/portal", "p4/ct", "p5/series"}  # the MR folder is skipped
    for case in ("p4/ct", "p5/series"):
        assert rows[case]["status"] == "bad_input" and rows[case]["error"]
        assert not (out_dir / f"{case}_seg.nii.gz").exists()
    # One readable line per failure on stderr, no traceback.
    problems = [line for line in err.splitlines() if "bad_input" in line]
    assert len(problems) == 2 and "Traceback" not in err
    assert "skipped 1 DICOM folder" in err
    portal = read_scan(archive / "p3" / "study" / "portal")
    good["p3/study/portal"] = portal.voxels
    for case, voxels in good.items():
        assert rows[case]["status"] == "ok" and rows[case]["attempts"] == "1"
        labels = labels_of(out_dir / f"{case}_seg.nii.gz")
        assert np.array_equal(labels, expected_labels(voxels))
        stats = json.loads((out_dir / f"{case}_stats.json").read_text())
        assert stats["lesion_count"] >= 1 and float(rows[case]["liver_ml"]) == pytest.approx(stats["liver_ml"], 1e-3)
        assert (out_dir / f"{case}_preview.png").read_bytes().startswith(b"\x89PNG")
    assert segment_requests(real_triton) == requests + 3
    # Nothing about the patient in any log line or in the summary and stats.
    written = out + err + (out_dir / "summary.csv").read_text()
    written += "".join(path.read_text() for path in out_dir.rglob("*_stats.json"))
    for identifier in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.replace("^", " ")):
        assert identifier not in written

    # A re-run redoes only what is not ok (the bad inputs, still bad): nothing reaches the server again.
    code, out, err = run_cli(capsys, "batch", archive, "-o", out_dir, "--url", real_triton, "--stats", "--preview")
    assert code == 2 and "3 already done" in out
    assert segment_requests(real_triton) == requests + 3
    # --overwrite redoes everything.
    code, out, _ = run_cli(capsys, "batch", archive / "p1", archive / "p2", "-o", tmp_path / "out2", "--url",
                           real_triton)
    assert code == 0 and set(summary_rows(tmp_path / "out2")) == {"ct", "ct-2"}
    code, out, _ = run_cli(capsys, "batch", archive / "p1", "-o", tmp_path / "out2", "--url", real_triton,
                           "--overwrite")
    assert code == 0 and "already done" not in out
    assert segment_requests(real_triton) == requests + 6


def test_csv_and_glob_inputs(tmp_path, capsys, real_triton):
    voxels = {name: scan_at(tmp_path / "scans" / name / "ct.nii.gz", seed=i)
              for i, name in enumerate(("a", "b", "c"))}
    listing = tmp_path / "cases.csv"
    listing.write_text("case,path\nfirst,scans/a/ct.nii.gz\n")
    code, _, err = run_cli(capsys, "batch", listing, str(tmp_path / "scans" / "[bc]" / "*.nii.gz"), "-o",
                           tmp_path / "out", "--url", real_triton)
    assert code == 0, err
    assert set(summary_rows(tmp_path / "out")) == {"first", "b/ct", "c/ct"}
    assert np.array_equal(labels_of(tmp_path / "out" / "first_seg.nii.gz"), expected_labels(voxels["a"]))
    assert np.array_equal(labels_of(tmp_path / "out" / "c" / "ct_seg.nii.gz"), expected_labels(voxels["c"]))


# -- servers that go away ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_repository(tmp_path_factory) -> Path:
    from mixsup.repository import write_ensemble, write_network

    root = tmp_path_factory.mktemp("pixel-repository")
    onnx_path = triton_utils.write_pixel_network(root / "pixel.onnx", PIXEL_WEIGHT, PIXEL_BIAS)
    write_network(root / "repository", NETWORK, onnx_path, ModelContract(spacing_mm=SPACING, patch_size=(16, 16)))
    write_ensemble(root / "repository")
    return root / "repository"


def serve_on(repository: Path, ports: list[int], log_dir: Path) -> subprocess.Popen:
    """``mixsup-serve`` on the given (grpc, http, metrics) ports, once ready (a restart must reuse its ports)."""
    assert triton_utils.wait_for(lambda: all(triton_utils.port_is_free(port) for port in ports), 60)
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher_log = log_dir / "launcher.log"
    args = ["--startup-timeout", "120", "--log-file", str(log_dir / "triton.log")]
    with open(launcher_log, "wb") as out:
        proc = subprocess.Popen(triton_utils.serve_command(repository, *ports, args), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    setattr(proc, triton_utils.LAUNCHER_LOG_ATTR, str(launcher_log))
    ready = triton_utils.wait_for(
        lambda: proc.poll() is not None or triton_utils._is_ready(f"http://127.0.0.1:{ports[1]}"), 150, 0.2
    )
    assert ready and proc.poll() is None, triton_utils.launcher_output(proc)
    return proc


def crash(proc: subprocess.Popen) -> None:
    """SIGKILL ``tritonserver`` itself (not the launcher): the server dies as in a crash; the launcher follows."""
    server_pid, _ = triton_utils.launched_pids(proc)
    os.kill(server_pid, signal.SIGKILL)
    proc.wait(60)


def start_batch(scans: Path, out_dir: Path, url: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mixsup.clients.cli", "batch", str(scans), "-o", str(out_dir), "--url", url,
               "--no-progress", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_scans(folder: Path, count: int) -> dict[str, np.ndarray]:
    # 48 x 40 x 8 voxels: 8 slices of 6 tiles each, a fraction of a second per scan on this server.
    return {f"s{i:02d}": scan_at(folder / f"s{i:02d}.nii.gz", shape=(48, 40, 8), seed=i) for i in range(count)}


#: Scans in a batch that a test kills the server under: enough that the batch is still running when the kill
#: lands. With the network in the window step's process a scan of write_scans' size takes ~20 ms, and batches of
#: 16 and of 10 were done before it (measured).
MID_RUN_SCANS = 200


def test_a_server_killed_and_restarted_mid_run(tmp_path, pixel_repository):
    ports = triton_utils.free_ports(3)
    url = f"127.0.0.1:{ports[0]}"
    count = MID_RUN_SCANS
    voxels = write_scans(tmp_path / "scans", count)
    out_dir = tmp_path / "out"
    server = serve_on(pixel_repository, ports, tmp_path / "logs-1")
    batch = None
    try:
        batch = start_batch(tmp_path / "scans", out_dir, url, "--jobs", "2", "--retry-seconds", "180")
        assert triton_utils.wait_for(lambda: len(summary_rows(out_dir)) >= 2 or batch.poll() is not None, 180)
        crash(server)
        done_before_the_crash = len(summary_rows(out_dir))
        assert done_before_the_crash < count, "the batch finished before the server was killed: nothing was tested"
        time.sleep(2.0)  # the batch meets a dead server for a while
        assert batch.poll() is None
        server = serve_on(pixel_repository, ports, tmp_path / "logs-2")
        out, err = batch.communicate(timeout=300)
        assert batch.returncode == 0, err
        rows = summary_rows(out_dir)
        assert set(rows) == set(voxels) and all(row["status"] == "ok" for row in rows.values())
        assert any(int(row["attempts"]) > 1 for row in rows.values())  # some scan waited for the restart
        assert "retrying" in err and "is back" in err
        for case, case_voxels in voxels.items():
            assert np.array_equal(labels_of(out_dir / f"{case}_seg.nii.gz"), expected_labels(case_voxels))
        restarted_did = segment_requests(url)
        assert 0 < restarted_did <= count - done_before_the_crash + 2  # at most the in-flight pair again

        # The second run does no repeated work.
        rerun = start_batch(tmp_path / "scans", out_dir, url)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
        assert f"{count} already done" in out and segment_requests(url) == restarted_did
    finally:
        if batch is not None and batch.poll() is None:
            batch.kill()
        triton_utils.stop_serve(server)


def test_a_server_gone_for_good(tmp_path, pixel_repository):
    ports = triton_utils.free_ports(3)
    url = f"127.0.0.1:{ports[0]}"
    write_scans(tmp_path / "scans", MID_RUN_SCANS)
    out_dir = tmp_path / "out"
    server = serve_on(pixel_repository, ports, tmp_path / "logs")
    try:
        batch = start_batch(tmp_path / "scans", out_dir, url, "--retry-seconds", "3")
        assert triton_utils.wait_for(lambda: len(summary_rows(out_dir)) >= 1 or batch.poll() is not None, 180)
        crash(server)
        killed_at = time.monotonic()
        out, err = batch.communicate(timeout=300)
    finally:
        triton_utils.stop_serve(server)
    # The scan in flight waits 3 s; the later ones each find the server still gone and fail at once.
    assert time.monotonic() - killed_at < 3 + 30
    assert batch.returncode == 3, err
    rows = summary_rows(out_dir)
    statuses = [row["status"] for row in rows.values()]
    assert len(rows) == MID_RUN_SCANS and statuses.count("ok") >= 1 and "server_unavailable" in statuses
    assert set(statuses) <= {"ok", "server_unavailable"}
    unavailable = [line for line in err.splitlines() if ": server_unavailable: " in line]
    assert len(unavailable) == statuses.count("server_unavailable") and "Traceback" not in err


def test_scans_are_spread_over_two_servers(tmp_path, capsys, real_triton, pixel_repository):
    voxels = write_scans(tmp_path / "scans", 6)
    second, second_url, _ = triton_utils.start_serve(pixel_repository, log_dir=tmp_path / "logs")
    try:
        before = segment_requests(real_triton)
        code, _, err = run_cli(capsys, "batch", tmp_path / "scans", "-o", tmp_path / "out", "--url", real_triton,
                               "--url", second_url, "--jobs", "2")
        first_did, second_did = segment_requests(real_triton) - before, segment_requests(second_url)
    finally:
        triton_utils.stop_serve(second)
    assert code == 0, err
    assert first_did + second_did == 6 and first_did >= 1 and second_did >= 1
    rows = summary_rows(tmp_path / "out")
    assert {row["server"] for row in rows.values()} == {real_triton, second_url}
    for case, case_voxels in voxels.items():
        assert np.array_equal(labels_of(tmp_path / "out" / f"{case}_seg.nii.gz"), expected_labels(case_voxels))


# -- DICOM in, DICOM SEG out, through the server ------------------------------------------------------------------


def shuffled_jpeg2000_series(folder: Path) -> str:
    """A JPEG 2000 (lossless) CT series whose file names are random, so neither name nor listing order says
    where a slice lies; returns its SeriesInstanceUID."""
    # 40 x 32: openjpeg's default five wavelet levels need at least 32 pixels a side.
    volume = np.stack([np.kron(dicom_plane(), np.ones((2, 2), np.int16)) + 10 * k for k in range(5)])
    datasets = write_series(folder, volume, JPEG2000Lossless, spacing=SPACING)
    rng = np.random.default_rng(7)
    for path in sorted(folder.iterdir()):
        path.rename(folder / f"{rng.integers(1 << 40):x}.dcm")
    return datasets[0].SeriesInstanceUID


def test_a_shuffled_jpeg2000_series_becomes_a_dicom_seg(tmp_path, capsys, real_triton):
    """The issue's acceptance case: segment and batch --dicom-seg write a SEG that references the source series
    and holds, per source slice, the labels of the scan on its own grid; NIfTI inputs of the batch stay NIfTI."""
    archive = tmp_path / "archive"
    series_uid = shuffled_jpeg2000_series(archive / "p1" / "ct")
    nifti = scan_at(archive / "p2" / "ct.nii.gz", seed=3)
    scan = read_scan(archive / "p1" / "ct")
    expected = expected_labels(scan.voxels)
    assert set(np.unique(expected)) == {0, 1, 2}

    code, _, err = run_cli(capsys, "segment", archive / "p1" / "ct", "-o", tmp_path / "seg.dcm", "--url", real_triton)
    assert code == 0, err
    check_seg(tmp_path / "seg.dcm", scan, expected, series_uid)

    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "batch", archive, "-o", out_dir, "--url", real_triton, "--dicom-seg",
                             "--no-progress")
    assert code == 0, err
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*_seg.*")) == [
        "p1/ct_seg.dcm", "p2/ct_seg.nii.gz"]
    check_seg(out_dir / "p1" / "ct_seg.dcm", scan, expected, series_uid)
    assert np.array_equal(labels_of(out_dir / "p2" / "ct_seg.nii.gz"), expected_labels(nifti))
    assert summary_rows(out_dir)["p1/ct"]["output"].endswith("ct_seg.dcm")
    # A re-run knows the SEG as the case's output: nothing is redone.
    requests = segment_requests(real_triton)
    code, out, _ = run_cli(capsys, "batch", archive, "-o", out_dir, "--url", real_triton, "--dicom-seg")
    assert code == 0 and "2 already done" in out
    assert segment_requests(real_triton) == requests
