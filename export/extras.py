"""The models beside the ensemble, built from a checkpoint's training-only networks.

* ``--keep-detection`` (msdn): the segmentation path plus the detection unit, decoded and non-max-suppressed per
  slice (:mod:`mixsup.export.detection`), as model ``NAME_detection``;
* ``--keep-confidence`` (asdnet): the segmentation net plus the confidence map (:mod:`mixsup.export.confidence`),
  as model ``NAME_confidence``;
* ``--teacher`` (teacher-student): the teacher as a box-prompted annotator (:mod:`mixsup.export.annotator`), as
  model ``NAME``.

Each is exported as float32 ONNX for ONNX Runtime in Triton's python backend (several inputs or outputs, which
the sliding-window step never needs) and checked against eager PyTorch on every output, like every export.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixsup.contract import ANNOTATOR, CONFIDENCE, DETECTION, ModelContract
from mixsup.errors import InputError
from mixsup.export.annotator import IMAGE, Annotator
from mixsup.export.annotator import input_specs as annotator_inputs
from mixsup.export.confidence import SegmentationAndConfidence
from mixsup.export.confidence import output_specs as confidence_outputs
from mixsup.export.detection import DetectionSettings, SegmentationAndDetection
from mixsup.export.detection import output_specs as detection_outputs
from mixsup.export.onnx_export import export_contract_graph, onnx_outputs, torch_outputs
from mixsup.export.parity import check_outputs_parity, probe_feeds
from mixsup.training.recipes import get_recipe
from mixsup.training.recipes.base import unwrap
from mixsup.training.trainer import TrainConfig

#: The recipe each model beside the ensemble comes from.
RECIPE_OF = {DETECTION: "msdn", CONFIDENCE: "asdnet", ANNOTATOR: "teacher-student"}
#: The flag that asks for each, for error messages.
FLAG_OF = {DETECTION: "--keep-detection", CONFIDENCE: "--keep-confidence", ANNOTATOR: "--teacher"}


@dataclass
class Auxiliary:
    """A model beside the ensemble before export: its eager module and its contract."""

    kind: str
    module: nn.Module
    contract: ModelContract


def recipe_modules(payload: dict, kind: str) -> tuple[nn.ModuleDict, TrainConfig]:
    """Every network of the checkpoint's recipe with its weights, in eval mode, and the run's config; a
    checkpoint of another recipe than ``kind`` needs is an InputError."""
    wanted = RECIPE_OF[kind]
    if payload.get("recipe") != wanted:
        raise InputError(f"{FLAG_OF[kind]} needs a {wanted} checkpoint; this one is {payload.get('recipe')!r}")
    config = TrainConfig.from_dict(payload["config"])
    modules = get_recipe(wanted).build(config)
    modules.load_state_dict(payload["state_dict"])
    return modules.eval(), config


def detection_model(payload: dict, contract: ModelContract, settings: DetectionSettings) -> Auxiliary:
    """MSDN's segmentation path and detection unit (``NAME_detection``)."""
    modules, config = recipe_modules(payload, DETECTION)
    network = unwrap(modules["msdn"])
    anchor_size = float(get_recipe("msdn").option(config, "anchor_size"))
    module = SegmentationAndDetection(network, anchor_size, settings)
    # Detection classes are the unit's box channels: the organ box and the lesion box, the contract's classes
    # after background.
    box_classes = contract.class_names[1:1 + network.config.detection_classes]
    described = {**settings.to_dict(), "anchor_size": anchor_size, "strides": network.detection_strides,
                 "classes": list(box_classes)}
    return Auxiliary(DETECTION, module, contract.replace(
        kind=DETECTION, extra_outputs=detection_outputs(settings, box_classes), size_divisor=module.size_divisor,
        extra={**contract.extra, "detection": described}))


def confidence_model(payload: dict, contract: ModelContract) -> Auxiliary:
    """ASDNet's segmentation net and confidence network (``NAME_confidence``)."""
    modules, _ = recipe_modules(payload, CONFIDENCE)
    module = SegmentationAndConfidence(modules["segmentation"], modules["confidence"])
    return Auxiliary(CONFIDENCE, module, contract.replace(
        kind=CONFIDENCE, extra_outputs=confidence_outputs(), size_divisor=module.size_divisor))


def annotator_model(payload: dict, contract: ModelContract) -> Auxiliary:
    """The teacher-student teacher, prompted by box masks (``NAME``)."""
    modules, _ = recipe_modules(payload, ANNOTATOR)
    teacher = unwrap(modules["teacher"])
    module = Annotator(teacher)
    return Auxiliary(ANNOTATOR, module, contract.replace(
        kind=ANNOTATOR, input_name=IMAGE, extra_inputs=annotator_inputs(), size_divisor=module.size_divisor,
        extra={**contract.extra, "teacher_box_input": bool(teacher.box_input)}))


def export_auxiliary(auxiliary: Auxiliary, path: Path, opset: int) -> float:
    """Write ``auxiliary`` as ONNX to ``path`` and check every output against eager PyTorch on probes of two
    shapes; returns the largest difference (an error when above the fp32 tolerance)."""
    export_contract_graph(auxiliary.module, auxiliary.contract, path, opset=opset)
    feeds = probe_feeds(auxiliary.contract, auxiliary.contract.size_divisor)
    with torch.no_grad():
        return check_outputs_parity(f"{auxiliary.kind} ONNX", lambda feed: onnx_outputs(path, feed),
                                    lambda feed: torch_outputs(auxiliary.module, auxiliary.contract, feed), feeds)
