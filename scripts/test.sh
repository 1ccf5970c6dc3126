#!/usr/bin/env bash
# Install mixsup with every extra (all, test) into .venv and run the whole test suite (the real Triton server included).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/install.sh all,test)
exec "$bin/python" -m pytest -q "$@"
