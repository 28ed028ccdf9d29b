"""The step bound of the paper's Lemma 2, ||w_{t+1} - w_t|| <= lr / (1 - momentum), as it holds
for params and momentum stored in a floating-point dtype: plus what rounding adds, per dtype
(docs/optimizer.md, "The step bound in floating point", states it; ``bounds.stored_step_bound`` is
its formula). Every backend, every dtype, plain and Nesterov momentum and SNGD."""

import math

import pytest
import torch

from bounds import UNIT, stored_step_bound
from sngm_ext import SNGM


def _flat(ps):
    return torch.cat([p.detach().double().flatten() for p in ps])


def _run(backend, dtype, lr, beta, nesterov, steps, w_scale, seed=0):
    """Steps with a gradient of the same direction each time (momentum builds up to its limit, the
    worst case of Lemma 2) and params w_scale times larger than a step; per step (the stored step
    length, its bound, ||w_t||, ||w_{t+1}||)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300,), (7, 9), ()]
    ps = [torch.nn.Parameter((w_scale * torch.randn(s, generator=g, dtype=torch.float64))
                             .to(dtype)) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    n = sum(p.numel() for p in ps)
    opt = SNGM(ps, lr=lr, momentum=beta, nesterov=nesterov, weight_decay=1e-4, backend=backend)
    out = []
    for _ in range(steps):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        before = _flat(ps)
        opt.step()
        after = _flat(ps)
        out.append(((after - before).norm().item(),
                    stored_step_bound(lr, beta, nesterov, dtype, n, before.norm().item(),
                                      after.norm().item())))
    assert opt.skipped_steps.item() == 0
    return out


@pytest.mark.parametrize("dtype", list(UNIT), ids=str)
@pytest.mark.parametrize("beta,nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_every_stored_step_is_within_the_bound_with_rounding(backend, dtype, beta, nesterov):
    """Small lrs next to |w| (the storage rounding of w dominates) and a large one (the momentum's
    build-up does): every step within stored_step_bound."""
    for lr, w_scale in ((1e-3, 10.0), (1e-2, 0.3), (0.5, 1.0)):
        for length, bound in _run(backend, dtype, lr, beta, nesterov, steps=10, w_scale=w_scale):
            assert length <= bound, (lr, length, bound, lr / (1 - beta))


def test_rounding_is_what_exceeds_lemma_2(backend):
    """The excess is real, and it is the storage rounding: with momentum 0 (a step of exactly lr
    before rounding), bf16 params of ~10 lr move more than 1% farther than lr, fp32 ones farther
    too (by ~1e-6), fp64 ones by no more than 1e-12 relative."""
    lr = 1e-2

    def longest(dtype, w_scale):
        return max(length for length, _ in _run(backend, dtype, lr, 0.0, False, 10, w_scale))

    assert longest(torch.bfloat16, 0.1) > 1.01 * lr
    assert longest(torch.float32, 0.3) > lr
    # fp64: stored_step_bound exceeds lr by u64 (||w_t|| + L) + u64 ||w_t+1|| ~ 2 * 5.7 * 2^-53
    # (||w|| ~ 0.3 sqrt(364)), 1.3e-13 of lr: 1e-12 lies above it and far below fp32's excess
    assert longest(torch.float64, 0.3) <= lr * (1 + 1e-12)


def test_the_bound_is_lemma_2_without_rounding():
    # fp64 with ||w|| = 0: what is left is the bound's own factors, (1 + u64)^k with k < 10
    # and 1 / (1 - rho), rho = (1 + u64)^4 beta, which adds 4 u64 beta / (1 - beta) = 36 u64:
    # below 50 u64 = 5.6e-15 of Lemma 2's value: rel 1e-14
    for nesterov in (False, True):
        exact = stored_step_bound(0.1, 0.9, nesterov, torch.float64, 1, 0.0, 0.0)
        assert exact == pytest.approx(0.1 / (1 - 0.9), rel=1e-14)
    assert math.isclose(stored_step_bound(0.1, 0.0, False, torch.float64, 1, 0.0, 0.0), 0.1,
                        rel_tol=1e-14)
