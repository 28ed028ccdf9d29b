"""LARS as the SNGM paper writes it (Section 4.2, after You et al. 2020, the paper's ref. [24]).

Kept in large_batch_study/, not in the package: it is a baseline. Per block s (here: per parameter tensor)

    d^(s) = g^(s) + weight_decay * w^(s)
    m^(s) = momentum * m^(s) + d^(s)                  (ref. [24] normalizes the momentum)
    w^(s) = w^(s) - lr * phi(||w^(s)||) * m^(s) / ||m^(s)||

With momentum 0 and no weight decay this is the paper's Eq. (9) exactly:
w^(s) <- w^(s) - lr * phi(||w^(s)||) * g^(s) / ||g^(s)||. (Ref. [24] writes
m = b*m + (1-b)*d; the factor (1-b) cancels in m/||m||.)

phi: ``"identity"`` (phi(z) = z, the default) or ``"clip"`` (phi(z) = min(max(z, gamma_l), gamma_u)),
the two scale functions the paper says ref. [24] recommends.

Where ||w^(s)|| = 0 or ||m^(s)|| = 0 the formula is 0/0-like or freezes the tensor for good (with
phi(z) = z a tensor initialized to zero, e.g. a BatchNorm shift, would never move); there this
implementation takes the plain momentum step ``w -= lr * m`` (trust ratio 1), the convention of the
public LARS/LAMB implementations. ``phi="clip"`` never needs it for ||w|| = 0.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 phi: str = "identity", gamma_l: float = 1e-3, gamma_u: float = 10.0):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("invalid LARS hyper-parameters")
        if phi not in ("identity", "clip"):
            raise ValueError("phi must be 'identity' or 'clip'")
        if phi == "clip" and not 0 < gamma_l <= gamma_u:
            raise ValueError("need 0 < gamma_l <= gamma_u")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, phi=phi,
                                      gamma_l=gamma_l, gamma_u=gamma_u))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if beta:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d
                    else:
                        buf.mul_(beta).add_(d)
                    d = buf
                w_norm = torch.linalg.vector_norm(p)
                d_norm = torch.linalg.vector_norm(d)
                if group["phi"] == "clip":
                    scale = w_norm.clamp(group["gamma_l"], group["gamma_u"])
                else:
                    scale = w_norm
                ok = (w_norm > 0) & (d_norm > 0)
                # trust ratio phi(||w||)/||m|| where defined, else 1 (plain step)
                ratio = torch.where(ok, scale / torch.where(ok, d_norm, torch.ones_like(d_norm)),
                                    torch.ones_like(d_norm))
                if group["phi"] == "clip":
                    ratio = torch.where(d_norm > 0, scale / d_norm.clamp_min(1e-30), ratio)
                p.add_(d * ratio, alpha=-lr)
        return loss
