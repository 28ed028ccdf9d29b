"""The GPU tests' cases, written for any device: test_gpu.py and test_gpu_extra.py run them on CUDA
with both GPU backends; test_gpu_power.py runs them on CPU under Triton's interpreter, on small
sizes, against deliberately broken copies of the Triton kernels, to show each one fails a wrong
kernel. Bounds are per element, from the reference's own rounding (sngm_ext/_selfcheck.py's
``elementwise_bounds``: only the fp64 norm's summation order differs between backends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from sngm_ext import SNGM
from sngm_ext._selfcheck import (
    Mismatch,
    Run,
    assert_runs_match,
    check_close,
    elementwise_bounds,
    norm_rtol,
)

# ---------------------------------------------------------------- views at odd storage offsets

# Element offsets into one shared storage (a flat buffer of views, as FSDP1 and some loaders lay
# params out): 4, 12 and 20 bytes off 16-byte alignment for fp32; every chunk takes the scalar path.
ODD_OFFSETS = ((1, 5000), (5003, 4096 * 2 + 3), (13201, 777))


def _views(total, dtype, device, gen):
    flat = torch.randn(total, generator=gen, dtype=torch.float64).to(device, dtype)
    return [flat[o:o + n] for o, n in ODD_OFFSETS]


def odd_offset_run(backend: str, dtype: torch.dtype, device, steps: int = 3) -> Run:
    """Params and grads that are views at odd element offsets of shared storages; weight decay,
    nesterov. The momentum buffers SNGM makes are aligned: a chunk mixes both."""
    gen = torch.Generator().manual_seed(3)
    total = sum(ODD_OFFSETS[-1]) + 5
    h = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    params = [torch.nn.Parameter(v) for v in _views(total, dtype, device, gen)]
    storage = params[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in params)
    assert all(p.data_ptr() % 16 for p in params), "the views must be unaligned"
    opt = SNGM(params, backend=backend, **h)
    max_w = [p.detach().abs().double() for p in params]
    max_u = [torch.zeros_like(m) for m in max_w]
    norms = []
    for _ in range(steps):
        for p, g in zip(params, _views(total, dtype, device, gen)):
            p.grad = g
        opt.step()
        norms.append(opt.grad_norm.clone())
        for i, p in enumerate(params):
            max_w[i] = torch.maximum(max_w[i], p.detach().abs().double())
            max_u[i] = torch.maximum(max_u[i], opt.state[p]["momentum_buffer"].abs().double())
    assert all(p.untyped_storage().data_ptr() == storage for p in params)  # still the views
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    return Run([p.detach().clone() for p in params], bufs, norms, max_w, max_u, [h] * len(params))


def check_odd_offsets(backend: str, dtype: torch.dtype, device, steps: int = 3) -> None:
    ref = odd_offset_run("reference", dtype, device, steps)
    got = odd_offset_run(backend, dtype, device, steps)
    assert_runs_match(got, ref, dtype, f"{backend} odd offsets {dtype}", steps=steps)


# ---------------------------------------------------------------- large tensors, in slices


@dataclass
class Large:
    """A large case: tensors of ``sizes``, ``steps`` steps of SNGM with weight decay large enough
    that its share of d (~wd |w| / |g|) shows in every element's momentum and param."""

    sizes: Sequence[int]
    dtype: torch.dtype
    steps: int = 2
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.1
    slice: int = 1 << 26  # elements per slice of the oracle (fp64 temporaries of 512 MiB)


# The GPU's large cases (test_gpu_extra.py): 40M fp32 elements over three tensors, and one bf16
# tensor of more than 2^31 elements (4 GiB each for param, grad and momentum; ~28 GiB in all with
# the oracle's copies) whose chunks start past 2^31, where 32-bit offsets would wrap. lr is large
# enough that the step shows in bf16 params (each element moves by ~lr / sqrt(N)).
GPU_LARGE = Large(sizes=(25_000_000, 14_999_999, 1), dtype=torch.float32)
BIG_BF16 = Large(sizes=(2**31 + 4100, 1000), dtype=torch.bfloat16, steps=1, lr=1e4)


def _slices(n: int, size: int):
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _rand(n, dtype, device, gen):
    """Standard normal values, made on the device (a host copy of 2^31 elements would take
    minutes), in slices so that no fp32 temporary of the full size exists."""
    out = torch.empty(n, dtype=dtype, device=device)
    for s in _slices(n, 1 << 26):
        out[s] = torch.randn(s.stop - s.start, generator=gen, device=device).to(dtype)
    return out


def check_large(backend: str, case: Large, device) -> None:
    """``backend`` against the reference's operations run slice by slice (a full-size reference
    run would need several fp64 copies of every tensor), element by element.

    The oracle does what reference.py does, in its order and its dtypes: d = g + wd * w in C
    (fp32, fp64 for fp64 params), n^2 the fp64 sum of d^2, nd = C(double(d) * (1 / n)),
    u = beta * u + nd, w = w - lr * u, each stored in the param's dtype."""
    device = torch.device(device)
    ct = torch.float64 if case.dtype == torch.float64 else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(_rand(n, case.dtype, device, gen)) for n in case.sizes]
    w_ref = [p.detach().clone() for p in params]
    u_ref = [torch.zeros_like(w) for w in w_ref]
    # per element: the largest |w| and |u| of the reference so far (the bounds' Mw, Mu)
    max_w = [w.abs() for w in w_ref]
    max_u = [torch.zeros_like(w) for w in w_ref]
    opt = SNGM(params, lr=case.lr, momentum=case.momentum, weight_decay=case.weight_decay,
               backend=backend)
    wd, beta, lr = case.weight_decay, case.momentum, case.lr
    for step in range(case.steps):
        for p in params:
            p.grad = _rand(p.numel(), case.dtype, device, gen)
        opt.step()
        got_norm = opt.grad_norm.clone()

        def direction(i, s):
            return params[i].grad[s].to(ct) + wd * w_ref[i][s].to(ct)

        sumsq = torch.zeros((), dtype=torch.float64, device=device)
        for i, n in enumerate(case.sizes):
            for s in _slices(n, case.slice):
                sumsq += direction(i, s).double().square().sum()
        norm = sumsq.sqrt()
        inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        for i, n in enumerate(case.sizes):
            for s in _slices(n, case.slice):
                nd = (direction(i, s).double() * inv).to(ct)
                u = beta * u_ref[i][s].to(ct) + nd
                w = w_ref[i][s].to(ct) - lr * u
                u_ref[i][s] = u.to(case.dtype)
                w_ref[i][s] = w.to(case.dtype)
                max_w[i][s] = torch.maximum(max_w[i][s], w_ref[i][s].abs())
                max_u[i][s] = torch.maximum(max_u[i][s], u_ref[i][s].abs())
        # The norm: the first step's d are the same values in every backend, summed in another
        # order; later steps add what the params' differences (within the bounds) move it by.
        rtol = norm_rtol(case.dtype, step, sum(case.sizes))
        check_close(got_norm, norm, rtol * norm, f"{backend}: norm of step {step}")
    for i, (p, buf) in enumerate(zip(params, (opt.state[p]["momentum_buffer"] for p in params))):
        for s in _slices(case.sizes[i], case.slice):
            du, dw = elementwise_bounds(case.dtype, case.steps, lr, beta, max_w[i][s].double(),
                                        max_u[i][s].double(), sum(case.sizes))
            where = f"{backend}: tensor {i} ({case.sizes[i]} x {case.dtype}), elements {s.start}:"
            check_close(buf[s], u_ref[i][s], du, f"{where} momentum")
            check_close(p.detach()[s], w_ref[i][s], dw, f"{where} param")


# ---------------------------------------------------------------- GradScaler


def check_grad_scaler(backend: str, dtype: torch.dtype, device) -> None:
    """A real GradScaler whose scale is not a power of two, weight decay: the reference's bits up
    to the bounds (fp64 params tell the fp32 reciprocal of the scale from an fp64 one)."""
    from sngm_ext._selfcheck import scaler_run

    ref = scaler_run("reference", torch.device(device), dtype)
    got = scaler_run(backend, torch.device(device), dtype)
    assert_runs_match(got, ref, dtype, f"{backend} GradScaler {dtype}")


# ---------------------------------------------------------------- fp64 grads of any scale


# Shapes of the fp64 cases: 0-dim, one element, none, a chunk and one, a non-multiple of it.
FP64_SHAPES = [(5000,), (4097,), (3, 7), (), (1,), (0,)]


def fp64_grads(gen: torch.Generator, shapes=FP64_SHAPES):
    """fp64 grads with 2^-10 <= |g| < 8 (randn away from 0): scaled by 2^k they stay in one
    of scaled_norm.py's ranges."""
    out = []
    for s in shapes:
        x = torch.randn(s, generator=gen, dtype=torch.float64)
        out.append((x.abs() + 2.0 ** -10).clamp(max=7.9) * x.sign().where(x != 0, 1.0))
    return out


def check_fp64_any_scale(backend: str, device, k: int, *, nesterov: bool = False,
                         norm: str = "global") -> None:
    """fp64 grads times 2^k (|k| = 1000: far beyond where an fp64 square fits a double, the
    scaled sums of scaled_norm.py) give the bits of the grads times 1 in params and momentum
    (every scaling is by a power of two, every element stays in one range), no skipped step, and
    the norm times 2^k exactly; two steps with momentum 0.9 (tests/test_scaled_norm.py runs it
    on the CPU backends, test_gpu.py on the GPU ones)."""
    def one(scale):
        g = torch.Generator().manual_seed(7)
        ps = [torch.nn.Parameter((1 + torch.rand(s, generator=g, dtype=torch.float64))
                                 .to(device)) for s in FP64_SHAPES]
        opt = SNGM(ps, lr=0.1, momentum=0.9, nesterov=nesterov, norm=norm, backend=backend)
        norms = []
        for _ in range(2):
            for p, gr in zip(ps, fp64_grads(g)):
                p.grad = gr.to(device) * scale
            opt.step()
            norms.append(opt.grad_norm.item())
        if opt.skipped_steps.item() != 0:
            raise Mismatch(f"{backend}, fp64 grads x {scale}: a step was skipped")
        return [p.detach() for p in ps] + [opt.state[p]["momentum_buffer"] for p in ps], norms

    base, base_norms = one(1.0)
    got, norms = one(2.0 ** k)
    for i, (a, b) in enumerate(zip(got, base)):
        if not torch.equal(a, b):
            raise Mismatch(f"{backend}, fp64 grads x 2^{k}: tensor {i} is not the x 1 step's "
                           f"(largest difference {(a - b).abs().max().item():.3g})")
    # sqrt of 4^k times the same sum: exactly 2^k times the norm
    if norms != [math.ldexp(n, k) for n in base_norms]:
        raise Mismatch(f"{backend}, fp64 grads x 2^{k}: norms {norms}, not 2^{k} x {base_norms}")


def expect_mismatch(fn, *args) -> str:
    """Run a check that must fail (a broken kernel): its Mismatch message."""
    try:
        fn(*args)
    except (Mismatch, AssertionError) as e:
        return str(e)
    raise AssertionError(f"{fn.__name__} passed a broken kernel")

