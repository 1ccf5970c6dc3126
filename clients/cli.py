"""``mixsup-client``: segment scans with a mixsup model served on Triton, check its health, score archives.

* ``mixsup-client segment SCAN [-o OUT.nii.gz | -o OUT.dcm] [--series UID]`` -- SCAN is a NIfTI file or DICOM: a
  series folder, a ``.zip`` of one, or a (multi-frame) DICOM file. When the DICOM input holds several series the
  axial CT series with the most slices is taken and named in one line on stderr; ``--series`` picks another
  (:mod:`mixsup.dicom` has the rule, and what happens to a gantry-tilted series). The label map (uint8:
  0 background, 1 liver, 2 lesion) is written on the input's exact grid (same shape and affine), by default
  beside the input as ``<stem>_seg.nii.gz``; an output ending in ``.dcm`` is a DICOM SEG referencing the source
  images (DICOM input only). An existing output is replaced atomically (the file is complete or absent, never
  half-written); the input itself is never overwritten.
* ``mixsup-client health`` -- one line of readiness; exit 0 when the server and the model are ready, else 3.
* ``mixsup-client batch INPUT -o OUT_DIR`` -- INPUT is a folder (its NIfTI files and DICOM series sub-folders) or
  a text file listing scans one per line. Every case is attempted; failures are reported and the run goes on,
  except when the server becomes unreachable. ``OUT_DIR/summary.csv`` lists every case.

Exit codes (DESIGN.md): 0 success, 2 bad usage or bad input, 3 server unreachable / not ready, 1 anything else.
Input is read and checked before the server is contacted, so a bad scan exits 2 whatever the server's state.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mixsup.clients.client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    LESION_LABEL,
    ORGAN_LABEL,
    SegmentationClient,
)
from mixsup.dicom import dicom_source
from mixsup.dicom_seg import check_seg_possible, write_dicom_seg
from mixsup.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    InputError,
    MixsupError,
    ServerUnavailable,
    add_debug_flag,
    run_command,
)
from mixsup.files import atomic_path
from mixsup.metrics import label_volumes_ml
from mixsup.readers import read_scan
from mixsup.scan import NIFTI_SUFFIXES, Scan, is_nifti, write_nifti

PROG = "mixsup-client"
OUTPUT_SUFFIX = "_seg"
#: Outputs with this suffix are written as a DICOM SEG (the default output stays NIfTI).
DICOM_SEG_SUFFIX = ".dcm"
#: Input suffixes dropped from a case's name (``series.zip`` -> ``series``); NIfTI suffixes are dropped as well.
DICOM_INPUT_SUFFIXES = (".zip", ".dcm")
SUMMARY_FILENAME = "summary.csv"
SUMMARY_COLUMNS = ("case", "status", "liver_ml", "lesion_ml", "seconds", "error", "input", "output")

#: Case statuses in the batch summary.
STATUS_OK = "ok"
STATUS_BAD_INPUT = "bad_input"
STATUS_FAILED = "failed"
STATUS_UNAVAILABLE = "server_unavailable"
STATUS_SKIPPED = "skipped"


# -- paths --------------------------------------------------------------------------------------------------------


def case_name(scan_path: Path) -> str:
    """``x`` for ``x.nii`` / ``x.nii.gz`` / ``x.zip`` / ``x.dcm``; the folder's name for a DICOM series folder."""
    name = scan_path.name
    for suffix in sorted(NIFTI_SUFFIXES + DICOM_INPUT_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def default_output_path(scan_path: Path) -> Path:
    """``<stem>_seg.nii.gz`` beside the input (beside the folder, for a DICOM series folder)."""
    scan_path = Path(os.path.abspath(scan_path))
    return scan_path.parent / f"{case_name(scan_path)}{OUTPUT_SUFFIX}.nii.gz"


def is_dicom_seg_path(path: Path) -> bool:
    """Whether the label output ``path`` asks for a DICOM SEG (it ends in ``.dcm``)."""
    return path.name.lower().endswith(DICOM_SEG_SUFFIX)


def check_output_path(output: Path, scan_path: Path, what: str = "output", allow_dicom: bool = False) -> None:
    """Refuse an output that is not NIfTI (or, with ``allow_dicom``, ``.dcm``), is a folder, or is the input."""
    if not is_nifti(output) and not (allow_dicom and is_dicom_seg_path(output)):
        endings = ".nii, .nii.gz or .dcm (DICOM SEG)" if allow_dicom else ".nii or .nii.gz"
        raise InputError(f"{output}: the {what} must end in {endings}")
    if output.is_dir():
        raise InputError(f"{output}: the {what} is a folder")
    if output.exists() and scan_path.exists() and output.resolve() == scan_path.resolve():
        raise InputError(f"{output}: refusing to overwrite the input scan")


# -- one case -----------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    status: str
    liver_ml: float | None = None
    lesion_ml: float | None = None
    seconds: float | None = None
    error: str = ""
    input: str = ""
    output: str = ""


def segment_file(
    client: SegmentationClient,
    scan_path: Path,
    output: Path,
    postprocess: bool = True,
    probabilities_output: Path | None = None,
    scan: Scan | None = None,
) -> CaseResult:
    """Read ``scan_path`` (unless ``scan`` is it, already read), segment it, write the labels (and probabilities)
    on the input's grid: NIfTI, or a DICOM SEG on the source images when ``output`` ends in ``.dcm``."""
    start = time.perf_counter()
    if scan is None:
        scan = read_scan(scan_path)
    if probabilities_output is None:
        labels = client.segment_scan(scan, postprocess=postprocess)
    else:
        labels, probabilities = client.segment_scan_with_probabilities(scan, postprocess=postprocess)
        # NIfTI keeps the three spatial axes first; classes go on the fourth axis.
        write_nifti(probabilities_output, np.moveaxis(probabilities, 0, -1), scan.affine)
    write_labels(output, labels, scan, client.model)
    volumes = label_volumes_ml(labels, scan.affine, (ORGAN_LABEL, LESION_LABEL))
    return CaseResult(
        case=case_name(scan_path),
        status=STATUS_OK,
        liver_ml=volumes[ORGAN_LABEL],
        lesion_ml=volumes[LESION_LABEL],
        seconds=time.perf_counter() - start,
        input=str(scan_path),
        output=str(output),
    )


def write_labels(output: Path, labels: np.ndarray, scan: Scan, model: str = DEFAULT_MODEL) -> Path:
    """Write ``labels`` (on ``scan``'s stored grid) as NIfTI, or as a DICOM SEG when ``output`` ends in ``.dcm``."""
    if is_dicom_seg_path(output):
        return write_dicom_seg(output, labels, scan, algorithm_name=f"mixsup {model}")
    return write_nifti(output, labels, scan.affine)


def summary_line(result: CaseResult) -> str:
    return (
        f"{result.output}: liver {result.liver_ml:.1f} mL, lesion {result.lesion_ml:.1f} mL "
        f"({result.seconds:.1f} s)"
    )


def _client(args: argparse.Namespace) -> SegmentationClient:
    for flag, value in (("--timeout", args.timeout), ("--connect-timeout", args.connect_timeout)):
        if not value > 0:
            raise InputError(f"{flag} {value:g}: must be a positive number of seconds")
    return SegmentationClient(
        url=args.url, model=args.model, timeout_s=args.timeout, connect_timeout_s=args.connect_timeout
    )


# -- segment ------------------------------------------------------------------------------------------------------


def cmd_segment(args: argparse.Namespace) -> int:
    scan_path = Path(args.scan)
    if not scan_path.exists():
        raise InputError(f"{scan_path}: no such file or folder")
    output = Path(args.output) if args.output else default_output_path(scan_path)
    check_output_path(output, scan_path, allow_dicom=True)
    probabilities_output = Path(args.probabilities) if args.probabilities else None
    if probabilities_output is not None:
        check_output_path(probabilities_output, scan_path, "probabilities output")
        if probabilities_output.resolve() == output.resolve():
            raise InputError(f"{output}: labels and probabilities cannot go to the same file")
    scan = read_scan(scan_path, args.series)  # a bad input exits 2 before the server is contacted
    source = dicom_source(scan)
    if source is not None and source.note:
        print(f"{PROG}: {source.note}", file=sys.stderr)
    if is_dicom_seg_path(output):
        check_seg_possible(scan, output)
    with _client(args) as client:
        client.ensure_ready()
        result = segment_file(client, scan_path, output, not args.no_postprocess, probabilities_output, scan)
    print(summary_line(result))
    return EXIT_OK


# -- health -------------------------------------------------------------------------------------------------------


def health_line(report: dict) -> str:
    server = "live" if report["server_live"] else "not live"
    server += ", ready" if report["server_ready"] else ", not ready"
    model = f"model {report['model']!r} " + ("ready" if report["model_ready"] else "not ready")
    if report["versions"]:
        model += f" (versions {', '.join(report['versions'])})"
    return f"{report['url']}: server {server}; {model}"


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = client.health()
    print(json.dumps(report, sort_keys=True) if args.json else health_line(report))
    return EXIT_OK if report["ready"] else EXIT_UNAVAILABLE


# -- batch --------------------------------------------------------------------------------------------------------


def _is_label_map(path: Path) -> bool:
    """Label maps beside the scans: our own outputs and LiTS's ``segmentation-N`` files."""
    stem = case_name(path)
    return stem.endswith(OUTPUT_SUFFIX) or stem.lower().startswith("segmentation-")


def _looks_like_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``.dcm`` file or a file with the DICOM preamble (checks until the first hit)."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix.lower() == ".dcm":
            return True
        try:
            with path.open("rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def _scans_in_folder(folder: Path, exclude: Path | None) -> list[Path]:
    scans = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or (exclude is not None and entry.resolve() == exclude):
            continue
        if entry.is_file() and is_nifti(entry) and not _is_label_map(entry):
            scans.append(entry)
        elif entry.is_dir() and _looks_like_dicom_folder(entry):
            scans.append(entry)
    return scans


def _scans_in_list(list_file: Path) -> list[Path]:
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_file}: cannot read the list of scans ({exc})") from None
    scans = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            scans.append(path if path.is_absolute() else list_file.parent / path)
    return scans


def collect_scans(source: Path, output_dir: Path | None = None) -> list[Path]:
    """The scans a batch run segments: a folder's NIfTI files and DICOM series sub-folders, a NIfTI file, or the
    paths listed in a text file (relative paths are relative to the list). Label maps and ``output_dir`` are
    skipped."""
    if source.is_dir():
        exclude = output_dir.resolve() if output_dir is not None else None
        scans = _scans_in_folder(source, exclude)
        if not scans:
            raise InputError(f"{source}: no NIfTI files or DICOM series folders found")
        return scans
    if not source.is_file():
        raise InputError(f"{source}: no such file or folder")
    if is_nifti(source):
        return [source]
    scans = _scans_in_list(source)
    if not scans:
        raise InputError(f"{source}: the list of scans is empty")
    return scans


def write_summary(path: Path, results: Sequence[CaseResult]) -> Path:
    """The batch summary as CSV, written atomically."""
    with atomic_path(path, ".csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for result in results:
            row = asdict(result)
            for key in ("liver_ml", "lesion_ml"):
                row[key] = "" if row[key] is None else f"{row[key]:.2f}"
            row["seconds"] = "" if row["seconds"] is None else f"{row['seconds']:.2f}"
            writer.writerow({key: row[key] for key in SUMMARY_COLUMNS})
    return path


def _status_for(error: BaseException) -> str:
    if isinstance(error, ServerUnavailable):
        return STATUS_UNAVAILABLE
    if isinstance(error, InputError):
        return STATUS_BAD_INPUT
    return STATUS_FAILED


def batch_exit_code(results: Sequence[CaseResult]) -> int:
    """3 if the server went away, else 2 if some inputs were bad, else 1 if some cases failed, else 0."""
    statuses = {result.status for result in results}
    if STATUS_UNAVAILABLE in statuses or STATUS_SKIPPED in statuses:
        return EXIT_UNAVAILABLE
    if STATUS_BAD_INPUT in statuses:
        return EXIT_BAD_INPUT
    if STATUS_FAILED in statuses:
        return EXIT_FAILURE
    return EXIT_OK


def run_batch(
    client: SegmentationClient,
    scans: Sequence[Path],
    output_dir: Path,
    jobs: int = 1,
    postprocess: bool = True,
    debug: bool = False,
) -> list[CaseResult]:
    """Segment every scan into ``output_dir``; one :class:`CaseResult` per scan, in the order given.

    A failing case is recorded and the run continues; once the server is unreachable the remaining cases are
    skipped rather than each waiting to fail.
    """
    server_gone = threading.Event()
    print_lock = threading.Lock()
    seen: dict[str, Path] = {}
    duplicates: dict[int, str] = {}
    for index, scan_path in enumerate(scans):
        name = case_name(scan_path)
        if name in seen:
            duplicates[index] = f"same case name as {seen[name]}"
        seen.setdefault(name, scan_path)

    def one(index: int) -> CaseResult:
        scan_path = Path(scans[index])
        name = case_name(scan_path)
        output = output_dir / f"{name}{OUTPUT_SUFFIX}.nii.gz"
        if server_gone.is_set():
            result = CaseResult(name, STATUS_SKIPPED, error="server unavailable", input=str(scan_path))
        elif index in duplicates:
            result = CaseResult(name, STATUS_BAD_INPUT, error=duplicates[index], input=str(scan_path))
        else:
            start = time.perf_counter()
            try:
                result = segment_file(client, scan_path, output, postprocess)
            except Exception as exc:  # noqa: BLE001 - one bad case must not end the run
                if debug:
                    import traceback

                    traceback.print_exc()
                status = _status_for(exc)
                if status == STATUS_UNAVAILABLE:
                    server_gone.set()
                message = str(exc) if isinstance(exc, MixsupError) else f"{type(exc).__name__}: {exc}"
                message = (message.strip().splitlines() or [""])[0]
                result = CaseResult(
                    name, status, seconds=time.perf_counter() - start, error=message, input=str(scan_path)
                )
        with print_lock:
            if result.status == STATUS_OK:
                print(f"{STATUS_OK:<10} {result.case}: {summary_line(result)}", flush=True)
            else:
                print(f"{PROG}: {result.case}: {result.status}: {result.error}", file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, range(len(scans))))


def cmd_batch(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir}: not a folder")
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be at least 1")
    scans = collect_scans(Path(args.inputs), output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        client.ensure_ready()
        client.contract()  # once, before the workers, so a wrong --model fails the run, not every case
        results = run_batch(client, scans, output_dir, args.jobs, not args.no_postprocess, args.debug)
    summary = write_summary(output_dir / SUMMARY_FILENAME, results)
    counts = {status: sum(r.status == status for r in results) for status in dict.fromkeys(r.status for r in results)}
    print(f"{len(results)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; summary: {summary}")
    return batch_exit_code(results)


# -- parser -------------------------------------------------------------------------------------------------------


def _server_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC endpoint HOST:PORT (default {DEFAULT_URL})")
    options.add_argument("--model", default=DEFAULT_MODEL, help=f"served model name (default {DEFAULT_MODEL})")
    options.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds one inference may take (default %(default)g)"
    )
    options.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        help="seconds a health or metadata call may take (default %(default)g)",
    )
    add_debug_flag(options)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Segment CT scans with a mixsup model on Triton.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = _server_options()

    segment = commands.add_parser("segment", parents=[server], help="segment one scan (NIfTI file or DICOM folder)")
    segment.add_argument(
        "scan", metavar="SCAN", help="a .nii / .nii.gz file, or DICOM: a series folder, a .zip of one, or a file"
    )
    segment.add_argument(
        "-o", "--output",
        help="label map to write: .nii / .nii.gz, or .dcm for a DICOM SEG (DICOM input only; default: "
        "<stem>_seg.nii.gz beside SCAN)",
    )
    segment.add_argument(
        "--series", metavar="UID", help="SeriesInstanceUID to segment when the DICOM input holds several series"
    )
    segment.add_argument("--no-postprocess", action="store_true", help="write the server's raw argmax labels")
    segment.add_argument(
        "--probabilities", metavar="OUT_PROB.nii.gz", help="also write the class probabilities (float32, [X,Y,Z,C])"
    )
    segment.set_defaults(handler=cmd_segment)

    health = commands.add_parser("health", parents=[server], help="check that the server and the model are ready")
    health.add_argument("--json", action="store_true", help="print the report as JSON")
    health.set_defaults(handler=cmd_health)

    batch = commands.add_parser("batch", parents=[server], help="segment every scan of a folder or a list file")
    batch.add_argument("inputs", metavar="INPUT_DIR_OR_LIST", help="a folder of scans or a text file of paths")
    batch.add_argument("-o", "--output-dir", required=True, help="folder for <case>_seg.nii.gz and summary.csv")
    batch.add_argument("--jobs", type=int, default=1, help="cases in flight at once (threads; default 1)")
    batch.add_argument("--no-postprocess", action="store_true", help="write the server's raw argmax labels")
    batch.set_defaults(handler=cmd_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, build_parser(), lambda args: args.handler(args), argv)


if __name__ == "__main__":
    sys.exit(main())
