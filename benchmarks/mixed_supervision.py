"""The mixed-supervision claim, measured: do a few masks plus many boxes come close to masks everywhere?

One phantom pool; per seed the pool is shuffled and dealt out 10% validation / 30% strong (masks) / 60% weak
(boxes only: the masks stay on disk, referenced by no manifest, and are read only to score the teacher's
pseudo-labels). Rows, each trained with ``mixsup-train`` in its own process:

* ``strong-only`` -- the ``unet`` baseline on the 30% strong cases;
* ``full``        -- the same U-Net on all 90% with masks (the ceiling mixed supervision aims at);
* ``teacher-student``, ``msdn``, ``lazy``, ``asdnet`` -- each method on 30% strong + 60% weak;
* ``teacher-student + Dice`` -- the same, its student trained with the baseline's CE + soft Dice instead of the
  paper's plain CE (``--set student_dice_weight=1``), so that its gap to ``full`` measures the supervision
  alone, not the loss;
* ``teacher-student 10:80 / 50:40 / 90:0`` -- the strong:weak sweep of the teacher-student paper's Fig. 10,
  for teacher-student (chosen beforehand as the method the sweep comes from, not after looking at the table);
* ``teacher-student perturbed`` -- 30:60 with the weak boxes perturbed as in that paper's robustness study.

Every run's ``best.pt`` (chosen on a moving average of its validation cases' liver + lesion Dice) segments three
held-out test sets that no run sees: phantoms of the project's generator with other seeds (``own``), of the second
generator in ``benchmarks/foreign_phantoms.py`` (``foreign``) and of the independent evaluation generator in
``benchmarks/independent_phantoms.py`` (``independent``, written apart from the training generator and never
tuned on). Each scan goes the served path's way -- the client's
pre-processing to the model grid, whole-slice inference, labels restored to the scan's grid, the client's
post-processing (largest liver component, holes filled, lesions inside the liver) -- and is scored with LiTS
metrics: Dice global and per case for liver (liver ∪ lesion) and lesion, and the RMSE of the tumour burden
(lesion volume / liver volume). Seeds vary the split, the initialisation and the crops; rows report the mean over
seeds with a 95% t-interval (three seeds for the six main rows; the sweep and perturbed rows run on ``--sweep-seeds``,
the first seed by default, to keep the CPU preset within the hour).

Usage (one command; the CPU preset is sized to finish in about an hour on 2 cores that step in bfloat16)::

    python benchmarks/mixed_supervision.py [--preset cpu|cuda] [--seeds 0 1 2] [--work DIR] [--rows ...]

Writes ``benchmarks/results/mixed_supervision.{json,md}`` and ``mixed_supervision_{rows,sweep,curves}.png`` (the
curves: validation Dice per epoch of each main row's exported network, from its runs' ``log.csv``). With
``--work DIR`` the phantoms and runs are kept, and a rerun skips the runs that finished.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Callable, Iterator, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from foreign_phantoms import make_foreign_case  # noqa: E402
from independent_phantoms import make_case as make_independent_case  # noqa: E402

from mixsup.clients.pipeline import Restore, prepare_volume, restore_labels  # noqa: E402
from mixsup.contract import ModelContract  # noqa: E402
from mixsup.metrics import GlobalDice, dice  # noqa: E402
from mixsup.postprocess import postprocess_labels  # noqa: E402
from mixsup.scan import Scan, read_nifti  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = HERE / "results"
VALIDATION, STRONG_SHARE, WEAK_SHARE = 0.1, 0.3, 0.6
TEST_SETS = ("own", "foreign", "independent")


@dataclass(frozen=True)
class Preset:
    """How big everything is: the phantom pool and test sets, the network and the schedule."""

    pool: int
    test: int
    foreign: int
    independent: int
    shape: tuple[int, int, int]
    jobs: int
    train: dict[str, Any]
    recipe_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def validation(self) -> int:
        """Cases of the pool every run of a seed validates on (and none trains on)."""
        return int(round(VALIDATION * self.pool))


PRESETS = {
    # 2 cores: two single-threaded runs side by side. 24x128x128 phantoms hold a whole abdomen at 1.2-4 mm; the
    # nets train at 2.4 mm on 64 px crops, 15 epochs of 60 steps: 1.5x the float32 schedule in the same hour,
    # bfloat16 steps (TrainConfig.precision auto) taking about half the time; 20 epochs would take ~70 min (from
    # its first 14 runs, with the evaluation threads beside the two runs). 16 base channels, not fewer: at 8 a U-Net
    # never predicted a lesion on validation in 1,400 steps, at 16 it did within 400 (measured on seed 0's
    # strong-only split). MSDN's detection towers are 16 wide (the paper's 256 would cost ~10x a U-Net step).
    # Timed on a 2-core CPU with AMX; a 2-core AMD EPYC without native bfloat16 took 403 s per U-Net run, not 81.
    # A pool of 100 (27 strong cases for strong-only, 90 for full) was measured (results/pool_100/): at these
    # 900 steps full supervision did not beat strong-only on either class, the runs are step-bound, and the
    # invocation took 87 min (10 validation cases each epoch), so the pool stays at 30.
    "cpu": Preset(pool=30, test=20, foreign=10, independent=20, shape=(24, 128, 128), jobs=2,
                  train=dict(base_channels=16, depth=4, spacing_mm=[2.4, 2.4], crop=64, patch_size=64,
                             batch_size=8, epochs=15, iterations_per_epoch=60, threads=1),
                  recipe_options={"msdn": {"detection_width": 16}}),
    # Seconds: for trying the script itself, not for results.
    "smoke": Preset(pool=10, test=2, foreign=1, independent=1, shape=(16, 64, 64), jobs=2,
                    train=dict(base_channels=4, depth=3, spacing_mm=[3.2, 3.2], crop=32, patch_size=32,
                               batch_size=4, epochs=1, iterations_per_epoch=2, threads=1)),
    # One H200: the default network at the served resolution, several runs at once.
    "cuda": Preset(pool=40, test=24, foreign=12, independent=24, shape=(48, 256, 256), jobs=6,
                   train=dict(base_channels=16, depth=4, spacing_mm=[1.6, 1.6], crop=128, patch_size=160,
                              batch_size=16, epochs=30, iterations_per_epoch=50, threads=2)),
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a recipe on a strong:weak split, optionally with perturbed boxes and recipe
    options beyond the preset's (``mixsup-train --set``)."""

    method: str
    recipe: str
    strong: float
    weak: float
    perturbed: bool = False
    options: tuple[tuple[str, Any], ...] = ()


ROWS = [
    Row("strong-only", "unet", STRONG_SHARE, 0.0),
    Row("full", "unet", STRONG_SHARE + WEAK_SHARE, 0.0),
    Row("teacher-student", "teacher-student", STRONG_SHARE, WEAK_SHARE),
    Row("teacher-student + Dice", "teacher-student", STRONG_SHARE, WEAK_SHARE, options=(("student_dice_weight", 1.0),)),
    Row("msdn", "msdn", STRONG_SHARE, WEAK_SHARE),
    Row("lazy", "lazy", STRONG_SHARE, WEAK_SHARE),
    Row("asdnet", "asdnet", STRONG_SHARE, WEAK_SHARE),
    Row("teacher-student 10:80", "teacher-student", 0.1, 0.8),
    Row("teacher-student 50:40", "teacher-student", 0.5, 0.4),
    Row("teacher-student 90:0", "teacher-student", 0.9, 0.0),
    Row("teacher-student perturbed", "teacher-student", STRONG_SHARE, WEAK_SHARE, perturbed=True),
]
MAIN_ROWS = ROWS[:7]


def run_prefix(method: str) -> str:
    """The folder name of a row's runs under ``WORK/runs`` (``<prefix>-seed<N>``)."""
    return method.replace(" + ", "_plus_").replace(" ", "_").replace(":", "-")


#: Seconds of a training step relative to the U-Net's (measured at the cpu preset), for scheduling only.
RELATIVE_COST = {"unet": 1.0, "teacher-student": 2.2, "lazy": 2.1, "asdnet": 3.9, "msdn": 6.0}
SWEEP = ["teacher-student 10:80", "teacher-student", "teacher-student 50:40", "teacher-student 90:0"]


# ----------------------------------------------------------------------------------------------------- data
def make_phantoms(out: Path, n: int, seed: int, shape: Sequence[int]) -> Path:
    """``n`` phantoms of the project's generator, every one with its mask (``mixsup-data phantoms``)."""
    if not (out / "manifest.json").is_file():
        subprocess.run([str(BIN / "mixsup-data"), "phantoms", str(out), "--n", str(n), "--seed", str(seed),
                        "--shape", *map(str, shape), "-q"], check=True, stdout=subprocess.DEVNULL)
    return out


def write_split_manifest(pool: Path, row: Row, seed: int, validation: int, out: Path) -> Path:
    """The manifest of ``row`` for ``seed``: the pool shuffled by the seed, the first ``validation`` cases
    validate (the same for every row of a seed), the next ones are strong, then weak (boxes from their masks,
    perturbed if the row says so). Strong cases are listed before the validation ones because the trainer
    validates on the last strong cases of a manifest."""
    from mixsup.training.data.boxes import boxes_from_labels, perturb_boxes, save_boxes
    from mixsup.training.data.manifest import (
        WEAK,
        Case,
        Manifest,
        boxes_path,
        case_number,
        load_case,
        load_dataset,
        write_manifest,
    )
    from mixsup.training.data.split import perturbation_rng

    cases = load_dataset(pool).cases
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_strong = int(round(row.strong * len(cases)))
    n_weak = int(round(row.weak * len(cases)))
    held, strong, weak = order[:validation], order[validation:validation + n_strong], \
        order[validation + n_strong:validation + n_strong + n_weak]
    listed = [Case(c.case, c.volume, c.segmentation, instances=c.instances) for c in (*strong, *held)]
    for case in weak:
        number = case_number(case)
        # Perturbed boxes differ per seed, so each seed keeps its own file.
        relative = boxes_path(number).replace(".json", f".perturbed-seed{seed}.json") if row.perturbed \
            else boxes_path(number)
        if not (pool / relative).is_file():
            _, labels, _ = load_case(case, pool)
            boxes = boxes_from_labels(labels)
            if row.perturbed:
                boxes = perturb_boxes(boxes, perturbation_rng(seed, case.case), labels.shape)
            save_boxes(pool / relative, boxes, labels.shape)
        listed.append(Case(case.case, case.volume, None, relative, WEAK, row.perturbed or None))
    manifest = Manifest(cases=listed, root=pool)
    return write_manifest(manifest, out)


@dataclass
class TestCase:
    """A held-out scan on the model grid, how to map labels back, and its true labels on the stored grid."""

    hu: np.ndarray
    restore: Restore
    truth: np.ndarray
    voxel_ml: float


def own_test_set(folder: Path, contract: ModelContract) -> list[TestCase]:
    from mixsup.training.data.manifest import load_dataset

    cases = []
    for case in load_dataset(folder).cases:
        scan = read_nifti(case.path(case.volume))
        truth = read_nifti(case.path(case.segmentation)).voxels.astype(np.uint8)
        cases.append(test_case(scan, truth, contract))
    return cases


def generated_test_set(make_case: Callable[..., tuple], n: int, seed: int, shape: Sequence[int],
                       contract: ModelContract) -> list[TestCase]:
    """``n`` cases of another generator (``make_case(seed, shape=...)`` -> hu, labels, affine), seeds from ``seed``."""
    cases = []
    for index in range(n):
        hu, labels, affine = make_case(seed + index, shape=tuple(shape))
        cases.append(test_case(Scan(voxels=hu, affine=affine), labels.astype(np.uint8), contract))
    return cases


def test_case(scan: Scan, truth: np.ndarray, contract: ModelContract) -> TestCase:
    hu, restore = prepare_volume(scan, contract)
    return TestCase(hu, restore, truth, abs(float(np.linalg.det(scan.affine[:3, :3]))) / 1000.0)


# ---------------------------------------------------------------------------------------------- training
def train_run(row: Row, seed: int, manifest: Path, out: Path, preset: Preset) -> float:
    """Train one run in its own process (skipped if it finished before); returns its wall seconds."""
    done = out / "seconds.txt"
    if done.is_file():
        return float(done.read_text())
    # validation_cases first: a --set override of it still wins, as it did when the presets listed it
    settings = {"validation_cases": preset.validation, **preset.train, **preset.recipe_options.get(row.recipe, {}),
                **dict(row.options), "seed": seed}
    command = [str(BIN / "mixsup-train"), row.recipe, "--data", str(manifest), "--out", str(out), "--no-progress",
               *[arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]]
    started = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    done.write_text(f"{seconds:.1f}\n")
    return seconds


# -------------------------------------------------------------------------------------------- evaluation
def segment_cases(checkpoint: Path, cases: list[TestCase]) -> Iterator[np.ndarray]:
    """Each case's labels on its stored grid from a checkpoint's exported network, after the client's
    post-processing, one case at a time."""
    import torch

    from mixsup.training.trainer import TrainConfig, load_checkpoint, network_from_checkpoint, predict_volume

    payload = load_checkpoint(checkpoint)
    network = network_from_checkpoint(payload)
    config = TrainConfig.from_dict(payload["config"])
    for case in cases:
        with torch.inference_mode():
            model_labels = predict_volume(network, case.hu, context_slices=config.context_slices,
                                          size_divisor=2**config.depth)
        yield postprocess_labels(restore_labels(model_labels, case.restore, 3))


def evaluate_checkpoint(checkpoint: Path, cases: list[TestCase]) -> dict[str, float]:
    """LiTS metrics of a checkpoint's exported network on ``cases``, after the client's post-processing."""
    liver, lesion = GlobalDice([1]), GlobalDice([2])
    per_case_liver, per_case_lesion, burden_errors = [], [], []
    lesion_voxels = np.zeros(3, dtype=np.int64)  # found, predicted, true: a low Dice told apart by its cause
    for case, predicted in zip(cases, segment_cases(checkpoint, cases)):
        liver_pred, liver_true = np.minimum(predicted, 1), np.minimum(case.truth, 1)
        liver.update(liver_pred, liver_true)
        lesion.update(predicted, case.truth)
        per_case_liver.append(dice(liver_pred, liver_true, 1))
        per_case_lesion.append(dice(predicted, case.truth, 2))
        burden_errors.append(tumour_burden(predicted) - tumour_burden(case.truth))
        lesion_voxels += lesion_voxel_counts(predicted, case.truth)
    return {"liver_dice_global": liver.result()[1], "lesion_dice_global": lesion.result()[2],
            "liver_dice_per_case": float(np.mean(per_case_liver)),
            "lesion_dice_per_case": float(np.mean(per_case_lesion)),
            "tumour_burden_rmse": float(np.sqrt(np.mean(np.square(burden_errors)))),
            # counts, not ratios: they add up over seeds, and a run that predicts no lesion has no precision
            **{f"lesion_voxels_{name}": int(n) for name, n in zip(LESION_COUNTS, lesion_voxels)}}


#: The lesion voxel counts :func:`evaluate_checkpoint` reports: precision is found / predicted, recall found / true.
LESION_COUNTS = ("found", "predicted", "true")


def precision_recall(metrics: dict[str, Any], prefix: str = "") -> tuple[float | None, float | None]:
    """Lesion precision and recall from ``metrics``' (``prefix``ed) voxel counts, pooled over whatever the counts
    were summed or averaged over; None where nothing was predicted (or there was nothing to find)."""
    found, predicted, true = (metrics[f"{prefix}lesion_voxels_{name}"] for name in LESION_COUNTS)
    return (found / predicted if predicted else None), (found / true if true else None)


def format_precision_recall(metrics: dict[str, Any], prefix: str = "") -> str:
    """``precision / recall`` to two places, "none predicted" for a model that never predicts a lesion."""
    if f"{prefix}lesion_voxels_found" not in metrics:  # results written before the counts were measured
        return ""
    precision, recall = precision_recall(metrics, prefix)
    recall_text = "-" if recall is None else f"{recall:.2f}"
    return "none predicted" if precision is None else f"{precision:.2f} / {recall_text}"


def lesion_voxel_counts(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[found, predicted, true]`` lesion voxels of one case: precision and recall summed over cases."""
    predicted_lesion, true_lesion = predicted == 2, truth == 2
    return np.array([np.count_nonzero(predicted_lesion & true_lesion), np.count_nonzero(predicted_lesion),
                     np.count_nonzero(true_lesion)], dtype=np.int64)


def tumour_burden(labels: np.ndarray) -> float:
    """Lesion volume over liver volume (liver ∪ lesion), as LiTS defines the tumour burden; 0 without liver."""
    liver = int(np.count_nonzero(labels))
    return int(np.count_nonzero(labels == 2)) / liver if liver else 0.0


def interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% Student-t interval over seeds (0 for a single seed)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))) \
        if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "ci95": half}


def validation_curve(log_csv: Path) -> dict[str, list[float]]:
    """Validation liver and lesion Dice per epoch of a run's last stage (the network that is exported and scored;
    a teacher-student run's student), from its ``log.csv``: whether the schedule, not the method, set the row."""
    with open(log_csv, newline="") as handle:
        epochs = list(csv.DictReader(handle))
    last = [epoch for epoch in epochs if epoch["stage"] == epochs[-1]["stage"]]
    return {"epoch": [int(e["epoch"]) for e in last], "dice_liver": [float(e["dice_liver"]) for e in last],
            "dice_lesion": [float(e["dice_lesion"]) for e in last]}


def summarise(row: Row, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the results: means over seeds of every metric, per-seed values and intervals."""
    summary: dict[str, Any] = {"method": row.method, "recipe": row.recipe, "strong": row.strong, "weak": row.weak,
                               "perturbed_boxes": row.perturbed, "recipe_options": dict(row.options),
                               "seeds": [r["seed"] for r in runs],
                               "seconds_mean": float(np.mean([r["seconds"] for r in runs]))}
    for test_set in TEST_SETS:
        for metric in runs[0][test_set]:
            values = [r[test_set][metric] for r in runs]
            key = metric if test_set == "own" else f"{test_set}_{metric}"
            summary[key] = interval(values)["mean"]
            summary.setdefault("intervals", {})[key] = interval(values)
            summary.setdefault("per_seed", {})[key] = values
    summary["validation_curves"] = [r["validation_curve"] for r in runs]
    quality = [r["pseudo_label_quality"] for r in runs if r.get("pseudo_label_quality")]
    if quality:
        for metric in ("dice_liver", "dice_lesion"):
            summary[f"pseudo_label_{metric}"] = interval([q[metric] for q in quality])["mean"]
    return summary


# ----------------------------------------------------------------------------------------------- reports
def markdown_table(rows: list[dict[str, Any]], full: dict[str, Any] | None) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        iv = row["intervals"][key]
        return f"{iv['mean']:.3f} ± {iv['ci95']:.3f}"

    lines = ["| method | liver Dice global | lesion Dice global | liver per case | lesion per case | burden RMSE "
             "| foreign liver | foreign lesion | independent liver | independent lesion | × full (liver / lesion) "
             "| lesion precision / recall | pseudo-label Dice (liver / lesion) | s / run |", "|" + "---|" * 14]
    for row in rows:
        ratio = "" if full is None else (f"{row['liver_dice_global'] / full['liver_dice_global']:.3f} / "
                                         f"{row['lesion_dice_global'] / max(full['lesion_dice_global'], 1e-9):.3f}")
        pseudo = (f"{row['pseudo_label_dice_liver']:.3f} / {row['pseudo_label_dice_lesion']:.3f}"
                  if "pseudo_label_dice_liver" in row else "")
        lines.append(f"| {row['method']} | {cell(row, 'liver_dice_global')} | {cell(row, 'lesion_dice_global')} "
                     f"| {cell(row, 'liver_dice_per_case')} | {cell(row, 'lesion_dice_per_case')} "
                     f"| {cell(row, 'tumour_burden_rmse')} | {cell(row, 'foreign_liver_dice_global')} "
                     f"| {cell(row, 'foreign_lesion_dice_global')} | {cell(row, 'independent_liver_dice_global')} "
                     f"| {cell(row, 'independent_lesion_dice_global')} | {ratio} | {format_precision_recall(row)} "
                     f"| {pseudo} | {row['seconds_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_rows: Path, out_sweep: Path, out_curves: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = {row["method"]: row for row in rows}
    main = [row for row in rows if row["method"] not in SWEEP[:1] + SWEEP[2:] and "perturbed" not in row["method"]]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "liver_dice_global", "liver"), (axes[1], "lesion_dice_global", "lesion")):
        for offset, test_set in zip((-0.27, 0.0, 0.27), TEST_SETS):
            prefix = "" if test_set == "own" else f"{test_set}_"
            means = [r["intervals"][prefix + key]["mean"] for r in main]
            errors = [r["intervals"][prefix + key]["ci95"] for r in main]
            axis.bar(np.arange(len(main)) + offset, means, 0.27, yerr=errors, capsize=3, label=f"{test_set} test set")
        axis.set_xticks(np.arange(len(main)), [r["method"] for r in main], rotation=30, ha="right")
        axis.set_title(f"{title} Dice global (mean ± 95% CI)")
        axis.set_ylim(0, 1)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out_rows, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "dice_liver", "liver"), (axes[1], "dice_lesion", "lesion")):
        for row in main:
            curves = row["validation_curves"]
            length = min(len(c[key]) for c in curves)
            axis.plot(curves[0]["epoch"][:length], np.mean([c[key][:length] for c in curves], axis=0),
                      marker=".", label=row["method"])
        axis.set_xlabel("epoch of the exported network's stage")
        axis.set_title(f"validation {title} Dice (mean over seeds)")
        axis.set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_curves, dpi=110)
    plt.close(figure)

    sweep = [by_method[m] for m in SWEEP if m in by_method]
    if len(sweep) < 2:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    strong = [100 * r["strong"] for r in sweep]
    for key, label in (("liver_dice_global", "liver"), ("lesion_dice_global", "lesion")):
        axis.errorbar(strong, [r["intervals"][key]["mean"] for r in sweep],
                      yerr=[r["intervals"][key]["ci95"] for r in sweep], marker="o", capsize=3,
                      label=f"teacher-student, {label}")
        if "full" in by_method:
            axis.axhline(by_method["full"][key], linestyle="--", color="grey")
        if "strong-only" in by_method:
            axis.axhline(by_method["strong-only"][key], linestyle=":", color="grey")
    axis.set_xlabel("strong share of the pool (%); the rest up to 90% is weak")
    axis.set_ylabel("Dice global (own generator)")
    axis.set_title("strong:weak sweep (dashed: full, dotted: strong-only 30%)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_sweep, dpi=110)
    plt.close(figure)


def write_reports(document: dict[str, Any], folder: Path) -> None:
    """The results as JSON, a Markdown table and the two plots in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mixed_supervision.json").write_text(json.dumps(document, indent=2) + "\n")
    rows = document["rows"]
    table = markdown_table(rows, next((row for row in rows if row["method"] == "full"), None))
    (folder / "mixed_supervision.md").write_text(
        f"# Mixed supervision benchmark ({document['preset']} preset, seeds {document['seeds']}; sweep and "
        f"perturbed rows: seeds {document['sweep_seeds']})\n\n`{document['command']}`: "
        f"{document['wall_seconds'] / 60:.1f} min wall for this invocation; the runs' training took "
        f"{document['training_seconds_total'] / 60:.1f} min in all, {document['settings']['jobs']} at a time "
        f"(a rerun over kept runs only evaluates them).\n\n{table}")
    plot(rows, *(folder / f"mixed_supervision_{name}.png" for name in ("rows", "sweep", "curves")))
    print(table)


# -------------------------------------------------------------------------------------------------- main
def with_overrides(preset: Preset, assignments: Sequence[str]) -> Preset:
    """``preset`` with ``KEY=VALUE`` training settings replaced (values parsed as JSON where they parse)."""
    train = dict(preset.train)
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        try:
            train[key] = json.loads(raw)
        except json.JSONDecodeError:
            train[key] = raw
    return replace(preset, train=train)


# ------------------------------------------------------------------------ scripts reading a --work folder
def kept_runs(work: Path, method: str) -> list[Path]:
    """A row's finished runs (those with a ``best.pt``) under ``WORK/runs``, by seed: what the scripts that read
    a ``--work`` folder score."""
    return sorted(p for p in (work / "runs").glob(f"{run_prefix(method)}-seed*") if (p / "best.pt").is_file())


def preset_contract(preset: Preset) -> ModelContract:
    """The contract (patch size, spacing) of a preset's networks: how the held-out scans are brought to them."""
    return ModelContract(patch_size=(preset.train["patch_size"],) * 2, spacing_mm=tuple(preset.train["spacing_mm"]))


def work_test_set(work: Path, preset: str) -> tuple[list[TestCase], list]:
    """A ``--work`` folder's own held-out test set on ``preset``'s model grid, and each case's manifest entry in the
    same order (for the files beside it: instance maps, label files)."""
    from mixsup.training.data.manifest import load_dataset

    test = work / "test"
    return own_test_set(test, preset_contract(PRESETS[preset])), load_dataset(test).cases


def work_folder_parser(description: str, default_rows: Sequence[str]) -> argparse.ArgumentParser:
    """The command line the scripts reading a ``--work`` folder share: ``--work``, ``--preset``, ``--rows``
    (``default_rows`` unless given) and ``--out``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the --work folder of mixed_supervision.py")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the preset those runs used")
    parser.add_argument("--rows", nargs="+", choices=[r.method for r in ROWS], default=list(default_rows))
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    return parser


def score_kept_rows(work: Path, methods: Sequence[str], score: Callable[[list[Path]], dict]) -> dict[str, dict]:
    """``score(runs)`` of each of ``methods`` that has kept runs in ``work``, each printed as it comes."""
    rows = {}
    for method in methods:
        runs = kept_runs(work, method)
        if runs:
            rows[method] = score(runs)
            print(method, json.dumps(rows[method]), flush=True)
    return rows


def report(results: dict[str, Any], table: str, out: Path | None) -> None:
    """Print a script's ``table``; with ``out``, also write ``OUT.json`` (``results``) and ``OUT.md`` (the table)."""
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)


def results_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Where the reports go without ``--results``: the committed folder only for the table the README's command
    makes (every row, default preset, seeds and settings), so a partial or modified run never overwrites it."""
    defaults = {name: parser.get_default(name) for name in ("preset", "seeds", "sweep_seeds", "rows", "overrides")}
    if all(getattr(args, name) == value for name, value in defaults.items()) and args.device in (None, "cpu"):
        return RESULTS
    return (args.work or Path.cwd()) / ("results" if args.work else "mixed_supervision_results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="alias of --preset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[0],
                        help="seeds of the sweep and perturbed-box rows (default: the first only, to fit the hour)")
    parser.add_argument("--rows", nargs="+", choices=[r.method for r in ROWS], help="default: every row")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training setting of the preset (JSON value), e.g. --set epochs=40")
    parser.add_argument("--work", type=Path, help="keep phantoms and runs here; a rerun skips finished runs")
    parser.add_argument("--results", type=Path,
                        help="where the json/md/png go (default: benchmarks/results for the default table, else "
                             "WORK/results or ./mixed_supervision_results)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.results = args.results or results_folder(parser, args)
    preset = with_overrides(PRESETS[args.device or args.preset], args.overrides)
    rows = [r for r in ROWS if not args.rows or r.method in args.rows]
    started = time.perf_counter()

    import torch

    torch.set_num_threads(1)  # evaluation runs in the worker threads, beside the training processes
    with TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        pool = make_phantoms(work / "pool", preset.pool, 1000, preset.shape)
        own = make_phantoms(work / "test", preset.test, 2000, preset.shape)
        contract = preset_contract(preset)
        test_sets = {"own": own_test_set(own, contract),
                     "foreign": generated_test_set(make_foreign_case, preset.foreign, 3000, preset.shape, contract),
                     "independent": generated_test_set(make_independent_case, preset.independent, 4000, preset.shape,
                                                       contract)}

        def one_run(row: Row, seed: int) -> dict[str, Any]:
            name = f"{run_prefix(row.method)}-seed{seed}"
            out = work / "runs" / name
            out.mkdir(parents=True, exist_ok=True)
            # Manifests sit in the pool folder: their paths are relative to where they are.
            manifest = write_split_manifest(pool, row, seed, preset.validation, pool / f"manifest-{name}.json")
            seconds = train_run(row, seed, manifest, out, preset)
            result = {"seed": seed, "seconds": seconds,
                      **{key: evaluate_checkpoint(out / "best.pt", cases) for key, cases in test_sets.items()}}
            result["validation_curve"] = validation_curve(out / "log.csv")
            quality = out / "pseudo_label_quality.json"
            if quality.is_file():
                result["pseudo_label_quality"] = json.loads(quality.read_text())
            print(f"{row.method} seed {seed}: {seconds:.0f} s, " + ", ".join(
                f"{name} liver {result[name]['liver_dice_global']:.3f} lesion {result[name]['lesion_dice_global']:.3f}"
                for name in TEST_SETS), flush=True)
            return result

        def reported(job: tuple[Row, int]) -> dict[str, Any]:
            try:
                return one_run(*job)
            except Exception:
                traceback.print_exc()
                raise

        jobs = [(row, seed) for row in rows for seed in (args.seeds if row in MAIN_ROWS else args.sweep_seeds)]
        jobs.sort(key=lambda job: -RELATIVE_COST[job[0].recipe])  # longest first: the two workers end together
        with ThreadPoolExecutor(max_workers=preset.jobs) as executor:
            results = list(executor.map(reported, jobs))
    by_row = {row.method: [r for (job_row, _), r in zip(jobs, results) if job_row.method == row.method]
              for row in rows}
    summaries = [summarise(row, by_row[row.method]) for row in rows]
    document = {"preset": args.device or args.preset, "settings": {**preset.__dict__, "shape": list(preset.shape)},
                "seeds": args.seeds, "sweep_seeds": args.sweep_seeds,
                "pool_seed": 1000, "test_seed": 2000, "foreign_seed": 3000, "independent_seed": 4000,
                "split": {"validation": VALIDATION, "strong": STRONG_SHARE, "weak": WEAK_SHARE,
                          "validation_cases": preset.validation},
                "wall_seconds": round(time.perf_counter() - started, 1),
                # a rerun over kept runs skips their training: the time they took when they did train
                "training_seconds_total": round(sum(r["seconds"] for r in results), 1),
                "command": "python benchmarks/mixed_supervision.py " + shlex.join(argv or sys.argv[1:]),
                "rows": summaries}
    write_reports(document, args.results)
    print(f"wall time {document['wall_seconds'] / 60:.1f} min; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
