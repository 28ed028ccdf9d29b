"""The norm neither overflows nor underflows for any finite fp32, bf16 or fp16 gradient: squares
are summed in fp64 and d / n is taken in fp64 (``torch.linalg.vector_norm`` in fp32 fails every
case below). With weight decay 0 the step does not depend on the gradient's scale at all. fp64
gradients of any scale: test_scaled_norm.py."""

import math

import pytest
import torch

from bounds import FIRST_STEP_RTOL, norm_rtol_of_order
from sngm_ext import SNGM


def _step(backend, grads, dtype, momentum=0.9, lr=0.1):
    ps = [torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in grads]
    opt = SNGM(ps, lr=lr, momentum=momentum, backend=backend)
    for p, g in zip(ps, grads):
        p.grad = g.to(dtype)
    opt.step()
    return [p.detach().double() for p in ps], opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_grads_do_not_overflow(backend, dtype):
    """[1e20, -1e20] (its fp32 sum of squares overflows): a normal step of length lr."""
    (w,), opt = _step(backend, [torch.tensor([1e20, -1e20])], dtype)
    assert opt.skipped_steps.item() == 0
    # the grads' rounding to the dtype (u: 2^-8 bf16, 2^-24 fp32) moves the norm by as much; the
    # params (equal |g|: d / n exact up to its fp32 rounding) take fl(lr) * fl(d / n), their
    # product's and the storage's roundings: u + 3 * 2^-24. Both within FIRST_STEP_RTOL.
    torch.testing.assert_close(opt.grad_norm, torch.tensor(math.sqrt(2) * 1e20, dtype=torch.float64),
                               rtol=FIRST_STEP_RTOL[dtype], atol=0)
    torch.testing.assert_close(w, torch.tensor([-0.1, 0.1], dtype=torch.float64) / math.sqrt(2),
                               rtol=FIRST_STEP_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_largest_finite_grads(backend, dtype):
    """fp32's largest finite value in every element: still a step (1/n lies below fp32's normal
    range there, which is why d / n is taken in fp64)."""
    big = torch.finfo(dtype).max
    (w,), opt = _step(backend, [torch.full((1000,), big)], dtype)
    assert opt.skipped_steps.item() == 0
    # equal elements: d / n = 1/sqrt(1000) up to its rounding, then as above (FIRST_STEP_RTOL)
    torch.testing.assert_close(w, torch.full((1000,), -0.1 / math.sqrt(1000), dtype=torch.float64),
                               rtol=FIRST_STEP_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tiny_grads_do_not_underflow(backend, dtype):
    """1000 elements of the dtype's smallest subnormal (fp32: squares of 1e-23 underflow to 0 in
    fp32): a full step, not a zero norm."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    (w,), opt = _step(backend, [torch.full((1000,), tiny)], dtype)
    assert opt.grad_norm.item() > 0
    # equal elements: d / n = 1/sqrt(1000) up to its rounding, then as above (FIRST_STEP_RTOL)
    torch.testing.assert_close(w, torch.full((1000,), -0.1 / math.sqrt(1000), dtype=torch.float64),
                               rtol=FIRST_STEP_RTOL[dtype], atol=0)


def test_lemma_2_holds_for_mixed_tiny_grads(backend):
    """[1e-21] + 10^6 x [2.5e-23], momentum 0: the step is lr long (an fp32 sum of squares keeps
    only the first square and moved the params 25 lr, breaking Lemma 2's bound)."""
    grads = [torch.tensor([1e-21]), torch.full((10**6,), 2.5e-23)]
    ws, opt = _step(backend, grads, torch.float32, momentum=0.0)
    length = torch.cat([w.flatten() for w in ws]).norm().item()
    # each element fl(fl(lr) * fl(d / n)) stored in fp32 (3 roundings) with d / n of norm 1 up to
    # the fp64 sum of 1e6 squares (2 gamma_N ~ 2e-10): within FIRST_STEP_RTOL[float32] of lr
    assert length == pytest.approx(0.1, rel=FIRST_STEP_RTOL[torch.float32])
    # the grads' rounding to fp32 (2^-24 relative each: the norm moves by as much at most), the
    # fp64 sum of 1e6 + 1 squares and its square root (norm_rtol_of_order, ~1e-10)
    assert opt.grad_norm.item() == pytest.approx(math.sqrt(1e-42 + 1e6 * 6.25e-46),
                                                 rel=2.0**-24 + norm_rtol_of_order(10**6 + 1))


@pytest.mark.parametrize("scale", [2.0**-100, 2.0**-60, 1.0, 2.0**60, 2.0**100])
def test_scale_invariant_without_weight_decay(backend, scale):
    """Grads times a power of two from 2^-100 to 2^100: bitwise the same params and momentum."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in [(4097,), (33, 17), ()]]
    outs = []
    for sc in (1.0, scale):
        ps = [torch.nn.Parameter(torch.ones(b.shape)) for b in base]
        opt = SNGM(ps, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
        for _ in range(2):
            for p, b in zip(ps, base):
                p.grad = b * sc
            opt.step()
        outs.append([p.detach().clone() for p in ps] + [opt.state[p]["momentum_buffer"] for p in ps])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_weights_are_not_read_for_the_norm_without_weight_decay(backend):
    """With weight_decay=0 the norm is the gradient's alone: an inf param (a diverged unit) does
    not turn it into NaN (0 * inf) and skip every step."""
    p = torch.nn.Parameter(torch.tensor([float("inf"), 1.0, 2.0]))
    opt = SNGM([p], lr=0.1, momentum=0.0, backend=backend)
    p.grad = torch.tensor([3.0, 0.0, 4.0])
    opt.step()
    assert opt.grad_norm.item() == 5.0 and opt.skipped_steps.item() == 0
    # fp32: fl(2 - fl(fl(0.1) * fl(0.8))): three roundings of 2^-24 at most at |2 - 0.08|
    assert p[1].item() == 1.0 and p[2].item() == pytest.approx(2.0 - 0.1 * 0.8, rel=3 * 2.0**-24)
