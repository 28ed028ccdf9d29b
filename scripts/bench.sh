#!/usr/bin/env bash
# README's main command: set up, then time one optimizer step of SNGM's backends against
# torch.optim.SGD on this machine (quick by default; pass --full for the whole set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec $PY benchmarks/bench_step.py "$@"
