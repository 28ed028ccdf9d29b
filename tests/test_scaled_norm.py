"""fp64 gradients of any finite size: the norm neither overflows nor underflows (#21 item 6).

An fp64 square leaves the double range beyond ~1e+-154 per element; the sums of squares are three
additive rows (sngm_ext/scaled_norm.py, csrc/sngm_math.h, triton_kernels/scaled.py: med, big and
small, with power-of-two scales). What must hold, on every backend:

* a gradient multiplied by 2^k gives the same step, bit for bit, as long as its elements stay in
  one of the three ranges (every scaling is by a power of two: exact), and the norm times 2^k;
* a gradient spread over several ranges gives the exact step up to fp64 rounding;
* NaN or inf anywhere still skips the step; 1.8e308 in every element still steps (the reported
  norm is then +inf: it exceeds the double range itself);
* the three implementations use the same constants.
"""

import math
import os
import re
from fractions import Fraction

import pytest
import torch

from bounds import gamma
from gpu_cases import FP64_SHAPES, check_fp64_any_scale, fp64_grads
from kit import ROOT
from sngm_ext import SNGM, scaled_norm

SHAPES = FP64_SHAPES


def _grads(seed: int):
    return fp64_grads(torch.Generator().manual_seed(seed))


# 2^k with every element in one range: k = -1000 small (and normal: |g| 2^k >= 2^-1010),
# -600 small, 600 and 1000 big (|g| 2^k > 2^486).
@pytest.mark.parametrize("k", [-1000, -600, 600, 1000])
@pytest.mark.parametrize("nesterov", [False, True])
def test_fp64_step_is_the_same_bits_at_every_scale(backend, k, nesterov):
    check_fp64_any_scale(backend, "cpu", k, nesterov=nesterov)


@pytest.mark.parametrize("k", [-1000, 1000])
def test_fp64_per_tensor_norms_at_every_scale(backend, k):
    check_fp64_any_scale(backend, "cpu", k, norm="tensor")


def _exact_norm(xs) -> Fraction:
    """sum x^2 exactly (Fractions), for the oracle."""
    return sum((Fraction(v) ** 2 for x in xs for v in x.reshape(-1).tolist()), Fraction(0))


# Elements spread over two ranges at once: (scale of the first half, scale of the second half).
MIXES = {
    "big+med": (2.0 ** 500, 2.0 ** 400),      # big and med terms, the big ones dominate
    "big+small": (2.0 ** 600, 2.0 ** -600),   # the small terms vanish next to the big ones
    "med+small": (2.0 ** -480, 2.0 ** -600),  # med < 2^-900: folded into the small row
    "small+subnormal": (2.0 ** -700, 2.0 ** -1070),  # subnormal elements (few significant bits)
    "med, a few tiny": (1.0, 2.0 ** -1000),   # small terms dropped: far below med's last bit
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_fp64_mixed_ranges_give_the_exact_step(backend, mix):
    """One SNGD step (momentum 0) against the exact maths. The kernels' d / n: the fp64 sum of
    N nonnegative terms is within gamma_N of the exact one (Higham eq. 3.4, each square rounded
    once; dropped small terms weigh < 2^-82), the norm within gamma_N / 2 + u (sqrt), 1/n within
    one more u, the products d * pre * inv * post one more (the scales are exact unless the result
    is subnormal, where the error is absolute: <= u_min = 2^-1074 per rounding, at most two);
    then lr * nd and w - lr * nd: two more u (|w| <= 2). Params start in [1, 2) and |lr * nd| <=
    0.1, so w0 - w1 is exact (Sterbenz)."""
    hi, lo = MIXES[mix]
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(1 + torch.rand(s, generator=g, dtype=torch.float64)) for s in SHAPES]
    grads = []
    for x in _grads(11):
        flat = x.reshape(-1).clone()
        flat[: flat.numel() // 2] *= hi
        flat[flat.numel() // 2:] *= lo
        grads.append(flat.reshape(x.shape))
    w0 = [p.detach().clone() for p in ps]
    opt = SNGM(ps, lr=0.1, momentum=0.0, backend=backend)
    for p, gr in zip(ps, grads):
        p.grad = gr
    opt.step()
    assert opt.skipped_steps.item() == 0
    n2 = _exact_norm(grads)
    # n2 as a float may overflow or underflow: its square root is taken scaled by 4^-exp
    exp = (n2.numerator.bit_length() - n2.denominator.bit_length()) // 2
    n = math.ldexp(math.sqrt(float(n2 / Fraction(2) ** (2 * exp))), exp)
    assert opt.grad_norm.item() == pytest.approx(n, rel=gamma(sum(x.numel() for x in grads)) + 4e-16)
    u = 2.0 ** -53
    rel = gamma(sum(x.numel() for x in grads)) / 2 + 6 * u
    for a, b, gr in zip(w0, ps, grads):
        step = (a - b.detach()).reshape(-1).tolist()
        for s, d in zip(step, gr.reshape(-1).tolist()):
            want = 0.1 * float(Fraction(d) / Fraction(n))  # |lr * d / n| in fp64, rounded once
            assert abs(s - want) <= rel * abs(want) + 2 * u * 2 + 0.1 * 2 * 2.0 ** -1074, (s, want)


def test_fp64_largest_and_smallest_values(backend):
    """1.8e308 in every element: the norm (1.8e308 * sqrt(N)) exceeds the double range, so the
    reported norm is +inf, but the step is taken, of length lr. The smallest subnormal in every
    element: a full step too (its square is 0 in fp64)."""
    for value, norm_finite in ((torch.finfo(torch.float64).max, False), (5e-324, True)):
        p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))
        opt = SNGM([p], lr=0.1, momentum=0.9, backend=backend)
        p.grad = torch.full_like(p, value)
        opt.step()
        assert opt.skipped_steps.item() == 0
        assert math.isfinite(opt.grad_norm.item()) == norm_finite
        # equal elements: d / n = 1 / sqrt(1000) up to a few fp64 roundings
        torch.testing.assert_close(p.detach(), torch.full_like(p, -0.1 / math.sqrt(1000)),
                                   rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("scale", [2.0 ** 600, 2.0 ** -600, 1.0])
def test_fp64_non_finite_grad_skips_in_every_range(backend, bad, scale):
    """inf sums into the big row, NaN into med: either way the step is skipped, nothing moves."""
    ps = [torch.nn.Parameter(torch.rand(s, dtype=torch.float64)) for s in SHAPES]
    opt = SNGM(ps, lr=0.1, momentum=0.9, backend=backend)
    grads = [x * scale for x in _grads(0)]
    grads[1].view(-1)[17] = bad
    for p, gr in zip(ps, grads):
        p.grad = gr
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert opt.skipped_steps.item() == 1 and not math.isfinite(opt.grad_norm.item())
    for a, b in zip(ps, before):
        assert torch.equal(a.detach(), b)


def test_fp64_norm_in_backward_partials_are_the_steps(fused_backend):
    """The grad hooks (norm_in_backward) write the three rows a step's own phase 1 would."""
    def run(in_backward):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.Linear(40, 3)).double()
        opt = SNGM(m.parameters(), lr=0.1, momentum=0.9, norm_in_backward=in_backward,
                   backend=fused_backend)
        for t in range(3):
            loss = m(torch.randn(8, 50, dtype=torch.float64)).square().sum() * 2.0 ** (700 - 700 * t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in m.parameters()], opt
    (a, _), (b, opt) = run(False), run(True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert opt._stepper.sums.served >= 1  # the hooks' partials were used


def test_the_three_implementations_share_constants():
    """scaled_norm.py, csrc/sngm_math.h and triton_kernels/scaled.py hold the same numbers."""
    with open(os.path.join(ROOT, "csrc", "sngm_math.h")) as f:
        header = f.read()
    names = {"kBig": "BIG", "kBigScale": "BIG_SCALE", "kSmall": "SMALL",
             "kSmallScale": "SMALL_SCALE", "kMedFloor": "MED_FLOOR"}
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_scaled_triton", os.path.join(ROOT, "triton_kernels", "scaled.py"))
    with open(spec.origin) as f:
        triton_src = f.read()
    for cname, pyname in names.items():
        m = re.search(rf"constexpr double {cname} = 0x1p(-?\d+);", header)
        assert m is not None, cname
        value = getattr(scaled_norm, pyname)
        assert value == 2.0 ** int(m.group(1)), cname
        t = re.search(rf"^{pyname}\b.*?=\s*2\.0\s*\*\*\s*\(?(-?\d+)\)?", triton_src, re.M)
        assert t is not None and value == 2.0 ** int(t.group(1)), pyname


def test_combine_cases():
    """combine's three cases on hand-made sums, with the scales they promise."""
    rows = torch.tensor([[4.0, 4.0, 2.0 ** -1000, 2.0 ** -1000, 0.0],
                         [0.0, 9.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    q, pre, post = scaled_norm.combine(rows)
    assert q.tolist() == [4.0, 9.0 + 4.0 * 2.0 ** -1076, 1.0 + 2.0 ** 200, 2.0 ** -1000, 0.0]
    assert pre.tolist() == [1.0, 1.0, 2.0 ** 600, 1.0, 1.0]
    assert post.tolist() == [1.0, 2.0 ** -538, 1.0, 1.0, 1.0]
    # the reported norm (a hypot of the rows' own norms) agrees with combine's sqrt(q) / (pre *
    # post) to a few roundings (three sqrt, two exact scalings, two hypot: < 8 u)
    n = scaled_norm.norm(rows)
    want = q.sqrt() / (pre * post)
    assert n[0].item() == 2.0 and n[4].item() == 0.0
    torch.testing.assert_close(n, want, rtol=8 * 2.0 ** -53, atol=0)


@pytest.mark.parametrize("k, fp32_grads", [(600, "randn"), (-600, "zeros")])
def test_fp32_params_beside_fp64_ones_out_of_range(backend, k, fp32_grads):
    """fp32 params sharing the one norm with fp64 grads out of range: the fp64 params step as
    they would alone (the fp32 squares weigh nothing next to 2^1200, and with 2^-1200 they are
    0), the fp32 ones by d / n, which fp32 cannot hold: 0 (their own path through combine's
    scales, never inf or NaN)."""
    def run(with_fp32):
        g = torch.Generator().manual_seed(5)
        p64 = [torch.nn.Parameter(1 + torch.rand(s, generator=g, dtype=torch.float64))
               for s in SHAPES]
        p32 = [torch.nn.Parameter(torch.rand(s, generator=g)) for s in ((300,), (5, 5))]
        params = p64 + (p32 if with_fp32 else [])
        opt = SNGM(params, lr=0.1, momentum=0.9, backend=backend)
        for p, gr in zip(p64, _grads(2)):
            p.grad = gr * 2.0 ** k
        for p in p32:
            p.grad = torch.randn(p.shape, generator=g) if fp32_grads == "randn" \
                else torch.zeros_like(p)
        before = [p.detach().clone() for p in p32]
        opt.step()
        assert opt.skipped_steps.item() == 0
        if with_fp32:
            for p, b in zip(p32, before):
                assert torch.equal(p.detach(), b)
                assert not opt.state[p]["momentum_buffer"].any()
        return [p.detach().clone() for p in p64]
    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fp64_partials_in_range_or_not(fused_backend, wd):
    """The CPU kernel sums an fp64 chunk whose nonzero elements are all in range as the plain
    sum of squares and splits only the others: a chunk's three partials must be the same bits
    as its med had it been split (an out-of-range element replaced by 0 leaves med as it was),
    whichever chunks share its group of four, and the split rows must match scaled_norm's."""
    from sngm_ext.layout import CHUNK, make_plan

    ops = SNGM([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=0.1,
               backend=fused_backend)._stepper.resolve(torch.device("cpu"))[1]
    g = torch.Generator().manual_seed(0)
    n = CHUNK * 8 + 40
    w = torch.randn(n, generator=g, dtype=torch.float64)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    grad[3 * CHUNK: 4 * CHUNK: 97] = 0.0  # zeros: in no row
    grad[CHUNK + 5] = 2.0 ** 600  # one big element
    grad[5 * CHUNK + 11] = 2.0 ** -700  # one tiny element
    grad[7 * CHUNK + 3] = 1e-300  # another
    plan = make_plan([[n]], False, torch.device("cpu"))
    table = plan.chunks[0]
    together = torch.empty(3, table.shape[1], dtype=torch.float64)
    ops.sumsq([w], [grad], table, None, wd, False, together, 0)
    alone = torch.empty_like(together)
    for c in range(table.shape[1]):
        ops.sumsq([w], [grad], table[:, c:c + 1].contiguous(), None, wd, False, alone, c)
    assert torch.equal(together, alone)
    cleaned = grad.clone()  # the out-of-range elements as zeros: every chunk on the plain path
    for i in (CHUNK + 5, 5 * CHUNK + 11, 7 * CHUNK + 3):
        cleaned[i] = 0.0
    plain = torch.empty_like(together)
    ops.sumsq([w], [cleaned], table, None, wd, False, plain, 0)
    if wd == 0:  # with weight decay d = g + wd * w is in range even where g is 0
        assert torch.equal(together[0], plain[0])
        assert not plain[1:].any()
    for c in range(table.shape[1]):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        want = torch.stack(scaled_norm.squares(grad[lo:hi] + wd * w[lo:hi]))
        torch.testing.assert_close(together[:, c], want, rtol=2 * gamma(hi - lo), atol=0)
