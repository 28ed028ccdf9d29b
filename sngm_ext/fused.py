"""The two-phase fused step over the user's own tensors, shared by every kernel backend.

Per step: one ``sumsq`` and one ``update`` launch per (param group, dtype) list of the prepared
step (prepare.py), one ``finalize``: they grow with the number of lists, never with the number
of tensors (layout.py). Params, grads and momentum are read and written where they live; nothing
is re-pointed.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import scaled_norm
from ._group import TensorGroup
from ._ops import traced_hyper
from .layout import ACC_DTYPE, PlanCache, StepPlan
from .prepare import Prepared, StepList


def plan_for(plans: PlanCache, lists: Sequence[StepList], per_tensor: bool,
             device: torch.device) -> StepPlan:
    """The (cached) tables of these lists: keyed by group, dtype and sizes, never by pointers."""
    key = (per_tensor, device, tuple((lst.group_index, lst.params[0].dtype, tuple(lst.numels))
                                     for lst in lists))
    return plans.get(key, [lst.numels for lst in lists], per_tensor, device)


def fused_step(
    prepared: Prepared,
    ops,
    *,
    device: torch.device,
    tensor_groups: Sequence[TensorGroup],
    per_tensor: bool,
    skipped_steps: Tensor,
    plans: PlanCache,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backward_sums=None,
    lrs: Sequence[tuple],
) -> Tensor:
    """One SNGM step of ``prepared`` (the checked lists of ``tensor_groups``) through ``ops`` (a
    backend's FusedOps); returns the norm.

    ``device``: where the step runs (the params' device; a rank without grads still runs there).
    ``lrs[gi]``: group gi's (lr_tensor, lr) operands (_group.lr_operands).
    ``reduce_sumsq`` (an in-place all-reduce, say) sees the sums of squares between the phases
    (float64 [3, m]: rows med, big, small of scaled_norm.py, each additive).
    ``grad_scale`` / ``found_inf``: GradScaler's tensors (the grads are still scaled; a found inf
    skips the step on the device). ``backward_sums`` (backward_sums.py) may hold this step's
    partials already, summed by the grad hooks during backward.
    """
    lists, groups = prepared.lists, tensor_groups
    plan = plan_for(plans, lists, per_tensor, device)

    # With no weight decay anywhere the step does not depend on the grads' scale: a GradScaler's
    # power-of-two scale then cancels exactly, and the kernels need not unscale at all.
    kernel_scale = grad_scale
    if grad_scale is not None and all(groups[lst.group_index].weight_decay == 0 for lst in lists):
        kernel_scale = None
    fresh = backward_sums.fresh_lists(plan, lists, groups, grad_scale, kernel_scale, found_inf) \
        if backward_sums is not None else None
    traced = torch.compiler.is_compiling()
    hyper = [traced_hyper(0.0 if lrs[gi][0] is not None else lrs[gi][1], grp.momentum,
                          grp.weight_decay) for gi, grp in enumerate(groups)] if traced else None
    for li, lst in enumerate(lists):
        if fresh is not None and fresh[li]:
            continue  # the grad hooks wrote these partials during backward
        grp = groups[lst.group_index]
        if traced:
            ops.traced_sumsq(lst.params, lst.grads, plan.chunks[li], kernel_scale,
                             hyper[lst.group_index], grp.maximize, plan.partials,
                             plan.partial_offsets[li], ops.namespace)
            continue
        ops.sumsq(lst.params, lst.grads, plan.chunks[li], kernel_scale, grp.weight_decay,
                  grp.maximize, plan.partials, plan.partial_offsets[li])
    sumsq = plan.sumsq
    ops.finalize(plan.partials, plan.seg_ptr, found_inf, sumsq)
    if reduce_sumsq is not None:
        reduce_sumsq(sumsq)
    for li, lst in enumerate(lists):
        grp = groups[lst.group_index]
        lr_tensor, lr = lrs[lst.group_index]
        if traced:
            ops.traced_update(lst.params, lst.grads, lst.bufs, plan.chunks[li], sumsq,
                              kernel_scale, lr_tensor, hyper[lst.group_index], grp.nesterov,
                              grp.maximize, ops.namespace)
            continue
        ops.update(lst.params, lst.grads, lst.bufs, plan.chunks[li], sumsq, kernel_scale,
                   lr_tensor, lr, grp.momentum, grp.weight_decay, grp.nesterov, grp.maximize)
    prepared.write_back()
    if backward_sums is not None:
        backward_sums.stepped(plan, lists, groups)
    if reduce_sumsq is not None or any(lst.params[0].dtype == torch.float64 for lst in lists):
        total = sumsq[:, 0]  # the big and small rows may be in use
        norm = scaled_norm.norm(total)
        skipped_steps.add_(~scaled_norm.finite(total))
    else:  # they are 0: med is the square, its root the norm (each tiny op costs a few us)
        skipped_steps.add_(~torch.isfinite(plan.total))
        norm = plan.total.sqrt()
    if grad_scale is not None and kernel_scale is None:
        norm = norm / grad_scale.to(ACC_DTYPE)  # the norm of the unscaled gradient
    return norm
