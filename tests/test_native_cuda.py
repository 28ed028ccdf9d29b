"""backend="cuda" (csrc/cuda) against the reference on a GPU; skipped without one.

The same scenarios and bounds as test_native_cpu.py. The CUDA kernels contract a*b+c into FMAs
(nvcc's default), which moves fp32 results by an ulp or so: well inside the bounds.
"""

import math

import pytest
import torch

import sngm_ext
from sngm_ext import SNGM, BackendUnavailable
from test_native_cpu import (CONFIGS, DTYPES, SHAPES, assert_native_close,
                             check_non_finite_grad_skips_the_step, grads_for, make_params, run)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def ops():
    try:
        return sngm_ext.resolve_backend("cuda", torch.device("cuda"))[1]
    except BackendUnavailable as e:
        pytest.fail(f"a CUDA device is present but the native CUDA backend is not: {e}")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(ops, dtype, config):
    ref_p, ref_b, ref_n, _ = run("reference", dtype, config, device="cuda")
    p, b, n, opt = run("cuda", dtype, config, device="cuda")
    for i, (x, y) in enumerate(zip(p, ref_p)):
        assert_native_close(x.cpu(), y.cpu(), dtype, f"param {i} {SHAPES[i]}")
    for i, (x, y) in enumerate(zip(b, ref_b)):
        assert (x is None) == (y is None)
        if x is not None:
            assert_native_close(x.cpu(), y.cpu(), dtype, f"momentum {i} {SHAPES[i]}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for x, y in zip(n, ref_n):
        assert x.device.type == "cuda" and x.dtype == acc
        assert_native_close(x.cpu(), y.cpu(), acc, "grad norm")
    assert opt.skipped_steps.item() == 0


def test_auto_prefers_the_native_cuda_backend(ops):
    assert sngm_ext.resolve_backend("auto", torch.device("cuda"))[0] == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_bitwise_deterministic(ops, dtype):
    a = run("cuda", dtype, "three_groups", device="cuda")
    b = run("cuda", dtype, "three_groups", device="cuda")
    for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_non_finite_grad_skips_on_device(ops, dtype, bad):
    check_non_finite_grad_skips_the_step("cuda", dtype, bad, device="cuda")


def test_cuda_and_cpu_backends_agree(ops):
    cpu = run("cpu", torch.float32, "tensor_norm")
    gpu = run("cuda", torch.float32, "tensor_norm", device="cuda")
    for x, y in zip(gpu[0] + gpu[1], cpu[0] + cpu[1]):
        if x is not None:
            assert_native_close(x.cpu(), y, torch.float32)


def test_cuda_step_has_no_host_sync(ops):
    params = make_params(torch.float32, device="cuda")
    opt = SNGM(params, lr=0.1, momentum=0.9, backend="cuda")
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()  # builds buckets and tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
