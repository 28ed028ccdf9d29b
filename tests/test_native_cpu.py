"""backend="cpu" (the C++ extension, csrc/cpu) against the reference, with tight per-dtype bounds.

The kernels compute every element with the reference's operations in the reference's order, each
rounded once (-ffp-contract=off); only the sum of squares is added in another order. So fp32 stays
within ~1e-6 relative of the reference, fp64 within 1e-12, and bf16/fp16 within one unit in the
last place (plus fp32-level error at the tensor's scale where a result cancels towards zero). A
per-tensor norm in global mode misses these bounds by orders of magnitude (checked below).
"""

import math

import pytest
import torch

import sngm_ext
from sngm_ext import SNGM, BackendUnavailable
from sngm_ext._ops import CPU_SCHEMAS, SCHEMAS
from sngm_ext.buckets import BucketSet


def _native_or_skip():
    try:
        return sngm_ext.resolve_backend("cpu", torch.device("cpu"))[1]
    except BackendUnavailable as e:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"the native CPU backend must be available in CI: {e}")
        pytest.skip(f"native CPU backend unavailable: {e}")


@pytest.fixture(scope="module")
def ops():
    return _native_or_skip()


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# relative bound for fp32/fp64 (also scaled by the tensor's largest magnitude as an absolute one)
REL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (x in fp64), subnormals included."""
    fi = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.smallest_normal)))
    return torch.exp2(e - mant)


def assert_native_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    if dtype in REL:
        bound = REL[dtype] * (e.abs() + scale)
    else:
        bound = _ulp(torch.maximum(a.abs(), e.abs()), dtype) + 4 * 2.0**-24 * scale
    err = (a - e).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {a.numel()} elements off, worst {err.max().item():.3g} "
        f"(bound there {bound.flatten()[err.flatten().argmax()].item():.3g})"
    )


# 0-dim, 0-size, 1, 4097 (a chunk and one element), 2-D, non-contiguous, a multi-chunk tensor
SHAPES = [(), (0,), (1,), (4097,), (33, 17), "t(40, 24)", (3, 5000)]


def make_params(dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in SHAPES:
        if isinstance(s, str):
            t = torch.randn(40, 24, generator=g, dtype=torch.float64).to(device, dtype).t()
            assert not t.is_contiguous()
        else:
            t = torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)
        ps.append(torch.nn.Parameter(t))
    return ps


def grads_for(params, step, seed=100, scale=1.0):
    g = torch.Generator().manual_seed(seed + step)
    out = []
    for i, p in enumerate(params):
        t = (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.device, p.dtype)
        if i == 5 and step % 2:  # a non-contiguous grad now and then
            t = t.t().contiguous().t()
        skip = (step == 1 and i in (3, 6)) or (step == 2 and i in (0, 4))
        out.append(None if skip else t)
    return out


CONFIGS = {
    "plain": dict(norm="global", groups=[dict(lr=0.1, momentum=0.9)]),
    "three_groups": dict(norm="global", groups=[
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
        dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
        dict(lr=0.2, momentum=0.0, weight_decay=1e-3),  # no momentum: no buffer
    ]),
    "tensor_norm": dict(norm="tensor", groups=[
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2, maximize=True),
        dict(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
    ]),
}


def split(params, n):
    if n == 1:
        return [params]
    if n == 2:
        return [params[:4], params[4:]]
    return [params[:2], params[2:5], params[5:]]


def run(backend, dtype, config, steps=4, norm=None, seed=0, grad_scale=1.0, threads=None,
        device="cpu"):
    cfg = CONFIGS[config]
    params = make_params(dtype, seed, device)
    hypers = cfg["groups"]
    groups = [dict(params=ps, **h) for ps, h in zip(split(params, len(hypers)), hypers)]
    opt = SNGM(groups, lr=0.1, backend=backend, norm=norm or cfg["norm"])
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        norms = []
        for s in range(steps):
            for p, g in zip(params, grads_for(params, s, scale=grad_scale)):
                p.grad = g
            opt.step()
            norms.append(opt.grad_norm.clone())
    finally:
        torch.set_num_threads(old)
    bufs = [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]
    return [p.detach().clone() for p in params], bufs, norms, opt


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matches_reference(ops, dtype, config):
    ref_p, ref_b, ref_n, _ = run("reference", dtype, config)
    p, b, n, opt = run("cpu", dtype, config)
    assert sngm_ext.resolve_backend("cpu", torch.device("cpu"))[0] == "cpu"
    for i, (x, y) in enumerate(zip(p, ref_p)):
        assert_native_close(x, y, dtype, f"param {i} {SHAPES[i]}")
    for i, (x, y) in enumerate(zip(b, ref_b)):
        assert (x is None) == (y is None), f"momentum buffer {i} presence"
        if x is not None:
            assert_native_close(x, y, dtype, f"momentum {i} {SHAPES[i]}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for x, y in zip(n, ref_n):
        assert x.dtype == acc
        assert_native_close(x, y, acc, "grad norm")
    assert opt.skipped_steps.item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bounds_reject_a_per_tensor_norm(dtype):
    glob, gb, _, _ = run("reference", dtype, "three_groups")
    per_tensor, pb, _, _ = run("reference", dtype, "three_groups", norm="tensor")
    with pytest.raises(AssertionError):
        for x, y in zip(per_tensor, glob):
            assert_native_close(x, y, dtype)
    with pytest.raises(AssertionError):
        for x, y in zip(pb, gb):
            if x is not None:
                assert_native_close(x, y, dtype)


def test_mixed_dtypes_share_one_fp64_norm(ops):
    """fp32, bf16 and fp64 params: one norm, summed in fp64 (fp32 partials in an fp64 buffer)."""
    def go(backend):
        g = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64).to(dt))
              for n, dt in [(5000, torch.float32), (300, torch.bfloat16), (77, torch.float64),
                            (4096, torch.float16)]]
        opt = SNGM(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        for s in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            opt.step()
        return ps, opt
    ref, ro = go("reference")
    nat, no = go("cpu")
    assert no.grad_norm.dtype == torch.float64
    # the fp32 buckets' sums of squares are fp32 sums (as in the reference), in another order
    assert_native_close(no.grad_norm, ro.grad_norm, torch.float32)
    for x, y in zip(nat, ref):
        assert_native_close(x, y, torch.float32 if x.dtype == torch.float64 else x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(ops, dtype):
    a = run("cpu", dtype, "three_groups", threads=2)
    b = run("cpu", dtype, "three_groups", threads=2)
    c = run("cpu", dtype, "three_groups", threads=1)
    for other in (b, c):
        for x, y in zip(a[0] + a[1] + a[2], other[0] + other[1] + other[2]):
            if x is not None:
                assert torch.equal(x, y)


def check_non_finite_grad_skips_the_step(backend, dtype, bad, device="cpu"):
    """A NaN/Inf in one grad: params, momentum and the device-side counter as the tests expect,
    and a finite step afterwards goes through (shared with test_native_cuda.py)."""
    params = make_params(dtype, device=device)
    opt = SNGM([dict(params=params[:4]), dict(params=params[4:], nesterov=True, momentum=0.5)],
               lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params if p in opt.state]
    grads = grads_for(params, 3)
    grads[6].view(-1)[1234] = bad
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert opt.skipped_steps.device == params[0].device and opt.skipped_steps.item() == 1
    assert not torch.isfinite(opt.grad_norm)
    for x, y in zip(params, before):
        assert torch.equal(x.detach(), y)
    after = [opt.state[p]["momentum_buffer"] for p in params if p in opt.state]
    for x, y in zip(after, bufs):
        assert torch.equal(x, y)
    for p, g in zip(params, grads_for(params, 4)):  # a finite step afterwards goes through
        p.grad = g
    opt.step()
    assert opt.skipped_steps.item() == 1
    assert not torch.equal(params[3].detach(), before[3])


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_finite_grad_skips_the_step(ops, dtype, bad):
    check_non_finite_grad_skips_the_step("cpu", dtype, bad)


def test_zero_grads_give_a_zero_norm_and_no_nan(ops):
    ps = make_params(torch.float32)
    opt = SNGM(ps, lr=0.1, momentum=0.9, backend="cpu")
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.grad_norm.item() == 0.0 and opt.skipped_steps.item() == 0
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)


def test_schemas_are_the_contracts(ops):
    for name, schema in {**SCHEMAS, **CPU_SCHEMAS}.items():
        op = getattr(torch.ops.sngm_native, name).default
        expect = torch._C.parse_schema(f"sngm_native::{name}{schema}")
        assert str(op._schema) == str(expect)
        assert op._schema.is_mutable


def _bucket(dtype=torch.float32, sizes=(100, 40, 5000)):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    bs = BucketSet.build([ps], adopt=False)
    b = bs.buckets[0]
    b.grad.copy_(torch.randn(b.grad.shape, generator=g).to(dtype) * (b.param != 0))
    return bs, b


def test_ops_partials_in_fp64_and_per_segment_sums(ops):
    bs, b = _bucket(torch.float32)
    plan = bs.plan([(True, True, True)], per_tensor=True)
    partials = torch.full_like(plan.partials, float("nan"), dtype=torch.float64)
    ops.sumsq(b.param, b.grad, plan.chunks[0], 0.5, True, partials, 0)
    sumsq = torch.empty(plan.n_sumsq, dtype=torch.float64)
    ops.finalize(partials, plan.seg_ptr, sumsq)
    d = [(-g.double() + 0.5 * w.double()) for w, g in zip(b.param_views, b.grad_views)]
    expect = torch.stack([sum(x.square().sum() for x in d)] + [x.square().sum() for x in d])
    torch.testing.assert_close(sumsq, expect, rtol=1e-6, atol=0)


def test_ops_reject_unsupported_dtypes_and_bad_tables(ops):
    bs, b = _bucket()
    plan = bs.plan([(True, True, True)], per_tensor=False)
    ints = torch.zeros(b.param.shape, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 and float16"):
        ops.sumsq(ints, ints, plan.chunks[0], 0.0, False, plan.partials, 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.sumsq(b.param, b.grad, plan.chunks[0], 0.0, False, plan.partials.half(), 0)
    bad = plan.chunks[0].clone()
    bad[0, -1] = b.param.numel() - 8  # runs past the bucket
    before = b.param.clone()
    sumsq = torch.ones(1)
    with pytest.raises(RuntimeError, match="outside the bucket"):
        ops.update(b.param, b.grad, None, bad, sumsq, 0.1, 0.0, 0.0, False, False)
    assert torch.equal(b.param, before)  # checked before anything was written
    bad = plan.chunks[0].clone()
    bad[2, 0] = 3
    with pytest.raises(RuntimeError, match="segment"):
        ops.update(b.param, b.grad, None, bad, sumsq, 0.1, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sumsq(b.param, b.grad, plan.chunks[0], 0.0, False, plan.partials, 1)


def test_update_skips_on_a_non_finite_total(ops):
    bs, b = _bucket(torch.bfloat16)
    plan = bs.plan([(True, True, True)], per_tensor=False)
    mom = torch.randn(b.param.shape).bfloat16()
    p0, m0 = b.param.clone(), mom.clone()
    ops.update(b.param, b.grad, mom, plan.chunks[0], torch.tensor([math.inf]), 0.1, 0.9, 0.0,
               False, False)
    assert torch.equal(b.param, p0) and torch.equal(mom, m0)


def test_auto_picks_the_native_cpu_backend(ops):
    assert sngm_ext.resolve_backend("auto", torch.device("cpu"))[0] == "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_handle_tables_not_from_buckets(ops, dtype):
    """Starts and lengths that are not multiples of 16 (the scalar tails of every kernel)."""
    g = torch.Generator().manual_seed(1)
    n = 300
    w = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    u = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    rows = [(5, 37, 0), (42, 1, 0), (43, 200, 1), (250, 0, 1)]
    chunks = torch.tensor(rows, dtype=torch.int64).t().contiguous()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partials = torch.empty(len(rows), dtype=acc)
    ops.sumsq(w, grad, chunks, 0.25, True, partials, 0)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    d = -grad.to(ct) + 0.25 * w.to(ct)
    expect = torch.stack([d[s:s + L].square().sum() for s, L, _ in rows]).to(acc)
    torch.testing.assert_close(partials, expect, rtol=REL.get(acc, 1e-6), atol=0)
    sumsq = torch.tensor([4.0, 9.0], dtype=acc)  # norms 2 and 3 for segments 0 and 1
    w0, u0 = w.clone(), u.clone()
    ops.update(w, grad, u, chunks, sumsq, 0.1, 0.9, 0.25, True, True)
    ew, eu = w0.clone(), u0.clone()
    for s, L, seg in rows:
        nd = d[s:s + L] * (1.0 / math.sqrt(sumsq[seg].item()))
        uu = 0.9 * u0[s:s + L].to(ct) + nd
        eu[s:s + L] = uu.to(dtype)
        ew[s:s + L] = (w0[s:s + L].to(ct) - 0.1 * (nd + 0.9 * uu)).to(dtype)
    assert_native_close(w, ew, dtype, "param")
    assert_native_close(u, eu, dtype, "momentum")
    untouched = torch.ones(n, dtype=torch.bool)
    for s, L, _ in rows:
        untouched[s:s + L] = False
    assert torch.equal(w[untouched], w0[untouched]) and torch.equal(u[untouched], u0[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_a_chunks_partial_does_not_depend_on_its_neighbours(ops, dtype, wd):
    """The kernel sums runs of equal-length chunks four at a time (four read streams); a chunk's
    partial must be the same bits whether it was summed in such a group, alone, or as a tail."""
    bs, b = _bucket(dtype, sizes=(4096 * 9 + 48, 4096, 33))
    plan = bs.plan([(True, True, True)], per_tensor=False)
    table = plan.chunks[0]
    n = table.shape[1]
    together = torch.empty(n, dtype=plan.acc_dtype)
    ops.sumsq(b.param, b.grad, table, wd, False, together, 0)
    alone = torch.empty(n, dtype=plan.acc_dtype)
    for c in range(n):  # every row in a table of its own
        ops.sumsq(b.param, b.grad, table[:, c:c + 1].contiguous(), wd, False, alone, c)
    shuffled = torch.empty(n, dtype=plan.acc_dtype)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ops.sumsq(b.param, b.grad, table[:, order].contiguous(), wd, False, shuffled, 0)
    assert torch.equal(together, alone)
    assert torch.equal(together[order], shuffled)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_copy_sumsq_is_a_copy_then_sumsq(ops, dtype, wd):
    """The grad hooks' fused op (norm_in_backward): the segment gets src's values, its padding
    stays zero, and each chunk's partial is the bits sumsq gives after a plain copy."""
    assert ops.copy_sumsq is not None
    bs, b = _bucket(dtype, sizes=(100, 4096 * 5 + 7, 33))
    plan = bs.plan([(True, True, True)], per_tensor=False)
    k = 1
    o, n = b.offsets[k], b.numels[k]
    table = plan.chunks[0]
    rows = ((table[0] >= o) & (table[0] < o + n)).nonzero().flatten()
    seg_table = table[:, rows].contiguous()
    src = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    expect_grad = b.grad.clone()
    expect_grad[o:o + n] = src
    expect = torch.full((table.shape[1],), float("nan"), dtype=plan.acc_dtype)
    b.grad.copy_(expect_grad)
    ops.sumsq(b.param, b.grad, table, wd, True, expect, 0)
    b.grad.zero_()
    got = torch.full_like(expect, float("nan"))
    ops.copy_sumsq(src, b.grad, b.param, seg_table, o, wd, True, got, int(rows[0]))
    assert torch.equal(got[rows], expect[rows])
    assert torch.isnan(got[:rows[0]]).all() and torch.isnan(got[rows[-1] + 1:]).all()
    assert torch.equal(b.grad[o:o + n], src) and not b.grad[o + n:].any() and not b.grad[:o].any()


def test_copy_sumsq_rejects_what_does_not_fit(ops):
    bs, b = _bucket()
    plan = bs.plan([(True, True, True)], per_tensor=False)
    table = plan.chunks[0]
    before = b.grad.clone()
    with pytest.raises(RuntimeError, match="does not fit in the bucket"):
        ops.copy_sumsq(torch.ones(b.grad.numel()), b.grad, b.param, table[:, -1:].contiguous(), 16,
                       0.0, False, plan.partials, 0)
    with pytest.raises(RuntimeError, match="before the segment"):
        ops.copy_sumsq(torch.ones(40), b.grad, b.param, table[:, :1].contiguous(), b.offsets[1],
                       0.0, False, plan.partials, 0)
    with pytest.raises(RuntimeError, match="src must be a contiguous"):
        ops.copy_sumsq(torch.ones(80)[::2], b.grad, b.param, table[:, 1:2].contiguous(),
                       b.offsets[1], 0.0, False, plan.partials, 0)
    assert torch.equal(b.grad, before)
