"""The sum of squares of any finite gradient, fp64 included, as three additive accumulators.

Every fp32, bf16 or fp16 square fits a double, but an fp64 one does not: ``(1e160)^2`` overflows
and ``(1e-160)^2`` is subnormal (``(1e-170)^2`` is 0). So each element's ``x = |d|`` goes to one of
three sums (Blue's scaled sum of squares, ACM TOMS 4(1), 1978; LAPACK 3.10's dnrm2), with
power-of-two scales, exact to multiply by:

    med   = sum x^2                 over SMALL <= x <= BIG (NaN too, so that it propagates)
    big   = sum (x * BIG_SCALE)^2   over x > BIG = 2^486       (fp64 only)
    small = sum (x * SMALL_SCALE)^2 over x < SMALL = 2^-511    (fp64 only)

``sumsq`` is then a float64 ``[3, m]`` tensor (rows med, big, small; column 0 the total, 1 + k
tensor k's): every row is a plain sum, so partial sums add across chunks, tensors and ranks
unchanged. :func:`combine` turns a column into ``(q, pre, post)`` with ``n^2 = q / (pre*post)^2``
and ``q`` in range; the update uses ``nd = ((d * pre) * (1 / sqrt(q))) * post``, which is bit
for bit ``d * (1 / n)`` whenever ``pre = post = 1`` (every step without an fp64 element beyond
~1e+-150). The norm a step reports (:func:`norm`) and whether it is taken (:func:`finite`) come
from the same sums. csrc/sngm_math.h (the C++ and CUDA kernels) and triton_kernels/scaled.py hold
the same constants and rules: tests/test_scaled_norm.py keeps the three equal.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

BIG = 2.0 ** 486
BIG_SCALE = 2.0 ** -538  # (x * 2^-538)^2 <= 2^972: 2^52 such terms cannot overflow
SMALL = 2.0 ** -511
SMALL_SCALE = 2.0 ** 600  # (x * 2^600)^2 >= 2^-948 for the smallest subnormal x: normal
# Below MED_FLOOR, med folds into small (med * 2^1200 < 2^300); above it the small terms (each
# < 2^-1022, at most 2^40 of them) weigh less than 2^-82 of med and are dropped.
MED_FLOOR = 2.0 ** -900

ROWS = 3  # med, big, small


def squares(d: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(med, big, small) of the elements of ``d``: float64 0-dim tensors. fp32, bf16 and fp16
    squares all fit a double: their big and small sums are 0 (no classification needed)."""
    x = d.double()
    if d.dtype != torch.float64:
        med = x.square().sum()
        zero = torch.zeros_like(med)
        return med, zero, zero
    x = x.abs()
    big = x > BIG
    small = x < SMALL
    mid = ~(big | small)  # NaN lands here: it must reach the total
    zero = x.new_zeros(())
    return (torch.where(mid, x, zero).square().sum(),
            torch.where(big, x * BIG_SCALE, zero).square().sum(),
            torch.where(small, x * SMALL_SCALE, zero).square().sum())


def combine(sums: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(q, pre, post) of each column of ``sums`` ([3] or [3, m], rows med, big, small): the
    norm is ``sqrt(q) / (pre * post)``. Every branch keeps med in q, so a NaN or inf anywhere
    makes q non-finite."""
    med, big, small = sums[0], sums[1], sums[2]
    one = torch.ones_like(med)
    use_big = big > 0
    use_small = ~use_big & (small > 0) & (med < MED_FLOOR)
    q = torch.where(use_big, big + (med * BIG_SCALE) * BIG_SCALE,
                    torch.where(use_small, small + (med * SMALL_SCALE) * SMALL_SCALE, med))
    pre = torch.where(use_small, one * SMALL_SCALE, one)
    post = torch.where(use_big, one * BIG_SCALE, one)
    return q, pre, post


def norm(sums: Tensor) -> Tensor:
    """The norm of each column of ``sums`` ([3] or [3, m], rows med, big, small): the hypot of
    the three rows' own norms, ``sqrt(med)``, ``sqrt(big) / BIG_SCALE`` and
    ``sqrt(small) / SMALL_SCALE``, each within range (hypot neither overflows nor underflows on
    the way), in a few ops: with big = small = 0 it is exactly ``sqrt(med)``. +inf only when the
    norm itself exceeds the fp64 range (elements near 1.8e308), or a sum is not finite."""
    r = sums.sqrt()
    return torch.hypot(torch.hypot(r[0], r[1] * (1 / BIG_SCALE)), r[2] * (1 / SMALL_SCALE))


def finite(sums: Tensor) -> Tensor:
    """Whether each column's q (combine) is finite: med and big are (small always is, and their
    sum cannot overflow: each is at most 2^52 terms of at most 2^972)."""
    return torch.isfinite(sums[0] + sums[1])
