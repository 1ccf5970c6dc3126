"""``mixsup-export CKPT --repository DIR --name NAME``: a checkpoint becomes a served member of an ensemble.

Writes ``DIR/NAME`` (the network) and ``DIR/NAME_window`` (its sliding-window step), then the ensemble it joins
(``DIR/segment`` and, once it has two members, its ``DIR/fuse``; or E and ``E_fuse`` with ``--member E``). Only
the recipe's segmentation path is exported (its auxiliary heads stay in training), with the HU window as its first
op and a softmax on top.

Formats: ``onnx`` (default) runs on ONNX Runtime inside Triton's python backend, or with ``--backend onnxruntime``
on Triton's native onnxruntime platform (``--tensorrt-accelerator`` adds TensorRT there); ``torchscript`` gives a
``pytorch_libtorch`` model; ``tensorrt`` a ``tensorrt_plan`` engine (needs TensorRT and a CUDA GPU here). Every
export is checked against PyTorch on raw-HU probes of several shapes: within 1e-4 in fp32, 1e-2 in fp16.

Ensembles: a new ensemble starts with NAME alone; an existing one is extended only with ``--member E`` (NAME
added with ``--weight``, or its weight changed), so several folds or recipes are averaged with chosen weights.
Without ``--member`` an existing ``segment`` is never merged into: that is an error unless NAME is already one of
its members or ``--replace`` makes NAME its only member. A NAME already in the repository is refused unless
``--replace``.

Models beside the ensembles, always fp32 ONNX on ONNX Runtime in the python backend, each with its own contract:
``--keep-detection`` (msdn) adds ``NAME_detection``: probabilities plus up to ``--max-detections`` boxes per
slice, non-max-suppressed per class; ``--keep-confidence`` (asdnet) adds ``NAME_confidence``: probabilities plus
the confidence map; ``--teacher`` (teacher-student) exports the teacher instead of the student, as the
box-prompted annotator ``NAME`` (inputs ``image`` and ``boxes``), outside every ensemble.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mixsup.errors import InputError, add_debug_flag, run_command
from mixsup.export.parity import PARITY_TOLERANCE
from mixsup.serving.runtime import DEVICES
from mixsup.stacks import DEFAULT_MAX_SLICE

if TYPE_CHECKING:  # pragma: no cover
    from mixsup.contract import ModelContract
    from mixsup.export.detection import DetectionSettings

FORMATS = ("onnx", "torchscript", "tensorrt")
BACKENDS = ("python", "onnxruntime")
#: Tiles per request from the window step, and the most the network model takes at once (dynamic batching).
WINDOW_BATCH, MAX_BATCH_SIZE = 8, 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixsup-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repository", required=True, type=Path, help="Triton model repository folder")
    parser.add_argument("--name", required=True, help="model name in the repository, e.g. unet")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="exported graph format (default onnx)")
    parser.add_argument("--precision", default="fp32", choices=sorted(PARITY_TOLERANCE),
                        help="fp16: half-precision weights and math (onnx, tensorrt); input and output stay fp32")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="Triton backend of an onnx export: python (ONNX Runtime in the python backend; the "
                             "default, and what the bundled server runs) or onnxruntime (native, NGC containers)")
    parser.add_argument("--tensorrt-accelerator", action="store_true",
                        help="with --backend onnxruntime: run through ONNX Runtime's TensorRT execution provider")
    parser.add_argument("--trt-cache-dir", help="where Triton keeps TensorRT engines on the serving host "
                                                "(--tensorrt-accelerator; default /tmp/mixsup_trt_cache/NAME)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite an existing model of this name (with its window and extras); an existing "
                             "ensemble it is not in gets it as its only member")
    parser.add_argument("--patch-size", type=int, help="sliding-window tile size (default: the checkpoint's)")
    parser.add_argument("--max-slice", type=int, default=DEFAULT_MAX_SLICE, metavar="PIXELS",
                        help="model-grid slices up to this size a side (after padding) are run whole, larger ones in "
                             f"tiles of --patch-size; 0: always tiles (default {DEFAULT_MAX_SLICE})")
    parser.add_argument("--test-spacings", type=float, nargs="+", metavar="MM",
                        help="in-plane spacings (mm) the client runs the model at, averaging the probabilities on "
                             "the scan's grid (multi-scale test-time augmentation; each costs one more run), e.g. "
                             "1.3 1.6 2.0; default: those of the --member ensemble's members, else the training "
                             "spacing alone")
    parser.add_argument("--lesion-threshold", type=float, metavar="P",
                        help="label lesion wherever p(lesion) exceeds P inside the argmax's liver-or-lesion region "
                             "(choose P on a selection set, never an evaluation set); default: the argmax")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--instances", type=int, default=1,
                        help="Triton instances of the network model (and of its window step, which runs a "
                             "python-runtime network in its own process)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where the python backend runs the ONNX models: auto (a GPU, else OpenVINO -- bfloat16 "
                             "on CPUs with AMX -- where installed, else ONNX Runtime), cpu (ONNX Runtime float32, "
                             "exactly), openvino, cuda, tensorrt (default auto)")
    parser.add_argument("--no-ensemble", action="store_true", help="write the network and its window step only")
    ensembles = parser.add_argument_group("ensembles")
    ensembles.add_argument("--member", metavar="ENSEMBLE",
                           help="add the network to this sliding-window ensemble (created if missing, extended "
                                "if it exists), e.g. segment or folds")
    ensembles.add_argument("--weight", type=float,
                           help="the network's weight in --member's ensemble (default 1; weights are normalized)")
    beside = parser.add_argument_group("models beside the ensembles (fp32 ONNX, python backend)")
    beside.add_argument("--keep-detection", action="store_true",
                        help="msdn: also write NAME_detection, probabilities plus per-slice boxes, scores, classes")
    beside.add_argument("--max-detections", type=int, help="--keep-detection: boxes per slice (default 100)")
    beside.add_argument("--score-threshold", type=float,
                        help="--keep-detection: least score of a box, in [0, 1) (default 0.05)")
    beside.add_argument("--nms-iou", type=float,
                        help="--keep-detection: IoU above which a box of the same class is suppressed (default 0.5)")
    beside.add_argument("--keep-confidence", action="store_true",
                        help="asdnet: also write NAME_confidence, probabilities plus the confidence map")
    beside.add_argument("--teacher", action="store_true",
                        help="teacher-student: export the teacher as the box-prompted annotator NAME (inputs "
                             "image and boxes) instead of the student; it joins no ensemble")
    add_debug_flag(parser)
    return parser


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_options(args: argparse.Namespace) -> None:
    """Refuse flag combinations that have no meaning, before any work is done."""
    if args.backend is not None and args.format != "onnx":
        raise InputError(f"--backend chooses how an onnx export is served; --format {args.format} has its own")
    if args.tensorrt_accelerator and args.backend != "onnxruntime":
        raise InputError("--tensorrt-accelerator is an option of --backend onnxruntime")
    if args.trt_cache_dir and not args.tensorrt_accelerator:
        raise InputError("--trt-cache-dir only applies with --tensorrt-accelerator")
    if args.format == "torchscript" and args.precision == "fp16":
        raise InputError("--precision fp16 is for --format onnx or tensorrt; TorchScript is exported in fp32")
    if args.max_slice < 0:
        raise InputError(f"--max-slice must be 0 (always tile) or more, got {args.max_slice}")
    if args.instances < 1:
        raise InputError(f"--instances must be at least 1, got {args.instances}")
    if args.test_spacings is not None and not all(0 < mm < float("inf") for mm in args.test_spacings):
        raise InputError(f"--test-spacings must be positive millimetres, got {args.test_spacings}")
    if args.lesion_threshold is not None and not 0 < args.lesion_threshold < 1:
        raise InputError(f"--lesion-threshold must be a probability between 0 and 1, got {args.lesion_threshold}")
    if args.weight is not None and args.member is None:
        raise InputError("--weight is the weight of a --member; name the ensemble with --member")
    if args.member is not None and args.no_ensemble:
        raise InputError("--member adds the network to an ensemble; --no-ensemble says not to")
    detection_flags = [flag for flag, value in [("--max-detections", args.max_detections),
                                                ("--score-threshold", args.score_threshold),
                                                ("--nms-iou", args.nms_iou)] if value is not None]
    if detection_flags and not args.keep_detection:
        raise InputError(f"{detection_flags[0]} is an option of --keep-detection")
    if args.teacher:
        clashing = [flag for flag, given in [
            ("--format", args.format != "onnx"), ("--backend", args.backend is not None),
            ("--precision", args.precision != "fp32"), ("--member", args.member is not None),
            ("--keep-detection", args.keep_detection), ("--keep-confidence", args.keep_confidence),
            ("--test-spacings", args.test_spacings is not None),
            ("--lesion-threshold", args.lesion_threshold is not None)] if given]
        if clashing:
            raise InputError(f"--teacher writes an fp32 ONNX annotator for the python backend outside every "
                             f"ensemble; drop {clashing[0]}")
    if args.keep_detection:
        detection_settings(args).check()


def detection_settings(args: argparse.Namespace) -> DetectionSettings:
    """The ``--keep-detection`` options, defaults where not given."""
    from mixsup.export.detection import DetectionSettings

    given = {"max_detections": args.max_detections, "score_threshold": args.score_threshold,
             "iou_threshold": args.nms_iou}
    return DetectionSettings(**{key: value for key, value in given.items() if value is not None})


def export_contract(args: argparse.Namespace, payload: dict, divisor: int) -> ModelContract:
    """The checkpoint's contract with what this export decides: patch size, opset, precision, checkpoint, the
    network's size divisor (the window step pads whole slices to it) and the client's test spacings."""
    from mixsup.contract import ModelContract

    contract = ModelContract.from_dict(payload["contract"])
    patch = args.patch_size or contract.patch_size[0]
    if patch % divisor:
        raise InputError(f"--patch-size {patch} must be a multiple of {divisor} for this network")
    return contract.replace(
        patch_size=(patch, patch), opset=None if args.format == "torchscript" else args.opset,
        precision=args.precision, checkpoint=f"{args.checkpoint.name} sha256:{sha256_of(args.checkpoint)[:16]}",
        size_divisor=divisor, test_spacings_mm=tuple(args.test_spacings or ()),
        lesion_threshold=args.lesion_threshold,
    )


def handle_teacher(args: argparse.Namespace) -> int:
    """``--teacher``: the annotator model ``NAME``, outside every ensemble."""
    from mixsup.export.extras import annotator_model, export_auxiliary
    from mixsup.repository import check_network_name, list_ensembles, write_auxiliary
    from mixsup.training.trainer import load_checkpoint

    check_network_name(args.repository, args.name, args.replace)
    # An ensemble's window step would call the annotator as if it were its network, and fail.
    holding = [name for name, members in list_ensembles(args.repository).items()
               if any(member == args.name for member, _ in members)]
    if holding:
        raise InputError(f"{args.name!r} is a member of ensemble {holding[0]!r}; an annotator cannot take its place "
                         "(pick another --name)")
    payload = load_checkpoint(args.checkpoint)
    auxiliary = annotator_model(payload, export_contract(args, payload, 1))
    if auxiliary.contract.patch_size[0] % auxiliary.contract.size_divisor:
        raise InputError(f"--patch-size must be a multiple of {auxiliary.contract.size_divisor} for this teacher")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        parity = export_auxiliary(auxiliary, path, args.opset)
        write_auxiliary(args.repository, args.name, path, auxiliary.contract, instance_count=args.instances,
                        device=args.device, replace=args.replace)
    parameters = sum(parameter.numel() for parameter in auxiliary.module.parameters())
    print(f"mixsup-export: wrote {args.repository / args.name} (teacher as box-prompted annotator, ONNX opset "
          f"{args.opset} fp32, python backend, {parameters:,} parameters, parity {parity:.1e})")
    return 0


def handle(args: argparse.Namespace) -> int:
    """Export the checkpoint, write its repository entries and its ensembles; errors are MixsupErrors."""
    check_options(args)
    if args.teacher:
        return handle_teacher(args)
    from mixsup.contract import CONFIDENCE, DETECTION
    from mixsup.export.ensemble import joined_test_spacings, plan_ensembles
    from mixsup.export.extras import confidence_model, detection_model, export_auxiliary
    from mixsup.export.network import export_model
    from mixsup.export.tensorrt_export import require_tensorrt
    from mixsup.repository import (
        ShapeProfile,
        auxiliary_name,
        check_network_name,
        write_auxiliary,
        write_ensemble,
        write_network,
    )
    from mixsup.training.trainer import load_checkpoint, network_from_checkpoint

    if args.format == "tensorrt":
        require_tensorrt()
    check_network_name(args.repository, args.name, args.replace)  # before the work, not after
    payload = load_checkpoint(args.checkpoint)
    network = network_from_checkpoint(payload)
    contract = export_contract(args, payload, getattr(network, "size_divisor", 1))
    if args.test_spacings is None:
        contract = contract.replace(test_spacings_mm=joined_test_spacings(args.repository, args.name, args.member))
    plans = plan_ensembles(args.repository, args.name, contract, args.member,
                           1.0 if args.weight is None else args.weight, args.replace, write=not args.no_ensemble)
    extras = []
    extra_contract = contract.replace(opset=args.opset, precision="fp32")  # whatever the network's format
    if args.keep_detection:
        extras.append(detection_model(payload, extra_contract, detection_settings(args)))
    if args.keep_confidence:
        extras.append(confidence_model(payload, extra_contract))
    patch = contract.patch_size[0]
    # The window step sends up to WINDOW_BATCH patch-sized tiles per request, or as many whole slices (any side
    # from the size divisor up to --max-slice).
    profile = ShapeProfile(batch=(1, WINDOW_BATCH, MAX_BATCH_SIZE),
                           side=(min(patch, contract.size_divisor), patch, max(patch, args.max_slice)))
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(args, network, contract, Path(tmp), profile)
        extra_paths = {}
        for extra in extras:
            extra_paths[extra.kind] = Path(tmp) / extra.kind / "model.onnx"
            export_auxiliary(extra, extra_paths[extra.kind], args.opset)
        write_network(args.repository, args.name, exported.path, contract, instance_count=args.instances,
                      device=args.device, max_batch_size=MAX_BATCH_SIZE, batch_size=WINDOW_BATCH,
                      runtime=exported.runtime,
                      accelerator=exported.accelerator, replace=args.replace, max_slice=args.max_slice)
        for extra in extras:
            write_auxiliary(args.repository, auxiliary_name(args.name, extra.kind), extra_paths[extra.kind],
                            extra.contract, instance_count=args.instances, device=args.device,
                            max_batch_size=MAX_BATCH_SIZE)
    for plan in plans:
        write_ensemble(args.repository, plan.members, plan.name)
    parameters = sum(parameter.numel() for parameter in network.parameters())
    beside = "".join(f", {auxiliary_name(args.name, kind)}" for kind in (DETECTION, CONFIDENCE)
                     if kind in extra_paths)
    joined = "".join(f", ensemble {plan.name!r} of {len(plan.members)}" for plan in plans)
    print(f"mixsup-export: wrote {args.repository / args.name} ({exported.description}, {parameters:,} parameters, "
          f"parity {exported.parity:.1e}, patch {patch}x{patch}){beside}{joined}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mixsup-export`` command; returns its exit code (DESIGN.md)."""
    return run_command("mixsup-export", build_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
