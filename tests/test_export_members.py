"""``mixsup-export --member ENSEMBLE --weight W``: exports join sliding-window ensembles with chosen weights
(folds, recipes), an existing ensemble is extended only when asked, and nothing merges into ``segment`` (the
bundled one included) by accident."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from test_export_recipes import build_checkpoint
from tritonclient.grpc import model_config_pb2

from mixsup.contract import ModelContract
from mixsup.export.cli import main as export_main
from mixsup.repository import read_ensemble

BUNDLED = Path(__file__).resolve().parents[1] / "model_repository"


def read_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def files_under(root):
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} if root.exists() else {}


def served_members(repository, ensemble="segment"):
    """(member, weight) as Triton would run them, read from the configs themselves: window steps and the fuse
    step's WEIGHTS, plus the members the ensemble's contract tells clients about."""
    config = read_config(repository / ensemble / "config.pbtxt")
    fuse = "fuse" if ensemble == "segment" else f"{ensemble}_fuse"
    steps = [step.model_name for step in config.ensemble_scheduling.step]
    told = ModelContract.from_json(config.parameters["contract"].string_value).extra["ensemble_members"]
    if len(steps) == 1:  # one member: its window step alone, no fuse step; the weight lives in the contract only
        assert not (repository / fuse).exists() and len(told) == 1
        return [(steps[0][: -len("_window")], told[0]["weight"])]
    assert steps[-1] == fuse
    weights = [float(w) for w in read_config(repository / fuse / "config.pbtxt").parameters["WEIGHTS"]
               .string_value.split(",")]
    members = [(step[: -len("_window")], weight) for step, weight in zip(steps[:-1], weights)]
    assert [(m["name"], m["weight"]) for m in told] == members
    return members


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two unet checkpoints (folds) and one whose contract has another spacing."""
    root = tmp_path_factory.mktemp("members")
    paths = {}
    for seed, name in enumerate(["fold0", "fold1", "coarse"]):
        paths[name] = root / f"{name}.pt"
        build_checkpoint("unet", paths[name], seed=seed)
    payload = torch.load(paths["coarse"], weights_only=False)
    payload["contract"]["spacing_mm"] = [0.8, 0.8]
    torch.save(payload, paths["coarse"])
    return paths


def export(checkpoint, repository, name, *flags):
    return export_main([str(checkpoint), "--repository", str(repository), "--name", name, *flags])


def one_line_error(capsys):
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_members_and_weights(checkpoints, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export(checkpoints["fold0"], repo, "a") == 0  # a new repository: segment starts with a alone
    assert served_members(repo) == [("a", 1.0)]

    # never merged silently: a second network is refused while segment exists, and nothing is written
    before = files_under(repo)
    capsys.readouterr()
    assert export(checkpoints["fold1"], repo, "b") == 2
    line = one_line_error(capsys)
    assert "'segment' already exists" in line and "--member segment" in line and "--replace" in line
    assert files_under(repo) == before

    assert export(checkpoints["fold1"], repo, "b", "--member", "segment", "--weight", "3") == 0
    assert served_members(repo) == [("a", 1.0), ("b", 3.0)]
    assert read_ensemble(repo, "segment") == [("a", 1.0), ("b", 3.0)]

    # another ensemble beside segment, with its own fuse step; segment is left as it was
    assert export(checkpoints["fold0"], repo, "c", "--member", "folds", "--weight", "2") == 0
    assert export(checkpoints["fold1"], repo, "d", "--member", "folds", "--weight", "0.5") == 0
    assert served_members(repo, "folds") == [("c", 2.0), ("d", 0.5)]
    assert served_members(repo) == [("a", 1.0), ("b", 3.0)]

    # --member on a member: its weight changes, its place and the others' weights stay
    assert export(checkpoints["fold0"], repo, "c", "--replace", "--member", "folds", "--weight", "4") == 0
    assert served_members(repo, "folds") == [("c", 4.0), ("d", 0.5)]

    # re-exporting a member without --member keeps its ensemble as it is, and rewrites every ensemble it is in
    assert export(checkpoints["fold1"], repo, "a", "--replace") == 0
    assert served_members(repo) == [("a", 1.0), ("b", 3.0)]
    told = ModelContract.from_json(read_config(repo / "segment" / "config.pbtxt").parameters["contract"]
                                   .string_value).extra["ensemble_members"]
    assert told[0]["checkpoint"].startswith("fold1.pt ")  # the new checkpoint, not the old one
    assert export(checkpoints["fold1"], repo, "b", "--replace", "--member", "folds") == 0
    assert served_members(repo) == [("a", 1.0), ("b", 3.0)]
    assert served_members(repo, "folds") == [("c", 4.0), ("d", 0.5), ("b", 1.0)]

    # --replace on a new name makes it segment's only member (the others stay in the repository)
    assert export(checkpoints["fold0"], repo, "e", "--replace") == 0
    assert served_members(repo) == [("e", 1.0)]
    assert (repo / "a" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--weight", "2"], "--weight is the weight of a --member"),
    (["--member", "segment", "--weight", "0"], "--weight must be a positive number"),
    (["--member", "segment", "--weight", "nan"], "--weight must be a positive number"),
    (["--member", "segment", "--no-ensemble"], "--no-ensemble"),
    (["--member", "x"], "would clash"),
    (["--member", "y_window"], "would clash"),
    (["--member", "a"], "is a model, not an ensemble"),
])
def test_bad_membership_exits_2_and_writes_nothing(checkpoints, tmp_path, capsys, flags, message):
    assert export(checkpoints["fold0"], tmp_path, "a") == 0
    before = files_under(tmp_path)
    capsys.readouterr()
    assert export(checkpoints["fold1"], tmp_path, "x", *flags) == 2
    line = one_line_error(capsys)
    assert line.startswith("mixsup-export: error: ") and message in line
    assert files_under(tmp_path) == before


def test_members_must_agree_before_anything_is_written(checkpoints, tmp_path, capsys):
    assert export(checkpoints["fold0"], tmp_path, "a") == 0
    before = files_under(tmp_path)
    capsys.readouterr()
    assert export(checkpoints["coarse"], tmp_path, "b", "--member", "segment") == 2
    assert "disagree on spacing_mm" in one_line_error(capsys)
    assert files_under(tmp_path) == before
    # on its own it is fine
    assert export(checkpoints["coarse"], tmp_path, "b", "--member", "coarse") == 0


def test_bundled_segment_is_never_merged_into_silently(checkpoints, tmp_path, capsys):
    repo = tmp_path / "model_repository"
    shutil.copytree(BUNDLED, repo)
    bundled_contract = ModelContract.load(repo / "unet" / "1")
    payload = torch.load(checkpoints["fold0"], weights_only=False)
    payload["contract"]["spacing_mm"] = list(bundled_contract.spacing_mm)  # so that it may join
    torch.save(payload, tmp_path / "fold.pt")
    before = files_under(repo)
    capsys.readouterr()
    assert export(tmp_path / "fold.pt", repo, "student") == 2
    assert "'segment' already exists (members unet)" in one_line_error(capsys)
    assert files_under(repo) == before
    assert export(tmp_path / "fold.pt", repo, "student", "--member", "segment", "--test-spacings", "1.6") == 2
    assert "disagree on test_spacings_mm" in one_line_error(capsys)
    assert files_under(repo) == before
    # A network that saw its scans prepared otherwise cannot share the one volume the client sends the ensemble.
    payload["contract"]["anti_aliasing"] = not bundled_contract.anti_aliasing
    torch.save(payload, tmp_path / "other.pt")
    assert export(tmp_path / "other.pt", repo, "student", "--member", "segment") == 2
    assert "disagree on anti_aliasing" in one_line_error(capsys)
    assert files_under(repo) == before
    payload["contract"]["anti_aliasing"] = bundled_contract.anti_aliasing
    torch.save(payload, tmp_path / "fold.pt")
    assert export(tmp_path / "fold.pt", repo, "student", "--member", "segment", "--weight", "0.5") == 0
    assert served_members(repo) == [("unet", 1.0), ("student", 0.5)]
    # It joins at the bundled model's test spacings: the client runs the whole ensemble at each.
    assert ModelContract.load(repo / "student" / "1").test_spacings_mm == bundled_contract.test_spacings_mm != ()
