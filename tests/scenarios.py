"""Deterministic optimizer scenarios that every backend runs, and their per-dtype tolerances."""

import torch

from sngm_ext import SNGM

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tolerances in units in the last place of the dtype, scaled by the reference tensor's largest
# magnitude for atol (where u = beta * u + d / n cancels to near zero the error is that of the
# operands, not of the result). fp32/fp64 leave room for the norm's summation order; bf16/fp16
# results are correctly rounded from fp32 maths and may differ by an ulp or two after several
# steps. A per-tensor norm in place of the global one moves these params by ~10% and more:
# test_tolerances_reject_a_per_tensor_norm checks these bounds fail it.
ULPS = {torch.float64: 64, torch.float32: 32, torch.bfloat16: 2, torch.float16: 2}


def tolerance(dtype, ref):
    tol = ULPS[dtype] * torch.finfo(dtype).eps
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    return dict(rtol=tol, atol=tol * scale + torch.finfo(dtype).tiny)


def assert_close(actual, ref, dtype, what=""):
    torch.testing.assert_close(
        actual.detach(), ref.detach(), **tolerance(dtype, ref), msg=lambda m: f"{what}: {m}"
    )


# Odd sizes: 0-dim, 0-size, 1, 4097 (one element past a chunk), 2-D, and a non-contiguous one.
SHAPES = [(), (0,), (1,), (4097,), (33, 17), "t(48, 64)"]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in SHAPES:
        if s == "t(48, 64)":
            t = (0.003 * torch.randn(48, 64, generator=g, dtype=torch.float64)).to(dtype).t()
            assert not t.is_contiguous()
        else:
            t = (0.003 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
        ps.append(torch.nn.Parameter(t))
    return ps


def grads_for(params, step, seed=100):
    """Grads of step `step`; some are None on some steps (the param sits out that step)."""
    g = torch.Generator().manual_seed(seed + step)
    out = []
    for i, p in enumerate(params):
        t = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        skip = (step == 1 and i == 3) or (step == 2 and i in (0, 4))
        out.append(None if skip else t)
    return out


CONFIGS = {
    # group 0: plain; group 1: nesterov + maximize + its own lr/momentum/weight decay
    "global": dict(norm="global", groups=[
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
        dict(lr=0.05, momentum=0.8, weight_decay=0.0, nesterov=True, maximize=True),
    ]),
    "tensor": dict(norm="tensor", groups=[
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
        dict(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
    ]),
    "sngd": dict(norm="global", groups=[
        dict(lr=0.1, momentum=0.0, weight_decay=1e-2, maximize=True),
        dict(lr=0.2, momentum=0.0),
    ]),
}


def group_split(params):
    return [params[:3], params[3:]]


def run(backend, dtype, config, steps=3, norm=None):
    """Run `steps` steps; returns params, momentum buffers, grad norms and the optimizer."""
    cfg = CONFIGS[config]
    params = make_params(dtype)
    groups = [dict(params=ps, **h) for ps, h in zip(group_split(params), cfg["groups"])]
    opt = SNGM(groups, backend=backend, norm=norm or cfg["norm"])
    norms = []
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        norms.append(opt.grad_norm.clone())
    bufs = [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]
    return params, bufs, norms, opt
