"""``mixsup-export CKPT --repository DIR --name NAME``: a checkpoint becomes a served member of ``segment``.

Writes ``DIR/NAME`` (the network, ONNX Runtime in Triton's python backend), ``DIR/NAME_window`` (its
sliding-window step) and regenerates ``DIR/fuse`` and the public ensemble ``DIR/segment`` over every network in
the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from mixsup.errors import MixsupError, add_debug_flag, run_command

PARITY_TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixsup-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repository", required=True, type=Path, help="Triton model repository folder")
    parser.add_argument("--name", required=True, help="model name in the repository, e.g. unet")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="exported graph format")
    parser.add_argument("--patch-size", type=int, help="sliding-window tile size (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--instances", type=int, default=1, help="Triton instances of the network model")
    parser.add_argument("--no-ensemble", action="store_true", help="write the network and its window step only")
    add_debug_flag(parser)
    return parser


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def handle(args: argparse.Namespace) -> int:
    from mixsup.contract import ModelContract
    from mixsup.export.onnx_export import export_onnx, max_parity_error
    from mixsup.repository import write_ensemble, write_network
    from mixsup.training.trainer import load_checkpoint, network_from_checkpoint

    payload = load_checkpoint(args.checkpoint)
    network = network_from_checkpoint(payload)
    contract = ModelContract.from_dict(payload["contract"])
    patch = args.patch_size or contract.patch_size[0]
    divisor = getattr(network, "size_divisor", 1)
    if patch % divisor:
        from mixsup.errors import InputError

        raise InputError(f"--patch-size {patch} must be a multiple of {divisor} for this network")
    contract = contract.replace(
        patch_size=(patch, patch), opset=args.opset, precision="fp32",
        checkpoint=f"{args.checkpoint.name} sha256:{sha256_of(args.checkpoint)[:16]}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(network, contract, Path(tmp) / "model.onnx", opset=args.opset)
        probe = np.random.default_rng(0).uniform(-1000, 1000, (2, contract.context_slices, patch, patch))
        error = max_parity_error(network, onnx_path, probe)
        if error > PARITY_TOLERANCE:
            raise MixsupError(f"ONNX output differs from PyTorch by {error:.2e} (> {PARITY_TOLERANCE})")
        write_network(args.repository, args.name, onnx_path, contract, instance_count=args.instances)
    if not args.no_ensemble:
        write_ensemble(args.repository)
    print(f"mixsup-export: wrote {args.repository / args.name} (ONNX opset {args.opset}, "
          f"parity {error:.1e}, patch {patch}x{patch})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("mixsup-export", build_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
