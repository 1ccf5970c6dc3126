#!/usr/bin/env bash
# Install mixsup with its test extra into .venv and run the whole test suite (the real Triton server included).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/install.sh test)
exec "$bin/python" -m pytest -q "$@"
