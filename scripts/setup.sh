#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): dev requirements, the package in editable mode
# (building its native extension where a compiler exists), and the data the training runs read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build against the torch just installed, not a fresh multi-GB CUDA one.
$PY -m pip install -q --no-build-isolation -e .
