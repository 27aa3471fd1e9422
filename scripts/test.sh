#!/usr/bin/env bash
# The test command: everything but the `slow` tests (those run with the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -m "not slow" --durations=30 "$@"
