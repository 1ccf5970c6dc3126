"""``mixsup-client``: segment scans with a mixsup model served on Triton, check its health, score archives.

* ``mixsup-client segment SCAN [-o OUT.nii.gz | -o OUT.dcm] [--series UID] [--probabilities P.nii.gz|P.npz]
  [--preview P.png] [--stats S.json]`` -- SCAN is a NIfTI file or DICOM: a series folder, a ``.zip`` of one, or a
  (multi-frame) DICOM file. When the DICOM input holds several series the axial CT series with the most slices is
  taken and named in one line on stderr; ``--series`` picks another (:mod:`mixsup.dicom` has the rule). The label
  map (uint8: 0 background, 1 liver, 2 lesion) is written on the input's exact grid (same shape and affine), by
  default beside the input as ``<stem>_seg.nii.gz``; an output ending in ``.dcm`` is a DICOM SEG referencing the
  source images (DICOM input only). Probabilities are 16-bit, the preview is a PNG montage, the stats are JSON
  (:mod:`mixsup.clients.outputs`). Every file is replaced atomically; the input itself is never overwritten.
* ``mixsup-client annotate SCAN --boxes BOXES.json -o OUT.nii.gz [--model annotator]`` -- "draw a box, get a
  mask": the teacher-student teacher served as a box-prompted annotator labels the slices that carry boxes; the
  labels are kept inside the boxes only (:mod:`mixsup.clients.annotate` has the box format and the rules).
* ``mixsup-client health`` -- one line of readiness; exit 0 when the server and the model are ready, else 3.
* ``mixsup-client batch INPUT... -o OUT_DIR [--url A --url B] [--jobs N] [--retry-seconds S] [--overwrite]`` --
  INPUTs are folders (walked recursively), globs, CSV or text lists (:mod:`mixsup.clients.inputs`); the run is
  :mod:`mixsup.clients.batch` (summary, resume, retries, exit code).

Exit codes (DESIGN.md): 0 success, 2 bad usage or bad input, 3 server unreachable / not ready, 1 anything else.
Input is read and checked before the server is contacted, so a bad scan exits 2 whatever the server's state.
Log lines name files and cases, never the patient (DICOM notes name series by number and UID only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from mixsup.clients.annotate import DEFAULT_ANNOTATOR_MODEL, AnnotatorClient, check_boxes_shape, load_boxes
from mixsup.clients.batch import BatchOptions, batch_exit_code, run_batch
from mixsup.clients.client import SegmentationClient
from mixsup.clients.inputs import case_name, collect_cases, unique_cases
from mixsup.clients.outputs import (
    JSON_SUFFIX,
    PNG_SUFFIX,
    is_dicom_seg_path,
    is_probability_path,
    write_outputs,
)
from mixsup.clients.protocol import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_MODEL, DEFAULT_TIMEOUT_S, DEFAULT_URL
from mixsup.clients.result import ScanSegmenter, segment_to_result
from mixsup.clients.servers import DEFAULT_RETRY_SECONDS, ServerPool
from mixsup.clients.shm import SHM_MODES
from mixsup.clients.summary import STATUS_OK, SUMMARY_FILENAME, CaseResult, absolute_input
from mixsup.dicom import dicom_source
from mixsup.dicom_seg import check_seg_possible
from mixsup.errors import EXIT_OK, EXIT_UNAVAILABLE, InputError, ServerUnavailable, add_debug_flag, run_command
from mixsup.readers import read_scan
from mixsup.scan import Scan, is_nifti, write_nifti

PROG = "mixsup-client"
OUTPUT_SUFFIX = "_seg"


# -- paths --------------------------------------------------------------------------------------------------------


def default_output_path(scan_path: Path) -> Path:
    """``<stem>_seg.nii.gz`` beside the input (beside the folder, for a DICOM series folder)."""
    scan_path = Path(os.path.abspath(scan_path))
    return scan_path.parent / f"{case_name(scan_path)}{OUTPUT_SUFFIX}.nii.gz"


def check_output_path(output: Path, scan_path: Path, what: str, allowed: str, ok: bool) -> None:
    """Refuse an output of the wrong kind (``ok`` False: it does not end in ``allowed``), a folder, or the input."""
    if not ok:
        raise InputError(f"{output}: the {what} must end in {allowed}")
    if output.is_dir():
        raise InputError(f"{output}: the {what} is a folder")
    if output.exists() and scan_path.exists() and output.resolve() == scan_path.resolve():
        raise InputError(f"{output}: refusing to overwrite the input scan")


# -- one case -----------------------------------------------------------------------------------------------------


def segment_file(
    client: ScanSegmenter,
    scan_path: Path,
    output: Path,
    postprocess: bool = True,
    probabilities_output: Path | None = None,
    scan: Scan | None = None,
    preview_output: Path | None = None,
    stats_output: Path | None = None,
) -> CaseResult:
    """Read ``scan_path`` (unless ``scan`` is it, already read), segment it with ``client``, write the labels on the
    input's grid (NIfTI, or a DICOM SEG when ``output`` ends in ``.dcm``) and every other output asked for."""
    start = time.perf_counter()
    if scan is None:
        scan = read_scan(scan_path)
    result = segment_to_result(client, scan, postprocess, probabilities=probabilities_output is not None)
    # A stand-in segmenter (tests) has no contract; the class names only label the optional outputs.
    class_names = client.contract().class_names if isinstance(client, SegmentationClient) else ()
    write_outputs(result, scan, output, probabilities_output, preview_output, stats_output, class_names)
    return CaseResult(
        case=case_name(scan_path), status=STATUS_OK, seconds=time.perf_counter() - start, attempts=1,
        server=str(getattr(client, "url", "")), input=absolute_input(scan_path), output=str(output),
    ).with_stats(result.stats)


def summary_line(result: CaseResult) -> str:
    """``OUT: liver ... mL, N lesions ... mL (burden ...) (T s)``."""
    stats = f"liver {result.liver_ml:.1f} mL, {result.lesion_count} lesion(s) {result.lesion_ml:.1f} mL"
    if result.tumour_burden is not None:
        stats += f" (burden {100 * result.tumour_burden:.2f} %)"
    return f"{result.output}: {stats} ({result.seconds:.1f} s)"


def _check_timeouts(args: argparse.Namespace) -> None:
    for flag, value in (("--timeout", args.timeout), ("--connect-timeout", args.connect_timeout)):
        if not value > 0:
            raise InputError(f"{flag} {value:g}: must be a positive number of seconds")


def _client(args: argparse.Namespace, url: str | None = None) -> SegmentationClient:
    _check_timeouts(args)
    return SegmentationClient(
        url=url or args.url, model=args.model, timeout_s=args.timeout, connect_timeout_s=args.connect_timeout,
        shared_memory=getattr(args, "shm", "auto"), single_scale=getattr(args, "single_scale", False),
    )


def _first_ready_client(args: argparse.Namespace) -> SegmentationClient:
    """A client of the first server in ``--url`` order whose model is ready (a scan needs only one); the last
    server's reason when none is."""
    error: ServerUnavailable | None = None
    for url in dict.fromkeys(args.url or [DEFAULT_URL]):
        client = _client(args, url)
        try:
            client.ensure_ready()
            return client
        except ServerUnavailable as exc:
            client.close()
            error = exc
    raise error


# -- segment ------------------------------------------------------------------------------------------------------


def cmd_segment(args: argparse.Namespace) -> int:
    scan_path = Path(args.scan)
    if not scan_path.exists():
        raise InputError(f"{scan_path}: no such file or folder")
    output = Path(args.output) if args.output else default_output_path(scan_path)
    check_output_path(
        output, scan_path, "output", ".nii, .nii.gz or .dcm (DICOM SEG)", is_nifti(output) or is_dicom_seg_path(output)
    )
    extras = {
        "probabilities": (args.probabilities, ".nii, .nii.gz or .npz", is_probability_path),
        "preview": (args.preview, PNG_SUFFIX, lambda p: str(p).lower().endswith(PNG_SUFFIX)),
        "stats": (args.stats, JSON_SUFFIX, lambda p: str(p).lower().endswith(JSON_SUFFIX)),
    }
    paths: dict[str, Path | None] = {}
    seen = {output.resolve()}
    for what, (value, allowed, accepts) in extras.items():
        paths[what] = Path(value) if value else None
        if paths[what] is not None:
            check_output_path(paths[what], scan_path, f"{what} output", allowed, accepts(paths[what]))
            if paths[what].resolve() in seen:
                raise InputError(f"{paths[what]}: two outputs cannot go to the same file")
            seen.add(paths[what].resolve())
    scan = read_scan(scan_path, args.series)  # a bad input exits 2 before the server is contacted
    source = dicom_source(scan)
    if source is not None and source.note:
        print(f"{PROG}: {source.note}", file=sys.stderr)
    if is_dicom_seg_path(output):
        check_seg_possible(scan, output)
    with _first_ready_client(args) as client:
        result = segment_file(
            client, scan_path, output, not args.no_postprocess, paths["probabilities"], scan, paths["preview"],
            paths["stats"],
        )
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


def _note(line: str) -> None:
    # tqdm.write keeps a progress bar intact, and is a plain print without one. Imported here: tqdm takes 0.1 s
    # to import, a twentieth of a whole `segment`, which never shows a bar.
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {line}", file=sys.stderr)


def cmd_batch(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir}: not a folder")
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be at least 1")
    if not args.retry_seconds >= 0:
        raise InputError(f"--retry-seconds {args.retry_seconds:g}: must be 0 or more")
    _check_timeouts(args)
    collected = collect_cases(args.inputs, output_dir)
    cases, renamed = unique_cases(collected.cases)
    for note in collected.notes:
        _note(note)
    if renamed:
        _note(f"{renamed} case name(s) occur more than once; the later ones get -2, -3, ...")
    urls = list(dict.fromkeys(args.url or [DEFAULT_URL]))
    clients = [_client(args, url) for url in urls]
    try:
        pool = ServerPool(clients, retry_seconds=args.retry_seconds, notify=_note)
        options = BatchOptions(
            output_dir=output_dir, jobs=args.jobs, postprocess=not args.no_postprocess,
            probabilities=args.probabilities, preview=args.preview, stats=args.stats, dicom_seg=args.dicom_seg,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None, debug=args.debug,
        )
        results, skipped = run_batch(cases, pool, options, PROG)
    finally:
        for client in clients:
            client.close()
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    done = ", ".join(f"{count} {status}" for status, count in counts.items())
    already = f" ({skipped} already done, skipped)" if skipped else ""
    cases_word = "case" if len(results) == 1 else "cases"
    print(f"{len(results)} {cases_word}: {done}{already}; summary: {output_dir / SUMMARY_FILENAME}")
    return batch_exit_code(results)


# -- annotate -----------------------------------------------------------------------------------------------------


def cmd_annotate(args: argparse.Namespace) -> int:
    scan_path = Path(args.scan)
    if not scan_path.exists():
        raise InputError(f"{scan_path}: no such file or folder")
    output = Path(args.output)
    check_output_path(output, scan_path, "output", ".nii or .nii.gz", is_nifti(output))
    boxes, boxes_shape = load_boxes(args.boxes)  # bad boxes or a bad scan exit 2 before the server is contacted
    scan = read_scan(scan_path, args.series)
    check_boxes_shape(scan, boxes_shape)
    source = dicom_source(scan)
    if source is not None and source.note:
        print(f"{PROG}: {source.note}", file=sys.stderr)
    _check_timeouts(args)
    start = time.perf_counter()
    with AnnotatorClient(args.url, args.model, args.timeout, args.connect_timeout) as client:
        client.ensure_ready()
        labels = client.annotate_scan(scan, boxes, boxes_shape)
    write_nifti(output, labels, scan.affine)
    slices = len({box.slice for box in boxes})
    print(f"{output}: {slices} slice(s) annotated from {len(boxes)} box(es), liver {int((labels == 1).sum())} "
          f"lesion {int((labels == 2).sum())} voxels ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------------------


def _server_options(several_urls: bool = False, model: str = DEFAULT_MODEL,
                    segmenting: bool = False) -> argparse.ArgumentParser:
    """Options of the commands that talk to a server; ``segmenting``: also those of the ones that segment scans."""
    options = argparse.ArgumentParser(add_help=False)
    if several_urls:
        options.add_argument(
            "--url", action="append", metavar="HOST:PORT",
            help=f"Triton gRPC endpoint; repeat for several servers: batch spreads the scans over them, segment "
                 f"uses the first that is ready (default {DEFAULT_URL})",
        )
    else:
        options.add_argument(
            "--url", default=DEFAULT_URL, help=f"Triton gRPC endpoint HOST:PORT (default {DEFAULT_URL})"
        )
    options.add_argument("--model", default=model, help=f"served model name (default {model})")
    options.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds one inference may take (default %(default)g)"
    )
    options.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        help="seconds a health or metadata call may take (default %(default)g)",
    )
    if segmenting:
        options.add_argument(
            "--shm", choices=SHM_MODES, default="auto",
            help="pass the volume and labels through /dev/shm: auto (default) when the server is on a loopback "
                 "address, on, off",
        )
        options.add_argument(
            "--single-scale", action="store_true",
            help="run the model at its training spacing only, not at each of the test spacings its contract names "
                 "(faster, a little less accurate)",
        )
    add_debug_flag(options)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Segment CT scans with a mixsup model on Triton.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = _server_options()

    segment = commands.add_parser("segment", parents=[_server_options(several_urls=True, segmenting=True)],
                                  help="segment one scan (NIfTI file or DICOM folder)")
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
    segment.add_argument("--no-postprocess", action="store_true",
                         help="write the raw labels (the argmax, or the contract's lesion threshold)")
    segment.add_argument(
        "--probabilities", metavar="OUT_PROB",
        help="also write the class probabilities, 16-bit: .nii/.nii.gz (int16 scaled by 1/32767, [X,Y,Z,C]) or "
        ".npz (float16 [C,X,Y,Z] with the affine)",
    )
    segment.add_argument(
        "--preview", metavar="OUT.png", help="also write a PNG montage of axial slices with the liver and lesions"
    )
    segment.add_argument(
        "--stats", metavar="OUT.json", help="also write volumes (mL), lesions and tumour burden as JSON"
    )
    segment.set_defaults(handler=cmd_segment)

    health = commands.add_parser("health", parents=[server], help="check that the server and the model are ready")
    health.add_argument("--json", action="store_true", help="print the report as JSON")
    health.set_defaults(handler=cmd_health)

    batch = commands.add_parser(
        "batch", parents=[_server_options(several_urls=True, segmenting=True)],
        help="segment every scan of folders, globs or lists (CSV or text)",
    )
    batch.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="a folder (walked recursively: NIfTI files and DICOM series folders), a quoted glob, a .csv with a "
        "'path' column (and optionally 'case'), a text file of paths, or one scan",
    )
    batch.add_argument("-o", "--output-dir", required=True, help="folder for <case>_seg.nii.gz and summary.csv")
    batch.add_argument("--jobs", type=int, default=1, help="scans in flight at once, over all servers (default 1)")
    batch.add_argument(
        "--retry-seconds", type=float, default=DEFAULT_RETRY_SECONDS,
        help="how long a scan waits for an unreachable server (exponential backoff) before it is marked "
        "server_unavailable (default %(default)g)",
    )
    batch.add_argument(
        "--overwrite", action="store_true", help="redo scans that summary.csv already lists as ok (default: skip)"
    )
    batch.add_argument("--no-postprocess", action="store_true",
                       help="write the raw labels (the argmax, or the contract's lesion threshold)")
    batch.add_argument("--probabilities", action="store_true", help="also write <case>_prob.nii.gz (16-bit)")
    batch.add_argument("--preview", action="store_true", help="also write <case>_preview.png")
    batch.add_argument("--stats", action="store_true", help="also write <case>_stats.json")
    batch.add_argument("--dicom-seg", action="store_true",
                       help="DICOM inputs get <case>_seg.dcm, a DICOM SEG on the source series (NIfTI inputs: .nii.gz)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    batch.set_defaults(handler=cmd_batch)

    annotate = commands.add_parser(
        "annotate", parents=[_server_options(model=DEFAULT_ANNOTATOR_MODEL)],
        help="draw a box, get a mask: label one scan from organ and lesion boxes with the served annotator",
    )
    annotate.add_argument(
        "scan", metavar="SCAN", help="a .nii / .nii.gz file, or DICOM: a series folder, a .zip of one, or a file"
    )
    annotate.add_argument(
        "--boxes", required=True, metavar="BOXES.json",
        help="boxes file as mixsup-data phantoms writes it (boxes/boxes-N.json): per-slice organ (1) and lesion (2) "
        "boxes on the scan's canonical [D, H, W] grid",
    )
    annotate.add_argument("-o", "--output", required=True, help="label map to write (.nii / .nii.gz)")
    annotate.add_argument(
        "--series", metavar="UID", help="SeriesInstanceUID to annotate when the DICOM input holds several series"
    )
    annotate.set_defaults(handler=cmd_annotate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, build_parser(), lambda args: args.handler(args), argv)


if __name__ == "__main__":
    sys.exit(main())
