"""The fused kernels as torch.library ops: schemas (mutated args), fake kernels, AOT dispatch."""

import pytest
import torch

from sngm_ext import BackendUnavailable, resolve_backend
from sngm_ext.buckets import BucketSet


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fused_ops_pass_opcheck(fused_backend, per_tensor):
    _, ops = resolve_backend(fused_backend, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(100, generator=g), torch.randn(40, generator=g), torch.randn(5000, generator=g)]
    bs = BucketSet.build([ps], adopt=False)
    b = bs.buckets[0]
    b.grad.normal_(generator=g)
    plan = bs.plan([(True, False, True)], per_tensor=per_tensor)
    sumsq = torch.zeros(plan.n_sumsq)
    mom = torch.randn(b.param.shape, generator=g)
    checks = [
        (ops.sumsq, (b.param, b.grad, plan.chunks[0], 0.1, True, plan.partials, 0)),
        (ops.finalize, (plan.partials, plan.seg_ptr, sumsq)),
        (ops.update, (b.param, b.grad, mom, plan.chunks[0], sumsq, 0.1, 0.9, 0.1, True, False)),
        (ops.update, (b.param, b.grad, None, plan.chunks[0], sumsq, 0.1, 0.0, 0.1, False, True)),
    ]
    for op, args in checks:
        ops.sumsq(*checks[0][1])  # real values for finalize/update to read
        ops.finalize(*checks[1][1])
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_partials_and_sums_follow_the_chunk_table(fused_backend):
    """Chunks never cross a tensor; a skipped tensor has no chunk; sums match torch's."""
    _, ops = resolve_backend(fused_backend, torch.device("cpu"))
    ps = [torch.arange(5000.0) / 5000, torch.ones(3), torch.full((4097,), 2.0)]
    bs = BucketSet.build([ps], adopt=False)
    b = bs.buckets[0]
    b.grad.copy_(b.param)
    plan = bs.plan([(True, False, True)], per_tensor=True)
    starts, lens, segs = plan.chunks[0].tolist()
    assert all(s % 16 == 0 and n % 16 == 0 for s, n in zip(starts, lens))
    assert segs == [1, 1, 2, 2]  # tensor 1 sits out; segment 0 is the total
    ops.sumsq(b.param, b.grad, plan.chunks[0], 0.0, False, plan.partials, 0)
    sumsq = torch.empty(plan.n_sumsq)
    ops.finalize(plan.partials, plan.seg_ptr, sumsq)
    expect = [ps[0].square().sum(), ps[2].square().sum()]
    torch.testing.assert_close(sumsq, torch.stack([expect[0] + expect[1]] + expect))
    with pytest.raises(BackendUnavailable):
        resolve_backend("cuda", torch.device("cpu"))


def test_launches_per_step_do_not_grow_with_tensors(fused_backend, monkeypatch):
    """Two groups x two dtypes = 4 buckets: 4 sumsq + 1 finalize + 4 update, for 200 tensors."""
    from sngm_ext import SNGM

    _, ops = resolve_backend(fused_backend, torch.device("cpu"))
    calls = {"sumsq": 0, "finalize": 0, "update": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(ops, name, counted)
    ps = [torch.nn.Parameter(torch.randn(7 + i).to(torch.float32 if i % 2 else torch.bfloat16))
          for i in range(200)]
    opt = SNGM([{"params": ps[:100]}, {"params": ps[100:], "lr": 0.01}], lr=0.1,
               backend=fused_backend)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == {"sumsq": 4, "finalize": 1, "update": 4}
