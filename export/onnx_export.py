"""Checkpoint -> ONNX: the segmentation path only, softmax on top, raw HU in (the contract); optionally fp16.
Also any module whose inputs and outputs a contract names (:func:`export_contract_graph`): the models beside the
ensemble."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from mixsup.contract import ModelContract, TensorSpec
from mixsup.training.models.unet import Probabilities

DEFAULT_OPSET = 17


def export_onnx(network: torch.nn.Module, contract: ModelContract, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``softmax(network(hu))`` as a single-file float32 ONNX graph with dynamic batch, height and width.

    The legacy TorchScript-based exporter is used on purpose: it is ~20x faster than the dynamo exporter for
    these convolutional nets and matches eager PyTorch to ~1e-7 (TRITON.md). In eval mode it folds each
    BatchNorm into the convolution before it, and it keeps only the parameters the graph uses.
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


def convert_to_fp16(source: Path, destination: Path) -> Path:
    """Write a float16 copy of the ONNX model ``source`` whose input and output stay float32.

    ONNX Runtime's own converter does the work. Keeping float32 at the boundary keeps the model contract and
    every Triton config unchanged: the graph casts the raw HU to float16 (exact to 0.125 HU at the window's
    edges) and its probabilities back to float32. The converter appends those casts at the end of the node
    list, so the graph is topologically re-sorted (ONNX requires it) before saving.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True))
    model.topological_sort()
    onnx.checker.check_model(model.model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model.model, str(destination))
    return destination


def onnx_probabilities(onnx_path: Path, inputs: np.ndarray) -> np.ndarray:
    """What ONNX Runtime (CPU) computes for float32 raw-HU ``inputs`` [N, context, h, w]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: inputs.astype(np.float32)})
    return probabilities


def torch_probabilities(network: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """What eager PyTorch computes for ``inputs``: the reference every export is checked against."""
    with torch.no_grad():
        return Probabilities(network).eval()(torch.from_numpy(inputs.astype(np.float32))).numpy()


def max_parity_error(network: torch.nn.Module, onnx_path: Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between ONNX Runtime and eager PyTorch probabilities on ``inputs``."""
    return float(np.abs(onnx_probabilities(onnx_path, inputs) - torch_probabilities(network, inputs)).max())


def example_tensor(spec: TensorSpec, height: int, width: int) -> torch.Tensor:
    """Zeros of ``spec``'s shape with batch 1 and the given slice size (the tracing example)."""
    sizes = {"N": 1, "h": height, "w": width}
    dtype = getattr(torch, spec.dtype)
    return torch.zeros([sizes[d] if isinstance(d, str) else int(d) for d in spec.shape], dtype=dtype)


def dynamic_axes(specs: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    """The variable axes (letters in a spec's shape) of every tensor, as ``torch.onnx.export`` takes them."""
    names = {"N": "batch", "h": "height", "w": "width"}
    return {spec.name: {axis: names.get(d, d) for axis, d in enumerate(spec.shape) if isinstance(d, str)}
            for spec in specs}


def export_contract_graph(module: torch.nn.Module, contract: ModelContract, path: Path,
                          opset: int = DEFAULT_OPSET) -> Path:
    """Write ``module`` (eval mode) as a single-file float32 ONNX graph whose inputs and outputs are the
    contract's (:attr:`ModelContract.inputs`, :attr:`~ModelContract.outputs`), in that order, with the contract's
    variable axes dynamic. Same exporter as :func:`export_onnx`, for the same reasons.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = contract.patch_size
    examples = tuple(example_tensor(spec, height, width) for spec in contract.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python values in eager-only code (the NMS reference, anchor constants); the
        # exported graph does not contain that code, and every export is checked on inputs of several shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(), examples, str(path), dynamo=False, opset_version=opset,
            input_names=[spec.name for spec in contract.inputs],
            output_names=[spec.name for spec in contract.outputs],
            dynamic_axes=dynamic_axes((*contract.inputs, *contract.outputs)),
        )
    return path


def onnx_outputs(onnx_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of an ONNX model (ONNX Runtime, CPU) for ``feeds``, by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def torch_outputs(module: torch.nn.Module, contract: ModelContract,
                  feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What eager PyTorch computes for ``feeds``: ``module``'s outputs named as the contract names them."""
    with torch.no_grad():
        results = module.eval()(*(torch.from_numpy(feeds[spec.name]) for spec in contract.inputs))
    results = results if isinstance(results, tuple) else (results,)
    return {spec.name: result.numpy() for spec, result in zip(contract.outputs, results)}
