"""The two-phase fused step over the user's own tensors, shared by every kernel backend.

Per step: one ``sumsq`` and one ``update`` launch per (param group, dtype) list, one ``finalize``:
they grow with the number of lists, never with the number of tensors (layout.py). Params, grads
and momentum are read and written where they live; nothing is re-pointed. A param whose tensors
the kernels cannot walk in one memory order (non-contiguous, and not one dense layout shared by
param, grad and momentum) goes through a contiguous copy in and out, that tensor alone.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ._group import TensorGroup, momentum_buffer_for
from .layout import ACC_DTYPE, PlanCache, StepPlan

_CHANNELS_LAST = (torch.channels_last, torch.channels_last_3d)
_dtype = attrgetter("dtype")
_numel = Tensor.numel
_contiguous = Tensor.is_contiguous


def _one_layout(p: Tensor, g: Tensor, u: Optional[Tensor]) -> bool:
    """True when p, g (and u), not all contiguous, can still be walked in memory order as they
    are: one dense channels-last layout with identical strides (conv weights and their grads)."""
    if p.dim() not in (4, 5):
        return False
    fmt = _CHANNELS_LAST[p.dim() - 4]
    stride = p.stride()
    return (p.is_contiguous(memory_format=fmt) and g.stride() == stride
            and (u is None or u.stride() == stride))


def _check_grad(p: Tensor, g: Tensor) -> None:
    if g.layout is not torch.strided:
        raise RuntimeError("SNGM does not support sparse gradients")
    if g.shape != p.shape or g.dtype is not p.dtype or g.device != p.device:
        raise ValueError(
            f"SNGM: a param of shape {tuple(p.shape)}, {p.dtype} on {p.device} has a grad of "
            f"shape {tuple(g.shape)}, {g.dtype} on {g.device}"
        )


class StepList:
    """The present tensors of one (param group, dtype), as the kernels receive them."""

    __slots__ = ("group_index", "params", "grads", "bufs", "numels", "index")

    def __init__(self, group_index: int):
        self.group_index = group_index
        self.params: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.bufs: List[Tensor] = []
        self.numels: List[int] = []
        self.index: List[int] = []  # position of each tensor in its group's param list


def _uniform_group(gi: int, grp: TensorGroup) -> Optional[StepList]:
    """The group as one kernel list when it is the common case: every param has a grad, one
    dtype, the same size for param, grad and momentum, everything contiguous (and the params where
    they were last step: the caller knows). Checked with C-level maps (a few tens of ns per tensor, where a Python loop over
    the same checks costs ~0.6 us): this is what a step costs per tensor. None otherwise."""
    params, grads = grp.params, grp.grads
    if not params or any(map(is_, grads, repeat(None))):
        return None
    dt = params[0].dtype
    if not (all(map(is_, map(_dtype, params), repeat(dt)))
            and all(map(is_, map(_dtype, grads), repeat(dt)))):
        return None
    numels = list(map(_numel, params))
    if numels != list(map(_numel, grads)):
        return None
    if not (all(map(_contiguous, params)) and all(map(_contiguous, grads))):
        return None  # sparse grads too: they are not contiguous
    bufs = []
    if grp.momentum != 0:
        bufs = grp.momentum_buffers
        if (any(map(is_, bufs, repeat(None))) or not all(map(is_, map(_dtype, bufs), repeat(dt)))
                or list(map(_numel, bufs)) != numels or not all(map(_contiguous, bufs))):
            return None
    lst = StepList(gi)
    lst.params, lst.grads, lst.bufs = list(params), list(grads), list(bufs)
    lst.numels, lst.index = numels, range(len(params))
    return lst


def collect_lists(groups: Sequence[TensorGroup], last_device: Optional[torch.device] = None):
    """Check this step's tensors and sort them into kernel lists; writes nothing a caller can see.

    Returns ``(lists, copies, device)``: ``copies`` are (user tensor, contiguous stand-in) pairs to
    copy back after the update. Entries of ``momentum_buffers`` that are None (momentum != 0), or
    of another dtype or device than their param (after ``model.double()`` or ``.to()``), are
    replaced by the buffers to keep.

    This runs for every tensor on every step, so the common case (a grad of the param's dtype and
    size, everything contiguous, the params where they were last step: ``last_device``) costs a
    few attribute reads; anything else takes the full checks. The native ops check dtypes, sizes,
    devices and layouts again in C++ before they write.
    """
    lists: List[StepList] = []
    copies: List[tuple] = []
    device = None
    moved = True  # check every momentum buffer's device (the first step, or the params moved)
    for gi, grp in enumerate(groups):
        if device is None and grp.params and grp.params[0].device == last_device:
            moved = False  # the params stayed: their momentum buffers did too
        if not moved:
            fast = _uniform_group(gi, grp)
            if fast is not None:
                device = last_device
                lists.append(fast)
                continue
        has_mom = grp.momentum != 0
        by_dtype = {}
        bufs = grp.momentum_buffers
        lst = None
        last_dtype = None
        for i, (p, g) in enumerate(zip(grp.params, grp.grads)):
            if g is None:
                continue
            dt = p.dtype
            n = p.numel()
            if g.dtype is not dt or g.numel() != n:
                _check_grad(p, g)
            if device is None:
                _check_grad(p, g)
                device = p.device
                moved = device != last_device
            u = None
            if has_mom:
                u = bufs[i]
                if (u is None or u.dtype is not dt or u.numel() != n
                        or (moved and u.device != device)):
                    u = bufs[i] = momentum_buffer_for(p, u)
            if dt is not last_dtype:
                lst = by_dtype.get(dt)
                if lst is None:
                    lst = by_dtype[dt] = StepList(gi)
                    lists.append(lst)
                last_dtype = dt
            if not (p.is_contiguous() and g.is_contiguous() and (u is None or u.is_contiguous())):
                _check_grad(p, g)  # sparse grads land here: they are not contiguous
                if p.device != device:
                    raise ValueError(
                        f"SNGM needs every param on one device, got {device} and {p.device}")
                if not _one_layout(p, g, u):
                    pc = p.contiguous()
                    if pc is not p:
                        copies.append((p, pc))
                    g = g.contiguous()
                    if u is not None and not u.is_contiguous():
                        uc = u.contiguous()
                        copies.append((u, uc))
                        u = uc
                    p = pc
            lst.params.append(p)
            lst.grads.append(g)
            if u is not None:
                lst.bufs.append(u)
            lst.numels.append(n)
            lst.index.append(i)
    return lists, copies, device


def _lr_args(lr, device: torch.device):
    """(lr_tensor, lr) for the update op: a tensor lr on the params' device is read there by the
    kernels (no host sync: what a captured CUDA graph needs); one on the CPU is read here (no sync
    either)."""
    if not isinstance(lr, Tensor):
        return None, lr
    if lr.device == device:
        return lr, 0.0
    if lr.device.type == "cpu":
        return None, lr.item()
    raise ValueError(f"SNGM: lr is a tensor on {lr.device} but the params are on {device}")


def plan_for(plans: PlanCache, lists: Sequence[StepList], per_tensor: bool,
             device: torch.device) -> StepPlan:
    """The (cached) tables of these lists: keyed by group, dtype and sizes, never by pointers."""
    key = (per_tensor, device, tuple((lst.group_index, lst.params[0].dtype, tuple(lst.numels))
                                     for lst in lists))
    return plans.get(key, [lst.numels for lst in lists], per_tensor, device)


def fused_step(
    groups: Sequence[TensorGroup],
    ops,
    *,
    per_tensor: bool,
    skipped_steps: Tensor,
    plans: PlanCache,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
    last_device: Optional[torch.device] = None,
    backward_sums=None,
) -> Tensor:
    """One SNGM step of ``groups`` through ``ops`` (a backend's FusedOps); returns the norm.

    ``reduce_sumsq`` (an in-place all-reduce, say) sees the sums of squares between the phases.
    ``grad_scale`` / ``found_inf``: GradScaler's tensors (the grads are still scaled; a found inf
    skips the step on the device). ``backward_sums`` (backward_sums.py) may hold this step's
    partials already, summed by the grad hooks during backward.
    """
    lists, copies, found_device = collect_lists(groups, last_device)
    device = found_device or device or torch.device("cpu")
    lrs = [_lr_args(grp.lr, device) for grp in groups]
    plan = plan_for(plans, lists, per_tensor, device)

    # With no weight decay anywhere the step does not depend on the grads' scale: a GradScaler's
    # power-of-two scale then cancels exactly, and the kernels need not unscale at all.
    kernel_scale = grad_scale
    if grad_scale is not None and all(groups[lst.group_index].weight_decay == 0 for lst in lists):
        kernel_scale = None
    fresh = backward_sums.fresh_lists(plan, lists, groups, grad_scale, kernel_scale, found_inf) \
        if backward_sums is not None else None
    for li, lst in enumerate(lists):
        if fresh is not None and fresh[li]:
            continue  # the grad hooks wrote these partials during backward
        grp = groups[lst.group_index]
        ops.sumsq(lst.params, lst.grads, plan.chunks[li], kernel_scale, grp.weight_decay,
                  grp.maximize, plan.partials, plan.partial_offsets[li])
    sumsq = torch.empty(plan.n_sumsq, dtype=ACC_DTYPE, device=device)
    ops.finalize(plan.partials, plan.seg_ptr, found_inf, sumsq)
    if reduce_sumsq is not None:
        reduce_sumsq(sumsq)
    for li, lst in enumerate(lists):
        grp = groups[lst.group_index]
        lr_tensor, lr = lrs[lst.group_index]
        ops.update(lst.params, lst.grads, lst.bufs, plan.chunks[li], sumsq, kernel_scale,
                   lr_tensor, lr, grp.momentum, grp.weight_decay, grp.nesterov, grp.maximize)
    if copies:
        torch._foreach_copy_([c[0] for c in copies], [c[1] for c in copies])
    if backward_sums is not None:
        backward_sums.stepped(plan, lists, groups)
    skipped_steps.add_((~torch.isfinite(sumsq[0])).to(skipped_steps.dtype))
    norm = sumsq[0].sqrt()
    if grad_scale is not None and kernel_scale is None:
        norm = norm / grad_scale.to(ACC_DTYPE)  # the norm of the unscaled gradient
    return norm
