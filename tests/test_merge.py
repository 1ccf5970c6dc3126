"""``mixsup-data merge``: one manifest over several datasets, the validation cases drawn from each."""
from __future__ import annotations

import numpy as np
import pytest

from mixsup.errors import EXIT_BAD_INPUT
from mixsup.training.data import cli
from mixsup.training.data.manifest import load_dataset, read_case

SHAPE = ("4", "32", "32")


@pytest.fixture(scope="module")
def two_styles(tmp_path_factory):
    """4 classic phantoms (the last one weak) and 3 randomized ones, side by side in one work folder."""
    work = tmp_path_factory.mktemp("merge")
    assert cli.main(["phantoms", str(work / "classic"), "--n", "4", "--seed", "1", "--shape", *SHAPE,
                     "--weak-fraction", "0.25", "-q"]) == 0
    assert cli.main(["phantoms", str(work / "randomized"), "--n", "3", "--seed", "5", "--shape", *SHAPE,
                     "--style", "randomized", "-q"]) == 0
    return work


def test_merged_manifest_orders_each_datasets_last_cases_last(two_styles):
    out = two_styles / "runs" / "manifest.json"  # a folder that does not exist yet
    assert cli.main(["merge", str(out), str(two_styles / "classic"), str(two_styles / "randomized"),
                     "--first", "3", "--last-of-each", "1"]) == 0
    merged = load_dataset(out)
    sources = {style: load_dataset(two_styles / style).cases for style in ("classic", "randomized")}
    expected = [sources["classic"][0], sources["classic"][1], sources["randomized"][0], sources["randomized"][1],
                sources["classic"][2], sources["randomized"][2]]
    assert [case.case for case in merged.cases] == [str(i) for i in range(6)]
    assert [case.volume for case in merged.cases][:2] == ["../classic/volume-0.nii.gz", "../classic/volume-1.nii.gz"]
    for case, source in zip(merged.cases, expected):
        assert case.supervision == source.supervision
        assert (case.path(case.volume).resolve() == source.path(source.volume).resolve())
        assert case.instances is not None and case.path(case.instances).is_file()
    # the same arrays come back through the merged manifest
    first, original = read_case(merged.cases[4]), read_case(expected[4])
    assert np.array_equal(first.volume, original.volume) and np.array_equal(first.labels, original.labels)


def test_supervision_and_missing_files_are_kept_as_they_are(two_styles, tmp_path):
    out = tmp_path / "all.json"
    assert cli.main(["merge", str(out), str(two_styles / "classic"), str(two_styles / "randomized")]) == 0
    merged = load_dataset(out)
    assert [case.supervision for case in merged.cases] == ["strong"] * 3 + ["weak"] + ["strong"] * 3
    weak = merged.cases[3]
    assert weak.segmentation is None and weak.instances is None and weak.path(weak.boxes).is_file()


@pytest.mark.parametrize("flags, message", [(["--last-of-each", "3"], "last_of_each"),
                                            (["--first", "0"], "first must be")])
def test_a_bad_request_is_one_line_and_writes_nothing(two_styles, tmp_path, capsys, flags, message):
    out = tmp_path / "bad.json"
    code = cli.main(["merge", str(out), str(two_styles / "classic"), str(two_styles / "randomized"), *flags])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_missing_dataset_is_named(tmp_path, capsys):
    code = cli.main(["merge", str(tmp_path / "m.json"), str(tmp_path / "nowhere")])
    assert code == EXIT_BAD_INPUT and "nowhere" in capsys.readouterr().err
