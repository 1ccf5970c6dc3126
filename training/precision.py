"""The arithmetic a training step runs in: float32, or bfloat16 autocast where the hardware computes it natively.

bfloat16 autocast runs convolutions and matmuls in bfloat16 while weights, optimizer state and losses stay float32
(no loss scaling: bfloat16 has float32's exponent range). On this project's 2-core CPU with AMX a U-Net step took
0.117 s in float32 and 0.056 s in bfloat16 autocast with channels_last weights (16 base channels, 8 crops of
64 px, one thread), 0.227 and 0.093 s at 128 px on two threads. On a CPU without native bfloat16 the emulation is
slower than float32, hence ``auto``.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn

from mixsup.errors import InputError

#: The values of ``TrainConfig.precision``.
PRECISIONS = ("auto", "fp32", "bf16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it, a CPU with AVX512-BF16
    or AMX (torch offers no public query for the CPU; a torch without the private one counts as no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check is not None and check() for check in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is ``bf16`` where :func:`native_bfloat16`, else ``fp32``."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bfloat16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The context a training step runs in for a resolved ``precision`` (``fp32``: none)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_modules(modules: nn.ModuleDict, precision: str) -> nn.ModuleDict:
    """``modules`` made ready for ``precision`` (in place; float32: unchanged).

    For bfloat16: channels_last weights, where oneDNN's and cuDNN's bfloat16 convolutions are fastest (the inputs
    follow the weights' layout); and every module's floating outputs cast back to float32, so that each recipe's
    losses run in float32 -- CPU autocast leaves softmax in bfloat16, and a soft Dice summed over a batch in
    bfloat16 keeps 3 significant digits, too few for a small lesion's share.
    """
    if precision != "bf16":
        return modules
    modules.to(memory_format=torch.channels_last)
    for module in modules.values():
        module.register_forward_hook(lambda _module, _inputs, outputs: to_float32(outputs))
    return modules


def to_float32(value: Any) -> Any:
    """``value`` with every floating tensor in it (also inside tuples, lists, dicts) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_float32(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: to_float32(item) for key, item in value.items()}
    return value
