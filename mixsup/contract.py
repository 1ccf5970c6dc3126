"""The model contract: what every exported network promises its consumers (serving and the client).

Export writes it as ``contract.json`` next to each network; the repository writer also embeds it in the
``segment`` ensemble's config (and in the config of every model beside the ensemble) so a client can read it
with one ``get_model_config`` call.

Kinds of exported model (:attr:`ModelContract.kind`):

* ``segmentation`` — raw-HU stacks ``input`` [N, context, h, w] -> ``probabilities`` [N, C, h, w]; the only kind
  that joins a sliding-window ensemble.
* ``detection`` — MSDN's segmentation path and detection unit: ``input`` -> ``probabilities`` plus the padded
  per-slice detections its :attr:`~ModelContract.extra_outputs` document.
* ``confidence`` — ASDNet's segmentation net and confidence network: ``input`` -> ``probabilities`` plus
  ``confidence`` [N, 1, h, w].
* ``annotator`` — the teacher-student teacher: raw-HU stacks ``image`` plus the box masks its
  :attr:`~ModelContract.extra_inputs` document -> ``probabilities``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Union

from mixsup.errors import InputError

CONTRACT_FILENAME = "contract.json"
#: Request parameter of the ``segment`` ensemble that asks for the probabilities (TRITON.md). Triton requests every
#: output of an ensemble step whatever the client asked for, so the steps that can end the ensemble (a lone window,
#: a fuse step) go by this parameter and copy out no probabilities that would be dropped.
PROBABILITIES_PARAMETER = "probabilities"
#: The window and fuse steps' config parameter carrying the contract's ``lesion_threshold`` (absent: argmax).
LESION_THRESHOLD_PARAMETER = "LESION_THRESHOLD"
FORMAT_VERSION = 1

SEGMENTATION, DETECTION, CONFIDENCE, ANNOTATOR = "segmentation", "detection", "confidence", "annotator"
KINDS = (SEGMENTATION, DETECTION, CONFIDENCE, ANNOTATOR)
#: Fields added after format 1 was in use. They are written only when they differ from their defaults, so the
#: contract of a plain segmentation network stays what every reader of format 1 (an older client) accepts.
LATER_FIELDS = ("kind", "extra_inputs", "extra_outputs", "size_divisor", "test_spacings_mm", "anti_aliasing",
                "lesion_threshold")
#: numpy dtype names a tensor of the contract may have.
TENSOR_DTYPES = ("float32", "float16", "int64", "int32", "int16", "uint8")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor beyond the contract's main ones, documented for its consumers.

    ``shape`` holds ints for fixed sizes and letters for variable ones: ``"N"`` the batch (the first axis
    always), ``"h"``/``"w"`` the slice's height and width.
    """

    name: str
    dtype: str
    shape: tuple[Union[int, str], ...]
    description: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in TENSOR_DTYPES:
            raise InputError(f"model contract: tensor {self.name!r} has unknown dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @classmethod
    def from_value(cls, value: "TensorSpec | dict") -> "TensorSpec":
        """A spec from itself or from its JSON form."""
        if isinstance(value, TensorSpec):
            return value
        try:
            return cls(**value)
        except TypeError as exc:
            raise InputError(f"model contract: bad tensor description {value!r} ({exc})") from None


@dataclass(frozen=True)
class ModelContract:
    """How to feed a 2.5D segmentation network and read what it returns.

    The input is raw Hounsfield units: clipping to ``hu_window`` and normalisation are the first operations
    inside the exported graph, so no consumer can get them wrong. ``kind`` says which model this is (module
    docstring); ``extra_inputs`` and ``extra_outputs`` document tensors beyond ``input_name`` and
    ``output_name``; ``size_divisor`` is what the height and width of an input must be a multiple of, where a
    consumer sends whole slices (1: not recorded).
    """

    class_names: tuple[str, ...] = ("background", "liver", "lesion")
    patch_size: tuple[int, int] = (160, 160)
    #: In-plane voxel size (rows, columns) in mm that the network was trained at.
    spacing_mm: tuple[float, float] = (1.6, 1.6)
    context_slices: int = 3
    hu_window: tuple[float, float] = (-200.0, 250.0)
    input_name: str = "input"
    input_layout: str = "NCHW"
    input_units: str = "HU"
    output_name: str = "probabilities"
    output: str = "per-class probabilities (softmax over the class axis)"
    opset: int | None = None
    precision: str = "fp32"
    recipe: str = ""
    checkpoint: str = ""
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kind: str = SEGMENTATION
    extra_inputs: tuple[TensorSpec, ...] = ()
    extra_outputs: tuple[TensorSpec, ...] = ()
    size_divisor: int = 1
    #: In-plane spacings (mm, square pixels) a client runs the model at, averaging the probabilities on the scan's
    #: grid (multi-scale test-time augmentation, :mod:`mixsup.clients.pipeline`); empty: ``spacing_mm`` alone.
    test_spacings_mm: tuple[float, ...] = ()
    #: Whether the network trained on scans smoothed before in-plane downsampling to its grid
    #: (:func:`mixsup.resample.resample_inplane`'s ``anti_aliasing``), so its consumers must prepare them so too.
    #: False for contracts from before the field (they trained on plain linear resampling).
    anti_aliasing: bool = False
    #: How labels are decided from the probabilities ``[background, organ, lesion]``: None, their argmax; a number,
    #: lesion wherever p(lesion) exceeds it inside the region the argmax gives organ or lesion (that region, and
    #: so the organ's outline, is the argmax's). Chosen per network on a selection set (MODEL_CARD.md).
    lesion_threshold: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def run_spacings_mm(self) -> tuple[tuple[float, float], ...]:
        """The in-plane spacings (rows, columns) a client runs the model at: each test spacing, or ``spacing_mm``."""
        if not self.test_spacings_mm:
            return (tuple(self.spacing_mm),)
        return tuple((float(s), float(s)) for s in self.test_spacings_mm)

    def replace(self, **changes) -> "ModelContract":
        return ModelContract.from_dict({**self.to_dict(), **changes})

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Every input tensor: the raw-HU stacks ``input_name`` first, then :attr:`extra_inputs`."""
        main = TensorSpec(self.input_name, "float32", ("N", self.context_slices, "h", "w"),
                          f"raw HU, {self.context_slices} consecutive axial slices as channels")
        return (main, *self.extra_inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Every output tensor: the probabilities ``output_name`` first, then :attr:`extra_outputs`."""
        main = TensorSpec(self.output_name, "float32", ("N", self.num_classes, "h", "w"), self.output)
        return (main, *self.extra_outputs)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every input and output name."""
        return tuple(tensor.name for tensor in (*self.inputs, *self.outputs))

    def to_dict(self) -> dict:
        data = asdict(self)
        defaults = ModelContract()
        for name in LATER_FIELDS:
            if getattr(self, name) == getattr(defaults, name):
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelContract":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"model contract has unknown fields: {sorted(unknown)}")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise InputError(f"model contract format {data['format_version']} is not supported")
        values = dict(data)
        for name in ("class_names", "patch_size", "spacing_mm", "hu_window", "test_spacings_mm"):
            if name in values:
                values[name] = tuple(values[name])
        for name in ("extra_inputs", "extra_outputs"):
            if name in values:
                values[name] = tuple(TensorSpec.from_value(value) for value in values[name])
        contract = cls(**values)
        if contract.context_slices % 2 != 1:
            raise InputError("model contract: context_slices must be odd")
        if contract.kind not in KINDS:
            raise InputError(f"model contract: unknown kind {contract.kind!r} (this mixsup knows {', '.join(KINDS)})")
        if len(set(contract.tensor_names)) != len(contract.tensor_names):
            raise InputError(f"model contract: tensor names repeat: {list(contract.tensor_names)}")
        if contract.size_divisor < 1:
            raise InputError(f"model contract: size_divisor must be at least 1, got {contract.size_divisor}")
        if not isinstance(contract.anti_aliasing, bool):
            raise InputError(f"model contract: anti_aliasing must be true or false, got {contract.anti_aliasing!r}")
        if not all(isinstance(s, (int, float)) and 0 < s < float("inf") for s in contract.test_spacings_mm):
            raise InputError(f"model contract: test_spacings_mm must be positive numbers, got "
                             f"{list(contract.test_spacings_mm)}")
        if contract.lesion_threshold is not None and not (
                isinstance(contract.lesion_threshold, (int, float)) and 0 < contract.lesion_threshold < 1
                and contract.num_classes == 3):
            raise InputError(f"model contract: lesion_threshold must be a number between 0 and 1 for three classes "
                             f"(background, organ, lesion), got {contract.lesion_threshold!r} for "
                             f"{contract.num_classes}")
        return contract

    @classmethod
    def from_json(cls, text: str) -> "ModelContract":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InputError(f"model contract is not valid JSON: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelContract":
        path = Path(path)
        if path.is_dir():
            path = path / CONTRACT_FILENAME
        if not path.is_file():
            raise InputError(f"{path}: no model contract")
        return cls.from_json(path.read_text())
