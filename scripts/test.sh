#!/usr/bin/env bash
# README's test command: set up, then run the whole suite (CPU only; GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
# The Triton kernels run in Triton's interpreter on CPU: it must be on before triton is imported.
export TRITON_INTERPRET=1
exec $PY -m pytest -q tests "$@"
