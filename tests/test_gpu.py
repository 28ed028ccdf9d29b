"""GPU tests: run by anyone with a CUDA device (skipped without one; no CUDA query at collection).

Triton compiles for real here, so these must run in a process without TRITON_INTERPRET:
``python -m pytest -q tests/test_gpu.py -m gpu`` with the variable unset.
"""

import os

import pytest
import torch

from scenarios import CONFIGS, DTYPES, assert_close, grads_for, group_split, make_params
from sngm_ext import SNGM, BackendUnavailable, resolve_backend

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the GPU tests need compiled kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        resolve_backend(request.param, torch.device("cuda"))
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return request.param


def run_on(device, backend, dtype, config, steps=3):
    cfg = CONFIGS[config]
    params = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(dtype)]
    groups = [dict(params=ps, **h) for ps, h in zip(group_split(params), cfg["groups"])]
    opt = SNGM(groups, backend=backend, norm=cfg["norm"])
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = None if g is None else g.to(device)
        opt.step()
    return [p.detach().cpu() for p in params], [
        opt.state[p]["momentum_buffer"].cpu() if opt.state[p].get("momentum_buffer") is not None
        else None for p in params if p in opt.state
    ]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backend_matches_reference(gpu_backend, dtype, config):
    ref_p, ref_b = run_on("cuda", "reference", dtype, config)
    p, b = run_on("cuda", gpu_backend, dtype, config)
    for x, y in zip(p + b, ref_p + ref_b):
        if y is not None:
            assert_close(x, y, dtype)


def test_gpu_step_never_syncs_and_is_deterministic(gpu_backend):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
        opt = SNGM(m.parameters(), lr=0.1, weight_decay=1e-4, backend=gpu_backend)
        x = torch.randn(128, 64, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        for s in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if s >= 1:  # buckets and tables exist after the first step
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        outs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_gpu_norm_in_backward_is_bitwise_the_step_and_never_syncs(gpu_backend):
    """norm_in_backward on the GPU: the hooks' sums (launched during backward, on its stream) give
    the bits of the step's own phase 1, the step leaves phase 1 out, and neither syncs."""
    outs = []
    for flag in (True, False):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
        opt = SNGM(m.parameters(), lr=0.1, weight_decay=1e-4, backend=gpu_backend,
                   norm_in_backward=flag)
        x = torch.randn(128, 64, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        for s in range(4):
            opt.zero_grad()
            if s >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        if flag:
            assert opt._buckets.sums_steps == 3  # every step after the first
        outs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
