"""GPU tests for both GPU backends ("triton" compiled for real, "cuda" the native extension):
run by anyone with a CUDA device, skipped without one (no CUDA query at collection time).

Triton compiles for real here, so these must run in a process without TRITON_INTERPRET:
``python -m pytest -q tests/test_gpu.py -m gpu`` with the variable unset. The scenarios and the
bounds are the CPU suite's (scenarios.py; gpu_cases.py's per element): the kernels round every
operation as the reference does, so only the norm's summation order differs. test_gpu_power.py
shows on CPU that these checks fail kernels broken the ways a GPU bug would break them.
"""

import math

import pytest
import torch

from gpu_cases import check_fp64_any_scale, check_grad_scaler, check_odd_offsets
from bounds import elementwise_bounds
from kit import assert_within, check_non_finite_grad_skips_the_step
from scenarios import CONFIGS, DTYPES, assert_runs_match, grads_for, make_params, run
from sngm_ext import SNGM, resolve_backend
from sngm_ext.layout import make_plan

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backend_matches_reference(gpu_backend, dtype, config):
    ref = run("reference", dtype, config, device="cuda")
    got = run(gpu_backend, dtype, config, device="cuda")
    assert all(n.device.type == "cuda" for n in got.norms)
    assert got.opt.skipped_steps.item() == 0
    assert_runs_match(got, ref, dtype, gpu_backend)


def test_gpu_and_cpu_agree(gpu_backend):
    cpu = run("reference", torch.float32, "tensor_norm")
    gpu = run(gpu_backend, torch.float32, "tensor_norm", device="cuda")
    gpu.params = [p.cpu() for p in gpu.params]
    gpu.bufs = [None if b is None else b.cpu() for b in gpu.bufs]
    gpu.norms = [n.cpu() for n in gpu.norms]
    assert_runs_match(gpu, cpu, torch.float32, f"{gpu_backend} vs CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_bitwise_deterministic(gpu_backend, dtype):
    a = run(gpu_backend, dtype, "three_groups", device="cuda")
    b = run(gpu_backend, dtype, "three_groups", device="cuda")
    for x, y in zip(a.params + a.bufs + a.norms, b.params + b.bufs + b.norms):
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_non_finite_grad_skips_on_device(gpu_backend, dtype, bad):
    check_non_finite_grad_skips_the_step(gpu_backend, dtype, bad, device="cuda")


def test_auto_prefers_the_native_cuda_backend(gpu_backend):
    assert resolve_backend("auto", torch.device("cuda"))[0] == "cuda"


@pytest.mark.parametrize("flag", [False, True])
def test_gpu_step_never_syncs_and_leaves_tensors_in_place(gpu_backend, flag):
    """No host sync in backward or step (after the first step, which builds tables), params and
    grads stay where they are, and norm_in_backward gives the bits of the plain step."""
    outs = []
    for nib in (flag, False):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
        ptrs = [p.data_ptr() for p in m.parameters()]
        opt = SNGM(m.parameters(), lr=0.1, weight_decay=1e-4, backend=gpu_backend,
                   norm_in_backward=nib)
        x = torch.randn(128, 64, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        for s in range(4):
            opt.zero_grad()
            if s >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                torch.nn.functional.cross_entropy(m(x), y).backward()
                grads = [p.grad for p in m.parameters()]
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert all(p.grad is g for p, g in zip(m.parameters(), grads))
        assert [p.data_ptr() for p in m.parameters()] == ptrs
        if nib:
            assert opt._sums.served == 3  # every step after the first
        outs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_gpu_params_on_another_device_than_the_current_one(gpu_backend):
    """Params on cuda:1 while cuda:0 is current: the kernels run on the params' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    params = make_params(torch.float32, device="cuda:1")
    opt = SNGM(params, lr=0.1, momentum=0.9, backend=gpu_backend)
    ref_params = make_params(torch.float32)
    ref = SNGM(ref_params, lr=0.1, momentum=0.9, backend="reference")
    before = [q.detach().clone() for q in ref_params]
    for p, q, g in zip(params, ref_params, grads_for(ref_params, 0)):
        p.grad = None if g is None else g.to("cuda:1")
        q.grad = g
    with torch.cuda.device(0):
        opt.step()
    ref.step()
    # one step on the same values: the norm's summation order alone (bounds.elementwise_bounds)
    n_terms = sum(q.numel() for q in ref_params)
    for i, (p, q, q0) in enumerate(zip(params, ref_params, before)):
        if not q.numel():
            continue
        buf = ref.state[q].get("momentum_buffer") if q in ref.state else None
        du, dw = elementwise_bounds(torch.float32, 1, 0.1, 0.9,
                                    max(q0.abs().max().item(), q.detach().abs().max().item()),
                                    0.0 if buf is None else buf.abs().max().item(), n_terms)
        assert_within(p.detach().cpu(), q.detach(), dw, f"param {i}")


def test_gpu_tensor_lr_is_read_on_the_device(gpu_backend):
    """lr as a CUDA tensor: the same bits as the float lr, a scheduler writing it in place, and
    no host sync in the step (the kernels read it from device memory)."""
    outs = []
    for lr in (0.1, torch.tensor(0.1, device="cuda")):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
        opt = SNGM(m.parameters(), lr=lr, weight_decay=1e-4, backend=gpu_backend)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        x = torch.randn(128, 64, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        for s in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if s >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            sched.step()
        outs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_views_at_odd_storage_offsets(gpu_backend, dtype):
    """Params and grads that are views at odd element offsets of one storage: every chunk on the
    scalar path (a 128-bit access there would be a misaligned-address error)."""
    check_odd_offsets(gpu_backend, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gpu_grad_scaler_with_a_scale_that_is_not_a_power_of_two(gpu_backend, dtype):
    check_grad_scaler(gpu_backend, dtype, "cuda")


def test_gpu_ops_refuse_bad_arguments_before_writing(gpu_backend):
    """Both GPU backends check their arguments on the host (a direct caller cannot make them
    write out of bounds): each refusal is a RuntimeError naming the problem; nothing written."""
    ops = resolve_backend(gpu_backend, torch.device("cuda"))[1]
    ws = [torch.randn(n, device="cuda") for n in (100, 5000)]
    gs = [torch.randn_like(w) for w in ws]
    plan = make_plan([[100, 5000]], False, torch.device("cuda"))
    sumsq = torch.ones(3, 1, dtype=torch.float64, device="cuda")
    before = [w.clone() for w in ws] + [plan.partials.clone()]
    cases = [
        ("out of range", lambda: ops.sumsq(ws, gs, plan.chunks[0], None, 0.0, False,
                                           plan.partials, 1)),
        ("2 params but 1 grads", lambda: ops.sumsq(ws, gs[:1], plan.chunks[0], None, 0.0, False,
                                                   plan.partials, 0)),
        ("grad_scale must be a one-element float32", lambda: ops.update(
            ws, gs, [], plan.chunks[0], sumsq, torch.tensor(2.0, device="cuda").double(), None,
            0.1, 0.0, 0.0, False, False)),
        ("grads\\[1\\]", lambda: ops.update(ws, [gs[0], gs[1][1:]], [], plan.chunks[0], sumsq,
                                            None, None, 0.1, 0.0, 0.0, False, False)),
        ("cpu", lambda: ops.update([w.cpu() for w in ws], [g.cpu() for g in gs], [],
                                   plan.chunks[0], sumsq, None, None, 0.1, 0.0, 0.0, False,
                                   False)),
        ("sumsq", lambda: ops.finalize(plan.partials, plan.seg_ptr, None, sumsq.float())),
        ("shape \\[3, n >= 1\\]", lambda: ops.update(ws, gs, [], plan.chunks[0], sumsq[0], None,
                                                     None, 0.1, 0.0, 0.0, False, False)),
    ]
    for match, call in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(ws + [plan.partials], before)), match



@pytest.mark.parametrize("k", [-1000, 1000])
def test_fp64_grads_of_any_scale_give_the_same_step(gpu_backend, k):
    check_fp64_any_scale(gpu_backend, "cuda", k)
