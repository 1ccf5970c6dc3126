"""Batch pieces without a server: finding scans (folders, globs, CSV), the append-only summary, and the server
pool's retries (on stand-in clients and a fake clock, so backoff and give-up times are exact)."""
from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
from dicom_phantoms import hu_volume, write_series

from mixsup.clients.inputs import collect_cases, unique_cases
from mixsup.clients.servers import ServerPool
from mixsup.clients.summary import CaseResult, SummaryFile, read_summary
from mixsup.contract import ModelContract
from mixsup.errors import InputError, ServerUnavailable

# -- finding scans ------------------------------------------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def archive(tmp_path):
    """ARCHIVE/p1/ct.nii.gz, p1/ct_seg.nii.gz (an output), p2/study/portal/ (CT series), p2/study/seg/ (MR
    series: no CT), p2/.hidden/x.nii, p3/scan.NII, notes.txt."""
    root = tmp_path / "archive"
    touch(root / "p1" / "ct.nii.gz")
    touch(root / "p1" / "ct_seg.nii.gz")
    write_series(root / "p2" / "study" / "portal", hu_volume((2, 8, 8)))
    write_series(root / "p2" / "study" / "seg", hu_volume((2, 8, 8)), modality="MR")
    touch(root / "p2" / ".hidden" / "x.nii")
    touch(root / "p3" / "scan.NII")
    touch(root / "notes.txt")
    return root


def test_folders_are_walked_recursively(archive):
    collected = collect_cases([archive])
    assert [(c.case, c.path.relative_to(archive).as_posix()) for c in collected.cases] == [
        ("p1/ct", "p1/ct.nii.gz"), ("p2/study/portal", "p2/study/portal"), ("p3/scan", "p3/scan.NII"),
    ]
    assert collected.notes == ["skipped 1 DICOM folder(s) without a CT image (SEG, SR, localizers, ...)"]


def test_the_output_folder_inside_the_input_is_skipped(archive):
    touch(archive / "out" / "p1" / "ct_prob.nii.gz")
    touch(archive / "out" / "old.nii.gz")
    cases = collect_cases([archive], output_dir=archive / "out").cases
    assert "old" not in [c.case for c in cases] and len(cases) == 3


def test_globs_are_relative_to_their_fixed_part(archive):
    cases = collect_cases([str(archive / "*" / "*.nii.gz")]).cases
    assert [c.case for c in cases] == ["p1/ct"]  # the label map matched too, and was left out
    cases = collect_cases([str(archive / "**" / "portal")]).cases
    assert [c.case for c in cases] == ["p2/study/portal"]
    with pytest.raises(InputError, match="no file or folder matches"):
        collect_cases([str(archive / "*.nope")])


def test_csv_lists_with_paths_and_case_names(archive, tmp_path):
    listing = tmp_path / "cases.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Case", "Path", "notes"])
        writer.writerow(["first", "archive/p1/ct.nii.gz", "x"])
        writer.writerow(["", str(archive / "p2" / "study" / "portal"), ""])
        writer.writerow(["../../escape", "archive/p3/scan.NII", ""])
        writer.writerow(["", "", "an empty row"])
    cases = collect_cases([listing]).cases
    assert [(c.case, c.path) for c in cases] == [
        ("first", tmp_path / "archive" / "p1" / "ct.nii.gz"),
        ("archive/p2/study/portal", archive / "p2" / "study" / "portal"),
        ("escape", tmp_path / "archive" / "p3" / "scan.NII"),  # a case name never leaves the output folder
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,size\na,1\n")
    with pytest.raises(InputError, match="column"):
        collect_cases([bad])


def test_several_inputs_same_scan_once_and_unique_names(archive, tmp_path):
    other = tmp_path / "other"
    touch(other / "p1" / "ct.nii.gz")
    collected = collect_cases([archive / "p1", archive / "p1" / "ct.nii.gz", other])
    assert [c.case for c in collected.cases] == ["ct", "p1/ct"]
    cases, renamed = unique_cases(collect_cases([archive / "p1", other / "p1"]).cases)
    assert [c.case for c in cases] == ["ct", "ct-2"] and renamed == 1


def test_missing_inputs_are_bad_input(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        collect_cases([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI"):
        collect_cases([tmp_path / "empty"])


# -- the summary ----------------------------------------------------------------------------------------------------


def ok_result(case: str, input_path: Path, output: Path) -> CaseResult:
    return CaseResult(case, "ok", liver_ml=1500.123, lesion_ml=12.0, lesion_count=2, tumour_burden=0.008,
                      seconds=1.5, attempts=1, server="h:1", input=str(input_path), output=str(output))


def test_summary_rows_are_appended_whole_from_many_threads(tmp_path):
    path = tmp_path / "summary.csv"
    with SummaryFile(path) as summary:
        threads = [threading.Thread(target=lambda n=n: [summary.append(ok_result(f"c{n}-{k}", tmp_path, tmp_path))
                                                        for k in range(25)]) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Appended as they finish: on disk before the run ends.
        assert len(read_summary(path)) == 200
    rows = list(csv.DictReader(path.open(newline="")))
    assert len(rows) == 200 and all(row["status"] == "ok" and row["liver_ml"] == "1500.12" for row in rows)


def test_a_line_cut_by_a_crash_is_dropped_and_the_rest_kept(tmp_path):
    path = tmp_path / "summary.csv"
    with SummaryFile(path) as summary:
        summary.append(ok_result("a", tmp_path / "a.nii", tmp_path / "a_seg.nii.gz"))
    with path.open("a") as handle:
        handle.write("b,o")  # a crash mid-line
    assert list(read_summary(path)) == ["a"]
    with SummaryFile(path) as summary:  # compacted on open: the partial line is gone before anything is appended
        summary.append(ok_result("c", tmp_path / "c.nii", tmp_path / "c_seg.nii.gz"))
    assert [row["case"] for row in csv.DictReader(path.open(newline=""))] == ["a", "c"]


def test_done_means_ok_same_input_and_outputs_present(tmp_path):
    output = touch(tmp_path / "a_seg.nii.gz")
    path = tmp_path / "summary.csv"
    with SummaryFile(path) as summary:
        summary.append(ok_result("a", tmp_path / "a.nii", output))
        summary.append(CaseResult("b", "bad_input", error="corrupt", input=str(tmp_path / "b.nii")))
    summary = SummaryFile(path)
    assert summary.is_done("a", tmp_path / "a.nii", [output])
    assert not summary.is_done("a", tmp_path / "other.nii", [output])
    assert not summary.is_done("a", tmp_path / "a.nii", [output, tmp_path / "a_preview.png"])
    assert not summary.is_done("b", tmp_path / "b.nii", [])


# -- the server pool ------------------------------------------------------------------------------------------------


class Clock:
    """A fake clock; sleeping advances it."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


class StandIn:
    """A client whose server is up while ``up(now)`` says so."""

    def __init__(self, url: str, clock: Clock, up=lambda now: True, contract: ModelContract | None = None):
        self.url, self.clock, self.up = url, clock, up
        self._contract = contract or ModelContract()
        self.calls = 0

    def _check(self):
        if not self.up(self.clock.now):
            raise ServerUnavailable(f"cannot reach Triton at {self.url}")

    def health(self):
        up = self.up(self.clock.now)
        if not up:
            raise ServerUnavailable(f"cannot reach Triton at {self.url}")
        return {"ready": True}

    def ensure_ready(self):
        self._check()

    def contract(self):
        return self._contract

    def work(self):
        self._check()
        self.calls += 1
        self.clock.now += 1.0  # a case takes a second
        return self.url


def pool_of(clients, clock, retry=60.0, lines=None):
    return ServerPool(clients, retry_seconds=retry, notify=(lines if lines is not None else []).append,
                      clock=clock, sleep=clock.sleep)


def test_a_server_that_comes_back_is_waited_for_with_backoff():
    clock = Clock()
    server = StandIn("a:1", clock, up=lambda now: not 10 <= now < 20)  # down from t=10 to t=20
    lines: list[str] = []
    pool = pool_of([server], clock, lines=lines)
    pool.start()
    clock.now = 10.0
    attempted = pool.run(lambda client: client.work())
    assert attempted.value == "a:1" and attempted.attempts == 2  # the first try failed, the retry after t=20 worked
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0] and clock.now == pytest.approx(26.5)
    assert any("retrying" in line for line in lines) and "Triton at a:1 is back" in lines


def test_a_case_gives_up_after_retry_seconds_and_later_cases_fail_fast():
    clock = Clock()
    server = StandIn("a:1", clock, up=lambda now: now < 5)
    pool = pool_of([server], clock, retry=20.0)
    pool.start()
    clock.now = 5.0
    with pytest.raises(ServerUnavailable):
        pool.run(lambda client: client.work())
    assert clock.now == pytest.approx(25.0)  # 20 s after its first failure
    sleeps = len(clock.sleeps)
    with pytest.raises(ServerUnavailable):  # the server has been down for 20 s: one check, no waiting
        pool.run(lambda client: client.work())
    assert len(clock.sleeps) == sleeps and clock.now == pytest.approx(25.0)
    server.up = lambda now: True  # back: the next case checks, finds it and goes on
    assert pool.run(lambda client: client.work()).attempts == 1


def test_work_moves_to_another_server_without_waiting():
    clock = Clock()
    a = StandIn("a:1", clock, up=lambda now: now < 3)
    b = StandIn("b:1", clock)
    pool = pool_of([a, b], clock)
    pool.start()
    urls = [pool.run(lambda client: client.work()).url for _ in range(8)]
    assert set(urls[:2]) == {"a:1", "b:1"}  # spread while both are up
    assert urls[-4:] == ["b:1"] * 4 and clock.sleeps == []


def test_servers_must_serve_the_same_model():
    clock = Clock()
    a = StandIn("a:1", clock, contract=ModelContract(spacing_mm=(1.0, 1.0)))
    b = StandIn("b:1", clock, contract=ModelContract(spacing_mm=(1.6, 1.6)))
    with pytest.raises(InputError, match="different model"):
        pool_of([a, b], clock).start()


def test_no_ready_server_at_the_start_fails_at_once():
    clock = Clock()
    with pytest.raises(ServerUnavailable):
        pool_of([StandIn("a:1", clock, up=lambda now: False)], clock).start()
    assert clock.sleeps == []


def test_a_server_down_at_the_start_joins_when_it_is_up():
    clock = Clock()
    a = StandIn("a:1", clock)
    b = StandIn("b:1", clock, up=lambda now: now >= 4)
    lines: list[str] = []
    pool = pool_of([a, b], clock, lines=lines)
    pool.start()
    assert any("b:1" in line for line in lines)
    urls = [pool.run(lambda client: client.work()).url for _ in range(12)]
    assert urls[:4] == ["a:1"] * 4 and "b:1" in urls[5:]
    assert np.mean([url == "b:1" for url in urls[6:]]) >= 0.5


def test_a_rerun_with_nothing_left_needs_no_server(tmp_path, capsys):
    import socket

    from mixsup.clients.cli import main

    scan = touch(tmp_path / "scans" / "a.nii.gz")
    output = touch(tmp_path / "out" / "a_seg.nii.gz")
    with SummaryFile(tmp_path / "out" / "summary.csv") as summary:
        summary.append(ok_result("a", scan, output))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
    assert main(["batch", str(tmp_path / "scans"), "-o", str(tmp_path / "out"), "--url", url]) == 0
    assert "1 ok (1 already done, skipped)" in capsys.readouterr().out
    # With --overwrite there is work, and no server: exit 3, the summary untouched.
    assert main(["batch", str(tmp_path / "scans"), "-o", str(tmp_path / "out"), "--url", url, "--overwrite"]) == 3
    assert read_summary(tmp_path / "out" / "summary.csv")["a"]["status"] == "ok"
