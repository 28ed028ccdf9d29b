"""The error bounds the suite's tolerances come from: each formula once, derived in its docstring,
cited where a test uses it. (N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd
ed., SIAM 2002: "Higham" below.)

Notation: u is a dtype's unit roundoff (half an ulp at 1, round to nearest even), so
|fl(x) - x| <= u |x| for every operation (Higham eq. 2.4); k roundings in a row give a relative
error of at most gamma_k = k u / (1 - k u) (Higham Lemma 3.1).

Which bound to use:
- Two backends on the same inputs (the same operations in the same order, each rounded once, only
  the fp64 sum of squares added in another order): ``elementwise_bounds`` / ``norm_rtol`` of
  ``sngm_ext._selfcheck`` (derived in that module's doc; ``python -m sngm_ext --check`` runs the
  same formula on a new machine). Re-exported here so that tests import every bound from one place.
- A step computed in the kernels' dtypes against the exact step from the same stored values (a
  check by hand in fp64): ``step_error_bounds``.
- Two fp64 sums of the same terms in two orders: ``two_sums_rtol``.
- The step's length in storage: ``stored_step_bound`` (Lemma 2 plus rounding).
- One step from zero on equal grads: ``FIRST_STEP_RTOL``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence

import torch

from sngm_ext._selfcheck import elementwise_bounds, gamma, norm_rtol, norm_rtol_of_order

__all__ = ["UNIT", "compute_unit", "FIRST_STEP_RTOL", "gamma", "two_sums_rtol", "stored_step_bound",
           "step_error_bounds", "StepBounds", "elementwise_bounds", "norm_rtol",
           "norm_rtol_of_order"]

# Unit roundoff of each storage dtype, and of the dtype the kernels compute in (fp64 for fp64
# params, fp32 otherwise).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11}


def compute_unit(dtype) -> float:
    return UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32]


# Relative error of a param after one step from zero whose elements all have the same |g| (d / n
# is 1 / sqrt(N) up to the fp64 sum's gamma_N, ~1e-13 at N = 1000, and the fp64 sqrt and
# inverse): three fp32 roundings (fl(lr), d / n, their product) plus the storage dtype's unit u
# (the rounding of w to it; in fp32, where w needs none, room for gamma_N); u also bounds a norm
# moved by the grads' rounding to the dtype.
FIRST_STEP_RTOL = {dt: UNIT[dt] + 3 * UNIT[torch.float32]
                   for dt in (torch.bfloat16, torch.float16, torch.float32)}




def two_sums_rtol(n: int) -> float:
    """How far apart, relative to the exact sum, two fp64 sums of the same n products x_i * y_i
    (squares) may be when each adds them in its own order (the kernels' chunks and blocks, torch's
    vectorized reduction, which differs per ATen CPU capability). Each is within gamma_n of the
    exact sum of nonnegative terms for ANY order (Higham eq. 3.4 and Sec. 4.2: recursive summation
    |E| <= gamma_(n-1) sum |x_i|, plus one rounding per product: gamma_n), so the two are within
    2 gamma_n of each other. Products of fp32/bf16/fp16 values are exact in fp64: the bound then
    holds with gamma_(n-1); gamma_n covers fp64 inputs as well."""
    return 2 * gamma(n)


def stored_step_bound(lr, beta, nesterov, dtype, n_elements, w_norm, new_w_norm) -> float:
    """A bound on ||w_{t+1} - w_t|| for the stored params of ``dtype`` (2-norm over all params;
    ``w_norm``, ``new_w_norm``: ||w_t||, ||w_{t+1}||), every value in the normal range; the
    paper's Lemma 2 (docs/optimizer.md, "The step bound in floating point", states it).

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
    With every u -> 0 this is Lemma 2's lr / (1 - beta) (Nesterov's too). The bound on ||m||
    holds whatever lr each earlier step had (m does not contain lr): a scheduler may change it."""
    # Evaluated exactly (in fp64, 1 + 2^-53 would round to 1 and drop fp64's factors), rounded up.
    f = Fraction
    us, uc = f(UNIT[dtype]), f(compute_unit(dtype))
    lr, beta = f(float(lr)), f(float(beta))
    a = (1 + uc) * (1 + (n_elements + 3) * f(UNIT[torch.float64]))
    if beta == 0:
        s = a
    else:
        rho = (1 + us) * (1 + uc) ** 3 * beta
        m = (1 + us) * (1 + uc) * a / (1 - rho)
        s = (1 + uc) * ((1 + uc) ** 2 * beta * m + a)
        if nesterov:
            s = (1 + uc) * (a + (1 + uc) ** 2 * beta * s)
    big_l = lr * (1 + uc) ** 2 * s
    exact = big_l + uc * (f(float(w_norm)) + big_l) + us * f(float(new_w_norm)) / (1 - us)
    return math.nextafter(float(exact), math.inf)


@dataclass
class StepBounds:
    """Per tensor, bounds on |stored - exact| (``momentum[i]`` None without momentum), and the
    relative bound on the norm."""

    momentum: List[Optional[torch.Tensor]]
    params: List[torch.Tensor]
    norm_rtol: float


def _one_side(uc, us, um, um_s, reads_stored, lrs, betas, wds, nesterovs, ws, ds, us_in, n,
              n_terms):
    """|stored result - exact result| of one step: d, v, the step and w round to uc (compute) and
    us (storage), the momentum to um (its operations) and um_s (its storage); ``reads_stored``: the
    param update reads the stored momentum (torch.optim.SGD) rather than the computed one (SNGM's
    kernels and reference); see step_error_bounds."""
    g3c, g2c, g3m = gamma(3, uc), gamma(2, uc), gamma(3, um)
    # d = fl(sign g + fl(fl(wd) w)): the grad is exact in the compute dtype, the product of the
    # rounded wd and w rounds twice, the sum once
    e_d = [uc * d.abs() + g3c * wd * w.abs() if wd else torch.zeros_like(d)
           for d, w, wd in zip(ds, ws, wds)]
    phi = 0.0
    if n is None:  # SGD: no normalization, v = d
        e_v, v = e_d, [d.abs() for d in ds]
    else:
        # ||d_c|| is within E = ||e_d|| of ||d|| = n, 1/||d_c|| within phi of 1/n; the fp64 sum of
        # N squares, its square root and the inverse within r = gamma_N + 3 u64 of 1/||d_c||
        # (_selfcheck.norm_rtol_of_order); fl_64(d_c * inv) and its rounding to compute: one
        # rounding each. So v_c = d_c (1 + kappa) / n, and |v_c - d/n| <= (e_d (1 + kappa) +
        # |d| kappa) / n.
        big_e = torch.sqrt(sum((e * e).sum() for e in e_d)).item()
        assert big_e < n, "the norm is not determined to any accuracy"
        phi = big_e / (n - big_e)
        kappa = (1 + phi) * (1 + norm_rtol_of_order(n_terms)) * (1 + UNIT[torch.float64]) \
            * (1 + uc) - 1
        e_v = [(e * (1 + kappa) + d.abs() * kappa) / n for e, d in zip(e_d, ds)]
        v = [d.abs() / n for d in ds]
    out_u, out_w = [], []
    for w, ev, vv, u, lr, beta, nesterov in zip(ws, e_v, v, us_in, lrs, betas, nesterovs):
        if beta:
            big_u = beta * u.abs() + vv  # >= |beta u + v|
            # U = fl(fl(fl(beta) u) + v_c): gamma_2 on beta u, the sum's rounding on the rest
            e_u = g3m * beta * u.abs() + (1 + um) * ev + um * big_u
            e_us = e_u + um_s * (big_u + e_u)  # and its rounding to storage
            out_u.append(e_us)
            if reads_stored:
                e_u = e_us
            if nesterov:  # s_c = fl(v_c + fl(fl(beta) U))
                s = vv + beta * big_u
                e_s = (1 + uc) * (ev + beta * (e_u + g2c * (big_u + e_u))) + uc * s
            else:  # the step is U itself
                s, e_s = big_u, e_u
        else:
            out_u.append(None)
            s, e_s = vv, ev
        # W_c = fl(w - fl(fl(lr) s_c)), then stored
        big_w = w.abs() + lr * s
        e_w = (1 + uc) * lr * (e_s + g2c * (s + e_s)) + uc * big_w
        out_w.append(e_w + us * (big_w + e_w))
    rtol = None if n is None else (1 + phi) * (1 + norm_rtol_of_order(n_terms)) - 1
    return out_u, out_w, rtol


def step_error_bounds(dtype, *, lr, beta, wd, nesterov, ws: Sequence[torch.Tensor],
                      ds: Sequence[torch.Tensor],
                      us: Sequence[torch.Tensor], n: Optional[float],
                      torch_sgd_momentum: Optional[torch.dtype] = None) -> StepBounds:
    """Bounds on how far one step of params stored in ``dtype``, computed the way the kernels and
    the reference compute it (docs/ops.md; csrc/sngm_math.h: in the compute dtype C, fp64 for
    fp64 params and fp32 otherwise, each operation rounded once, the norm in fp64), may lie from
    the same step computed by hand in fp64 from the same stored values. ``ws``, ``us``: the
    stored params and momentum before the step, ``ds`` the directions d = sign g + wd w, all
    fp64; ``n``: the fp64 norm of all of ``ds``; ``lr``, ``beta``, ``wd``, ``nesterov``: one
    value, or one per tensor (param groups). ``torch_sgd_momentum``: the momentum buffer's
    dtype for a torch.optim.SGD step instead (``n`` None: no normalization; SGD's ops round every
    result to their tensor's dtype, and its param update reads the stored buffer).

    Per element, with |fl(x) - x| <= u |x| and gamma_k (Higham Lemma 3.1), uc the compute unit
    and us the storage unit:
      d_c = fl(sign g + fl(fl(wd) w)):  |d_c - d| <= e_d = uc |d| + gamma_3 wd |w|
      v_c = fl_C(fl_64(d_c * inv)):     |v_c - d / n| <= e_v = (e_d (1 + kappa) + |d| kappa) / n,
            kappa = (1 + phi)(1 + r)(1 + u64)(1 + uc) - 1, phi = E / (n - E), E = ||e_d||,
            r = gamma_N + 3 u64 (the sum of N squares, its sqrt and inverse)
      U_c = fl(fl(fl(beta) u) + v_c):    |U_c - U| <= e_U = gamma_3 beta |u| + (1 + uc) e_v
                                                            + uc (beta |u| + |v|)
      nesterov s_c = fl(v_c + fl(fl(beta) U_c)): |s_c - s| <= (1 + uc)(e_v + beta (e_U
                                                            + gamma_2 (|U| + e_U))) + uc |s|
      W_c = fl(w - fl(fl(lr) s_c)):      |W_c - W| <= (1 + uc) lr (e_s + gamma_2 (|s| + e_s))
                                                            + uc (|w| + lr |s|)
      and the rounding to storage:      + us (|x| + e_x)
    The fp64 check by hand rounds too: the same bound with every unit u64 is added (it matters
    for fp64 params). The norm: |n_c - n| <= ((1 + phi)(1 + r) - 1) n, likewise doubled.
    A step that drops weight decay, uses another norm or another momentum rule is off by far more
    than these: they are a few units of the dtype at each element's own scale."""
    if torch_sgd_momentum is None:
        uc, us_ = compute_unit(dtype), UNIT[dtype]
        um, um_s = uc, us_
    else:
        assert n is None, "torch.optim.SGD does not normalize"
        uc = us_ = UNIT[dtype]
        um = um_s = UNIT[torch_sgd_momentum]
    n_terms = sum(d.numel() for d in ds)

    def per_tensor(x):
        return list(x) if isinstance(x, (list, tuple)) else [x] * len(ds)

    args = (*map(per_tensor, (lr, beta, wd, nesterov)), ws, ds, us, n, n_terms)
    ku, kw, kr = _one_side(uc, us_, um, um_s, torch_sgd_momentum is not None, *args)
    u64 = UNIT[torch.float64]
    hu, hw, hr = _one_side(u64, u64, u64, u64, False, *args)
    momentum = [None if a is None else a + b for a, b in zip(ku, hu)]
    params = [a + b for a, b in zip(kw, hw)]
    return StepBounds(momentum, params, None if n is None else kr + hr)
