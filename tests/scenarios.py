"""The one harness every backend runs: shapes, configs, a runner, and bounds from error analysis.

Why the bounds are what they are. Every backend computes each element with the reference's
operations in the reference's order, each rounded once (sngm_math.h, -ffp-contract=off; Triton and
CUDA round explicitly). They differ only in the order the fp64 sum of squares is added: two such
sums of N terms are within 2 gamma_N of each other (Higham 2002, eq. 3.4), so the norms and their
inverses within r = gamma_N + 3 u64. That moves ``nd = C(d * inv)`` by r relative (what shows in
fp64) or flips its rounding by one unit of the compute dtype, and a changed nd can flip the
rounding of ``u`` or ``w`` to their storage dtype by one unit of it; each later step can add as
much per element, and carries the earlier ones on (``u`` scaled by beta < 1, ``w`` through
``lr * (1 + beta) * du``). One unit of a dtype at magnitude M is at most ``eps * M``. So after s
steps, with Mu and Mw the largest magnitudes the tensor's momentum and param reached along the way
(a value that shrinks by cancellation keeps the error of its larger past: the AMD EPYC fp16 failure
of older bounds was exactly that),

    |du| <= s (2 eps + (1 + beta) r) Mu,    |dw| <= 2 s eps Mw + lr (1 + beta) s |du|

(2 eps: the flip of nd plus the flip of the sum it enters; |nd| <= (1 + beta) Mu). The formula is
sngm_ext/_selfcheck.py's ``elementwise_bounds`` (``python -m sngm_ext --check`` uses it too), the
norm's ``norm_rtol``: r plus what the params' differences move it by. None of this depends on the
CPU model. A per-tensor norm in place of the global one misses these bounds by orders of magnitude
(test_parity.test_bounds_reject_a_per_tensor_norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from bounds import elementwise_bounds, norm_rtol
from sngm_ext import SNGM

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

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
    """Grads of step ``step``; some None (the param sits out), one non-contiguous now and then."""
    g = torch.Generator().manual_seed(seed + step)
    out = []
    for i, p in enumerate(params):
        t = (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.device, p.dtype)
        if i == 5 and step % 2:
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
    "sngd": dict(norm="global", groups=[
        dict(lr=0.1, momentum=0.0, weight_decay=1e-2, maximize=True),
        dict(lr=0.2, momentum=0.0),
    ]),
}


def split(params, n):
    if n == 1:
        return [params]
    if n == 2:
        return [params[:4], params[4:]]
    return [params[:2], params[2:5], params[5:]]


@dataclass
class Run:
    params: List[torch.Tensor]
    bufs: List[Optional[torch.Tensor]]
    norms: List[torch.Tensor]
    opt: SNGM
    config: str
    steps: int
    # per param: the largest |w| and |u| seen after any step (the bounds' Mw and Mu)
    max_w: List[float] = field(default_factory=list)
    max_u: List[float] = field(default_factory=list)


def _amax(t):
    return t.detach().abs().max().item() if t is not None and t.numel() else 0.0


# The bounds' Mu for a param without momentum: its step is nd itself, |nd_i| <= ||d / n|| = 1 (up
# to a few roundings), which the bounds read as (1 + beta) Mu with beta = 0: 2 covers it.
NO_MOMENTUM_MU = 2.0


def run(backend, dtype, config, steps=4, norm=None, seed=0, threads=None, device="cpu",
        grad_scale=1.0, **opt_kwargs) -> Run:
    """``steps`` steps of ``config`` on fresh params; returns the final tensors and the history."""
    cfg = CONFIGS[config]
    params = make_params(dtype, seed, device)
    hypers = cfg["groups"]
    groups = [dict(params=ps, **h) for ps, h in zip(split(params, len(hypers)), hypers)]
    opt = SNGM(groups, lr=0.1, backend=backend, norm=norm or cfg["norm"], **opt_kwargs)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    max_w = [_amax(p) for p in params]
    max_u = [0.0] * len(params)
    try:
        norms = []
        for s in range(steps):
            for p, g in zip(params, grads_for(params, s, scale=grad_scale)):
                p.grad = g
            opt.step()
            norms.append(opt.grad_norm.clone())
            for i, p in enumerate(params):
                max_w[i] = max(max_w[i], _amax(p))
                st = opt.state.get(p)
                buf = st.get("momentum_buffer") if st else None
                max_u[i] = max(max_u[i], _amax(buf) if buf is not None else NO_MOMENTUM_MU)
    finally:
        torch.set_num_threads(old)
    bufs = [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]
    return Run([p.detach().clone() for p in params], bufs, norms, opt, config, steps, max_w, max_u)


def _hyper_of(config, i):
    """(lr, momentum) of param i's group in ``config``."""
    hypers = CONFIGS[config]["groups"]
    k = 0
    for gi, ps in enumerate(split(list(range(len(SHAPES))), len(hypers))):
        if i in ps:
            k = gi
    return hypers[k]["lr"], hypers[k].get("momentum", 0.0)


def bounds(dtype, ref: Run, i: int):
    """(bound on |du|, bound on |dw|) for param i after ref.steps steps (see the module doc)."""
    lr, beta = _hyper_of(ref.config, i)
    n_terms = sum(p.numel() for p in ref.params)
    return elementwise_bounds(dtype, ref.steps, lr, beta, ref.max_w[i], ref.max_u[i], n_terms)


def _check(actual, expected, bound, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.numel() == 0:
        return
    err = (actual.detach().double() - expected.detach().double()).abs()
    worst = err.max().item()
    assert worst <= bound, (
        f"{what}: {int((err > bound).sum())} of {err.numel()} elements off, worst {worst:.3g} "
        f"(bound {bound:.3g})"
    )


def assert_runs_match(got: Run, ref: Run, dtype, what=""):
    """Params, momentum buffers and grad norms of ``got`` within the bounds around ``ref``."""
    for i, (x, y) in enumerate(zip(got.params, ref.params)):
        du, dw = bounds(dtype, ref, i)
        _check(x, y, dw, f"{what} param {i} {SHAPES[i]}")
    for i, (x, y) in enumerate(zip(got.bufs, ref.bufs)):
        assert (x is None) == (y is None), f"{what} momentum buffer {i} presence"
        if x is not None:
            _check(x, y, bounds(dtype, ref, i)[0], f"{what} momentum {i} {SHAPES[i]}")
    # the norm of step k: the same d summed in another order (r), and d moved by the params'
    # differences after k steps (weight decay <= 1e-2 times dw, over |d| ~ 1: unit-variance
    # grads): norm_rtol(dtype, k, N) = r + 2 k eps (the module doc)
    n = sum(p.numel() for p in ref.params)
    for k, (x, y) in enumerate(zip(got.norms, ref.norms)):
        assert x.dtype == y.dtype == torch.float64, what
        torch.testing.assert_close(x, y, rtol=norm_rtol(dtype, k, n), atol=0.0,
                                   msg=lambda m: f"{what} norm {k}: {m}")
