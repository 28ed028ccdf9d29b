"""Pure-PyTorch SNGM, one tensor at a time: the readable oracle every other backend is held to.

It computes :class:`sngm_ext.SNGM`'s update rule (its docstring) the plain way, tensor by tensor,
over the lists a step's preparation made (prepare.py). With ``norm="tensor"`` each param uses its
own ``n_i = ||d_i||``. When the global sum of squares is not finite, or GradScaler's ``found_inf``
is set, nothing is written.

``d`` is computed in fp32 (fp64 for fp64 params). Squares are summed in fp64 as scaled_norm.py's
three additive rows, and ``d / n`` is ``d * (1 / n)`` taken in fp64 (with combine's power-of-two
scales where an fp64 gradient lies beyond ~1e+-150) and rounded once to the compute dtype: no
finite gradient of any dtype overflows or underflows the norm, whatever its scale. Momentum and
param maths run in the compute dtype and are rounded once to the param's dtype. No host sync: the
finite check is a device-side ``torch.where``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import scaled_norm
from ._group import TensorGroup, compute_dtype
from .prepare import Prepared
from .scaled_norm import ROWS


def _direction(grad: Tensor, param: Tensor, weight_decay: float, maximize: bool,
               grad_scale: Optional[Tensor]) -> Tensor:
    ct = compute_dtype(param.dtype)
    d = grad.to(ct)
    if grad_scale is not None:
        d = d * (1.0 / grad_scale.float()).to(ct)
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * param.to(ct)
    return d


def _safe_inverse(n: Tensor) -> Tensor:
    return torch.where(n > 0, 1.0 / n, torch.zeros_like(n))


def sngm_reference(
    prepared: Prepared,
    groups: Sequence[TensorGroup],
    *,
    device: torch.device,
    norm: str = "global",
    skipped_steps: Optional[Tensor] = None,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Tensor:
    """Apply one SNGM step in place over ``prepared`` (prepare.py: checked, momentum buffers
    made); returns the global gradient norm (fp64 0-dim, on device).

    ``reduce_sumsq`` sees the fp64 sums of squares, ``[3, 1]`` (the total) or ``[3, 1 + k]``
    (and one column per tensor in the lists' order), rows scaled_norm.py's med, big and small,
    before they are used (the fused backends hand the same tensor to the same hook).
    ``skipped_steps`` (int64 0-dim) grows by one when the step is skipped.
    """
    work: List[Tuple[TensorGroup, Tensor, Tensor, Optional[Tensor]]] = []  # (group, p, d, u)
    for lst in prepared.lists:
        grp = groups[lst.group_index]
        bufs = lst.bufs or [None] * len(lst.params)
        for p, g, u in zip(lst.params, lst.grads, bufs):
            work.append((grp, p, _direction(g, p, grp.weight_decay, grp.maximize, grad_scale), u))
    if work:  # [3, tensors]: each tensor's med, big and small sums
        per = torch.stack([torch.stack(row) for row in zip(*(scaled_norm.squares(d)
                                                              for _, _, d, _ in work))])
        total = per.sum(1)
    else:
        per = torch.zeros(ROWS, 0, dtype=torch.float64, device=device)
        total = torch.zeros(ROWS, dtype=torch.float64, device=device)
    if found_inf is not None:
        total = torch.cat([torch.where(found_inf.to(device) != 0, float("inf"), total[:1]),
                           total[1:]])
    sumsq = torch.cat([total[:, None], per], 1) if norm == "tensor" else total[:, None]
    if reduce_sumsq is not None:
        reduce_sumsq(sumsq)
    q, pre, post = scaled_norm.combine(sumsq)
    finite = torch.isfinite(q[0])
    inv = _safe_inverse(q.sqrt())
    # fp32/bf16/fp16 d: C(((d * pre) * inv) * post) is C(d * (inv * post)), one pass: where
    # pre = 1, post is a power of two (exact) unless d * inv * post lies far below C's smallest
    # value, and pre != 1 only when every such d is 0 (small fp64 sums alone; inv * pre may
    # overflow there, so 0 stands in for it). Two more passes of ResNet-50's fp32 tensors made
    # the reference step ~1.3x slower here.
    one_pass = torch.where(pre == 1, inv * post, torch.zeros_like(inv))

    for k, (grp, p, d, buf) in enumerate(work, start=1):
        col = k if norm == "tensor" else 0
        if d.dtype == torch.float64:  # ((d * pre) * inv) * post, each product rounded once
            nd = (d * pre[col]).mul_(inv[col]).mul_(post[col])
        else:
            nd = (d.double() * one_pass[col]).to(d.dtype)
        if grp.momentum != 0:
            u = grp.momentum * buf.to(d.dtype) + nd
            step = nd + grp.momentum * u if grp.nesterov else u
            buf.copy_(torch.where(finite, u.to(buf.dtype), buf))
        else:
            step = nd
        w = p.to(d.dtype) - grp.lr * step
        p.copy_(torch.where(finite, w.to(p.dtype), p))
    prepared.write_back()
    if skipped_steps is not None:
        skipped_steps.add_((~finite).to(skipped_steps.dtype))
    return scaled_norm.norm(sumsq[:, 0])
