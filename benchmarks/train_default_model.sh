#!/usr/bin/env bash
# Reproduces the bundled default model in model_repository/ (see model_repository/MODEL_CARD.md).
# About 40 minutes on an otherwise idle 2-core CPU. Usage: bash benchmarks/train_default_model.sh [WORKDIR]
set -euo pipefail
work=${1:-runs/default-model}
[ -f "$work/data/manifest.json" ] || mixsup-data phantoms "$work/data" --n 80 --seed 1 --shape 48 256 256
# precision=fp32: the bundled model was trained in float32, before bfloat16 steps (the default on AMX CPUs) existed.
mixsup-train unet --data "$work/data" --out "$work/run" --preset default --no-progress \
    --set validation_cases=4 --set precision=fp32
mixsup-export "$work/run/best.pt" --repository model_repository --name unet --replace
