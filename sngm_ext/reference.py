"""Pure-PyTorch SNGM, one tensor at a time: the readable oracle every other backend is held to.

The update (DESIGN.md, Algorithm 1 of the paper plus PyTorch's extras), per param ``i`` with a grad:

    d_i = (maximize ? -g_i : g_i) + weight_decay * w_i
    n   = sqrt(sum_i ||d_i||^2)                  # ONE norm over every param of every group
    u_i = momentum * u_i + d_i / n               # d_i / n := 0 when n == 0
    w_i = w_i - lr * u_i                         # nesterov: w_i - lr * (d_i / n + momentum * u_i)

With ``norm="tensor"`` each param uses its own ``n_i = ||d_i||`` (the block-wise variant of the
paper's Section 6). When the global sum of squares is not finite nothing is written.

Maths runs in fp32 (fp64 for fp64 params) and is rounded once to the param's dtype. No host sync:
the finite check is a device-side ``torch.where``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import TensorGroup, accumulate_dtype, compute_dtype, present


def _direction(grad: Tensor, param: Tensor, weight_decay: float, maximize: bool) -> Tensor:
    ct = compute_dtype(param.dtype)
    d = grad.to(ct)
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * param.to(ct)
    return d


def _safe_inverse(n: Tensor) -> Tensor:
    return torch.where(n > 0, 1.0 / n, torch.zeros_like(n))


def sngm_reference(
    groups: Sequence[TensorGroup],
    *,
    norm: str = "global",
    skipped_steps: Optional[Tensor] = None,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """Apply one SNGM step in place; returns the global gradient norm (0-dim, on device).

    ``reduce_sumsq`` sees the sums of squares, [total] or [total, one per tensor], before they are
    used (fused.py hands the same vector to the same hook).
    """
    from .fused import finish_norm

    ds: List[List[Tuple[int, Tensor]]] = [
        [(i, _direction(g, p, grp.weight_decay, grp.maximize)) for i, p, g in present(grp)]
        for grp in groups
    ]
    flat = [d for dl in ds for _, d in dl]
    acc = accumulate_dtype([d.dtype for d in flat])
    sq = [d.square().sum().to(acc) for d in flat]
    total = torch.stack(sq).sum() if sq else torch.zeros((), dtype=acc, device=_device_of(groups))
    sumsq = torch.stack([total] + (sq if norm == "tensor" else []))
    if reduce_sumsq is not None:
        reduce_sumsq(sumsq)
    finite = torch.isfinite(sumsq[0])

    k = 0
    for grp, dl in zip(groups, ds):
        for i, d in dl:
            k += 1
            n = sumsq[k if norm == "tensor" else 0].sqrt()
            nd = d * _safe_inverse(n).to(d.dtype)
            p, buf = grp.params[i], grp.momentum_buffers[i]
            if grp.momentum != 0:
                u = grp.momentum * buf.to(d.dtype) + nd
                step = nd + grp.momentum * u if grp.nesterov else u
                buf.copy_(torch.where(finite, u.to(buf.dtype), buf))
            else:
                step = nd
            w = p.to(d.dtype) - grp.lr * step
            p.copy_(torch.where(finite, w.to(p.dtype), p))
    if skipped_steps is None:
        return sumsq[0].sqrt()
    return finish_norm(sumsq[0], skipped_steps)


def _device_of(groups: Sequence[TensorGroup]) -> torch.device:
    for grp in groups:
        for p in grp.params:
            return p.device
    return torch.device("cpu")
