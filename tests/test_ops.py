"""The fused kernels as torch.library ops (docs/ops.md), for every fused backend that runs here:
schemas, opcheck, the chunk-table contract, the scalar and vector paths, skipped steps."""

import math

import pytest
import torch

from bounds import two_sums_rtol
from sngm_ext import SNGM, resolve_backend
from sngm_ext._ops import NAMESPACES, SCHEMAS
from sngm_ext.layout import CHUNK, make_plan


def _ops(backend):
    return resolve_backend(backend, torch.device("cpu"))[1]


def _lists(dtype=torch.float32, sizes=(100, 40, 5000), seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randn(n, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return [rnd(n) for n in sizes], [rnd(n) for n in sizes], [rnd(n) for n in sizes]


def _sums(*med: float) -> torch.Tensor:
    """A [3, m] sums-of-squares tensor with these totals in range (big and small rows 0)."""
    out = torch.zeros(3, len(med), dtype=torch.float64)
    out[0] = torch.tensor(med, dtype=torch.float64)
    return out


def test_schemas_are_defined_once_for_every_namespace():
    for ns in NAMESPACES:
        for name, schema in SCHEMAS.items():
            op = getattr(getattr(torch.ops, ns), name).default
            assert str(op._schema) == str(torch._C.parse_schema(f"{ns}::{name}{schema}"))
            assert op._schema.is_mutable


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fused_ops_pass_opcheck(fused_backend, per_tensor):
    ops = _ops(fused_backend)
    ws, gs, us = _lists()
    plan = make_plan([[w.numel() for w in ws]], per_tensor, torch.device("cpu"))
    sumsq = torch.zeros(3, plan.n_sumsq, dtype=torch.float64)
    scale = torch.tensor(4.0)
    checks = [
        (ops.sumsq, (ws, gs, plan.chunks[0], scale, 0.1, True, plan.partials, 0)),
        (ops.finalize, (plan.partials, plan.seg_ptr, torch.tensor(0.0), sumsq)),
        (ops.update, (ws, gs, us, plan.chunks[0], sumsq, None, None, 0.1, 0.9, 0.1, True, False)),
        (ops.update, (ws, gs, [], plan.chunks[0], sumsq, scale, None, 0.1, 0.0, 0.1, False, True)),
        (ops.update, (ws, gs, us, plan.chunks[0], sumsq, None, torch.tensor(0.1), 0.0, 0.9, 0.1,
                      False, False)),
    ]
    for op, args in checks:
        ops.sumsq(*checks[0][1])  # real values for finalize/update to read
        ops.finalize(*checks[1][1])
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_rows_follow_tensors_and_segments(fused_backend):
    """Chunks never cross a tensor; sums per segment and in total match torch's in fp64."""
    ops = _ops(fused_backend)
    ps = [torch.arange(5000.0) / 5000, torch.ones(3), torch.full((4097,), 2.0)]
    plan = make_plan([[p.numel() for p in ps]], True, torch.device("cpu"))
    t, starts, lens, segs = plan.chunks[0].tolist()
    assert t == [0, 0, 1, 2, 2] and starts == [0, CHUNK, 0, 0, CHUNK]
    assert lens == [CHUNK, 5000 - CHUNK, 3, CHUNK, 1] and segs == [1, 1, 2, 3, 3]
    ops.sumsq(ps, ps, plan.chunks[0], None, 0.0, False, plan.partials, 0)
    sumsq = torch.empty(3, plan.n_sumsq, dtype=torch.float64)
    ops.finalize(plan.partials, plan.seg_ptr, None, sumsq)
    assert not sumsq[1:].any()  # fp32: the big and small rows stay 0
    expect = [p.double().square().sum() for p in ps]
    expect, terms = [sum(expect)] + expect, [sum(p.numel() for p in ps)] + [p.numel() for p in ps]
    for got, want, n in zip(sumsq[0].tolist(), expect, terms):
        assert abs(got - want) <= two_sums_rtol(n) * want, (got, want.item(), n)


def _expected_update(w, g, u, rows, sumsq, lr, beta, wd, nesterov, sign, gscale=1.0):
    """The update of docs/ops.md on the given rows, with torch ops (fp64 normalization)."""
    ct = torch.float64 if w[0].dtype == torch.float64 else torch.float32
    ew, eu = [x.clone() for x in w], [x.clone() for x in u]
    for t, s, n, seg in rows:
        sl = slice(s, s + n)
        inv = 1.0 / math.sqrt(sumsq[seg]) if sumsq[seg] > 0 else 0.0
        d = sign * (g[t][sl].to(ct) * torch.tensor(gscale, dtype=torch.float32).to(ct)) \
            + wd * w[t][sl].to(ct)
        nd = (d.double() * inv).to(ct)
        uu = beta * u[t][sl].to(ct) + nd
        step = nd + beta * uu if nesterov else uu
        eu[t][sl] = uu.to(u[t].dtype)
        ew[t][sl] = (w[t][sl].to(ct) - lr * step).to(w[t].dtype)
    return ew, eu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_rows_of_any_start_and_length(fused_backend, dtype):
    """Rows that are not whole chunks (the scalar paths), a tensor based at an odd address (no
    128-bit path), an empty row; elements outside every row are never written."""
    ops = _ops(fused_backend)
    ws, gs, us = _lists(dtype, sizes=(300, 301, 64))
    ws[1], gs[1], us[1] = ws[1][1:], gs[1][1:], us[1][1:]  # based one element in: unaligned
    rows = [(0, 5, 37, 0), (0, 42, 1, 0), (1, 43, 200, 1), (2, 0, 64, 1), (0, 250, 0, 1)]
    chunks = torch.tensor(rows, dtype=torch.int64).t().contiguous()
    partials = torch.full((3, len(rows)), math.nan, dtype=torch.float64)
    ops.sumsq(ws, gs, chunks, None, 0.25, True, partials, 0)
    assert not partials[1:].any()  # every value in range: the big and small rows are 0
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    d = [-g.to(ct) + 0.25 * w.to(ct) for w, g in zip(ws, gs)]
    expect = torch.stack([d[t][s:s + n].double().square().sum() for t, s, n, _ in rows])
    for got, want, (_, _, n, _) in zip(partials[0].tolist(), expect.tolist(), rows):
        assert abs(got - want) <= two_sums_rtol(n) * want, (got, want, n)
    sumsq = _sums(4.0, 9.0)  # norms 2 and 3
    w0, u0 = [w.clone() for w in ws], [u.clone() for u in us]
    ops.update(ws, gs, us, chunks, sumsq, None, None, 0.1, 0.9, 0.25, True, True)
    ew, eu = _expected_update(w0, gs, u0, rows, sumsq[0].tolist(), 0.1, 0.9, 0.25, True, -1.0)
    for a, b in zip(ws + us, ew + eu):
        assert torch.equal(a, b)  # same operations in the same order: the same bits


def test_grad_scale_and_found_inf(fused_backend):
    """grad_scale divides the grads on the fly (GradScaler); found_inf skips the whole step."""
    ops = _ops(fused_backend)
    ws, gs, us = _lists(torch.float32, sizes=(5000, 33))
    plan = make_plan([[5000, 33]], False, torch.device("cpu"))
    scaled = [g * 1024 for g in gs]
    sumsq, ref = torch.empty(3, 1, dtype=torch.float64), torch.empty(3, 1, dtype=torch.float64)
    ops.sumsq(ws, scaled, plan.chunks[0], torch.tensor(1024.0), 0.1, False, plan.partials, 0)
    ops.finalize(plan.partials, plan.seg_ptr, torch.tensor(0.0), sumsq)
    ops.sumsq(ws, gs, plan.chunks[0], None, 0.1, False, plan.partials, 0)
    ops.finalize(plan.partials, plan.seg_ptr, None, ref)
    assert torch.equal(sumsq, ref)
    w1, u1 = [w.clone() for w in ws], [u.clone() for u in us]
    ops.update(ws, scaled, us, plan.chunks[0], sumsq, torch.tensor(1024.0), None, 0.1, 0.9, 0.1,
               False, False)
    ops.update(w1, gs, u1, plan.chunks[0], ref, None, None, 0.1, 0.9, 0.1, False, False)
    for a, b in zip(ws + us, w1 + u1):
        assert torch.equal(a, b)
    ops.finalize(plan.partials, plan.seg_ptr, torch.tensor(1.0), sumsq)
    assert sumsq[0, 0].item() == math.inf
    before = [x.clone() for x in ws + us]
    ops.update(ws, gs, us, plan.chunks[0], sumsq, None, None, 0.1, 0.9, 0.1, False, False)
    assert all(torch.equal(a, b) for a, b in zip(ws + us, before))


@pytest.mark.parametrize("row", [0, 1], ids=["med", "big"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_update_writes_nothing_on_a_non_finite_total(fused_backend, bad, row):
    ops = _ops(fused_backend)
    ws, gs, us = _lists(torch.bfloat16)
    plan = make_plan([[w.numel() for w in ws]], False, torch.device("cpu"))
    before = [x.clone() for x in ws + us]
    sumsq = _sums(4.0)
    sumsq[row, 0] = bad
    ops.update(ws, gs, us, plan.chunks[0], sumsq, None, None, 0.1, 0.9, 0.0, False, False)
    assert all(torch.equal(a, b) for a, b in zip(ws + us, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_a_chunks_partial_does_not_depend_on_its_neighbours(fused_backend, dtype, wd):
    """The CPU kernel sums runs of equal-length chunks four at a time (four read streams); a
    chunk's partial must be the same bits in such a group, alone, or shuffled (norm_in_backward
    sums one tensor at a time and relies on it)."""
    ops = _ops(fused_backend)
    ws, gs, _ = _lists(dtype, sizes=(CHUNK * 5 + 48, CHUNK, 33))
    plan = make_plan([[w.numel() for w in ws]], False, torch.device("cpu"))
    table = plan.chunks[0]
    n = table.shape[1]
    together = torch.empty(3, n, dtype=torch.float64)
    ops.sumsq(ws, gs, table, None, wd, False, together, 0)
    alone = torch.empty(3, n, dtype=torch.float64)
    for c in range(n):
        ops.sumsq(ws, gs, table[:, c:c + 1].contiguous(), None, wd, False, alone, c)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shuffled = torch.empty(3, n, dtype=torch.float64)
    ops.sumsq(ws, gs, table[:, order].contiguous(), None, wd, False, shuffled, 0)
    assert torch.equal(together, alone) and torch.equal(together[:, order], shuffled)


def test_launches_per_step_do_not_grow_with_tensors(fused_backend, monkeypatch):
    """Two groups x two dtypes = 4 lists: 4 sumsq + 1 finalize + 4 update, for 200 tensors."""
    import sngm_ext.fused as fused

    ops = _ops(fused_backend)
    calls = {"sumsq": 0, "finalize": 0, "update": 0}

    class Counted:
        def __getattr__(self, name):
            real = getattr(ops, name)

            def counted(*a):
                calls[name] += 1
                return real(*a)
            return counted

    real_step = fused.fused_step
    monkeypatch.setattr(fused, "fused_step", lambda groups, _ops, **kw: real_step(groups, Counted(),
                                                                                  **kw))
    ps = [torch.nn.Parameter(torch.randn(7 + i).to(torch.float32 if i % 2 else torch.bfloat16))
          for i in range(200)]
    opt = SNGM([{"params": ps[:100]}, {"params": ps[100:], "lr": 0.01}], lr=0.1,
               backend=fused_backend)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == {"sumsq": 4, "finalize": 1, "update": 4}


def test_one_chunk_size_for_python_and_cuda():
    """The chunk tables' row length (layout.CHUNK) is the one the CUDA kernels size their unrolled
    passes by (sngm_math.h kChunk): they must agree."""
    import os
    import re

    header = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                          "sngm_math.h")
    with open(header) as f:
        m = re.search(r"constexpr long kChunk = (\d+);", f.read())
    assert m is not None and int(m.group(1)) == CHUNK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_lr_tensor_is_the_float_lr(fused_backend, dtype, lr_dtype):
    """A tensor lr (read where it lies) gives the bits of the same lr as a float: the value the
    tensor holds, converted to the compute dtype as the float is."""
    ops = _ops(fused_backend)
    ws, gs, us = _lists(dtype, sizes=(5000, 33))
    plan = make_plan([[5000, 33]], False, torch.device("cpu"))
    sumsq = _sums(7.0)
    lr = torch.tensor(0.1, dtype=lr_dtype)
    w1, u1 = [w.clone() for w in ws], [u.clone() for u in us]
    ops.update(ws, gs, us, plan.chunks[0], sumsq, None, lr, 0.0, 0.9, 0.01, True, False)
    ops.update(w1, gs, u1, plan.chunks[0], sumsq, None, None, lr.item(), 0.9, 0.01, True, False)
    for a, b in zip(ws + us, w1 + u1):
        assert torch.equal(a, b)
