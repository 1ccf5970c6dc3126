"""Checkpoint -> TorchScript (``model.pt``) for Triton's ``pytorch_libtorch`` platform.

The same module as the ONNX export (:class:`~mixsup.training.models.unet.Probabilities` around the segmentation
path), so the HU window is the first op here too and the output is per-class probabilities.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mixsup.contract import ModelContract
from mixsup.training.models.unet import Probabilities


@contextmanager
def torchscript_api() -> Iterator[None]:
    """Quiet torch's deprecation notices for ``torch.jit``: TorchScript is what Triton's pytorch_libtorch backend
    loads, so it is used on purpose, and the notices would only repeat that on every export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def export_torchscript(network: torch.nn.Module, contract: ModelContract, path: Path) -> Path:
    """Trace ``softmax(network(hu))`` in eval mode and save it.

    Traced rather than scripted: ``torch.jit.script`` fails on these networks (tried on the unet, msdn and lazy
    ones with torch 2.13), and their forward passes have no data-dependent control flow, so a trace records the
    whole computation. The graph holds no shape constants (convolutions,
    pooling, concatenation only), so it accepts any batch and any size the network divides; the export checks
    that on probes of several shapes instead of ``check_trace``'s rerun of the one example.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = contract.patch_size
    example = torch.zeros(1, contract.context_slices, height, width)
    with torchscript_api(), torch.no_grad():
        traced = torch.jit.trace(Probabilities(network).eval(), example, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def torchscript_probabilities(path: Path, inputs: np.ndarray) -> np.ndarray:
    """What the saved TorchScript module computes for float32 raw-HU ``inputs`` [N, context, h, w]."""
    with torchscript_api():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return module(torch.from_numpy(inputs.astype(np.float32))).numpy()
