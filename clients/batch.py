"""``mixsup-client batch``: segment many scans, on one or more servers, into an output folder.

Each case is read, segmented (through :class:`~mixsup.clients.servers.ServerPool`, which retries while a server is
away) and written (:mod:`mixsup.clients.outputs`); its row is appended to ``summary.csv`` the moment it finishes
(:mod:`mixsup.clients.summary`). A case already done in an earlier run (ok, same input, outputs present) is skipped
unless ``overwrite``. A failing case is recorded and the run goes on.

Exit code (DESIGN.md's, over every case of the run, skipped ones counting as ok): 3 if a case could not reach a
server, else 2 if an input was bad, else 1 if a case failed otherwise, else 0.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mixsup.clients.inputs import CaseInput
from mixsup.clients.outputs import write_outputs
from mixsup.clients.result import Result
from mixsup.clients.servers import ServerPool
from mixsup.clients.stats import describe
from mixsup.clients.summary import (
    STATUS_BAD_INPUT,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_UNAVAILABLE,
    SUMMARY_FILENAME,
    CaseResult,
    SummaryFile,
    absolute_input,
)
from mixsup.dicom import dicom_source
from mixsup.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    InputError,
    MixsupError,
    ServerUnavailable,
)
from mixsup.readers import read_scan
from mixsup.scan import is_nifti

LABELS_SUFFIX = "_seg.nii.gz"
DICOM_SEG_SUFFIX = "_seg.dcm"
PROBABILITIES_SUFFIX = "_prob.nii.gz"
PREVIEW_SUFFIX = "_preview.png"
STATS_SUFFIX = "_stats.json"


@dataclass(frozen=True)
class BatchOptions:
    """What a batch run writes and how it behaves."""

    output_dir: Path
    jobs: int = 1
    postprocess: bool = True
    probabilities: bool = False
    preview: bool = False
    stats: bool = False
    #: DICOM inputs get ``<case>_seg.dcm``, a DICOM SEG on the source series, instead of ``_seg.nii.gz``.
    dicom_seg: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    debug: bool = False


@dataclass(frozen=True)
class CaseOutputs:
    """The files of one case in the output folder (None: not asked for)."""

    labels: Path
    probabilities: Path | None
    preview: Path | None
    stats: Path | None

    def all(self) -> list[Path]:
        return [path for path in (self.labels, self.probabilities, self.preview, self.stats) if path is not None]


def case_outputs(case: CaseInput, options: BatchOptions) -> CaseOutputs:
    """``OUT_DIR/<case>_seg.nii.gz`` (``_seg.dcm`` for a DICOM input with ``dicom_seg``) and the optional
    ``_prob.nii.gz``, ``_preview.png``, ``_stats.json``. Known from the input's path alone, before it is read, so
    that a re-run can tell a finished case without reading it."""
    base = options.output_dir / case.case
    # A SEG references its source series: a NIfTI input has none, so it keeps a NIfTI label map.
    seg = options.dicom_seg and not is_nifti(case.path)

    def beside(suffix: str, wanted: bool) -> Path | None:
        return base.with_name(base.name + suffix) if wanted else None

    return CaseOutputs(
        labels=beside(DICOM_SEG_SUFFIX if seg else LABELS_SUFFIX, True),
        probabilities=beside(PROBABILITIES_SUFFIX, options.probabilities),
        preview=beside(PREVIEW_SUFFIX, options.preview),
        stats=beside(STATS_SUFFIX, options.stats),
    )


def status_for(error: BaseException) -> str:
    """The summary status of a case that raised ``error``."""
    if isinstance(error, ServerUnavailable):
        return STATUS_UNAVAILABLE
    if isinstance(error, InputError):
        return STATUS_BAD_INPUT
    return STATUS_FAILED


def one_line(error: BaseException) -> str:
    """An error as one readable line (mixsup errors are written for users; others get their type)."""
    message = str(error) if isinstance(error, MixsupError) else f"{type(error).__name__}: {error}"
    return (message.strip().splitlines() or [""])[0]


def batch_exit_code(results: Sequence[CaseResult]) -> int:
    """3 if a server could not be reached, else 2 if some inputs were bad, else 1 if some failed, else 0."""
    statuses = {result.status for result in results}
    if STATUS_UNAVAILABLE in statuses:
        return EXIT_UNAVAILABLE
    if STATUS_BAD_INPUT in statuses:
        return EXIT_BAD_INPUT
    if STATUS_FAILED in statuses:
        return EXIT_FAILURE
    return EXIT_OK


class Reporter:
    """Lines for the user, kept clear of the progress bar: results on stdout, problems on stderr."""

    def __init__(self, prog: str, total: int, initial: int, enabled: bool | None):
        from tqdm import tqdm  # here, not at the top: `mixsup-client segment` imports this module but shows no bar

        self._tqdm = tqdm
        self.prog = prog
        self._lock = threading.Lock()
        self.bar = tqdm(total=total, initial=initial, unit="scan", file=sys.stderr, disable=enabled is False
                        or (enabled is None and not sys.stderr.isatty()), dynamic_ncols=True)

    def out(self, line: str) -> None:
        with self._lock:
            self._tqdm.write(line, file=sys.stdout)

    def err(self, line: str) -> None:
        with self._lock:
            self._tqdm.write(f"{self.prog}: {line}", file=sys.stderr)

    def finished(self) -> None:
        with self._lock:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def segment_case(case: CaseInput, pool: ServerPool, options: BatchOptions, report: Reporter) -> CaseResult:
    """Read, segment and write one case; every error becomes the case's status, never an exception."""
    outputs = case_outputs(case, options)
    started = time.perf_counter()
    attempts, server = 0, ""
    try:
        scan = read_scan(case.path)
        source = dicom_source(scan)
        if source is not None and source.note:
            report.err(f"{case.case}: {source.note}")

        def work(client) -> Result:
            return client.segment(scan, postprocess=options.postprocess, probabilities=options.probabilities)

        attempted = pool.run(work)
        attempts, server = attempted.attempts, attempted.url
        write_outputs(
            attempted.value, scan, outputs.labels, outputs.probabilities, outputs.preview, outputs.stats,
            pool.contract.class_names,
        )
        result = CaseResult(
            case.case, STATUS_OK, seconds=time.perf_counter() - started, attempts=attempts, server=server,
            input=absolute_input(case.path), output=str(outputs.labels),
        ).with_stats(attempted.value.stats)
        report.out(f"{STATUS_OK:<4} {case.case}: {describe(attempted.value.stats)} ({result.seconds:.1f} s)")
        return result
    except Exception as exc:  # noqa: BLE001 - one bad case must not end the run
        if options.debug:
            report.err(traceback.format_exc().rstrip())
        result = CaseResult(
            case.case, status_for(exc), seconds=time.perf_counter() - started, attempts=attempts, server=server,
            error=one_line(exc), input=absolute_input(case.path),
        )
        report.err(f"{case.case}: {result.status}: {result.error}")
        return result


def run_batch(
    cases: Sequence[CaseInput],
    pool: ServerPool,
    options: BatchOptions,
    prog: str = "mixsup-client",
) -> tuple[list[CaseResult], int]:
    """Segment ``cases`` into ``options.output_dir``; returns one result per case of this run (in the order given;
    skipped ones from the summary) and how many were skipped as already done.

    ``pool`` is started here, and only when there is work left: a run with nothing to redo needs no server.
    """
    summary = SummaryFile(options.output_dir / SUMMARY_FILENAME)
    done = {
        index for index, case in enumerate(cases)
        if not options.overwrite and summary.is_done(case.case, case.path, case_outputs(case, options).all())
    }
    results: dict[int, CaseResult] = {}
    for index in done:
        row = summary.rows[cases[index].case]
        results[index] = CaseResult(
            row["case"], row["status"], input=row["input"], output=row["output"], server=row["server"]
        )
    todo = [index for index in range(len(cases)) if index not in done]
    if todo and not pool.started:
        pool.start()  # no ready server, or servers with different models: the run fails here, before any case
    options.output_dir.mkdir(parents=True, exist_ok=True)
    report = Reporter(prog, total=len(cases), initial=len(done), enabled=options.progress)

    def task(index: int) -> CaseResult:
        result = segment_case(cases[index], pool, options, report)
        # Recorded by the worker, so a case that finishes while the run is being interrupted still counts.
        summary.append(result)
        return result

    with summary:
        executor = ThreadPoolExecutor(max_workers=max(1, options.jobs), thread_name_prefix="mixsup-case")
        try:
            futures = {executor.submit(task, index): index for index in todo}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                report.finished()
        except BaseException:
            # Ctrl-C: cases not started are dropped, waits for a server end now, running inferences finish and
            # are recorded.
            pool.stop()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            report.close()
    return [results[index] for index in range(len(cases))], len(done)
