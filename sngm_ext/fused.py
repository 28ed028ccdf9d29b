"""The two-phase fused step over flat buckets, shared by every kernel backend (Triton, C++, CUDA).

Launches per step: one ``sumsq`` and one ``update`` per bucket, one ``finalize``: they grow with
the number of (param group, dtype) pairs, never with the number of tensors.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import TensorGroup
from ._ops import FusedOps
from .buckets import BucketSet


def fused_step(
    buckets: BucketSet,
    groups: Sequence[TensorGroup],
    ops: FusedOps,
    *,
    per_tensor: bool,
    skipped_steps: Tensor,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """One SNGM step of ``groups`` (the present params of each param group) through ``buckets``.

    On return the entries of ``groups[g].grads`` / ``.momentum_buffers`` are the tensors the caller
    should keep (views of the buckets where the param is one), as torch.optim's functional API
    hands back new momentum buffers in its list. ``reduce_sumsq`` (an in-place all-reduce, say)
    sees the sums of squares between the two phases.
    """
    given: Dict[int, Tuple[int, int]] = {}
    for gi, grp in enumerate(groups):
        for k, p in enumerate(grp.params):
            given[id(p)] = (gi, k)

    dst: List[Tensor] = []
    src: List[Tensor] = []
    presents = []
    for b in buckets.buckets:  # before anything is written: a changed layout means a rebuild
        b.check_layout()
    for b in buckets.buckets:
        grp = groups[b.group_index]
        slots = [given.get(id(p)) for p in b.params]
        grads = [grp.grads[s[1]] if s else None for s in slots]
        bufs: Optional[List[Optional[Tensor]]] = None
        if grp.momentum != 0:
            bufs = [grp.momentum_buffers[s[1]] if s else None for s in slots]
        present, new_grads, new_bufs = b.sync(grads, bufs, dst, src)
        presents.append(present)
        for s, g, m in zip(slots, new_grads, new_bufs):
            if s:
                grp.grads[s[1]] = g
                grp.momentum_buffers[s[1]] = m
    if dst:
        torch._foreach_copy_(dst, src)

    plan = buckets.plan(presents, per_tensor)
    sumsq = torch.empty(plan.n_sumsq, dtype=plan.acc_dtype, device=buckets.device)
    for b, chunks, off in zip(buckets.buckets, plan.chunks, plan.partial_offsets):
        if chunks is not None:
            grp = groups[b.group_index]
            ops.sumsq(b.param, b.grad, chunks, grp.weight_decay, grp.maximize, plan.partials, off)
    ops.finalize(plan.partials, plan.seg_ptr, sumsq)
    if reduce_sumsq is not None:
        reduce_sumsq(sumsq)
    for b, chunks in zip(buckets.buckets, plan.chunks):
        if chunks is not None:
            grp = groups[b.group_index]
            mom = b.momentum if grp.momentum != 0 else None
            ops.update(
                b.param, b.grad, mom, chunks, sumsq, grp.lr, grp.momentum, grp.weight_decay,
                grp.nesterov, grp.maximize,
            )

    dst, src = [], []
    for b, present in zip(buckets.buckets, presents):
        b.write_back(present, dst, src)
    if dst:
        torch._foreach_copy_(dst, src)
    return finish_norm(sumsq[0], skipped_steps)


def finish_norm(total_sumsq: Tensor, skipped_steps: Tensor) -> Tensor:
    """The global norm from the global sum of squares, counting a non-finite one as skipped."""
    skipped_steps.add_((~torch.isfinite(total_sumsq)).to(skipped_steps.dtype))
    return total_sumsq.sqrt()
