"""A trainable network from an exported one, so ``--init-from`` can fine-tune a served model (the bundled one, say).

Export folds each BatchNorm into the convolution before it (:func:`mixsup.export.onnx_export.export_onnx`): the
graph holds one weight and bias per such convolution and no normalisation statistics. Loading it back gives each
convolution its folded weight, and its BatchNorm the folded bias plus running statistics measured on slices of the
run's own data, with an affine part that undoes them. In eval mode the network then computes exactly the exported
function; in training mode (batch statistics) the same up to how far one batch's statistics stray from the
measured ones.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixsup.errors import InputError

#: The prefix export gives the network's own parameters in the graph (``Probabilities.network``).
PARAMETER_PREFIX = "network."


def exported_onnx_path(path: Path) -> Path | None:
    """The ONNX graph ``path`` names (the file itself, or a Triton model folder's highest version's
    ``model.onnx``), or None where ``path`` is something else (a checkpoint)."""
    if path.suffix == ".onnx":
        return path
    if path.is_dir():
        versions = sorted((int(p.name), p / "model.onnx") for p in path.iterdir()
                          if p.name.isdigit() and (p / "model.onnx").is_file())
        if not versions:
            raise InputError(f"{path}: no <version>/model.onnx in this model folder (only ONNX exports can "
                             "initialise a run)")
        return versions[-1][1]
    return None


def conv_batchnorm_pairs(network: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every convolution directly followed by a BatchNorm in a ``Sequential``: the pairs export folds, in the
    order the network registers them (its execution order for the U-Net's encoder-then-decoder blocks)."""
    pairs = []
    for module in network.modules():
        if isinstance(module, nn.Sequential):
            children = list(module)
            pairs += [(a, b) for a, b in zip(children, children[1:])
                      if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]
    return pairs


def parameter_device(network: nn.Module) -> torch.device:
    """Where ``network``'s weights live (the calibration slices are drawn on the CPU)."""
    return next(network.parameters()).device


def read_initializers(onnx_path: Path) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """The graph's initializers as float32 tensors, and the (weight, bias) names of its convolutions whose weight
    is not a named network parameter (the folded ones), in graph order."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:
        raise InputError(f"{onnx_path}: not a readable ONNX model ({type(exc).__name__})") from None
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype("float32")) for i in graph.initializer}
    folded = [(node.input[1], node.input[2]) for node in graph.node
              if node.op_type == "Conv" and len(node.input) == 3 and not node.input[1].startswith(PARAMETER_PREFIX)]
    return tensors, folded


def load_exported_weights(network: nn.Module, onnx_path: Path, calibration: torch.Tensor) -> None:
    """Set ``network``'s weights to the exported graph's, with BatchNorm statistics measured on ``calibration``
    (a batch of the run's input slices, raw HU); a graph of another network is a one-line refusal."""
    tensors, folded = read_initializers(onnx_path)
    pairs = conv_batchnorm_pairs(network)
    folded_parameters = {id(p) for conv, bn in pairs for p in (conv.weight, bn.weight, bn.bias)}
    named = [(name, p) for name, p in network.named_parameters() if id(p) not in folded_parameters]
    missing = [name for name, p in named if PARAMETER_PREFIX + name not in tensors
               or tensors[PARAMETER_PREFIX + name].shape != p.shape]
    shapes_differ = len(pairs) != len(folded) or any(
        conv.weight.shape != tensors[w].shape or conv.bias is not None for (conv, _), (w, _) in zip(pairs, folded))
    if missing or shapes_differ:
        detail = f"e.g. {missing[0]!r}" if missing else f"{len(folded)} folded convolutions for {len(pairs)}"
        raise InputError(f"{onnx_path}: its network differs from this run's ({detail}); use the same "
                         "base_channels and depth")
    with torch.no_grad():
        for name, parameter in named:
            parameter.copy_(tensors[PARAMETER_PREFIX + name])
        for (conv, bn), (weight, bias) in zip(pairs, folded):
            conv.weight.copy_(tensors[weight])
            # Identity statistics first, so that the network is already the exported one when they are measured.
            bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps), bn.weight.fill_(1.0)
            bn.bias.copy_(tensors[bias])
        outputs: dict[int, torch.Tensor] = {}
        hooks = [conv.register_forward_hook(lambda _m, _i, output, index=index: outputs.__setitem__(index, output))
                 for index, (conv, _) in enumerate(pairs)]
        was_training = network.training
        try:
            network.eval()(calibration.to(parameter_device(network)))
        finally:
            for hook in hooks:
                hook.remove()
            network.train(was_training)
        for index, (_, bn) in enumerate(pairs):
            output = outputs[index].float()
            mean, var = output.mean(dim=(0, 2, 3)), output.var(dim=(0, 2, 3), unbiased=False)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            # (x - mean) / sqrt(var + eps) * sqrt(var + eps) + mean + bias = x + bias, the folded convolution
            bn.bias.add_(mean)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
