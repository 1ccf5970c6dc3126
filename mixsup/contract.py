"""The model contract: what every exported network promises its consumers (serving and the client).

Export writes it as ``contract.json`` next to each network; the repository writer also embeds it in the
``segment`` ensemble's config so a client can read it with one ``get_model_config`` call.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mixsup.errors import InputError

CONTRACT_FILENAME = "contract.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelContract:
    """How to feed a 2.5D segmentation network and read what it returns.

    The input is raw Hounsfield units: clipping to ``hu_window`` and normalisation are the first operations
    inside the exported graph, so no consumer can get them wrong.
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def replace(self, **changes) -> "ModelContract":
        return ModelContract.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

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
        for name in ("class_names", "patch_size", "spacing_mm", "hu_window"):
            if name in values:
                values[name] = tuple(values[name])
        contract = cls(**values)
        if contract.context_slices % 2 != 1:
            raise InputError("model contract: context_slices must be odd")
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
