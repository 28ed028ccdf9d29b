"""SNGM in plain PyTorch ``_foreach`` ops: what a user could write without sngm_ext.

The baseline the benchmark holds sngm_ext's fused step against. One global norm over every param
of every group, then the normalized momentum update, all multi-tensor ops and no host sync:

    d    = (maximize ? -g : g) + weight_decay * w          _foreach_add (a new list)
    n    = || stack(_foreach_norm(d)) ||                   one 0-dim tensor on the device
    d   *= (n > 0 ? 1 / n : 0)                             _foreach_mul_ by that tensor
    u    = momentum * u + d                                _foreach_mul_, _foreach_add_
    w   -= lr * u          (nesterov: lr * (d + momentum * u))

Unlike sngm_ext it does not skip a step whose norm is not finite (that needs a sync or a masked
write per tensor), and it computes in the params' dtype (sngm_ext rounds once from fp32).
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor
from torch.optim import Optimizer


class ForeachSNGM(Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, maximize: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, defaults)
        self.grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, params, directions); directions are new tensors, never the grads
        all_d: List[Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            if group["weight_decay"] != 0:
                d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            elif group["maximize"]:
                d = list(grads)
            else:
                d = None  # the grads themselves: scaled into a new list below
            work.append((group, params, grads, d))
            all_d += d if d is not None else grads
        if not all_d:
            return loss
        # per-tensor norms accumulated and returned in fp32 (fp64 where a param is fp64), also for
        # bf16/fp16 params
        acc = torch.float64 if any(d.dtype == torch.float64 for d in all_d) else torch.float32
        norms = torch._foreach_norm(all_d, 2, dtype=acc)
        n = torch.linalg.vector_norm(torch.stack(norms))
        inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
        for group, params, grads, d in work:
            if d is None:
                d = torch._foreach_mul(grads, inv)
            else:
                torch._foreach_mul_(d, inv)
            mom = group["momentum"]
            if mom != 0:
                bufs = []
                for p in params:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(st["momentum_buffer"])
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, d)
                if group["nesterov"]:
                    torch._foreach_add_(d, bufs, alpha=mom)
                    upd = d
                else:
                    upd = bufs
            else:
                upd = d
            torch._foreach_add_(params, upd, alpha=-group["lr"])
        self.grad_norm = n
        return loss
