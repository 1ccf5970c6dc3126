"""Checkpoint -> ONNX: the segmentation path only, softmax on top, raw HU in (the contract)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixsup.contract import ModelContract
from mixsup.training.models.unet import Probabilities

DEFAULT_OPSET = 17


def export_onnx(network: torch.nn.Module, contract: ModelContract, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``softmax(network(hu))`` as a single-file ONNX graph with dynamic batch, height and width.

    The legacy TorchScript-based exporter is used on purpose: it is ~20x faster than the dynamo exporter for
    these convolutional nets and matches eager PyTorch to ~1e-7 (TRITON.md).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model = Probabilities(network).eval()
    height, width = contract.patch_size
    example = torch.zeros(1, contract.context_slices, height, width)
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[contract.input_name], output_names=[contract.output_name],
            dynamic_axes={contract.input_name: {0: "batch", 2: "height", 3: "width"},
                          contract.output_name: {0: "batch", 2: "height", 3: "width"}},
        )
    return path


def max_parity_error(network: torch.nn.Module, onnx_path: Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between ONNX Runtime and eager PyTorch probabilities on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: inputs.astype(np.float32)})
    with torch.no_grad():
        torch_out = Probabilities(network).eval()(torch.from_numpy(inputs.astype(np.float32))).numpy()
    return float(np.abs(onnx_out - torch_out).max())
