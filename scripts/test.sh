#!/usr/bin/env bash
# README's test command: set up, then run the whole suite (CPU only; GPU tests skip themselves),
# then the numerics-sensitive tests again under every other ATen CPU capability this machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
# The Triton kernels run in Triton's interpreter on CPU: it must be on before triton is imported.
export TRITON_INTERPRET=1
$PY -m pytest -q tests "$@"

# CPUs differ between machines (AVX-512, AVX2 only), and torch's own kernels (the reference's
# sums, say) add in another order under each capability; the native CPU kernels follow torch's
# capability (sngm_ext/native.py builds the one it names on first use, ~45 s each, cached). Every
# tolerance must hold under all of them, so these files run again with ATEN_CPU_CAPABILITY set to
# each capability this machine has that the main run did not use. The Triton interpreter's
# arithmetic (numpy) and the opcheck / launch-count tests do not depend on it: left out, to keep
# the passes short (measured on 2 busy cores: ~12 s each once built, ~60 s each with the build).
NUMERICS_TESTS="tests/test_ops.py tests/test_parity.py tests/test_reference.py tests/test_scale.py tests/test_scaled_norm.py
  tests/test_native_cpu.py tests/test_step_bound.py tests/test_optimizer.py tests/test_user_tensors.py"
if [ "$#" -gt 0 ]; then
  echo "test.sh: arguments given, so the per-capability passes of the numerics tests are skipped"
  exit 0
fi
cap_of() {  # the capability torch picks, lower case, under the environment given
  env "$@" $PY -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
}
BEST=$(cap_of -u ATEN_CPU_CAPABILITY)
MAIN=$(cap_of)
case "$BEST" in
  avx512) LADDER="default avx2 avx512" ;;
  avx2) LADDER="default avx2" ;;
  *) LADDER="default" ;;  # not x86-64: "default" is the only one ours build for
esac
for cap in $LADDER; do
  [ "$cap" = "$MAIN" ] && continue  # the main run above had it
  echo "test.sh: numerics-sensitive tests under ATEN_CPU_CAPABILITY=$cap (this CPU's best: $BEST)"
  # shellcheck disable=SC2086  # the file list is meant to split
  ATEN_CPU_CAPABILITY=$cap $PY -m pytest -q $NUMERICS_TESTS -k "not triton and not opcheck and not launches"
done
