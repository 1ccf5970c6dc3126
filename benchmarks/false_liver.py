"""Where a network's liver errors lie, on a *selection* set: unseen seeds of the training generators (classic and
randomized styles), never the evaluation generators, so a model may be chosen on it without tuning on them.

For each network (a model-repository entry such as ``model_repository/unet``), in process with the client's exact
pipeline (``evaluate_served_model.labels_in_process``: pre-processing, whole slices, the network on ``--device``,
labels restored, post-processed), per style:

* global liver Dice (liver ∪ lesion, as LiTS counts it) and lesion Dice;
* false-positive, false-negative liver voxels, and the false positives on slices without any liver, binned by
  their distance along z (mm) to the nearest slice with liver: a 2.5D network sees 3 slices, so false liver far
  from the organ is a failure to tell tissue apart in-plane, near it perhaps a lack of z context;
* the Dice the liver would reach with no false positive on liver-free slices;
* missed lesion voxels, and how many of them the network left outside the liver altogether (background): a lesion
  at the liver's edge that it took for a neighbouring structure costs liver Dice too, one taken for liver does not;
* per lesion size bin (mL), lesions there are, found (any voxel labelled lesion) and the share of their voxels
  covered (``lesion_breakdown.lesion_outcomes``): the global lesion Dice is decided by the large lesions, this says
  whether the small ones are seen at all.

How many cases: 32 per style by default. 8 were too few to choose on: v11 scored +0.065 above v10 in the sum of the
four Dice on the 8 of seeds 7000/7100 that chose it (``results/false_liver_anti_aliasing.json``), and -0.006 on 32
others (``--seeds 7400 7500``, ``results/false_liver_32_cases.json``). A model chosen on one set is also favoured on
that set by the choice itself: compare a new candidate with it on fresh ``--seeds``.

How sure a difference is: every network after the first is compared with the first case by case
(``paired_against_FIRST``): its Dice minus the first's, per style and class and for the sum of the four, with a
95% interval from resampling the cases (the same resample for both networks, so what they share cancels). A
difference whose interval holds 0 is one these cases cannot tell from none.

Usage: python benchmarks/false_liver.py [NAME=]NETWORK_DIR ... [--cases 32] [--seeds 7000 7100] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate_served_model import labels_in_process, own_phantoms  # noqa: E402
from lesion_breakdown import bin_names, lesion_outcomes  # noqa: E402
from measure import print_and_write  # noqa: E402

from mixsup.metrics import dice_from_counts  # noqa: E402
from mixsup.readers import read_scan  # noqa: E402

#: Default seeds of the selection set (classic, randomized); training runs use seed 1 (cases 1000+), evaluation 90210.
SEEDS = {"classic": 7000, "randomized": 7100}
#: Edges (mm) of the z-distance bins of false liver on liver-free slices.
Z_BINS_MM = (0, 5, 10, 20, 30, 50)
#: Per-case counts kept for the paired comparison, in this order.
PAIRED_COUNTS = ("tp", "fp", "fn", "lesion_tp", "lesion_fp", "lesion_fn")
#: Resamples of the cases behind each interval.
BOOTSTRAP_DRAWS = 2000


def liver_errors(predicted: np.ndarray, truth: np.ndarray, slice_mm: float) -> dict[str, np.ndarray | int]:
    """Counts for one case on the canonical grid ([D, H, W], axial slices along D ``slice_mm`` apart)."""
    p, t = predicted >= 1, truth >= 1
    has_liver = t.any(axis=(1, 2))
    liver_slices = np.flatnonzero(has_liver)
    false_per_slice = (p & ~t).sum(axis=(1, 2))
    by_distance = np.zeros(len(Z_BINS_MM), dtype=np.int64)
    for z in np.flatnonzero(~has_liver):
        distance = np.abs(liver_slices - z).min() * slice_mm if len(liver_slices) else np.inf
        by_distance[np.searchsorted(Z_BINS_MM, distance, side="right") - 1] += false_per_slice[z]
    lesion_p, lesion_t = predicted == 2, truth == 2
    return {"tp": int((p & t).sum()), "fp": int((p & ~t).sum()), "fn": int((t & ~p).sum()),
            "fp_liver_free_slices": by_distance,
            "lesion_tp": int((lesion_p & lesion_t).sum()), "lesion_fp": int((lesion_p & ~lesion_t).sum()),
            "lesion_fn": int((lesion_t & ~lesion_p).sum()), "lesion_fn_background": int((lesion_t & ~p).sum())}


def paired_counts(errors: dict) -> list[int]:
    """The :data:`PAIRED_COUNTS` of one case's :func:`liver_errors`, as the paired comparison keeps them."""
    return [int(errors[key]) for key in PAIRED_COUNTS]


def global_dice(counts: np.ndarray) -> np.ndarray:
    """Global liver and lesion Dice ``[..., 2]`` of per-case :data:`PAIRED_COUNTS` ``[..., cases, 6]`` (summed over
    the cases axis; 1.0 where a class is in neither, as :func:`mixsup.metrics.dice_from_counts`)."""
    total = counts.sum(axis=-2).astype(np.float64)
    dice = []
    for first in (0, 3):
        tp, fp, fn = total[..., first], total[..., first + 1], total[..., first + 2]
        denominator = 2 * tp + fp + fn
        dice.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0))
    return np.stack(dice, axis=-1)


def paired_difference(baseline: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                      draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """``candidate`` minus ``baseline`` (per style: per-case counts ``[cases, 6]`` of the same cases), per style and
    class and for the sum of the four Dice: the difference on these cases and its 95% percentile bootstrap
    interval, the cases of each style resampled with replacement, the same draw for both networks."""
    rng = np.random.default_rng(seed)
    result: dict = {}
    observed_sum, resampled_sum = 0.0, np.zeros(draws)
    for style in baseline:
        a, b = np.asarray(baseline[style]), np.asarray(candidate[style])
        drawn = rng.integers(0, len(a), (draws, len(a)))
        resampled = global_dice(b[drawn]) - global_dice(a[drawn])
        observed = global_dice(b) - global_dice(a)
        for index, name in enumerate(("liver", "lesion")):
            result[f"{style}_{name}"] = difference_summary(observed[index], resampled[:, index])
        observed_sum += float(observed.sum())
        resampled_sum += resampled.sum(axis=1)
    result["sum_of_four"] = difference_summary(observed_sum, resampled_sum)
    return result


def difference_summary(observed: float, resampled: np.ndarray) -> dict:
    """A difference as the JSON reports it: its value and the 2.5 and 97.5 percentiles of its resamples."""
    return {"difference": round(float(observed), 4),
            "interval_95": [round(float(np.percentile(resampled, 2.5)), 4),
                            round(float(np.percentile(resampled, 97.5)), 4)]}


def score(network: Path, cases: list[tuple[Path, Path]], device: str) -> dict:
    total: dict = {}
    per_case = []
    for volume_path, label_path in cases:
        labels_scan = read_scan(label_path)
        truth, spacing = labels_scan.canonical()
        predicted = labels_in_process(read_scan(volume_path), network, device=device)
        canonical = dataclasses.replace(labels_scan, voxels=predicted).canonical()[0]
        instances = read_scan(label_path.with_name(label_path.name.replace("segmentation", "instances")))
        counts = liver_errors(canonical, truth, float(spacing[0]))
        lesions = lesion_outcomes(canonical, instances.canonical()[0].astype(np.int64), truth > 0,
                                  float(np.prod(spacing)) / 1000.0)
        counts.update({f"lesion_{key}": lesions[key] for key in ("lesions", "detected", "voxels", "covered")})
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
        per_case.append(paired_counts(counts))
    tp, fp, fn, free = total["tp"], total["fp"], total["fn"], total["fp_liver_free_slices"]
    lesion = dice_from_counts(total["lesion_tp"], total["lesion_fp"], total["lesion_fn"])
    edges = [*Z_BINS_MM, None]
    return {"dice_liver_global": round(dice_from_counts(tp, fp, fn), 4), "dice_lesion_global": round(lesion, 4),
            "false_liver_voxels": fp, "missed_liver_voxels": fn, "false_liver_on_liver_free_slices": int(free.sum()),
            "false_liver_on_liver_free_slices_by_z_mm": {
                f"{lo}-{hi}" if hi is not None else f"{lo}+": int(n) for lo, hi, n in zip(edges, edges[1:], free)},
            "dice_liver_without_those": round(dice_from_counts(tp, fp - int(free.sum()), fn), 4),
            "missed_lesion_voxels": total["lesion_fn"], "missed_lesion_as_background": total["lesion_fn_background"],
            "lesions_by_size": {name: {"lesions": int(n), "found": int(found), "voxels_covered": round(float(c / v), 3)}
                                for name, n, found, c, v in zip(bin_names(), total["lesion_lesions"],
                                                                total["lesion_detected"], total["lesion_covered"],
                                                                np.maximum(total["lesion_voxels"], 1))},
            "per_case_counts": per_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("networks", nargs="+", metavar="[NAME=]NETWORK_DIR",
                        help="model-repository entries, e.g. v1=model_repository/unet")
    parser.add_argument("--cases", type=int, default=32, help="phantoms per style (default 32)")
    parser.add_argument("--seeds", type=int, nargs=2, default=list(SEEDS.values()), metavar=("CLASSIC", "RANDOMIZED"),
                        help="dataset seeds of the two styles' phantoms (default 7000 7100); fresh ones to compare "
                             "with a model that was chosen on the defaults")
    parser.add_argument("--device", default="auto", help="engine of the network (see mixsup-export --device)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    shape = (40, 256, 256)
    seeds = dict(zip(SEEDS, args.seeds))
    results: dict = {"cases_per_style": args.cases, "seeds": seeds, "shape": list(shape)}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {style: own_phantoms(Path(tmp) / style, args.cases, seed, shape, style) for style, seed in seeds.items()}
        names = []
        for named in args.networks:
            name, _, path = named.rpartition("=")
            names.append(name or path)
            results[names[-1]] = {style: score(Path(path), cases, args.device) for style, cases in sets.items()}
    first = names[0]
    counts = {name: {style: np.array(results[name][style]["per_case_counts"]) for style in sets} for name in names}
    for name in names[1:]:
        results[name][f"paired_against_{first}"] = paired_difference(counts[first], counts[name])
    print_and_write(results, args.out)


if __name__ == "__main__":
    main()
