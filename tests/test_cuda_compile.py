"""The CUDA sources compile for sm_80/sm_90, without spills, with 128-bit accesses to global memory
(never generic ones), and link against torch 2.14.1 (CUDA 13) and nvcc 13: checked without a GPU
(scripts/cuda_compile_check.py).

Needs nvcc and an unpacked CUDA torch (``pip install --no-deps --target
~/.cache/sngm_ext/torch-2.14.1-cuda torch==2.14.1``, or $SNGM_TORCH_CUDA_TREE): skipped without
them, except in CI (the environment variable CI set), where a missing one is a failure.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "cuda_compile_check.py")

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cuda_compile_check as ccc  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    missing = ccc.missing_prerequisites(ccc.find_tree(None))
    if missing:
        msg = "CUDA compile check cannot run: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " (required in CI: scripts/setup.sh installs the tree)")
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("cuda_check")
    rjson = out / "report.json"
    p = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out), "--json", str(rjson)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    assert rjson.exists(), p.stdout
    r = json.loads(rjson.read_text())
    r["rc"], r["stdout"] = p.returncode, p.stdout
    return r


def test_cuda_sources_compile_and_link(report):
    for step in ("kernels_cxx17", "ptx_sm90_cxx20", "host_cxx20", "link"):
        assert report["steps"].get(step, {}).get("rc") == 0, report["stdout"]
    assert report["rc"] == 0, report["stdout"]


def test_every_kernel_is_built_for_both_archs_without_spills(report):
    kernels = report["kernels"]
    for kind in ("update_kernel", "sumsq_kernel", "finalize_kernel"):
        for sm in ("sm_80", "sm_90"):
            assert any(k.startswith(f"{kind}:{sm}:") for k in kernels), (kind, sm)
    # 4 dtypes x (no momentum, momentum, nesterov) x (wd, no wd) update kernels per arch
    assert sum(k.startswith("update_kernel:sm_90:") for k in kernels) == 24
    # 4 dtypes x (wd, no wd) sumsq kernels per arch
    assert sum(k.startswith("sumsq_kernel:sm_90:") for k in kernels) == 8
    spills = {k: v for k, v in kernels.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, spills


def test_streaming_kernels_use_128_bit_accesses(report):
    ptx = report["ptx"]
    updates = {k: v for k, v in ptx.items() if "update_kernel" in k}
    assert len(updates) == 24
    for name, v in updates.items():
        assert v["load128"] >= 2 and v["store128"] >= 1, (name, v)
    for name, v in ptx.items():
        if "sumsq_kernel" in name:
            assert v["load128"] >= 1, (name, v)
        # the pointers come from the device table: every access must still say .global
        if "sumsq_kernel" in name or "update_kernel" in name:
            assert v["generic"] == 0, (name, v)


def test_ptx_parser_tells_vector_from_scalar_accesses():
    ptx = """
.visible .entry _Z13update_kernelv(
{
\tld.global.nc.v4.u32 \t{%r1, %r2, %r3, %r4}, [%rd1];
\tld.global.v2.f64 \t{%fd1, %fd2}, [%rd2];
\tst.global.wb.v4.u32 \t[%rd3], {%r1, %r2, %r3, %r4};
\tld.param.u64 \t%rd4, [p0];
\tst.shared.f64 \t[%r5], %fd3;
}
.visible .entry _Z12sumsq_kernelv(
{
\tld.global.f32 \t%f1, [%rd1];
\tld.global.v2.f32 \t{%f1, %f2}, [%rd1];
\tld.v4.u32 \t{%r1, %r2, %r3, %r4}, [%rd2];
\t@%p1 st.f32 \t[%rd3], %f1;
\tld.volatile.u16 \t%rs1, [%rd4];
}
"""
    r = ccc.ptx_report(ptx)
    assert r["_Z13update_kernelv"] == {"load128": 2, "store128": 1, "generic": 0}
    # 32 and 64 bits, or generic (no .global): none counts as a 128-bit global access
    assert r["_Z12sumsq_kernelv"] == {"load128": 0, "store128": 0, "generic": 3}
