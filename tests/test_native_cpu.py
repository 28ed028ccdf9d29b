"""What is particular to backend="cpu" (the C++ extension, csrc/cpu): thread-count independence,
argument checks made before anything is written, its place in backend="auto". Parity with the
reference is test_parity.py's, the op contract test_ops.py's."""

import math

import pytest
import torch

import sngm_ext
from sngm_ext import SNGM, BackendUnavailable
from sngm_ext.layout import make_plan
from bounds import elementwise_bounds
from kit import check_non_finite_grad_skips_the_step
from scenarios import DTYPES, run


@pytest.fixture(scope="module")
def ops():
    try:
        return sngm_ext.resolve_backend("cpu", torch.device("cpu"))[1]
    except BackendUnavailable as e:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"the native CPU backend must be available in CI: {e}")
        pytest.skip(f"native CPU backend unavailable: {e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(ops, dtype):
    a = run("cpu", dtype, "three_groups", threads=2)
    b = run("cpu", dtype, "three_groups", threads=2)
    c = run("cpu", dtype, "three_groups", threads=1)
    for other in (b, c):
        for x, y in zip(a.params + a.bufs + a.norms, other.params + other.bufs + other.norms):
            if x is not None:
                assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_finite_grad_skips_the_step(ops, dtype, bad):
    check_non_finite_grad_skips_the_step("cpu", dtype, bad)


def test_auto_picks_the_native_cpu_backend(ops):
    assert sngm_ext.resolve_backend("auto", torch.device("cpu"))[0] == "cpu"


def test_ops_refuse_bad_arguments_before_writing(ops):
    """Each refusal names the problem, and a refused update has written nothing."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, generator=g) for n in (100, 5000)]
    gs = [torch.randn(n, generator=g) for n in (100, 5000)]
    plan = make_plan([[100, 5000]], False, torch.device("cpu"))
    sumsq = torch.ones(3, 1, dtype=torch.float64)
    before = [w.clone() for w in ws]
    ints = [torch.zeros(100, dtype=torch.int32)]
    cases = [
        ("float32, float64, bfloat16 and float16",
         lambda: ops.sumsq(ints, ints, plan.chunks[0][:, :1].contiguous(), None, 0.0, False,
                           plan.partials, 0)),
        ("partials has dtype", lambda: ops.sumsq(ws, gs, plan.chunks[0], None, 0.0, False,
                                                 plan.partials.float(), 0)),
        ("out of range", lambda: ops.sumsq(ws, gs, plan.chunks[0], None, 0.0, False,
                                           plan.partials, 1)),
        ("2 params but 1 grads", lambda: ops.sumsq(ws, gs[:1], plan.chunks[0], None, 0.0, False,
                                                   plan.partials, 0)),
        (r"grads\[1\] is 4999", lambda: ops.update(ws, [gs[0], gs[1][1:]], [], plan.chunks[0],
                                                   sumsq, None, None, 0.1, 0.0, 0.0, False, False)),
        ("must be contiguous like its param",
         lambda: ops.update([ws[0].view(10, 10)], [gs[0].view(10, 10).t()], [],
                            plan.chunks[0][:, :1].contiguous(), sumsq, None, None, 0.1, 0.0, 0.0, False,
                            False)),
        ("sumsq must have shape \\[3, n >= 1\\]",
         lambda: ops.update(ws, gs, [], plan.chunks[0], sumsq[0], None, None, 0.1, 0.0, 0.0, False,
                            False)),
        ("partials must have shape \\[3, n >= 1\\]",
         lambda: ops.sumsq(ws, gs, plan.chunks[0], None, 0.0, False, plan.partials[0], 0)),
        ("grad_scale must be a one-element float32",
         lambda: ops.update(ws, gs, [], plan.chunks[0], sumsq, torch.tensor(2.0).double(), None, 0.1,
                            0.0, 0.0, False, False)),
    ]
    bad = plan.chunks[0].clone()
    bad[1, -1] = 5000 - 8  # starts 8 elements before the end of tensor 1, runs past it
    cases.append(("lies outside tensor 1", lambda: ops.update(ws, gs, [], bad, sumsq, None, None, 0.1,
                                                              0.0, 0.0, False, False)))
    bad2 = plan.chunks[0].clone()
    bad2[3, 0] = 3
    cases.append(("names segment 3", lambda: ops.update(ws, gs, [], bad2, sumsq, None, None, 0.1, 0.0,
                                                        0.0, False, False)))
    bad3 = plan.chunks[0].clone()
    bad3[0, 0] = 2
    cases.append(("names tensor 2 of 2", lambda: ops.update(ws, gs, [], bad3, sumsq, None, None, 0.1,
                                                            0.0, 0.0, False, False)))
    for match, call in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
        assert all(torch.equal(w, b) for w, b in zip(ws, before)), match


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_tensors_are_walked_in_place(ops, dtype):
    """A conv weight, its grad and momentum in channels_last: stepped where they lie, equal to
    the reference on the same tensors."""
    outs, steps, lr, beta = [], 2, 0.1, 0.9
    m_w = m_u = 0.0  # the largest |w| and |u| the reference reached (scenarios.py's Mw, Mu)
    for backend in ("reference", "cpu"):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
        w = torch.nn.Parameter(w.to(memory_format=torch.channels_last))
        opt = SNGM([w], lr=lr, momentum=beta, weight_decay=1e-2, backend=backend)
        ptr = w.data_ptr()
        m_w = max(m_w, w.detach().abs().max().item())
        for _ in range(steps):
            w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype).to(
                memory_format=torch.channels_last)
            opt.step()
            if backend == "reference":
                m_w = max(m_w, w.detach().abs().max().item())
                m_u = max(m_u, opt.state[w]["momentum_buffer"].abs().max().item())
        assert w.data_ptr() == ptr and w.is_contiguous(memory_format=torch.channels_last)
        outs.append((w.detach().clone(), opt.state[w]["momentum_buffer"].clone()))
    # The bounds of scenarios.py's module doc after `steps` steps: the two backends differ only in
    # the fp64 norm's summation order, which can flip one rounding per step and operation.
    du, dw = elementwise_bounds(dtype, steps, lr, beta, m_w, m_u, outs[0][0].numel())
    (w_ref, u_ref), (w_cpu, u_cpu) = outs
    assert (w_cpu.double() - w_ref.double()).abs().max().item() <= dw
    assert (u_cpu.double() - u_ref.double()).abs().max().item() <= du
