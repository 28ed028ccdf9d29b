"""An independent float64 implementation of SNGM (Algorithm 1 of the paper plus weight decay,
maximize, nesterov and the per-tensor variant), in numpy, written from the paper, not the package."""

import math

import numpy as np


class Oracle:
    """state: one float64 array per param (u_0 = 0); step() applies Algorithm 1 once."""

    def __init__(self, params, groups):
        # params: list of float64 arrays; groups: list of (indices, hyper dict)
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.u = [np.zeros_like(p) for p in self.w]
        self.groups = groups

    def step(self, grads, norm="global"):
        """grads: list of float64 arrays or None (param skipped this step)."""
        d = {}
        for idx, h in self.groups:
            for i in idx:
                if grads[i] is None:
                    continue
                g = -grads[i] if h.get("maximize", False) else grads[i]
                d[i] = g + h.get("weight_decay", 0.0) * self.w[i]
        total = sum(float(np.sum(x * x)) for x in d.values())
        if not math.isfinite(total):
            return math.nan
        n_global = math.sqrt(total)
        for idx, h in self.groups:
            beta = h.get("momentum", 0.9)
            lr = h["lr"]
            for i in idx:
                if i not in d:
                    continue
                n = n_global if norm == "global" else math.sqrt(float(np.sum(d[i] * d[i])))
                nd = d[i] / n if n > 0 else np.zeros_like(d[i])
                self.u[i] = beta * self.u[i] + nd
                if h.get("nesterov", False):
                    self.w[i] = self.w[i] - lr * (nd + beta * self.u[i])
                else:
                    self.w[i] = self.w[i] - lr * self.u[i]
        return n_global
