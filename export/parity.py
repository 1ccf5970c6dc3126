"""How close an export is to eager PyTorch: raw-HU probes and the largest difference an export may show.

Every export is run on probes of several shapes (batch, height and width are dynamic in every graph), with HU
values well beyond the window on both sides, and compared with the PyTorch module it came from.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from mixsup.contract import ModelContract, TensorSpec
from mixsup.errors import MixsupError

#: Largest difference from eager PyTorch, on probabilities, an export may show.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def probe_shapes(patch: int, divisor: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the probes: a batch of patch-sized tiles, and one non-square tile of another
    size."""
    return [(2, patch, patch), (1, patch + divisor, max(divisor, patch - divisor))]


def parity_probes(context_slices: int, patch: int, divisor: int, seed: int = 0) -> list[np.ndarray]:
    """Raw-HU inputs of the :func:`probe_shapes`, values well beyond the HU window on both sides."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1100, 1500, (n, context_slices, h, w)).astype(np.float32)
            for n, h, w in probe_shapes(patch, divisor)]


def check_parity(what: str, compute: Callable[[np.ndarray], np.ndarray], reference: Sequence[np.ndarray],
                 probes: Sequence[np.ndarray], precision: str) -> float:
    """Largest difference of ``compute`` from the PyTorch ``reference`` over ``probes``; too large is an error."""
    error = max(float(np.abs(compute(probe) - expected).max()) for probe, expected in zip(probes, reference))
    tolerance = PARITY_TOLERANCE[precision]
    if not error <= tolerance:  # `not <=` so that NaN fails too
        raise MixsupError(f"{what} output differs from PyTorch by {error:.2e} (> {tolerance} for {precision})")
    return error


def box_masks(rng: np.random.Generator, count: int, channels: int, height: int, width: int) -> np.ndarray:
    """``count`` x ``channels`` masks of one random filled rectangle each, nested (each channel's box inside
    the previous one's, as a lesion box lies inside the organ box), float32 [count, channels, h, w]."""
    masks = np.zeros((count, channels, height, width), np.float32)
    for item in range(count):
        top, left, bottom, right = 0, 0, height, width
        for channel in range(channels):
            rows = np.sort(rng.integers(top, bottom, 2))  # first and last row, inside the previous box
            cols = np.sort(rng.integers(left, right, 2))
            top, bottom = int(rows[0]), int(rows[1]) + 1
            left, right = int(cols[0]), int(cols[1]) + 1
            masks[item, channel, top:bottom, left:right] = 1.0
    return masks


def probe_feeds(contract: ModelContract, divisor: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs of every tensor the contract names, for each of the :func:`probe_shapes`: raw HU for the main
    input, nested box masks for a mask input (``[N, k, h, w]``)."""
    patch = contract.patch_size[0]
    feeds = [{contract.input_name: hu} for hu in parity_probes(contract.context_slices, patch, divisor, seed)]
    rng = np.random.default_rng(seed + 1)
    for feed, (n, h, w) in zip(feeds, probe_shapes(patch, divisor)):
        for spec in contract.extra_inputs:
            feed[spec.name] = probe_input(spec, rng, n, h, w)
    return feeds


def probe_input(spec: TensorSpec, rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """A probe for an extra input: box masks where the spec is ``[N, k, h, w]`` float32; others are not known."""
    if spec.dtype != "float32" or len(spec.shape) != 4 or tuple(spec.shape[2:]) != ("h", "w"):
        raise MixsupError(f"no parity probe for input {spec.name!r} of shape {spec.shape} ({spec.dtype})")
    return box_masks(rng, n, int(spec.shape[1]), height, width)


def output_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest difference, relative to the expected value's size where that exceeds 1 (box corners in pixels),
    absolute below; a shape mismatch is infinitely different."""
    if got.shape != expected.shape:
        return float("inf")
    expected = expected.astype(np.float64)
    return float((np.abs(got.astype(np.float64) - expected) / np.maximum(1.0, np.abs(expected))).max(initial=0.0))


def check_outputs_parity(what: str, compute: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
                         reference: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
                         feeds: Sequence[Mapping[str, np.ndarray]], precision: str = "fp32") -> float:
    """Largest :func:`output_difference` of every output of ``compute`` from ``reference`` over ``feeds``; too
    large is an error naming the output."""
    tolerance, worst = PARITY_TOLERANCE[precision], 0.0
    for feed in feeds:
        expected = reference(feed)
        got = compute(feed)
        for name, value in expected.items():
            error = output_difference(got[name], value)
            if not error <= tolerance:
                raise MixsupError(f"{what} output {name!r} differs from PyTorch by {error:.2e} "
                                  f"(> {tolerance} for {precision})")
            worst = max(worst, error)
    return worst
