#!/usr/bin/env bash
# Reproduces the bundled default model in model_repository/ (v11, see model_repository/MODEL_CARD.md): a U-Net on
# 160 classic and 160 domain-randomized phantoms, 200 epochs (v7), 60 more at a lower peak learning rate (v8), then
# twice 60 more on twice the cases (v9: the first 160 of each style plus 160 new ones), then 60 more (v10), then 60
# more with the scans smoothed before their in-plane downsampling (v11; v7-v10 resampled linearly alone).
# About 185 minutes on an otherwise idle 2-core CPU stepping in bfloat16; 12.3 GB of memory with 640 cases loaded.
# Usage: bash benchmarks/train_default_model.sh [WORKDIR]
set -euo pipefail
work=${1:-runs/default-model}
linear=(--set anti_aliasing=false)  # how v7-v10 saw their scans: trained before anti-aliasing existed
[ -f "$work/classic/manifest.json" ] || mixsup-data phantoms "$work/classic" --n 320 --seed 1 --shape 48 256 256 -q
[ -f "$work/randomized/manifest.json" ] || \
    mixsup-data phantoms "$work/randomized" --n 320 --seed 5 --shape 48 256 256 --style randomized -q
# One manifest over the first N cases of both folders (a case's seed depends on its index only, so the first 160
# of 320 are the cases a --n 160 run makes): the last 3 of each style go last, so the 6 validation cases (the
# trainer validates on the last ones) hold both styles.
for n in 160 320; do
    mixsup-data merge "$work/manifest-$((2 * n)).json" "$work/classic" "$work/randomized" --first $n --last-of-each 3
done
common=(--preset default --no-progress --set validation_cases=6)
more=("${common[@]}" --set epochs=60 --set learning_rate=6e-4)  # a new one-cycle schedule from a run's weights
mixsup-train unet --data "$work/manifest-320.json" --out "$work/run" "${common[@]}" --set epochs=200 "${linear[@]}"
# v7's validation Dice was still rising at its last epoch: a new one-cycle schedule from its weights.
mixsup-train unet --data "$work/manifest-320.json" --out "$work/run-more" --init-from "$work/run/best.pt" \
    "${more[@]}" "${linear[@]}"
# v9: twice more the same, on twice the cases (the same 6 validation cases can't be kept: they are the last 3 of
# each style, and those are new cases now).
mixsup-train unet --data "$work/manifest-640.json" --out "$work/run-640" --init-from "$work/run-more/best.pt" \
    "${more[@]}" "${linear[@]}"
mixsup-train unet --data "$work/manifest-640.json" --out "$work/run-640-more" --init-from "$work/run-640/best.pt" \
    "${more[@]}" "${linear[@]}"
# v10: once more the same (the control of a per-lesion loss that was not kept; it passed v9's selection rule).
mixsup-train unet --data "$work/manifest-640.json" --out "$work/run-640-again" \
    --init-from "$work/run-640-more/best.pt" "${more[@]}" "${linear[@]}"
# v11: once more with the default anti-aliasing: the scans' pixel noise averaged, not sampled, on the 1.6 mm grid.
mixsup-train unet --data "$work/manifest-640.json" --out "$work/run-640-smoothed" \
    --init-from "$work/run-640-again/best.pt" "${more[@]}"
mixsup-export "$work/run-640-smoothed/best.pt" --repository model_repository --name unet --replace \
    --test-spacings 1.3 1.6 2.0 --lesion-threshold 0.3  # chosen on selection phantoms (MODEL_CARD.md)
