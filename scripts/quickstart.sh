#!/usr/bin/env bash
# Install mixsup into .venv, start a local Triton with the bundled model, segment a synthetic CT scan, report
# Dice against the phantom's own label, and stop the server. Usage: bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/install.sh all)
export PATH="$bin:$PATH"
grpc=${GRPC_PORT:-8001}

work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
mixsup-data phantoms "$work/scans" --n 1 --seed 2026 --shape 40 256 256 -q
mixsup-serve --grpc-port "$grpc" --http-port "${HTTP_PORT:-8000}" --metrics-port "${METRICS_PORT:-8002}" \
    --log-file "$work/triton.log" &
server=$!
until mixsup-client health --url "127.0.0.1:$grpc" >/dev/null 2>&1; do
    kill -0 "$server" 2>/dev/null || { echo "mixsup-serve stopped; its log:"; tail -n 20 "$work/triton.log"; exit 3; }
    sleep 1
done
mixsup-client segment "$work/scans/volume-0.nii.gz" -o "$work/volume-0_seg.nii.gz" --url "127.0.0.1:$grpc"
python - "$work/volume-0_seg.nii.gz" "$work/scans/segmentation-0.nii.gz" <<'PY'
import sys
import numpy as np
from mixsup.metrics import dice
from mixsup.scan import read_nifti
pred, truth = (read_nifti(p).voxels for p in sys.argv[1:3])
print(f"Dice against the phantom's label: liver {dice(np.minimum(pred, 1), np.minimum(truth, 1), 1):.3f}, "
      f"lesion {dice(pred, truth, 2):.3f}")
PY
