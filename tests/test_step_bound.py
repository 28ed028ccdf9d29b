"""The step bound of the paper's Lemma 2, ||w_{t+1} - w_t|| <= lr / (1 - momentum), as it holds
for params and momentum stored in a floating-point dtype: plus what rounding adds, per dtype
(docs/optimizer.md, "The step bound in floating point", states it; ``stored_step_bound`` is its
formula). Every backend, every dtype, plain and Nesterov momentum and SNGD."""

import math

import pytest
import torch

from sngm_ext import SNGM

# Unit roundoff (half an ulp at 1; round to nearest even) of each storage dtype, and of the dtype
# the kernels compute in (fp64 for fp64 params, fp32 otherwise).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11}


def compute_unit(dtype) -> float:
    return UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32]


def stored_step_bound(lr, beta, nesterov, dtype, n_elements, w_norm, new_w_norm) -> float:
    """A bound on ||w_{t+1} - w_t|| for the stored params of ``dtype`` (2-norm over all params;
    ``w_norm``, ``new_w_norm``: ||w_t||, ||w_{t+1}||), every value in the normal range.

    |fl(x) - x| <= u |x| per operation (u = the unit roundoff of the dtype rounded to, us for
    storage, uc for compute), hence for the vectors below ||fl(x) - x|| <= u ||x||:
      v = fl(d * (1/n)):   ||v|| <= a = (1 + uc)(1 + (N + 3) 2^-53)   (fp64 sum of N squares, its
                           sqrt, the inverse and the product, then the rounding to compute)
      m = fl_s(fl(fl(beta m) + v)), m_0 = 0 (the stored momentum):
                           ||m|| <= M = (1 + us)(1 + uc) a / (1 - rho),
                           rho = (1 + us)(1 + uc)^3 beta     (beta rounded to compute too)
      the step s:          uu = fl(fl(beta m) + v): ||uu|| <= S = (1 + uc)((1 + uc)^2 beta M + a);
                           nesterov s = fl(v + fl(beta uu)): ||s|| <= (1 + uc)(a + (1 + uc)^2 beta S)
                           (momentum 0: s = v, ||s|| <= a)
      p = fl(lr s):        ||p|| <= L = lr (1 + uc)^2 ||s||
      c = fl(w_t - p), w_{t+1} = fl_s(c):
                           ||w_{t+1} - w_t|| <= L + uc (||w_t|| + L) + us ||w_{t+1}|| / (1 - us)
    With every u -> 0 this is Lemma 2's lr / (1 - beta) (Nesterov's too)."""
    us, uc = UNIT[dtype], compute_unit(dtype)
    a = (1 + uc) * (1 + (n_elements + 3) * 2.0**-53)
    if beta == 0:
        s = a
    else:
        rho = (1 + us) * (1 + uc) ** 3 * beta
        m = (1 + us) * (1 + uc) * a / (1 - rho)
        s = (1 + uc) * ((1 + uc) ** 2 * beta * m + a)
        if nesterov:
            s = (1 + uc) * (a + (1 + uc) ** 2 * beta * s)
    big_l = lr * (1 + uc) ** 2 * s
    return big_l + uc * (w_norm + big_l) + us * new_w_norm / (1 - us)


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
    assert longest(torch.float64, 0.3) <= lr * (1 + 1e-12)


def test_the_bound_is_lemma_2_without_rounding():
    for nesterov in (False, True):
        exact = stored_step_bound(0.1, 0.9, nesterov, torch.float64, 1, 0.0, 0.0)
        assert exact == pytest.approx(0.1 / (1 - 0.9), rel=1e-14)
    assert math.isclose(stored_step_bound(0.1, 0.0, False, torch.float64, 1, 0.0, 0.0), 0.1,
                        rel_tol=1e-14)
