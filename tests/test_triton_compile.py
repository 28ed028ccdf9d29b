"""The Triton kernels compile for real GPUs (sm_80, sm_90) and stream with 128-bit accesses.

The interpreter accepts code the compiler rejects, so this compiles ahead of time with no GPU
(scripts/triton_aot_check.py, in a subprocess without TRITON_INTERPRET) and reads the PTX and
ptxas's report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_aot_check.py"


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["kernels"]


@pytest.mark.parametrize("arch", [80, 90])
def test_update_kernel_uses_128_bit_accesses_and_never_spills(report, arch):
    # Each thread holds 16 elements (8 for fp64 at 16 warps) of param, grad and momentum.
    for dt, loads, stores in (("fp32", 12, 8), ("bf16", 6, 4), ("fp64", 12, 8)):
        k = report[f"update_{dt}_sm{arch}"]
        assert k["ld_128bit"] == loads, (dt, k)
        assert k["st_128bit"] == stores, (dt, k)
        assert k["ld_other"] <= 5, (dt, k)  # chunk row (3) + sums of squares (2): no scalar data
        assert k["spill_bytes"] == 0 and k["registers"] <= 128, (dt, k)


@pytest.mark.parametrize("arch", [80, 90])
def test_norm_kernels_compile_without_spills(report, arch):
    k = report[f"sumsq_fp32_sm{arch}"]
    assert k["ld_128bit"] == 8 and k["ld_other"] <= 2, k
    assert k["spill_bytes"] == 0
    assert report[f"finalize_fp32_sm{arch}"]["spill_bytes"] == 0
