"""A batch run's ``summary.csv``: one row per case, appended the moment the case finishes, so a killed run loses
nothing it finished and a re-run knows what is already done.

* **Appending** is one ``write`` of one whole line to a file opened with ``O_APPEND``, under a lock, then
  ``fsync``: a row is on disk completely or not at all (short of a full disk), whatever the worker threads do.
* **Compacting**: when a run starts and when it ends the file is rewritten atomically with one row per case (the
  latest), in the current columns, dropping any malformed line a crash could have left. Between those moments the
  file is append-only; a case that was redone has its old row until the end of the run.
* A case is **done** when its latest row says ``ok`` for the same input path and its output files exist.

Columns: ``liver_ml`` is the liver with its lesions, ``tumour_burden`` = lesion / liver volume
(:mod:`mixsup.clients.stats`); ``attempts`` counts tries (more than 1 when the server went away and came back);
``server`` is the Triton that segmented the case.
"""
from __future__ import annotations

import csv
import io
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mixsup.clients.stats import SegmentationStats
from mixsup.files import atomic_path

SUMMARY_FILENAME = "summary.csv"
SUMMARY_COLUMNS = (
    "case", "status", "liver_ml", "lesion_ml", "lesion_count", "tumour_burden", "seconds", "attempts", "server",
    "error", "input", "output",
)

#: Case statuses.
STATUS_OK = "ok"
STATUS_BAD_INPUT = "bad_input"
STATUS_FAILED = "failed"
STATUS_UNAVAILABLE = "server_unavailable"
STATUSES = (STATUS_OK, STATUS_BAD_INPUT, STATUS_FAILED, STATUS_UNAVAILABLE)


@dataclass
class CaseResult:
    """One case's outcome: a row of the summary."""

    case: str
    status: str
    liver_ml: float | None = None
    lesion_ml: float | None = None
    lesion_count: int | None = None
    tumour_burden: float | None = None
    seconds: float | None = None
    attempts: int = 0
    server: str = ""
    error: str = ""
    input: str = ""
    output: str = ""

    def with_stats(self, stats: SegmentationStats) -> "CaseResult":
        """This result with the volumes of ``stats`` filled in."""
        self.liver_ml, self.lesion_ml = stats.liver_ml, stats.lesion_ml
        self.lesion_count, self.tumour_burden = stats.lesion_count, stats.tumour_burden
        return self

    def row(self) -> dict[str, str]:
        """The summary row: numbers rounded for reading, empty cells for what is unknown."""
        row = asdict(self)
        formats = {"liver_ml": "{:.2f}", "lesion_ml": "{:.2f}", "tumour_burden": "{:.5f}", "seconds": "{:.2f}"}
        for key, value in row.items():
            if value is None:
                row[key] = ""
            elif key in formats:
                row[key] = formats[key].format(value)
            else:
                row[key] = str(value)
        return {key: row[key] for key in SUMMARY_COLUMNS}


def absolute_input(path: str | os.PathLike) -> str:
    """How an input path is recorded: absolute, not resolved (a link to a scan keeps its name)."""
    return os.path.abspath(path)


def _csv_text(rows: Iterable[dict[str, str]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", restval="")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    """Case -> its latest well-formed row of the summary at ``path`` (empty when there is none)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    rows: dict[str, dict[str, str]] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        # A row cut short (a crash mid-write) has None cells; a status outside the known ones is not ours.
        if None in row or any(value is None for value in row.values()):
            continue
        if row.get("case") and row.get("status") in STATUSES:
            rows.pop(row["case"], None)  # the latest row of a case goes last
            rows[row["case"]] = {column: row.get(column, "") for column in SUMMARY_COLUMNS}
    return rows


class SummaryFile:
    """``summary.csv`` of one output folder, open for appending during a run (see the module)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = read_summary(self.path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def is_done(self, case: str, input_path: str | os.PathLike, outputs: Sequence[Path]) -> bool:
        """Whether ``case`` finished ok for this input in an earlier run and its ``outputs`` are all there."""
        row = self.rows.get(case)
        return (
            row is not None
            and row["status"] == STATUS_OK
            and row["input"] == absolute_input(input_path)
            and all(Path(output).is_file() for output in outputs)
        )

    def compact(self) -> None:
        """Rewrite the file atomically: the header and one row per case."""
        with atomic_path(self.path, ".csv") as tmp:
            tmp.write_text(_csv_text(self.rows.values(), header=True), encoding="utf-8", newline="")

    def open(self) -> "SummaryFile":
        """Compact the file and open it for appending."""
        self.compact()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return self

    def append(self, result: CaseResult) -> None:
        """Append ``result``'s row: one write of the whole line, flushed to disk before returning."""
        if self._fd is None:
            raise RuntimeError("SummaryFile.append before open()")
        row = result.row()
        data = _csv_text([row], header=False).encode("utf-8")
        with self._lock:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write (a signal, a nearly full disk): finish the line
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
            self.rows.pop(row["case"], None)
            self.rows[row["case"]] = row

    def close(self) -> None:
        """Stop appending and compact the file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self.compact()

    def __enter__(self) -> "SummaryFile":
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
