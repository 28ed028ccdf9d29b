"""The Triton kernels compile for real GPUs (sm_80, sm_90), stream with 128-bit accesses on a
chunk's vector path, keep its scalar path scalar, and round every operation once, correctly.

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

# Per dtype: elements per thread (a 4096-element chunk over 8 warps, fp64 over 16) and the
# 128-bit accesses that take per tensor.
PER_THREAD = {"fp32": (16, 4), "bf16": (16, 2), "fp16": (16, 2), "fp64": (8, 4)}
# Scalar loads besides the data: the chunk row (4), the numel and pointers (4), sumsq[0, 0] and
# sumsq[1, 0] (the skip test), the segment's three sums, grad_scale (and lr_tensor, when the lr
# is read from one).
UPDATE_OTHER_LOADS = 14
SUMSQ_OTHER_LOADS = 7


@pytest.fixture(scope="module")
def full_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def report(full_report):
    return full_report["kernels"]


def test_no_integer_argument_is_specialized(full_report):
    """Each variant compiles once whatever the sizes (n_chunks, offsets, nesterov's 0 / 1): the
    number of variants bounds a run's compiles (the GPU kit's plan), and the code checked here
    (compiled with no integer assumptions) is the code that runs."""
    assert full_report["specialized_ints"] == {
        "_update_kernel": [], "_sumsq_kernel": [], "_finalize_kernel": []}
    n_variants = len(full_report["kernels"]) // 2  # two archs
    assert n_variants == 4 * 6 + 4 + 1  # dtypes x (momentum or not) x (float lr, lr_tensor fp32/64)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", sorted(PER_THREAD))
@pytest.mark.parametrize("mom", [True, False])
@pytest.mark.parametrize("lrt", ["", "32", "64"])
def test_update_kernel_vector_and_scalar_paths(report, arch, dt, mom, lrt):
    k = report[f"update_{dt}{'' if mom else '_nomom'}{'_lrt' + lrt if lrt else ''}_sm{arch}"]
    elems, wide = PER_THREAD[dt]
    loaded, stored = (3, 2) if mom else (2, 1)
    other = UPDATE_OTHER_LOADS + (1 if lrt else 0)
    # Vector path: param, grad (and momentum) in 128-bit loads, param (and momentum) stored so.
    assert k["ld_128bit"] == loaded * wide, k
    assert k["st_128bit"] == stored * wide, k
    # Scalar path: one access per element, so the vector path's alignment hints did not leak.
    assert k["st_other"] == stored * elems, k
    assert loaded * elems <= k["ld_other"] <= loaded * elems + other, k
    assert k["inexact"] == 0 and k["fma"] == 0, k
    assert k["spill_bytes"] == 0 and k["registers"] <= 128, k


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", sorted(PER_THREAD))
def test_sumsq_kernel_vector_and_scalar_paths(report, arch, dt):
    k = report[f"sumsq_{dt}_sm{arch}"]
    elems, wide = PER_THREAD[dt]
    assert k["ld_128bit"] == 2 * wide, k
    assert 2 * elems <= k["ld_other"] <= 2 * elems + SUMSQ_OTHER_LOADS, k
    assert k["st_other"] == 3, k  # the chunk's three partials (med, big, small)
    assert k["inexact"] == 0 and k["fma"] == 0, k
    assert k["spill_bytes"] == 0 and k["registers"] <= 128, k


@pytest.mark.parametrize("arch", [80, 90])
def test_finalize_kernel_compiles_without_spills(report, arch):
    k = report[f"finalize_sm{arch}"]
    assert k["spill_bytes"] == 0 and k["inexact"] == 0 and k["fma"] == 0, k
    assert k["st_other"] == 6, k  # 3 rows x (sumsq[:, 0] (program 0), sumsq[:, 1 + s] (segments))
