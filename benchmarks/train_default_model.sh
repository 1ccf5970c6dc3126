#!/usr/bin/env bash
# Reproduces the bundled default model in model_repository/ (v8, see model_repository/MODEL_CARD.md): a U-Net on
# 160 classic and 160 domain-randomized phantoms, 200 epochs (v7), then 60 more at a lower peak learning rate.
# About 100 minutes on an otherwise idle 2-core CPU stepping in bfloat16.
# Usage: bash benchmarks/train_default_model.sh [WORKDIR]
set -euo pipefail
work=${1:-runs/default-model}
[ -f "$work/classic/manifest.json" ] || mixsup-data phantoms "$work/classic" --n 160 --seed 1 --shape 48 256 256 -q
[ -f "$work/randomized/manifest.json" ] || \
    mixsup-data phantoms "$work/randomized" --n 160 --seed 5 --shape 48 256 256 --style randomized -q
# One manifest over both folders: the last 3 cases of each style go last, so the 6 validation cases (the trainer
# validates on the last ones) hold both styles.
python - "$work" <<'PY'
import sys
from dataclasses import replace
from pathlib import Path

from mixsup.training.data.manifest import Manifest, load_dataset, validate_manifest, write_manifest

work = Path(sys.argv[1])
styles = [load_dataset(work / style).cases for style in ("classic", "randomized")]
ordered = [(style, case) for cut in (slice(None, -3), slice(-3, None))
           for style, cases in zip(("classic", "randomized"), styles) for case in cases[cut]]
cases = [replace(case, case=str(index), root=None,
                 **{key: f"{style}/{getattr(case, key)}" for key in ("volume", "segmentation", "boxes", "instances")})
         for index, (style, case) in enumerate(ordered)]
manifest = Manifest(cases=cases, root=work)
validate_manifest(manifest)
write_manifest(manifest)
PY
mixsup-train unet --data "$work/manifest.json" --out "$work/run" --preset default --no-progress \
    --set validation_cases=6 --set epochs=200
# v7's validation Dice was still rising at its last epoch: a new one-cycle schedule from its weights.
mixsup-train unet --data "$work/manifest.json" --out "$work/run-more" --preset default --no-progress \
    --init-from "$work/run/best.pt" --set validation_cases=6 --set epochs=60 --set learning_rate=6e-4
mixsup-export "$work/run-more/best.pt" --repository model_repository --name unet --replace
