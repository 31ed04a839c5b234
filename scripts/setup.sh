#!/usr/bin/env bash
# Create .venv (if missing) and install: torch first (the CPU wheel on disk; an unpinned torch would
# pull several GB of CUDA packages), then this package with every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.qw-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install --quiet -e ".[all,test]"
    touch "$stamp"
fi
