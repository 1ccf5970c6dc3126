"""Packaging for where each part runs: the base install is the client (no torch, Triton or ONNX), the stages that
need more come as extras, and no extra combination we document installs both ONNX Runtime wheels."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Core modules the client does not use: the repository writer is export-side.
EXPORT_SIDE_CORE = {"repository.py"}
HEAVY = {"torch", "onnx", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton", "tensorrt"}


def distribution_name(requirement: str) -> str:
    """``"tritonclient[grpc,http]>=2.40"`` -> ``"tritonclient"`` (normalized as PEP 503 does)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def extra(name: str) -> set[str]:
    """Distribution names an extra brings, following self-references like ``mixsup[serve,train]``."""
    names: set[str] = set()
    for requirement in PYPROJECT["optional-dependencies"][name]:
        if distribution_name(requirement) == "mixsup":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= extra(inner.strip())
        else:
            names.add(distribution_name(requirement))
    return names


def third_party_imports(files: list[Path]) -> set[str]:
    """Top-level names of every non-stdlib, non-mixsup import in ``files``, function-level ones included."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            names |= {m.split(".")[0] for m in modules}
    return names - set(sys.stdlib_module_names) - {"mixsup"}


def test_base_install_covers_everything_the_client_imports():
    base = {distribution_name(r) for r in PYPROJECT["dependencies"]}
    files = sorted((ROOT / "clients").glob("*.py"))
    files += [p for p in sorted((ROOT / "mixsup").glob("*.py")) if p.name not in EXPORT_SIDE_CORE]
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in third_party_imports(files):
        distributions = {distribution_name(d) for d in providers.get(module, [])}
        assert distributions, f"{module}: imported by the client but installed by no distribution here"
        if not distributions & base:
            missing[module] = sorted(distributions)
    assert not missing, f"the client imports modules the base install lacks: {missing}"


def test_base_install_has_no_heavy_stage_dependencies():
    base = {distribution_name(r) for r in PYPROJECT["dependencies"]}
    assert not base & HEAVY, f"base install pulls {sorted(base & HEAVY)}; they belong in an extra"


def test_extras_split_by_stage_and_never_mix_onnx_runtime_wheels():
    assert {"nvidia-pytriton", "onnxruntime"} <= extra("serve")
    assert {"torch", "onnx"} <= extra("train")
    assert extra("all") == extra("serve") | extra("train")
    for documented in (extra("all"), extra("train") | extra("gpu")):
        assert not {"onnxruntime", "onnxruntime-gpu"} <= documented, "both ONNX Runtime wheels in one install"
    assert "onnxruntime-gpu" in extra("gpu")


def test_readme_commands_install_every_stage():
    assert "install.sh all)" in (ROOT / "scripts" / "quickstart.sh").read_text()
    assert "install.sh all,test)" in (ROOT / "scripts" / "test.sh").read_text()
