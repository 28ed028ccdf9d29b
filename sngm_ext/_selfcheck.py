"""``python -m sngm_ext --check``: every fused backend that runs here against the reference, on
the same device, on a few small cases (seconds; what to run on a new GPU, driver or triton
version, and what the GPU kit runs first).

Cases: the four param dtypes over three param groups (weight decay; nesterov and maximize; no
momentum) with a 0-dim param, one of 4097 elements (a chunk and one), a transposed view, a view at
an odd storage offset (no 128-bit path) and grads that sit a step out; the per-tensor norm; a tensor
learning rate; fp64 params with weight decay under a real ``torch.amp.GradScaler`` whose scale is
not a power of two (the kernels must take the fp32 reciprocal of the scale, as the reference does);
fp64 grads times 2^1000 and 2^-1000 (the scaled sums of squares of scaled_norm.py).

Bounds, per element (see :func:`elementwise_bounds`): every backend computes each element with
the reference's operations in the reference's order, each rounded once, so only the order in
which the fp64 sum of squares of the norm's N terms is added differs. Two such sums, each within
gamma_N of the exact one for any order (nonnegative terms; Higham, Accuracy and Stability of
Numerical Algorithms, 2002, eq. 3.4; gamma_N = N u / (1 - N u), u = 2^-53), differ by at most
2 gamma_N relative, so the norms and their inverses by r = gamma_N + 3u. Per step that moves
``nd = C(double(d) * inv)`` by a relative r (what shows in fp64, where C's unit is finer) or flips
its rounding by one unit of C, and a changed ``nd`` can flip the rounding of ``u`` or ``w`` to
their dtype by one unit of it (at most ``eps * |x|``); the earlier steps' differences carry on
(``u`` scaled by beta < 1, ``w`` through ``lr * (1 + beta) * du``). After ``s`` steps, with
``Mu`` and ``Mw`` the largest magnitudes the element's momentum and param reached on the way
(|nd| <= (1 + beta) Mu):

    |du| <= s (2 eps + (1 + beta) r) Mu,    |dw| <= 2 s eps Mw + lr (1 + beta) s |du|

and the norm agrees to ``r + 2 s eps`` relative (the sums' order, and params within the bounds
above). A wrong kernel (a missing term, a wrong index or rounding, a per-tensor norm) misses these
by orders of magnitude.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .backends import BackendUnavailable, resolve_backend
from .optimizer import SNGM

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
GROUPS = (
    dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
    dict(lr=0.2, momentum=0.0, weight_decay=1e-3),
)
# Shapes per group; "t" a transposed (non-contiguous) view, "odd" a view one element into a
# larger storage (its base address is not 16-byte aligned).
SHAPES = (((), (4097,)), ((33, 17), "t", "odd"), ((1,), (3, 1500)))
STEPS = 2
GRAD_SCALE = 1000.7  # not a power of two: 1 / scale rounds differently in fp32 and fp64


def gamma(k: int, u: float = 2.0**-53) -> float:
    """gamma_k = k u / (1 - k u): the relative error of k roundings of unit u (Higham Lemma 3.1)."""
    assert k * u < 1, (k, u)
    return k * u / (1 - k * u)


def norm_rtol_of_order(n_terms: int) -> float:
    """How far apart, relative, two backends' norms of the same N = ``n_terms`` values may be: the
    fp64 sums of squares in two orders (2 gamma_N), halved by the square root, plus the roundings
    of the square roots and inverses (the module's doc)."""
    return gamma(n_terms) + 3 * 2.0**-53


def elementwise_bounds(dtype: torch.dtype, steps: int, lr: float, beta: float, max_w, max_u,
                       n_terms: int):
    """(bound on |du|, bound on |dw|) per element after ``steps`` steps (the module's doc);
    ``max_w`` / ``max_u``: per element (tensors) or per tensor (floats) largest magnitudes;
    ``n_terms``: the number of elements the norm sums (at most)."""
    fi = torch.finfo(dtype)
    du = steps * (2 * fi.eps + (1 + beta) * norm_rtol_of_order(n_terms)) * max_u
    dw = 2 * steps * fi.eps * max_w + lr * (1 + beta) * steps * du
    return du + fi.tiny, dw + fi.tiny


def norm_rtol(dtype: torch.dtype, steps: int, n_terms: int) -> float:
    """Backends' norms after ``steps`` earlier steps (their params within the bounds)."""
    return norm_rtol_of_order(n_terms) + 2 * steps * torch.finfo(dtype).eps


class Mismatch(AssertionError):
    """A backend's result outside the bounds around the reference's."""


def check_close(got: torch.Tensor, ref: torch.Tensor, bound, what: str) -> float:
    """Raise Mismatch unless |got - ref| <= bound everywhere; returns the worst error / bound."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise Mismatch(f"{what}: {got.dtype} {tuple(got.shape)}, expected {ref.dtype} "
                       f"{tuple(ref.shape)}")
    if got.numel() == 0:
        return 0.0
    err = (got.detach().double() - ref.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=err.device)
    ratio = (err / bound).nan_to_num(nan=math.inf)
    worst = ratio.max().item()
    if not worst <= 1.0:
        bad = int((ratio > 1).sum())
        i = int(ratio.flatten().argmax())
        raise Mismatch(
            f"{what}: {bad} of {err.numel()} elements off the bound, worst at {i}: got "
            f"{got.detach().flatten()[i].item():.9g}, reference {ref.detach().flatten()[i].item():.9g} "
            f"(error {err.flatten()[i].item():.3g}, bound "
            f"{bound.expand_as(err).flatten()[i].item():.3g})")
    return worst


def _tensor(shape, dtype, device, gen):
    def rnd(*s):
        return torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)
    if shape == "t":
        return rnd(40, 24).t()
    if shape == "odd":
        return rnd(1001)[1:]
    return rnd(*shape)


@dataclass
class Run:
    params: List[torch.Tensor]
    bufs: List[Optional[torch.Tensor]]
    norms: List[torch.Tensor]
    max_w: List[torch.Tensor]  # per element, over the run
    max_u: List[torch.Tensor]
    hyper: List[dict]  # each param's group


def _run(backend: str, device: torch.device, dtype: torch.dtype, norm: str = "global",
         lr_tensor: bool = False, grad_exp: int = 0) -> Run:
    """``grad_exp``: grads times 2^grad_exp (fp64: beyond where a square fits a double; below 0
    without weight decay, so that every d is that small)."""
    gen = torch.Generator().manual_seed(0)
    groups, hyper, params, kinds = [], [], [], []
    for shapes, h in zip(SHAPES, GROUPS):
        if grad_exp < 0:
            h = dict(h, weight_decay=0.0)
        ps = [torch.nn.Parameter(_tensor(s, dtype, device, gen)) for s in shapes]
        lr = torch.tensor(h["lr"], device=device) if lr_tensor else h["lr"]
        groups.append(dict(params=ps, **dict(h, lr=lr)))
        params += ps
        hyper += [h] * len(ps)
        kinds += shapes
    opt = SNGM(groups, lr=0.1, norm=norm, backend=backend)
    max_w = [p.detach().abs().double() for p in params]
    # Without a momentum buffer (momentum 0) the update moves w by lr * nd, |nd_i| <= ||nd|| = 1:
    # Mu = 2 covers it in elementwise_bounds' (1 + beta) Mu (tests/scenarios.py NO_MOMENTUM_MU).
    max_u = [torch.zeros_like(m) if h["momentum"] else torch.full_like(m, 2.0)
             for m, h in zip(max_w, hyper)]
    norms = []
    for step in range(STEPS):
        for i, (p, kind) in enumerate(zip(params, kinds)):  # grads laid out as their params
            g = _tensor(kind, dtype, device, gen) * 2.0 ** grad_exp
            p.grad = None if (step == 1 and i in (1, 5)) else g
        opt.step()
        norms.append(opt.grad_norm.clone())
        for i, p in enumerate(params):
            max_w[i] = torch.maximum(max_w[i], p.detach().abs().double())
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                max_u[i] = torch.maximum(max_u[i], buf.abs().double())
    bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
    return Run([p.detach() for p in params], bufs, norms, max_w, max_u, hyper)


def scaler_run(backend: str, device: torch.device, dtype: torch.dtype = torch.float64) -> Run:
    """Weight decay and a real GradScaler with GRAD_SCALE: grads reach the kernels scaled, and
    they divide by the fp32 reciprocal of the scale on the fly (fp64 params tell it from an fp64
    one)."""
    gen = torch.Generator().manual_seed(1)
    h = dict(lr=0.1, momentum=0.9, weight_decay=0.5)
    params = [torch.nn.Parameter(_tensor(s, dtype, device, gen))
              for s in ((300,), (4097,), "odd")]
    opt = SNGM(params, backend=backend, **h)
    scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALE, growth_interval=10**6)
    max_w = [p.detach().abs().double() for p in params]
    max_u = [torch.zeros_like(m) for m in max_w]
    norms = []
    for _ in range(STEPS):
        coefs = [_tensor(p.shape, dtype, device, gen) for p in params]
        opt.zero_grad()
        scaler.scale(sum((p * c).sum() for p, c in zip(params, coefs))).backward()
        scaler.step(opt)
        scaler.update()
        norms.append(opt.grad_norm.clone())
        for i, p in enumerate(params):
            max_w[i] = torch.maximum(max_w[i], p.detach().abs().double())
            max_u[i] = torch.maximum(max_u[i], opt.state[p]["momentum_buffer"].abs().double())
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    return Run([p.detach() for p in params], bufs, norms, max_w, max_u, [h] * len(params))


def assert_runs_match(got: Run, ref: Run, dtype: torch.dtype, what: str,
                      steps: int = STEPS) -> float:
    """got within the per-element bounds around ref after ``steps`` steps; returns the worst
    error / bound."""
    worst = 0.0
    n_terms = sum(p.numel() for p in ref.params)
    for i, (x, y) in enumerate(zip(got.params, ref.params)):
        h = ref.hyper[i]
        du, dw = elementwise_bounds(dtype, steps, h["lr"], h.get("momentum", 0.0),
                                    ref.max_w[i], ref.max_u[i], n_terms)
        worst = max(worst, check_close(x, y, dw, f"{what}: param {i}"))
        if (got.bufs[i] is None) != (ref.bufs[i] is None):
            raise Mismatch(f"{what}: momentum buffer {i} present in one run only")
        if ref.bufs[i] is not None:
            worst = max(worst, check_close(got.bufs[i], ref.bufs[i], du, f"{what}: momentum {i}"))
    for k, (x, y) in enumerate(zip(got.norms, ref.norms)):
        rtol = norm_rtol(dtype, k, n_terms)
        worst = max(worst, check_close(x, y, rtol * y.abs(), f"{what}: norm of step {k}"))
    return worst


def cases(device: torch.device) -> Dict[str, Callable[[str], Run]]:
    """name -> (backend -> Run); the reference runs each the same way."""
    out = {f"{str(dt)[6:]} three groups": (lambda b, dt=dt: _run(b, device, dt)) for dt in DTYPES}
    out["float32 per-tensor norm"] = lambda b: _run(b, device, torch.float32, norm="tensor")
    out["float32 tensor lr"] = lambda b: _run(b, device, torch.float32, lr_tensor=True)
    out[f"float64 GradScaler scale {GRAD_SCALE}"] = lambda b: scaler_run(b, device)
    for k in (1000, -1000):  # the scaled sums of squares (scaled_norm.py): big, then small
        out[f"float64 grads x 2^{k}"] = lambda b, k=k: _run(b, device, torch.float64, grad_exp=k)
    return out


def _dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name.split()[0])


def check_backend(backend: str, device: torch.device) -> dict:
    """{"ok": bool, "cases": n, "worst": worst error / bound, "seconds": s, "error": str}"""
    t0 = time.perf_counter()
    worst, n = 0.0, 0
    try:
        for name, case in cases(device).items():
            ref = case("reference")
            got = case(backend)
            worst = max(worst, assert_runs_match(got, ref, _dtype_of(name), name))
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous kernel error surfaces here
    except Exception as e:  # noqa: BLE001  a mismatch, or a backend that raised
        kind = "" if isinstance(e, Mismatch) else f"{type(e).__name__}: "
        return {"ok": False, "cases": n, "worst": worst, "seconds": time.perf_counter() - t0,
                "error": f"{kind}{e}"}
    return {"ok": True, "cases": n, "worst": worst, "seconds": time.perf_counter() - t0}


# backend -> the device types it can run on
TARGETS = {"triton": ("cuda", "cpu"), "cpu": ("cpu",), "cuda": ("cuda",)}


def run_checks(devices: List[str], say: Callable[[str], None] = print) -> int:
    """Check every fused backend on every device here; one line each; 1 on any failure."""
    failed = False
    for backend, types in TARGETS.items():
        for dev in types:
            if dev not in devices:
                if dev == "cuda" and backend == "cuda":
                    say(f"SKIP {backend} on {dev}: no CUDA device here")
                continue
            device = torch.device(dev)
            try:
                resolve_backend(backend, device)
            except BackendUnavailable as e:
                say(f"SKIP {backend} on {dev}: {str(e).splitlines()[0]}")
                continue
            r = check_backend(backend, device)
            if r["ok"]:
                say(f"PASS {backend} on {dev}: {r['cases']} cases, worst error {r['worst']:.2f} "
                    f"of its bound, {r['seconds']:.1f} s")
            else:
                failed = True
                say(f"FAIL {backend} on {dev} after {r['cases']} passing cases: {r['error']}")
    return 1 if failed else 0
