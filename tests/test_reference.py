"""The reference against an independent float64 Algorithm 1, and the paper's invariants."""

import math

import numpy as np
import pytest
import torch

from bounds import stored_step_bound
from oracle import Oracle
from scenarios import CONFIGS, grads_for, make_params, split
from sngm_ext import SNGM


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reference_matches_float64_algorithm_1(dtype, config):
    cfg = CONFIGS[config]
    params = make_params(dtype)
    parts = split(params, len(cfg["groups"]))
    groups = [dict(params=ps, **h) for ps, h in zip(parts, cfg["groups"])]
    opt = SNGM(groups, lr=0.1, backend="reference", norm=cfg["norm"])
    idx, k = [], 0
    for ps in parts:
        idx.append(list(range(k, k + len(ps))))
        k += len(ps)
    oracle = Oracle([p.detach().double().numpy() for p in params],
                    list(zip(idx, cfg["groups"])))
    for step in range(4):
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        n = oracle.step([None if g is None else g.double().numpy() for g in grads], cfg["norm"])
        # the norm: d rounded once to dtype (u), squares summed in fp64 (2 gamma_N), the params
        # it reads (weight decay) off by the bound below: within 64 eps (u = eps / 2)
        assert opt.grad_norm.item() == pytest.approx(n, rel=64 * torch.finfo(dtype).eps)
    # The reference rounds every operation to `dtype` (fp32 or fp64) where the oracle is exact:
    # per step at most 8 roundings reach an element (d: 2, d * (1/n) and its cast: 2, u: 2, w: 2;
    # Higham 2002, Sec. 3.1: gamma_k per k roundings), each at the element's scale, carried on
    # with factors <= 1 + lr (1 + beta) <= 1.3: after 4 steps below 4 * 8 * 1.3^4 u ~ 92 u = 46
    # eps at the tensor's scale (the oracle's own fp64 error is 2^-53 of that at most).
    tol = 64 * torch.finfo(dtype).eps
    for i, p in enumerate(params):
        w = torch.from_numpy(np.asarray(oracle.w[i]))
        torch.testing.assert_close(p.detach().double(), w, rtol=tol, atol=tol * _amax(w))
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        if buf is not None and p.numel():
            u = torch.from_numpy(np.asarray(oracle.u[i]))
            torch.testing.assert_close(buf.double(), u, rtol=tol, atol=tol * _amax(u))


def _amax(t):
    return t.abs().max().item() if t.numel() else 0.0


def test_lemma_2_step_is_bounded(backend):
    """||w_{t+1} - w_t|| <= lr / (1 - momentum) whatever the gradient's scale."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(50,), (7, 3), ()]]
    lr, beta = 0.3, 0.9
    opt = SNGM(ps, lr=lr, momentum=beta, weight_decay=1e-3, backend=backend)
    for step in range(25):
        scale = 10.0 ** ((step % 7) - 3)  # gradients from 1e-3 to 1e3
        for p in ps:
            p.grad = scale * torch.randn_like(p)
        before = torch.cat([p.detach().flatten().double() for p in ps])
        opt.step()
        after = torch.cat([p.detach().flatten().double() for p in ps])
        # Lemma 2 plus what fp32 rounding adds (bounds.stored_step_bound; docs/optimizer.md)
        assert (after - before).norm() <= stored_step_bound(
            lr, beta, False, torch.float32, before.numel(), before.norm(), after.norm())


def test_lars_counterexample_sngm_reaches_the_optimum():
    """Section 4.2: on F(x) = 0.5 (x + 1)^2 from x0 > 0, LARS with phi(z) = z goes to 0; SNGM to -1."""
    x = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = SNGM([x], lr=0.01, momentum=0.9, backend="reference")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3000)
    for _ in range(3000):
        opt.zero_grad()
        loss = 0.5 * (x + 1) ** 2
        loss.sum().backward()
        opt.step()
        sched.step()
    # convergence, not rounding: SNGM ends 5e-8 from -1 (its steps shrink with the cosine lr),
    # LARS below (z ends at 2 * 0.99^3000 = 1.6e-13, 0.99 from -1); 1e-3 tells the two apart
    assert abs(x.item() + 1) < 1e-3

    # LARS as the paper writes it, x <- x - lr * |x| * g / |g|: converges to 0, not -1.
    z = 2.0
    for _ in range(3000):
        g = z + 1
        z = z - 0.01 * abs(z) * math.copysign(1.0, g)
    assert abs(z) < 1e-3 and abs(z + 1) > 0.99


def test_zero_gradient_leaves_params_and_decays_nothing(backend):
    """n == 0: d / n := 0, so params stay and momentum decays by beta."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = SNGM([p], lr=0.1, momentum=0.5, backend=backend)
    p.grad = torch.ones(5)
    opt.step()
    u1 = opt.state[p]["momentum_buffer"].clone()
    w1 = p.detach().clone()
    p.grad = torch.zeros(5)
    opt.step()
    assert torch.isfinite(opt.grad_norm) and opt.grad_norm.item() == 0.0
    # fp32: u = fl(0.5 u1 + 0) = 0.5 u1 exactly; w = fl(w1 - fl(fl(0.1) u)) and the expectation
    # fl(w1 - fl(fl(0.05) u1)): one rounding each at |w| and two each at |lr u| < |w| / 10,
    # within 5 u32 of each other relative to |w|
    np.testing.assert_array_equal(opt.state[p]["momentum_buffer"].numpy(), 0.5 * u1.numpy())
    np.testing.assert_allclose(p.detach().numpy(), (w1 - 0.1 * 0.5 * u1).numpy(), rtol=5 * 2.0**-24,
                               atol=0)
