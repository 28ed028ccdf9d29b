r"""The functional entry point: one SNGM step over lists of tensors, through a chosen backend.

.. math::
    d_i &= \pm g_i + \lambda w_i \qquad (- \text{ when maximize}) \\
    n &= \sqrt{\textstyle\sum_i \lVert d_i \rVert^2} \qquad \text{(one norm over every group)} \\
    u_i &\leftarrow \beta u_i + d_i / n \qquad (d_i / n := 0 \text{ when } n = 0) \\
    w_i &\leftarrow w_i - \eta u_i \qquad \text{(nesterov: } w_i - \eta (d_i / n + \beta u_i))

and when :math:`n` is not finite nothing changes (the step counts as skipped).

Backends: ``"reference"`` (pure PyTorch, per tensor, any device), ``"triton"`` (fused Triton
kernels; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``"cpu"`` / ``"cuda"`` (the C++/CUDA
extension), ``"auto"`` (the fastest one that runs on the params' device; it warns once when it has
to fall back). An explicit backend that cannot run raises :class:`BackendUnavailable` saying why.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import TensorGroup, check_hyperparameters, present
from .reference import _device_of, sngm_reference

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")
NORMS = ("global", "tensor")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what would fix it."""


def _triton_ops(device: torch.device):
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            raise BackendUnavailable(
                "backend 'triton' on CPU tensors runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing sngm_ext (or use backend='cpu'/'reference')"
            )
    elif device.type != "cuda":
        raise BackendUnavailable(f"backend 'triton' supports CUDA tensors, not {device.type}")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"backend 'triton' needs the triton package ({e})") from e
    from ._ops import FusedOps

    return FusedOps("sngm_ext", "triton_")


def _native_ops(device: torch.device):
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"the native extension has no kernels for {device.type}")
    try:
        from .native import load_ops
    except ImportError as e:
        raise BackendUnavailable(f"sngm_ext was installed without its native layer ({e})") from e
    return load_ops(device.type)  # raises BackendUnavailable with the build's error


_warned: set = set()
_cache: dict = {}


def resolve_backend(backend: str, device: torch.device) -> Tuple[str, Optional[object]]:
    """(name, fused ops or None for the reference) of ``backend`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    key = (backend, device.type, os.environ.get("TRITON_INTERPRET"))
    if key in _cache:
        return _cache[key]
    if backend == "reference":
        out = ("reference", None)
    elif backend == "triton":
        out = ("triton", _triton_ops(device))
    elif backend in ("cpu", "cuda"):
        if device.type != backend:
            raise BackendUnavailable(f"backend {backend!r} cannot run on {device.type} tensors")
        out = (backend, _native_ops(device))
    else:
        out = _auto(device)
    _cache[key] = out
    return out


def _auto(device: torch.device):
    preferred = {"cuda": ["cuda", "triton"], "cpu": ["cpu"]}.get(device.type, [])
    reasons = []
    for name in preferred:
        try:
            ops = _triton_ops(device) if name == "triton" else _native_ops(device)
            return name, ops
        except BackendUnavailable as e:
            reasons.append(f"{name}: {e}")
    if preferred and device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            "sngm_ext: backend='auto' falls back to the slow 'reference' backend on "
            f"{device.type} ({'; '.join(reasons)})",
            RuntimeWarning,
            stacklevel=4,
        )
    return "reference", None


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def sngm_groups(
    groups: Sequence[TensorGroup],
    *,
    norm: str = "global",
    backend: str = "auto",
    skipped_steps: Optional[Tensor] = None,
    buckets=None,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """One SNGM step over several param groups sharing ONE norm; returns it (0-dim, on device).

    ``buckets`` (a :class:`sngm_ext.buckets.BucketSet` over every param of every group, in group
    order) lets the fused backends keep their flat buffers across steps; without it a fused backend
    copies the tensors into temporary buckets and back. Entries of ``momentum_buffers`` that are
    None (with momentum != 0) are created; all lists are updated in place with the tensors to keep.
    ``reduce_sumsq`` (distributed.py) all-reduces the sums of squares between the two phases.
    """
    _check_norm(norm)
    device = _device_of(groups)
    if buckets is None:  # buckets are built over one device; lists may hold anything
        devices = {p.device for grp in groups for p in grp.params}
        if len(devices) > 1:
            raise ValueError(f"SNGM needs every param on one device, got {sorted(map(str, devices))}")
    name, ops = resolve_backend(backend, device)
    if skipped_steps is None:
        skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
    if name == "reference":
        for grp in groups:
            for i, p, g in present(grp):
                if g.layout != torch.strided:
                    raise RuntimeError("SNGM does not support sparse gradients")
        for grp in groups:
            if grp.momentum != 0:
                for i, p, g in present(grp):
                    if grp.momentum_buffers[i] is None:
                        grp.momentum_buffers[i] = torch.zeros_like(p)
        return sngm_reference(
            groups, norm=norm, skipped_steps=skipped_steps, reduce_sumsq=reduce_sumsq
        )

    from .buckets import BucketSet, Pending
    from .fused import fused_step

    own = buckets is None
    if own:
        given_bufs = [list(g.momentum_buffers) for g in groups]
        buckets = BucketSet.build([g.params for g in groups], adopt=False)
    grad_norm = fused_step(
        buckets, groups, ops, per_tensor=norm == "tensor", skipped_steps=skipped_steps,
        reduce_sumsq=reduce_sumsq,
    )
    if own:  # temporary buckets: hand momentum back in the caller's own buffers where it had them
        pending = Pending()
        for grp, before in zip(groups, given_bufs):
            for i, p, g in present(grp):
                old, new = before[i], grp.momentum_buffers[i]
                if new is not None:
                    if old is not None:
                        pending.copy(old, new)
                        grp.momentum_buffers[i] = old
                    else:
                        grp.momentum_buffers[i] = new.clone()
        pending.apply()
    return grad_norm


def sngm(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Optional[Tensor]],
    *,
    lr: float,
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
        list(params), list(grads), momentum_buffers, float(lr), float(momentum),
        float(weight_decay), bool(nesterov), bool(maximize),
    )
    return sngm_groups([grp], norm=norm, backend=backend, skipped_steps=skipped_steps)
