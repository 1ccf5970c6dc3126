"""The mixed-supervision benchmark runs end to end on its smoke preset and writes the promised results."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def benchmark(benchmark_module):
    return benchmark_module("mixed_supervision")


def test_split_manifests_share_validation_and_hide_weak_masks(benchmark, tmp_path):
    from mixsup.training.data.manifest import load_dataset

    pool = benchmark.make_phantoms(tmp_path / "pool", 10, 7, (8, 48, 48))
    rows = {row.method: row for row in benchmark.ROWS}
    manifests = {name: load_dataset(benchmark.write_split_manifest(pool, rows[name], 3, 1, pool / f"m-{i}.json"))
                 for i, name in enumerate(("strong-only", "full", "teacher-student", "teacher-student perturbed"))}
    validation = {name: m.strong()[-1].case for name, m in manifests.items()}
    assert len(set(validation.values())) == 1  # every row of a seed validates on the same case
    counts = {name: (len(m.strong()) - 1, len(m.weak())) for name, m in manifests.items()}
    assert counts == {"strong-only": (3, 0), "full": (9, 0), "teacher-student": (3, 6),
                      "teacher-student perturbed": (3, 6)}
    strong_only, mixed = manifests["strong-only"], manifests["teacher-student"]
    assert [c.case for c in strong_only.strong()] == [c.case for c in mixed.strong()]
    assert all(c.segmentation is None and c.boxes for c in mixed.weak())
    assert all(c.instances for c in mixed.strong())  # lesion ids come along for the lazy recipe
    perturbed = manifests["teacher-student perturbed"].weak()
    assert all(c.boxes_perturbed and "perturbed-seed3" in c.boxes for c in perturbed)


def test_interval_is_a_students_t_interval(benchmark):
    assert benchmark.interval([0.5]) == {"mean": 0.5, "ci95": 0.0}
    result = benchmark.interval([0.6, 0.7, 0.8])
    assert result["mean"] == pytest.approx(0.7)
    assert result["ci95"] == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)


def test_tumour_burden_is_lesion_over_liver(benchmark):
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, :2] = 1
    labels[0, 0, :2] = 2
    assert benchmark.tumour_burden(labels) == pytest.approx(2 / 8)
    assert benchmark.tumour_burden(np.zeros((2, 2, 2), np.uint8)) == 0.0


def test_lesion_voxel_counts_separate_false_from_missed_lesion(benchmark):
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 2                # 4 true lesion voxels
    truth[1] = 1
    predicted = truth.copy()
    predicted[0, 0, :2] = 1             # 2 of them missed
    predicted[1, 3, :] = 2              # 4 liver voxels called lesion
    assert benchmark.lesion_voxel_counts(predicted, truth).tolist() == [2, 6, 4]


def test_precision_and_recall_come_from_pooled_counts(benchmark):
    row = {"lesion_voxels_found": 2.0, "lesion_voxels_predicted": 8.0, "lesion_voxels_true": 4.0,
           "foreign_lesion_voxels_found": 0, "foreign_lesion_voxels_predicted": 0, "foreign_lesion_voxels_true": 5}
    assert benchmark.precision_recall(row) == (0.25, 0.5)
    assert benchmark.format_precision_recall(row) == "0.25 / 0.50"
    assert benchmark.precision_recall(row, "foreign_") == (None, 0.0)
    assert benchmark.format_precision_recall(row, "foreign_") == "none predicted"


def test_only_the_default_table_goes_to_the_committed_results(benchmark, tmp_path):
    """A partial or modified run (rows, seeds, settings, preset) must not overwrite the committed table."""
    parser = benchmark.build_parser()

    def folder(*argv: str):
        return benchmark.results_folder(parser, parser.parse_args(list(argv)))

    assert folder() == benchmark.RESULTS
    assert folder("--work", str(tmp_path)) == benchmark.RESULTS
    assert folder("--rows", "full", "--work", str(tmp_path)) == tmp_path / "results"
    assert folder("--set", "epochs=100") == Path.cwd() / "mixed_supervision_results"
    for argv in (["--seeds", "0"], ["--sweep-seeds", "0", "1"], ["--device", "cuda"], ["--preset", "smoke"]):
        assert folder(*argv) != benchmark.RESULTS, argv


def test_smoke_preset_writes_rows_table_and_plots(benchmark, benchmark_module, tmp_path):
    results = tmp_path / "results"
    assert benchmark.main(["--preset", "smoke", "--seeds", "0", "--rows", "strong-only", "full", "teacher-student",
                           "--work", str(tmp_path / "work"), "--results", str(results)]) == 0
    document = json.loads((results / "mixed_supervision.json").read_text())
    assert [row["method"] for row in document["rows"]] == ["strong-only", "full", "teacher-student"]
    for row in document["rows"]:
        assert 0.0 <= row["liver_dice_global"] <= 1.0 and 0.0 <= row["lesion_dice_global"] <= 1.0
        assert row["per_seed"]["liver_dice_global"] == [row["liver_dice_global"]]
        assert set(row["intervals"]) >= {"liver_dice_global", "foreign_liver_dice_global", "tumour_burden_rmse",
                                         "lesion_voxels_found", "independent_lesion_voxels_true"}
    assert "pseudo_label_dice_liver" in document["rows"][2]
    assert "| teacher-student |" in (results / "mixed_supervision.md").read_text()
    assert (results / "mixed_supervision_rows.png").stat().st_size > 1000
    assert (results / "mixed_supervision_curves.png").stat().st_size > 1000
    # the curve is the exported stage's: the teacher-student row's student epochs, each seed's from its log.csv
    curve = document["rows"][2]["validation_curves"][0]
    student = [line.split(",") for line in (tmp_path / "work" / "runs" / "teacher-student-seed0" / "log.csv")
               .read_text().splitlines()[1:] if line.startswith("student,")]
    assert curve["epoch"] == [int(line[1]) for line in student]
    assert curve["dice_lesion"] == [float(line[4]) for line in student]

    # training_fit.py scores the same runs on the cases they trained on: a row without weak cases has no weak set
    fit = benchmark_module("training_fit")
    fit.main(["--work", str(tmp_path / "work"), "--preset", "smoke", "--rows", "strong-only", "teacher-student",
              "--out", str(results / "training_fit")])
    rows = json.loads((results / "training_fit.json").read_text())["rows"]
    assert set(rows["strong-only"]) == {"runs", "strong", "test"}
    assert set(rows["teacher-student"]) == {"runs", "strong", "weak", "test"}
    weak = rows["teacher-student"]["weak"]
    assert 0 <= weak["lesion_voxels_found"] <= min(weak["lesion_voxels_predicted"], weak["lesion_voxels_true"])

    # liver_breakdown.py splits the same runs' liver errors; its Dice is the table's, counted its own way
    benchmark_module("liver_breakdown").main(["--work", str(tmp_path / "work"), "--preset", "smoke", "--rows",
                                              "strong-only", "--out", str(results / "liver_breakdown")])
    row = json.loads((results / "liver_breakdown.json").read_text())["rows"]["strong-only"]
    assert row["liver_dice_global"] == pytest.approx(document["rows"][0]["liver_dice_global"], abs=1e-4)
    assert 0 <= row["false_liver_on_liver_free_slices_ml"] <= row["false_liver_ml"]
    assert sum(row["by_z_ml"].values()) == pytest.approx(row["false_liver_on_liver_free_slices_ml"], abs=0.5)


def test_liver_errors_bin_false_liver_on_liver_free_slices_by_z_distance(benchmark_module):
    false_liver = benchmark_module("false_liver")
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:3, 2:6, 2:6] = 1                     # liver on slices 1 and 2, 16 voxels each
    truth[2, 3, 3] = 2                           # a lesion counts as liver
    predicted = truth.copy()
    predicted[1, 2, 2] = 0                       # 1 missed
    predicted[2, 0, :3] = 1                      # 3 false on a liver slice
    predicted[3, 0, 0] = 1                       # 1 false, one slice (4 mm) from the liver
    predicted[5, :2, :2] = 2                     # 4 false (as lesion), three slices (12 mm) away
    errors = false_liver.liver_errors(predicted, truth, slice_mm=4.0)
    assert (errors["tp"], errors["fp"], errors["fn"]) == (31, 8, 1)
    assert errors["fp_liver_free_slices"].tolist() == [1, 0, 4, 0, 0, 0]  # bins 0-5, 5-10, 10-20, ... mm
    assert (errors["lesion_tp"], errors["lesion_fp"], errors["lesion_fn"]) == (1, 4, 0)
    for missed_as, background in ((1, 0), (0, 1)):  # a lesion taken for liver, then for background
        predicted[2, 3, 3] = missed_as
        errors = false_liver.liver_errors(predicted, truth, slice_mm=4.0)
        assert (errors["lesion_fn"], errors["lesion_fn_background"]) == (1, background)


def test_lesion_breakdown_counts_found_covered_and_false_lesion(benchmark_module):
    breakdown = benchmark_module("lesion_breakdown")
    instances = np.zeros((4, 10, 10), np.int64)
    instances[0, :2, :2] = 1            # 4 voxels: bin "0-0.5 mL" at 0.1 mL per voxel
    instances[1:3, :5, :5] = 2          # 50 voxels, 5 mL: bin "2-8 mL"
    instances[3, 5:, 5:] = 3            # 25 voxels, 2.5 mL: bin "2-8 mL"
    predicted = np.zeros_like(instances, dtype=np.uint8)
    predicted[1, :5, :5] = 2            # half of lesion 2
    predicted[3, 0, 9] = 2              # one false lesion voxel
    predicted[0, :2, :2] = 1            # lesion 1 called liver: missed
    organ = instances > 0
    organ[3, :, :9] = True              # liver around lesion 3, up to the false voxel's column (exclusive)
    outcome = breakdown.lesion_outcomes(predicted, instances, organ, voxel_ml=0.1)
    assert outcome["lesions"].tolist() == [1, 0, 2, 0]
    assert outcome["detected"].tolist() == [0, 0, 1, 0]
    assert outcome["voxels"].tolist() == [4, 0, 75, 0] and outcome["covered"].tolist() == [0, 0, 25, 0]
    assert outcome["false_ml"] == pytest.approx(0.1)
    assert outcome["false_outside_ml"] == pytest.approx(0.1)  # (3, 0, 9) lies outside the organ
    organ[3, 0, 9] = True
    assert breakdown.lesion_outcomes(predicted, instances, organ, voxel_ml=0.1)["false_outside_ml"] == 0.0
    assert breakdown.bin_names() == ["0-0.5 mL", "0.5-2 mL", "2-8 mL", ">8 mL"]


def test_paired_difference_of_two_networks_on_the_same_cases(benchmark_module):
    """The paired comparison's difference is the global Dice difference, its interval holds it, is narrow when the
    candidate gains on every case alike and straddles 0 when the gain is one case's luck."""
    false_liver = benchmark_module("false_liver")
    rng = np.random.default_rng(0)
    baseline = rng.integers(50, 150, size=(32, 6))           # tp, fp, fn, lesion tp, fp, fn per case
    steady = baseline.copy()
    steady[:, 0] += 10                                        # 10 more true liver voxels on every case
    steady[:, 2] -= 10
    lucky = baseline.copy()
    lucky[0, 3] += 3000                                       # one case's lesion found much better
    base = {"classic": baseline, "randomized": baseline}
    result = false_liver.paired_difference(base, {"classic": steady, "randomized": baseline}, draws=500)
    expected = false_liver.global_dice(steady)[0] - false_liver.global_dice(baseline)[0]
    gain = result["classic_liver"]
    assert gain["difference"] == pytest.approx(expected, abs=1e-4) and gain["difference"] > 0
    assert 0 < gain["interval_95"][0] <= gain["difference"] <= gain["interval_95"][1]
    assert result["randomized_lesion"] == {"difference": 0.0, "interval_95": [0.0, 0.0]}
    assert result["sum_of_four"]["difference"] == pytest.approx(expected, abs=2e-4)
    luck = false_liver.paired_difference(base, {"classic": lucky, "randomized": baseline}, draws=500)
    assert luck["classic_lesion"]["difference"] > 0 and luck["classic_lesion"]["interval_95"][0] <= 0.0
