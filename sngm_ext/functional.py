r"""The functional entry point: one SNGM step over lists of tensors, through a chosen backend.

.. math::
    d_i &= \pm g_i / s + \lambda w_i \qquad (- \text{ when maximize};\ s: \text{GradScaler's scale, else } 1) \\
    n &= \sqrt{\textstyle\sum_i \lVert d_i \rVert^2} \qquad \text{(one norm over every group)} \\
    u_i &\leftarrow \beta u_i + d_i / n \qquad (d_i / n := 0 \text{ when } n = 0) \\
    w_i &\leftarrow w_i - \eta u_i \qquad \text{(nesterov: } w_i - \eta (d_i / n + \beta u_i))

and when :math:`n` is not finite (or ``found_inf`` is set) nothing changes and the step counts as
skipped. Backends: see :mod:`sngm_ext.backends`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ._group import TensorGroup, check_hyperparameters, momentum_buffer_for, present
from .backends import BACKENDS, BackendUnavailable, resolve_backend  # noqa: F401
from .reference import _device_of, sngm_reference

NORMS = ("global", "tensor")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def sngm_groups(
    groups: Sequence[TensorGroup],
    *,
    norm: str = "global",
    backend: str = "auto",
    skipped_steps: Optional[Tensor] = None,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    plans=None,
    last_device: Optional[torch.device] = None,
    backward_sums=None,
) -> Tensor:
    """One SNGM step over several param groups sharing ONE norm; returns it (fp64 0-dim, on device).

    Params, grads and momentum buffers are read and written in place. Entries of
    ``momentum_buffers`` that are None (with momentum != 0) are created, and the lists are updated
    with the buffers to keep. ``reduce_sumsq`` (distributed.py) all-reduces the sums of squares
    between the two phases. ``grad_scale`` / ``found_inf``: ``torch.amp.GradScaler``'s tensors
    (grads still multiplied by ``grad_scale``; ``found_inf`` nonzero skips the step). ``plans``
    (a :class:`~sngm_ext.layout.PlanCache`) keeps chunk tables across calls; ``last_device``, the
    params' device at the previous call, spares a check per momentum buffer when they stayed.
    """
    _check_norm(norm)
    device = _device_of(groups)
    name, ops = resolve_backend(backend, device)
    if skipped_steps is None:
        skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
    if name == "reference":
        for grp in groups:
            for i, p, g in present(grp):
                if g.layout != torch.strided:
                    raise RuntimeError("SNGM does not support sparse gradients")
                if p.device != device:
                    raise ValueError(f"SNGM needs every param on one device, got {device} and "
                                     f"{p.device}")
        for grp in groups:
            if grp.momentum != 0:
                for i, p, g in present(grp):
                    buf = grp.momentum_buffers[i]
                    if (buf is None or buf.dtype != p.dtype or buf.device != p.device
                            or buf.shape != p.shape):
                        grp.momentum_buffers[i] = momentum_buffer_for(p, buf)
        return sngm_reference(groups, norm=norm, skipped_steps=skipped_steps,
                              reduce_sumsq=reduce_sumsq, grad_scale=grad_scale,
                              found_inf=found_inf)

    from .fused import fused_step
    from .layout import PlanCache

    if plans is None:  # a one-off call (the optimizer checks devices when params are added)
        devices = {p.device for grp in groups for p in grp.params}
        if len(devices) > 1:
            raise ValueError(f"SNGM needs every param on one device, got {sorted(map(str, devices))}")

    return fused_step(groups, ops, per_tensor=norm == "tensor", skipped_steps=skipped_steps,
                      plans=plans if plans is not None else PlanCache(), reduce_sumsq=reduce_sumsq,
                      grad_scale=grad_scale, found_inf=found_inf, device=device,
                      last_device=last_device, backward_sums=backward_sums)


def sngm(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Optional[Tensor]],
    *,
    lr: Union[float, Tensor],
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    norm: str = "global",
    backend: str = "auto",
    skipped_steps: Optional[Tensor] = None,
) -> Tensor:
    """Functional SNGM over one list of params (``torch.optim.sgd.sgd``'s counterpart).

    ``momentum_buffers`` is updated in place: None entries become the new buffers.
    """
    check_hyperparameters(lr, momentum, weight_decay, nesterov)
    grp = TensorGroup(
        list(params), list(grads), momentum_buffers,
        lr.reshape(()) if isinstance(lr, Tensor) else float(lr), float(momentum),
        float(weight_decay), bool(nesterov), bool(maximize),
    )
    return sngm_groups([grp], norm=norm, backend=backend, skipped_steps=skipped_steps)
