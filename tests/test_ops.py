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
