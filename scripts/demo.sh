#!/usr/bin/env bash
# Install (first run only) and run the end-to-end demo on this machine, with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m quantization_wrapper demo "$@"
