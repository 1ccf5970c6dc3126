"""Fixtures shared across test files: tiny phantoms and a tiny trained checkpoint (made once per session)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/triton_utils.py


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    from mixsup.training.data.cli import main as data_main

    root = tmp_path_factory.mktemp("phantoms")
    assert data_main(["phantoms", str(root), "--n", "3", "--seed", "4", "--shape", "8", "64", "64"]) == 0
    return root


@pytest.fixture(scope="session")
def tiny_mixed_phantoms(tmp_path_factory) -> Path:
    """Three strong cases (two train, one validates) and one weak case: the least a box-supervised recipe needs."""
    from mixsup.training.data.cli import main as data_main

    root = tmp_path_factory.mktemp("mixed-phantoms")
    assert data_main(["phantoms", str(root), "--n", "4", "--seed", "4", "--shape", "8", "64", "64",
                      "--weak-fraction", "0.25", "-q"]) == 0
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_phantoms, tmp_path_factory) -> Path:
    from mixsup.training.cli import main as train_main

    out = tmp_path_factory.mktemp("tiny-run")
    assert train_main(["unet", "--data", str(tiny_phantoms), "--out", str(out), "--preset", "tiny", "--no-progress"]) == 0
    return out / "best.pt"


@pytest.fixture(scope="session")
def benchmark_module():
    """Import a script of ``benchmarks/`` by name (they are scripts, not a package, and import each other)."""
    import importlib

    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")

    def load(name: str):
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load
