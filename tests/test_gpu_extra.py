"""The GPU kit's extra checks (scripts/gpu_check.sh runs them after the GPU tests): opcheck on
CUDA, a step captured in a CUDA graph after a warm-up and without one, 40M fp32 elements and one
bf16 tensor of more than 2^31 elements against the reference's operations element by element,
tiny and huge norms, bf16 against the CPU kernels, the per-tensor finalize at 161 and 10,000
tensors.

Skipped without CUDA (no CUDA query at collection time); run with TRITON_INTERPRET unset:
``python -m pytest -q tests/test_gpu_extra.py -m gpu_extra``.
"""

import math

import pytest
import torch

from bounds import FIRST_STEP_RTOL, two_sums_rtol
from gpu_cases import BIG_BF16, GPU_LARGE, check_large
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
    sumsq = torch.zeros(3, plan.n_sumsq, dtype=torch.float64, device="cuda")
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


def _capture_setup(backend):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(256, 64), (256,), (10, 256),
                                                                       (10,)]]
    gs = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, gs):
        p.grad = g
    lr = torch.tensor(0.1, device="cuda")
    opt = SNGM(ps, lr=lr, momentum=0.9, weight_decay=1e-4, backend=backend)
    return ps, gs, lr, opt


def _replay_against_eager(backend, graph, ps, gs, lr, eager_warmup):
    """Four replays, the lr and the grads changed in place between them, against eager steps."""
    eps, egs, elr, eopt = _capture_setup(backend)
    for _ in range(eager_warmup):
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
    for i, (p, q) in enumerate(zip(ps, eps)):
        assert torch.equal(p, q), f"param {i}: replays differ from eager steps"


def test_a_captured_step_replays_as_eager(gpu_backend):
    """After a warm-up step (tables built, momentum created), step() captured in a CUDA graph and
    replayed equals eager steps, with the lr a device tensor a scheduler changes between replays."""
    ps, gs, lr, opt = _capture_setup(gpu_backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        opt.step()
    _replay_against_eager(gpu_backend, graph, ps, gs, lr, eager_warmup=2)


def test_a_step_captured_without_warm_up(gpu_backend):
    """The very first step captured (chunk tables, pointer tables and momentum buffers made during
    the capture): either refused with an error that says to warm up first, or each replay equals
    an eager step. Never silently different (a momentum buffer zeroed inside the graph would be
    zeroed again at every replay)."""
    ps, gs, lr, opt = _capture_setup(gpu_backend)
    before = [p.detach().clone() for p in ps]
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            opt.step()
    except Exception as e:  # noqa: BLE001  a refusal must say why and what to do
        assert "warm" in str(e).lower() and "captur" in str(e).lower(), e
        return
    torch.cuda.synchronize()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)), "the capture ran the step"
    _replay_against_eager(gpu_backend, graph, ps, gs, lr, eager_warmup=0)


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_40m_elements_with_weight_decay(gpu_backend):
    """40M fp32 elements in 3 tensors, 2 steps, weight decay a tenth of d: every element's
    momentum and param within its bound from the reference's operations (gpu_cases.check_large)."""
    try:
        check_large(gpu_backend, GPU_LARGE, "cuda")
    finally:
        _free()


def test_a_bf16_tensor_of_more_than_2_31_elements(gpu_backend):
    """One bf16 tensor of 2^31 + 4100 elements (and a small one): chunks that start past 2^31
    step their own elements, element by element within the bounds (~28 GiB of device memory)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs ~40 GiB of free device memory, {free / 2**30:.0f} GiB free")
    try:
        check_large(gpu_backend, BIG_BF16, "cuda")
    finally:
        _free()


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
    # equal elements: d / n = 1 / sqrt(1000) up to the fp64 sum's rounding, then fl(lr) * fl(d / n)
    # and the product's and the storage's roundings (bounds.FIRST_STEP_RTOL; test_scale on CPU)
    torch.testing.assert_close(p.detach().cpu().double(),
                               torch.full((1000,), -0.1 / math.sqrt(1000), dtype=torch.float64),
                               rtol=FIRST_STEP_RTOL[torch.float32], atol=0)


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
    sumsq = torch.empty(3, plan.n_sumsq, dtype=torch.float64, device="cuda")
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
    expect = plan.partials.view(3, n_tensors, 2).sum(2)  # each of the three rows
    # two fp64 sums of the same 2 nonnegative partials: 2 gamma_2 apart at most (Higham eq. 3.4)
    torch.testing.assert_close(sumsq[:, 1:], expect, rtol=two_sums_rtol(2), atol=0)
    assert ms < 1.0
