"""The GPU kit's extra checks (scripts/gpu_check.sh runs them after the GPU tests): opcheck on
CUDA, a step captured in a CUDA graph, a 40M-element cross-backend comparison, tiny and huge
norms, bf16 against the CPU kernels, the per-tensor finalize at 161 and 10,000 tensors.

Skipped without CUDA (no CUDA query at collection time); run with TRITON_INTERPRET unset:
``python -m pytest -q tests/test_gpu_extra.py -m gpu_extra``.
"""

import math
import os

import pytest
import torch

from scenarios import assert_runs_match, run
from sngm_ext import SNGM, BackendUnavailable, resolve_backend
from sngm_ext.layout import make_plan

pytestmark = pytest.mark.gpu_extra


def test_opcheck_on_cuda(gpu_backend):
    ops = resolve_backend(gpu_backend, torch.device("cuda"))[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = (100, 40, 5000)
    ws, gs, us = ([torch.randn(n, device="cuda", generator=g) for n in sizes] for _ in range(3))
    plan = make_plan([list(sizes)], True, torch.device("cuda"))
    sumsq = torch.zeros(plan.n_sumsq, dtype=torch.float64, device="cuda")
    lr = torch.tensor(0.1, device="cuda")
    checks = [
        (ops.sumsq, (ws, gs, plan.chunks[0], None, 0.1, True, plan.partials, 0)),
        (ops.finalize, (plan.partials, plan.seg_ptr, None, sumsq)),
        (ops.update, (ws, gs, us, plan.chunks[0], sumsq, None, None, 0.1, 0.9, 0.1, True, False)),
        (ops.update, (ws, gs, [], plan.chunks[0], sumsq, None, lr, 0.0, 0.0, 0.1, False, True)),
    ]
    for op, args in checks:
        ops.sumsq(*checks[0][1])
        ops.finalize(*checks[1][1])
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_a_captured_step_replays_as_eager(gpu_backend):
    """After a warm-up step (tables built, momentum created), step() captured in a CUDA graph and
    replayed equals eager steps, with the lr a device tensor a scheduler changes between replays."""
    def setup():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(256, 64), (256,),
                                                                           (10, 256), (10,)]]
        gs = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, gs):
            p.grad = g
        lr = torch.tensor(0.1, device="cuda")
        opt = SNGM(ps, lr=lr, momentum=0.9, weight_decay=1e-4, backend=gpu_backend)
        return ps, gs, lr, opt

    ps, gs, lr, opt = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        opt.step()
    eps, egs, elr, eopt = setup()
    for _ in range(2):  # the eager run's warm-up
        eopt.step()
    for k in range(4):
        lr.fill_(0.1 * 0.5 ** k)
        elr.fill_(0.1 * 0.5 ** k)
        for g, eg in zip(gs, egs):
            g.mul_(-1.1)
            eg.mul_(-1.1)
        graph.replay()
        eopt.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, eps):
        assert torch.equal(p, q)


def test_40m_elements_agree_across_backends():
    """cuda, triton and the reference on 40M fp32 elements in 3 tensors: within the bounds."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and compiled kernels")
    outs = {}
    for be in ("reference", "cuda", "triton"):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (25_000_000, 14_999_999, 1)]
        opt = SNGM(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, backend=be)
        for s in range(2):
            torch.manual_seed(10 + s)
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        outs[be] = ([p.detach() for p in ps], opt.grad_norm)
        del opt
    ref_ps, ref_n = outs["reference"]
    for be in ("cuda", "triton"):
        got_ps, got_n = outs[be]
        torch.testing.assert_close(got_n, ref_n, rtol=1e-12, atol=0)
        for a, b in zip(got_ps, ref_ps):
            torch.testing.assert_close(a, b, rtol=0, atol=8 * 2**-23 * b.abs().max().item())


@pytest.mark.parametrize("case", ["huge", "largest", "subnormal"])
def test_tiny_and_huge_norms(gpu_backend, case):
    """The norm neither overflows nor underflows for any finite fp32 gradient (fp64 sums, d/n in
    fp64, correctly rounded sqrt and division on the GPU)."""
    fi = torch.finfo(torch.float32)
    value = {"huge": 1e20, "largest": fi.max, "subnormal": fi.smallest_normal * fi.eps}[case]
    p = torch.nn.Parameter(torch.zeros(1000, device="cuda"))
    p.grad = torch.full((1000,), value, device="cuda")
    opt = SNGM([p], lr=0.1, momentum=0.9, backend=gpu_backend)
    opt.step()
    assert opt.skipped_steps.item() == 0
    torch.testing.assert_close(p.detach().cpu(), torch.full((1000,), -0.1 / math.sqrt(1000)),
                               rtol=1e-6, atol=0)


def test_bf16_rounds_as_the_cpu_kernels(gpu_backend):
    """bf16 params: the GPU kernels round every operation as the CPU ones and the reference do."""
    try:
        resolve_backend("cpu", torch.device("cpu"))
        cpu = "cpu"
    except BackendUnavailable:
        cpu = "reference"
    ref = run(cpu, torch.bfloat16, "three_groups")
    got = run(gpu_backend, torch.bfloat16, "three_groups", device="cuda")
    got.params = [p.cpu() for p in got.params]
    got.bufs = [None if b is None else b.cpu() for b in got.bufs]
    got.norms = [n.cpu() for n in got.norms]
    assert_runs_match(got, ref, torch.bfloat16, f"{gpu_backend} vs {cpu}")


@pytest.mark.parametrize("n_tensors", [161, 10_000])
def test_per_tensor_finalize_time(gpu_backend, n_tensors, record_property):
    """norm="tensor"'s finalize on 161 and 10,000 segments (the kit reports the time)."""
    ops = resolve_backend(gpu_backend, torch.device("cuda"))[1]
    plan = make_plan([[4096 * 2] * n_tensors], True, torch.device("cuda"))
    plan.partials.uniform_()
    sumsq = torch.empty(plan.n_sumsq, dtype=torch.float64, device="cuda")
    for _ in range(3):
        ops.finalize(plan.partials, plan.seg_ptr, None, sumsq)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        ops.finalize(plan.partials, plan.seg_ptr, None, sumsq)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    record_property("finalize_ms", ms)
    print(f"{gpu_backend} finalize, {n_tensors} segments: {ms:.4f} ms")
    expect = plan.partials.view(n_tensors, 2).sum(1)
    torch.testing.assert_close(sumsq[1:], expect, rtol=1e-15, atol=0)
    assert ms < 1.0
