"""Writing Triton model-repository entries for exported networks and the ``segment`` ensemble.

Layout written here (DESIGN.md, "Triton model repository")::

    NAME/config.pbtxt           the network; one of the runtimes below
    NAME/1/model.onnx           (or model.pt / model.plan; + any external-data files an ONNX model references)
    NAME/1/contract.json
    NAME/1/model.py             python runtime only: thin adapter -> mixsup.serving.triton.network
    NAME_window/config.pbtxt    python backend: whole volume -> slices or tiles -> NAME's model (in this step's
                                process for the python runtime, else NAME over BLS) -> blend -> labels
    NAME_window/1/model.py      thin adapter -> mixsup.serving.triton.window
    fuse/...                    python backend: weighted mean of the members -> labels
    segment/config.pbtxt        ensemble: volume -> every NAME_window in parallel -> fuse
                                (one member: volume -> NAME_window, no fuse step: it would only copy)
    E/, E_fuse/                 any further ensemble E over other members and weights (folds, recipes)

Models beside the ensembles, for direct calls (ONNX Runtime in the python backend, every tensor the model's
contract names, the contract itself as config parameter ``contract``)::

    NAME_detection/             MSDN: probabilities + per-slice detections (contract kind ``detection``)
    NAME_confidence/            ASDNet: probabilities + confidence map (kind ``confidence``)
    NAME/                       the teacher-student teacher as box-prompted annotator (kind ``annotator``)

An ensemble's members and weights are stored once, where Triton reads them: the order of its window steps and
the ``WEIGHTS`` parameter of its fuse step (:func:`read_ensemble` reads them back; the contract it embeds lists
them too, for clients, and is where a lone member's weight, which changes nothing served, is kept).

Network runtimes (:data:`RUNTIMES`): ``python`` (ONNX Runtime inside Triton's python backend, the default and the
one the ``nvidia-pytriton`` server runs), ``onnxruntime`` (Triton's native ``onnxruntime_onnx`` platform, optionally
with the TensorRT execution accelerator), ``tensorrt_plan`` and ``pytorch_libtorch``; the last three need an NGC
Triton container that has those backends. The sliding-window step runs a ``python``-runtime network's
``model.onnx`` in its own process and calls the native runtimes' networks over BLS.

Configs are ``ModelConfig`` protobufs (Triton's own schema, from ``tritonclient``) written in protobuf text format
by ``google.protobuf.text_format``, never string templates; :func:`write_config` parses every file back before
it counts as written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mixsup.contract import (
    ANNOTATOR,
    CONFIDENCE,
    CONTRACT_FILENAME,
    DETECTION,
    LESION_THRESHOLD_PARAMETER,
    SEGMENTATION,
    ModelContract,
    TensorSpec,
)
from mixsup.errors import InputError
from mixsup.stacks import DEFAULT_MAX_SLICE

VERSION = "1"
NETWORK_INPUT = "input"
NETWORK_OUTPUT = "probabilities"
VOLUME_INPUT = "volume"
LABELS_OUTPUT = "labels"
WINDOW_SUFFIX = "_window"
CONTRACT_PARAMETER = "contract"
DEFAULT_ENSEMBLE = "segment"
#: Models written beside a network NAME, as ``NAME_<kind>``.
NETWORK_EXTRAS = (DETECTION, CONFIDENCE)
#: Name endings the repository's own entries use (windows, fuse steps of named ensembles, network extras), so no
#: network may take them.
RESERVED_SUFFIXES = (WINDOW_SUFFIX, "_fuse", *(f"_{kind}" for kind in NETWORK_EXTRAS))
#: Triton data type of each contract dtype.
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "int16": "TYPE_INT16", "uint8": "TYPE_UINT8"}
#: Contract fields every member of one ensemble must share, or their probabilities cannot be averaged.
SHARED_CONTRACT_FIELDS = ("class_names", "spacing_mm", "context_slices", "test_spacings_mm", "anti_aliasing")

#: Network runtimes: ONNX Runtime in the python backend, and Triton's native platforms.
PYTHON, ONNXRUNTIME, TENSORRT_PLAN, LIBTORCH = "python", "onnxruntime", "tensorrt_plan", "pytorch_libtorch"
RUNTIMES = (PYTHON, ONNXRUNTIME, TENSORRT_PLAN, LIBTORCH)
#: The network file of each runtime: the name Triton's backends look for when no default_model_filename is set.
MODEL_FILENAMES = {PYTHON: "model.onnx", ONNXRUNTIME: "model.onnx", TENSORRT_PLAN: "model.plan", LIBTORCH: "model.pt"}
PLATFORMS = {ONNXRUNTIME: "onnxruntime_onnx", TENSORRT_PLAN: "tensorrt_plan", LIBTORCH: "pytorch_libtorch"}
_FILE_KINDS = {PYTHON: "ONNX", ONNXRUNTIME: "ONNX", TENSORRT_PLAN: "TensorRT plan", LIBTORCH: "TorchScript"}
PRECISIONS = ("fp32", "fp16")

#: A model input or output: (name, Triton data type such as ``"TYPE_FP32"``, dims with -1 for variable).
Tensor = tuple[str, str, Sequence[int]]

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

ADAPTER_TEMPLATE = '''"""Triton python-backend entry point of the {role} model.

Written by mixsup.repository. The logic lives in {module}, where it is tested
outside Triton; this file only tells the python backend where to find it.
"""
from {module} import TritonPythonModel  # noqa: F401
'''

#: A file that keeps the ensemble's otherwise empty version folder in version control.
ENSEMBLE_VERSION_NOTE = "EMPTY_ON_PURPOSE.txt"


@dataclass(frozen=True)
class ShapeProfile:
    """Input shapes a TensorRT engine is built for: batch and square in-plane side, each (min, opt, max).

    TensorRT tunes its kernels for ``opt`` and refuses shapes outside [min, max], so the defaults cover what the
    sliding-window step sends (up to ``max_batch_size`` patch-sized tiles) with room for whole 512 x 512 slices.
    """

    batch: tuple[int, int, int] = (1, 8, 16)
    side: tuple[int, int, int] = (160, 160, 512)

    def shapes(self, channels: int) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) NCHW shapes of a ``channels``-channel input."""
        return tuple((b, channels, s, s) for b, s in zip(self.batch, self.side))


@dataclass(frozen=True)
class TensorRTAccelerator:
    """The TensorRT execution provider of Triton's onnxruntime backend (``gpu_execution_accelerator``).

    Triton builds the TensorRT engines from the ONNX model when it loads it; the cache path (on the serving
    host) keeps them across restarts, which otherwise cost minutes each. ``profile`` pins the shapes the engine
    is built for; without one the provider rebuilds its engine whenever a shape outside those seen so far
    arrives.
    """

    precision: str = "fp16"
    max_workspace_size_bytes: int = 1 << 30
    engine_cache_path: str = "/tmp/mixsup_trt_cache"
    profile: ShapeProfile | None = None

    def parameters(self, input_name: str, channels: int) -> dict[str, str]:
        """The accelerator's parameters as Triton's onnxruntime backend names them, for input ``input_name``."""
        if self.precision not in PRECISIONS:
            raise InputError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        parameters = {
            "precision_mode": self.precision.upper(),
            "max_workspace_size_bytes": str(int(self.max_workspace_size_bytes)),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": self.engine_cache_path,
        }
        if self.profile is not None:
            for key, shape in zip(("min", "opt", "max"), self.profile.shapes(channels)):
                parameters[f"trt_profile_{key}_shapes"] = f"{input_name}:" + "x".join(str(n) for n in shape)
        return parameters


# ----------------------------------------------------------------------------------------------------------
# ModelConfig messages


def data_type(name: str) -> int:
    """The ``DataType`` enum value of ``"TYPE_FP32"`` and the like; an unknown name is a ValueError."""
    return mc.DataType.Value(name)


def model_inputs(tensors: Sequence[Tensor]) -> list[mc.ModelInput]:
    """``input`` entries from (name, TYPE_*, dims) triples."""
    return [mc.ModelInput(name=name, data_type=data_type(kind), dims=[int(d) for d in dims])
            for name, kind, dims in tensors]


def model_outputs(tensors: Sequence[Tensor]) -> list[mc.ModelOutput]:
    """``output`` entries from (name, TYPE_*, dims) triples."""
    return [mc.ModelOutput(name=name, data_type=data_type(kind), dims=[int(d) for d in dims])
            for name, kind, dims in tensors]


def set_parameters(config: mc.ModelConfig, parameters: Mapping[str, object]) -> None:
    """Model ``parameters`` as strings, the only kind the python backend reads."""
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)


def instance_group(count: int, kind: str = "KIND_CPU") -> mc.ModelInstanceGroup:
    """``count`` instances of ``kind`` (``KIND_CPU``, ``KIND_GPU``, ``KIND_AUTO``)."""
    return mc.ModelInstanceGroup(count=int(count), kind=mc.ModelInstanceGroup.Kind.Value(kind))


def python_model_config(
    name: str,
    max_batch_size: int,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    instance_count: int,
    parameters: Mapping[str, object],
    dynamic_batching: bool = False,
) -> mc.ModelConfig:
    """Config of a python-backend model."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=int(max_batch_size),
                            input=model_inputs(inputs), output=model_outputs(outputs),
                            instance_group=[instance_group(instance_count)])
    if dynamic_batching:
        # No queue delay (the field's default, 0): merge what is already waiting but never hold a request back
        # for company.
        config.dynamic_batching.SetInParent()
    set_parameters(config, parameters)
    return config


def network_config(
    name: str,
    contract: ModelContract,
    runtime: str = PYTHON,
    max_batch_size: int = 16,
    instance_count: int = 1,
    device: str = "auto",
    intra_op_threads: int = 0,
    accelerator: TensorRTAccelerator | None = None,
) -> mc.ModelConfig:
    """Config of a network entry: float32 raw-HU tiles [N, context, h, w] in, probabilities [N, C, h, w] out.

    ``device`` and ``intra_op_threads`` are read by the python runtime's adapter; the native runtimes place
    their instances with ``instance_group`` instead (GPU for TensorRT, Triton's choice otherwise).
    ``accelerator`` applies to ``onnxruntime`` only.
    """
    if runtime not in RUNTIMES:
        raise InputError(f"unknown network runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if accelerator is not None and runtime != ONNXRUNTIME:
        raise InputError(f"the TensorRT accelerator is an option of the {ONNXRUNTIME!r} runtime, not {runtime!r}")
    # Inputs and outputs stay float32 in every runtime: an fp16 ONNX model casts inside its graph and a TensorRT
    # engine built with FP16 keeps float32 bindings, so the sliding-window step never changes.
    inputs = [(NETWORK_INPUT, "TYPE_FP32", [contract.context_slices, -1, -1])]
    outputs = [(NETWORK_OUTPUT, "TYPE_FP32", [contract.num_classes, -1, -1])]
    if runtime == PYTHON:
        return python_model_config(name, max_batch_size, inputs, outputs, instance_count,
                                   {"DEVICE": device, "INTRA_OP_THREADS": intra_op_threads}, dynamic_batching=True)
    # TensorRT runs on GPUs only; ONNX Runtime without it and LibTorch use a GPU where there is one.
    on_gpu = runtime == TENSORRT_PLAN or accelerator is not None
    # The LibTorch backend matches a TorchScript model's single input and output to the config by position when
    # their names follow none of its conventions, so "input" / "probabilities" hold for every runtime.
    config = mc.ModelConfig(name=name, platform=PLATFORMS[runtime], max_batch_size=int(max_batch_size),
                            input=model_inputs(inputs), output=model_outputs(outputs),
                            instance_group=[instance_group(instance_count, "KIND_GPU" if on_gpu else "KIND_AUTO")])
    config.dynamic_batching.SetInParent()
    if accelerator is not None:
        tensorrt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        tensorrt.parameters.update(accelerator.parameters(NETWORK_INPUT, contract.context_slices))
    return config


def spec_tensor(spec: TensorSpec) -> Tensor:
    """A contract tensor as a config input or output of a batching model: the batch axis ``N`` left to
    ``max_batch_size``, every other variable axis -1."""
    if not spec.shape or spec.shape[0] != "N":
        raise InputError(f"tensor {spec.name!r}: the first axis must be the batch 'N', got {spec.shape}")
    return spec.name, TRITON_TYPES[spec.dtype], [-1 if isinstance(d, str) else int(d) for d in spec.shape[1:]]


def auxiliary_config(
    name: str,
    contract: ModelContract,
    max_batch_size: int = 16,
    instance_count: int = 1,
    device: str = "auto",
    intra_op_threads: int = 0,
) -> mc.ModelConfig:
    """Config of a model beside the ensembles: python backend, every input and output of ``contract``, the
    contract as parameter ``contract`` so a client learns what to send with one ``get_model_config``."""
    return python_model_config(
        name, max_batch_size, [spec_tensor(t) for t in contract.inputs], [spec_tensor(t) for t in contract.outputs],
        instance_count, {"DEVICE": device, "INTRA_OP_THREADS": intra_op_threads,
                         CONTRACT_PARAMETER: json.dumps(contract.to_dict(), sort_keys=True)},
        dynamic_batching=True)


def ensemble_step(model_name: str, input_map: Mapping[str, str],
                  output_map: Mapping[str, str]) -> mc.ModelEnsembling.Step:
    """One step of ``ensemble_scheduling``: maps are {model tensor name: ensemble tensor name}."""
    return mc.ModelEnsembling.Step(model_name=model_name, model_version=-1, input_map=dict(input_map),
                                   output_map=dict(output_map))


def ensemble_config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    steps: Sequence[mc.ModelEnsembling.Step],
    parameters: Mapping[str, object],
) -> mc.ModelConfig:
    """Config of an ensemble from its steps."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0, input=model_inputs(inputs),
                            output=model_outputs(outputs), ensemble_scheduling=mc.ModelEnsembling(step=steps))
    set_parameters(config, parameters)
    return config


def config_text(config: mc.ModelConfig) -> str:
    """``config`` in protobuf text format (UTF-8 kept readable rather than escaped)."""
    return text_format.MessageToString(config, as_utf8=True)


def read_config(path: str | os.PathLike) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` with Triton's schema; a file that does not parse is an InputError."""
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise InputError(f"{path}: not a readable Triton model config ({exc})") from None


def write_config(path: str | os.PathLike, config: mc.ModelConfig) -> Path:
    """Write ``config`` to ``path`` and parse it back, so no file that Triton would reject counts as written."""
    path = Path(path)
    path.write_text(config_text(config), encoding="utf-8")
    if read_config(path) != config:
        raise RuntimeError(f"{path}: the written config does not parse back to the same ModelConfig")
    return path


# ----------------------------------------------------------------------------------------------------------
# repository entries


def window_name(network: str) -> str:
    """The sliding-window entry of network ``network``."""
    return network + WINDOW_SUFFIX


def fuse_name(ensemble: str) -> str:
    """``fuse`` for the default ``segment`` ensemble; ``<ensemble>_fuse`` for others so they can coexist."""
    return "fuse" if ensemble == DEFAULT_ENSEMBLE else f"{ensemble}_fuse"


def auxiliary_name(network: str, kind: str) -> str:
    """The model beside network ``network`` that holds its ``kind`` outputs (``detection``, ``confidence``)."""
    if kind not in NETWORK_EXTRAS:
        raise InputError(f"no model of kind {kind!r} sits beside a network; those are {', '.join(NETWORK_EXTRAS)}")
    return f"{network}_{kind}"


def entry_names(name: str) -> list[str]:
    """Every entry an export named ``name`` may own: the model itself, its window step, its extras."""
    return [name, window_name(name), *(auxiliary_name(name, kind) for kind in NETWORK_EXTRAS)]


def check_network_name(repository: str | os.PathLike, name: str, replace: bool = False) -> None:
    """Refuse a network name that is unusable, clashes with the repository's own models, or is taken.

    Taken means any of :func:`entry_names` exists. It is only overwritten with ``replace``, and only when each
    such model is an export's (``1/contract.json``), so a replace never deletes a folder that export did not
    write.
    """
    repository = Path(repository)
    check_model_name(name)
    if name.endswith(RESERVED_SUFFIXES) or name in ("fuse", DEFAULT_ENSEMBLE):
        raise InputError(f"{name!r} would clash with the repository's own models; pick another network name")
    for entry_name in entry_names(name):
        entry = repository / entry_name
        if not entry.exists():
            continue
        if not replace:
            raise InputError(f"{entry} already exists; pick another --name or pass --replace to overwrite it")
        if entry_name != window_name(name) and not (entry / VERSION / CONTRACT_FILENAME).is_file():
            raise InputError(f"{entry} exists but is not a network entry (no {VERSION}/{CONTRACT_FILENAME}); "
                             "not replacing it")


def clear_entries(repository: str | os.PathLike, name: str) -> None:
    """Remove every entry of :func:`entry_names` ``name`` that exists (after :func:`check_network_name` allowed
    the replace), so no model, window or extra of the previous export stays behind."""
    for entry_name in entry_names(name):
        entry = Path(repository) / entry_name
        if entry.exists():
            shutil.rmtree(entry)


def write_network(
    repository: str | os.PathLike,
    name: str,
    model_path: str | os.PathLike,
    contract: ModelContract,
    instance_count: int = 1,
    max_batch_size: int = 16,
    device: str = "auto",
    *,
    runtime: str = PYTHON,
    accelerator: TensorRTAccelerator | None = None,
    replace: bool = False,
    overlap: float = 0.25,
    batch_size: int = 8,
    sigma_scale: float = 0.125,
    intra_op_threads: int = 0,
    max_slice: int = DEFAULT_MAX_SLICE,
) -> Path:
    """Write the network entry ``name`` (``model_path`` run by ``runtime``) and its sliding-window entry
    ``name_window``.

    The window step sends whole slices, padded to the contract's ``size_divisor``, when they fit ``max_slice``
    pixels a side (0: never), and tiles of the contract's ``patch_size`` beyond (:mod:`mixsup.serving.tiling`).
    It runs a ``python``-runtime network in its own process, with ``instance_count`` instances of its own, and
    calls a native runtime's network over BLS (:mod:`mixsup.serving.triton.window`).
    ``model_path`` is an ONNX file for the ``python`` and ``onnxruntime`` runtimes, a serialized TensorRT engine
    for ``tensorrt_plan`` and a TorchScript file for ``pytorch_libtorch``. ``batch_size`` tiles go to the network
    per request, so it must not exceed ``max_batch_size``. An existing entry of that name is an InputError unless
    ``replace``, which removes it and its window and extras first (no stale model file of another runtime, and
    no detection or confidence model of the previous network, stays behind). Returns the network's folder.
    """
    repository = Path(repository)
    check_network_name(repository, name, replace)
    if runtime not in RUNTIMES:
        raise InputError(f"unknown network runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such {_FILE_KINDS[runtime]} file")
    if not 1 <= batch_size <= max_batch_size:
        raise InputError(f"window batch size {batch_size} must be between 1 and max_batch_size {max_batch_size}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if sigma_scale <= 0:
        raise InputError(f"sigma_scale must be positive, got {sigma_scale}")
    if max_slice < 0:
        raise InputError(f"max_slice must be 0 (always tile) or more, got {max_slice}")
    config = network_config(name, contract, runtime, max_batch_size, instance_count, device, intra_op_threads,
                            accelerator)

    network_dir = repository / name
    window_dir = repository / window_name(name)
    clear_entries(repository, name)  # check_network_name let any existing one through: replace was asked for
    version_dir = network_dir / VERSION
    version_dir.mkdir(parents=True)
    destination = version_dir / MODEL_FILENAMES[runtime]
    if runtime in (PYTHON, ONNXRUNTIME):
        copy_onnx(model_path, destination)
    else:
        shutil.copyfile(model_path, destination)
    contract.save(version_dir / CONTRACT_FILENAME)
    if runtime == PYTHON:
        write_adapter(version_dir, "network", "mixsup.serving.triton.network")
    write_config(network_dir / "config.pbtxt", config)

    (window_dir / VERSION).mkdir(parents=True)
    write_adapter(window_dir / VERSION, "sliding-window", "mixsup.serving.triton.window")
    in_step = runtime == PYTHON
    write_config(window_dir / "config.pbtxt", python_model_config(
        window_name(name),
        max_batch_size=0,
        inputs=[(VOLUME_INPUT, "TYPE_INT16", [-1, -1, -1])],
        outputs=[(NETWORK_OUTPUT, "TYPE_FP16", [-1, -1, -1, -1]), (LABELS_OUTPUT, "TYPE_UINT8", [-1, -1, -1])],
        # In step the window's instances are the ones that run the network; over BLS one (async) instance only
        # coordinates and the network's instances work.
        instance_count=instance_count if in_step else 1,
        parameters={
            "NETWORK": name,
            "ROI": ",".join(str(n) for n in contract.patch_size),
            "OVERLAP": overlap,
            "BATCH_SIZE": batch_size,
            "SIGMA_SCALE": sigma_scale,
            "NUM_CLASSES": contract.num_classes,
            "CONTEXT_SLICES": contract.context_slices,
            "MAX_SLICE": max_slice,
            "SIZE_DIVISOR": contract.size_divisor,
            # The window step runs a python-runtime network in its own process, sparing every batch two copies
            # through Triton (mixsup.serving.triton.window); a native runtime's network it calls over BLS.
            "NETWORK_IN_STEP": str(in_step).lower(),
            **threshold_parameter(contract.lesion_threshold),
        },
    ))
    return network_dir


def write_auxiliary(
    repository: str | os.PathLike,
    name: str,
    model_path: str | os.PathLike,
    contract: ModelContract,
    *,
    instance_count: int = 1,
    max_batch_size: int = 16,
    device: str = "auto",
    intra_op_threads: int = 0,
    replace: bool = False,
) -> Path:
    """Write a model beside the ensembles: the ONNX file ``model_path`` run by ONNX Runtime in the python backend
    (adapter ``mixsup.serving.triton.onnx_model``), with every tensor ``contract`` names.

    An ``annotator`` takes a network's place in the naming: ``name`` is checked like a network's and a replace
    clears every entry of that name. A ``detection`` or ``confidence`` model is written after its network and
    must be named :func:`auxiliary_name` of it; it replaces an existing one only with ``replace``. Returns the
    model's folder.
    """
    repository = Path(repository)
    if contract.kind == SEGMENTATION:
        raise InputError("a segmentation network is written with its window step by write_network")
    if contract.kind == ANNOTATOR:
        check_network_name(repository, name, replace)
        clear_entries(repository, name)
    else:
        network = name[: -len(contract.kind) - 1]
        if name != auxiliary_name(network, contract.kind) or not (repository / network / VERSION /
                                                                   CONTRACT_FILENAME).is_file():
            raise InputError(f"{name!r}: a {contract.kind} model is named <network>_{contract.kind} after a network "
                             "already in the repository")
        entry = repository / name
        if entry.exists():
            if not replace:
                raise InputError(f"{entry} already exists; pass --replace to overwrite it")
            shutil.rmtree(entry)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such ONNX file")
    config = auxiliary_config(name, contract, max_batch_size, instance_count, device, intra_op_threads)
    version_dir = repository / name / VERSION
    version_dir.mkdir(parents=True)
    copy_onnx(model_path, version_dir / MODEL_FILENAMES[PYTHON])
    contract.save(version_dir / CONTRACT_FILENAME)
    write_adapter(version_dir, contract.kind, "mixsup.serving.triton.onnx_model")
    write_config(repository / name / "config.pbtxt", config)
    return repository / name


def write_ensemble(
    repository: str | os.PathLike,
    members: Sequence[tuple[str, float]] | None = None,
    name: str = DEFAULT_ENSEMBLE,
) -> Path:
    """Write the ensemble ``name`` over ``members`` (network name, weight) and, for more than one member, its fuse
    model (one member's window step gives the labels itself).

    ``members=None`` takes every network in the repository with weight 1. The ensemble's config carries the
    members' shared contract as parameter ``contract``. Returns the ensemble's folder.
    """
    repository = Path(repository)
    check_model_name(name)
    if members is None:
        members = [(network, 1.0) for network in list_networks(repository)]
    members = [(str(member), float(weight)) for member, weight in members]
    if not members:
        raise InputError(f"{repository}: no networks to put in the ensemble {name!r}")
    names = [member for member, _ in members]
    if len(set(names)) != len(names):
        raise InputError(f"ensemble {name!r} lists a member twice: {names}")
    for member, weight in members:
        if not weight > 0:
            raise InputError(f"ensemble member {member!r} has weight {weight}; weights must be positive")
        if not (repository / window_name(member) / "config.pbtxt").is_file():
            raise InputError(f"{repository}: {member!r} has no {window_name(member)!r} entry; write_network first")
    contracts = [ModelContract.load(repository / member / VERSION / CONTRACT_FILENAME) for member in names]
    for member, contract in zip(names, contracts):
        if contract.kind != SEGMENTATION:
            raise InputError(f"{member!r} is a {contract.kind} model; only segmentation networks join an ensemble")
    check_contracts_agree(names, contracts)
    contract = ensemble_contract(contracts[0], members, contracts)
    num_classes = contract.num_classes

    fuser = fuse_name(name)
    if len(members) == 1:
        # The window step decides its own labels: a fuse step would only copy them.
        shutil.rmtree(repository / fuser, ignore_errors=True)
        steps = [ensemble_step(window_name(names[0]), {VOLUME_INPUT: VOLUME_INPUT},
                               {LABELS_OUTPUT: LABELS_OUTPUT, NETWORK_OUTPUT: NETWORK_OUTPUT})]
    else:
        steps = write_fuse_step(repository, fuser, members, num_classes, contract.lesion_threshold)
    ensemble_dir = repository / name
    # Triton needs the ensemble's version folder to exist; a file in it keeps the folder when the repository
    # goes through git, which drops empty folders (a fresh clone then failed to load 'segment').
    (ensemble_dir / VERSION).mkdir(parents=True, exist_ok=True)
    (ensemble_dir / VERSION / ENSEMBLE_VERSION_NOTE).write_text(
        "This version folder of a Triton ensemble is empty on purpose; the steps live in ../config.pbtxt.\n")
    write_config(ensemble_dir / "config.pbtxt", ensemble_config(
        name,
        inputs=[(VOLUME_INPUT, "TYPE_INT16", [-1, -1, -1])],
        outputs=[(LABELS_OUTPUT, "TYPE_UINT8", [-1, -1, -1]), (NETWORK_OUTPUT, "TYPE_FP16", [-1, -1, -1, -1])],
        steps=steps,
        parameters={CONTRACT_PARAMETER: json.dumps(contract.to_dict(), sort_keys=True)},
    ))
    return ensemble_dir


def threshold_parameter(lesion_threshold: float | None) -> dict[str, str]:
    """A window or fuse step's parameter for a contract's ``lesion_threshold`` (none: the step argmaxes)."""
    return {} if lesion_threshold is None else {LESION_THRESHOLD_PARAMETER: repr(float(lesion_threshold))}


def write_fuse_step(repository: Path, fuser: str, members: Sequence[tuple[str, float]],
                    num_classes: int, lesion_threshold: float | None = None) -> list[mc.ModelEnsembling.Step]:
    """Write the fuse model ``fuser`` over ``members``; returns the ensemble's steps (every window, then it). The
    fused labels are decided with ``lesion_threshold``: the ensemble's contract's, its first member's."""
    member_outputs = [f"probabilities_{index}" for index in range(len(members))]
    fuse_dir = repository / fuser
    (fuse_dir / VERSION).mkdir(parents=True, exist_ok=True)
    write_adapter(fuse_dir / VERSION, "fuse", "mixsup.serving.triton.fuse")
    write_config(fuse_dir / "config.pbtxt", python_model_config(
        fuser,
        max_batch_size=0,
        inputs=[(output, "TYPE_FP16", [-1, -1, -1, -1]) for output in member_outputs],
        outputs=[(LABELS_OUTPUT, "TYPE_UINT8", [-1, -1, -1]), (NETWORK_OUTPUT, "TYPE_FP16", [-1, -1, -1, -1])],
        instance_count=1,
        parameters={"WEIGHTS": ",".join(repr(weight) for _, weight in members), "NUM_CLASSES": num_classes,
                    **threshold_parameter(lesion_threshold)},
    ))
    steps = [
        ensemble_step(window_name(member), {VOLUME_INPUT: VOLUME_INPUT}, {NETWORK_OUTPUT: output})
        for (member, _), output in zip(members, member_outputs)
    ]
    steps.append(ensemble_step(
        fuser,
        {output: output for output in member_outputs},
        {LABELS_OUTPUT: LABELS_OUTPUT, NETWORK_OUTPUT: NETWORK_OUTPUT},
    ))
    return steps


def list_networks(repository: str | os.PathLike, kind: str = SEGMENTATION) -> list[str]:
    """Names of the exported models of ``kind`` in ``repository`` (folders holding ``1/contract.json``; by
    default the segmentation networks, which ensembles are made of), sorted."""
    repository = Path(repository)
    if not repository.is_dir():
        raise InputError(f"{repository}: no such model repository")
    return sorted(entry.name for entry in repository.iterdir() if (entry / VERSION / CONTRACT_FILENAME).is_file()
                  and ModelContract.load(entry / VERSION / CONTRACT_FILENAME).kind == kind)


def read_ensemble(repository: str | os.PathLike, name: str) -> list[tuple[str, float]] | None:
    """The members (network, weight) of ensemble ``name`` as Triton serves them: the networks whose window steps
    it runs, in order, and the weights its fuse step applies. None when the repository has no model ``name``;
    a model that is not a sliding-window ensemble like :func:`write_ensemble` writes is an InputError."""
    folder = Path(repository) / name
    if not folder.exists():
        return None
    config = read_config(folder / "config.pbtxt")
    if config.platform != "ensemble":
        raise InputError(f"{folder} is a model, not an ensemble")
    models = [step.model_name for step in config.ensemble_scheduling.step]
    if len(models) == 1 and models[0].endswith(WINDOW_SUFFIX):
        # A lone member's weight changes nothing Triton computes; the contract keeps it for when members join.
        member = models[0][: -len(WINDOW_SUFFIX)]
        told = ModelContract.from_json(config.parameters[CONTRACT_PARAMETER].string_value).extra
        weights = [m["weight"] for m in told.get("ensemble_members", []) if m.get("name") == member]
        return [(member, float(weights[0]) if weights else 1.0)]
    if len(models) < 2 or models[-1] != fuse_name(name) or not all(m.endswith(WINDOW_SUFFIX) for m in models[:-1]):
        raise InputError(f"{folder}: not a sliding-window ensemble with its fuse step {fuse_name(name)!r} "
                         f"(steps {models})")
    members = [model[: -len(WINDOW_SUFFIX)] for model in models[:-1]]
    fuse = read_config(Path(repository) / fuse_name(name) / "config.pbtxt")
    weights = [float(w) for w in fuse.parameters["WEIGHTS"].string_value.split(",") if w.strip()]
    if len(weights) != len(members):
        raise InputError(f"{folder}: {len(members)} members but {len(weights)} weights in {fuse_name(name)!r}")
    return list(zip(members, weights))


def list_ensembles(repository: str | os.PathLike) -> dict[str, list[tuple[str, float]]]:
    """Every ensemble in ``repository`` with its members (:func:`read_ensemble`), by name."""
    repository = Path(repository)
    if not repository.is_dir():
        return {}
    ensembles = {}
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        if read_config(config_path).platform == "ensemble":
            ensembles[config_path.parent.name] = read_ensemble(repository, config_path.parent.name)
    return ensembles


def check_model_name(name: str) -> None:
    """A name Triton and the file system both accept, or an InputError."""
    if not _NAME_PATTERN.match(name):
        raise InputError(f"{name!r} is not a usable model name (letters, digits, '_', '-', '.')")


def check_contracts_agree(names: Sequence[str], contracts: Sequence[ModelContract]) -> None:
    """Members of one ensemble must share classes, spacings and context, or averaging them is meaningless."""
    first = contracts[0]
    for member, contract in zip(names[1:], contracts[1:]):
        for field_name in SHARED_CONTRACT_FIELDS:
            if getattr(contract, field_name) != getattr(first, field_name):
                raise InputError(
                    f"ensemble members {names[0]!r} and {member!r} disagree on {field_name}: "
                    f"{getattr(first, field_name)} vs {getattr(contract, field_name)}"
                )


def ensemble_contract(
    base: ModelContract, members: Sequence[tuple[str, float]], contracts: Sequence[ModelContract]
) -> ModelContract:
    """The contract a client sees for the ensemble: the shared fields plus, in ``extra``, who the members are."""
    described = [
        {"name": member, "weight": weight, "patch_size": list(contract.patch_size),
         "recipe": contract.recipe, "checkpoint": contract.checkpoint}
        for (member, weight), contract in zip(members, contracts)
    ]
    return base.replace(extra={**base.extra, "ensemble_members": described})


def write_adapter(version_dir: Path, role: str, module: str) -> Path:
    """The thin ``model.py`` the python backend loads, pointing at the tested ``module``."""
    path = version_dir / "model.py"
    path.write_text(ADAPTER_TEMPLATE.format(role=role, module=module))
    return path


def copy_onnx(source: Path, destination: Path) -> None:
    """Copy an ONNX model and the external-data files it references (kept under their own names)."""
    shutil.copyfile(source, destination)
    for location in external_data_locations(source):
        data_source = source.parent / location
        if not data_source.is_file():
            raise InputError(f"{source}: external data file {location!r} is missing")
        target = destination.parent / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_source, target)


def external_data_locations(onnx_path: Path) -> list[str]:
    """Relative paths of the external-data files an ONNX model references (torch's dynamo export writes one)."""
    import onnx  # only needed here; keeps `import mixsup.repository` light

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations: set[str] = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(entries["location"])
    return sorted(locations)


def _all_tensors(graph):
    """Initializers and attribute tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)
