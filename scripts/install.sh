#!/usr/bin/env bash
# Create (or reuse) the virtual environment $VENV (default .venv) and install mixsup into it, editable, with the
# extras named in $1 (e.g. "test"). Pip's chatter goes to $VENV/install.log and is shown only if it fails.
# Prints the venv's bin folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
bin=$(cd "$VENV/bin" && pwd)
if ! { "$bin/python" -m pip install --upgrade pip && "$bin/python" -m pip install -e "$spec"; } >"$VENV/install.log" 2>&1; then
    tail -n 40 "$VENV/install.log" >&2
    echo "install failed; full log: $VENV/install.log" >&2
    exit 1
fi
echo "$bin"
