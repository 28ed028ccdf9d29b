"""The two-phase fused step over flat buckets, shared by every kernel backend (Triton, C++, CUDA).

Launches per step: one ``sumsq`` and one ``update`` per bucket, one ``finalize``: they grow with
the number of (param group, dtype) pairs, never with the number of tensors.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ._group import TensorGroup
from ._ops import FusedOps
from .buckets import BucketSet, Pending


def fused_step(
    buckets: BucketSet,
    groups: Sequence[TensorGroup],
    ops: FusedOps,
    *,
    per_tensor: bool,
    skipped_steps: Tensor,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """One SNGM step of ``groups`` through ``buckets`` (built over the same groups' params).

    On return the entries of ``groups[g].grads`` / ``.momentum_buffers`` are the tensors the caller
    should keep (views of the buckets where the param is one), as torch.optim's functional API
    hands back new momentum buffers in its list. ``reduce_sumsq`` (an in-place all-reduce, say)
    sees the sums of squares between the two phases.
    """
    pending = Pending()
    presents = [b.sync(groups[b.group_index], pending) for b in buckets.buckets]
    pending.apply()  # every bucket checked: now write

    plan = buckets.plan(presents, per_tensor)
    sumsq = torch.empty(plan.n_sumsq, dtype=plan.acc_dtype, device=buckets.device)
    launched = 0
    for b, chunks, off in zip(buckets.buckets, plan.chunks, plan.partial_offsets):
        if chunks is not None:
            grp = groups[b.group_index]
            if plan.full and b.sums is not None and b.sums.ready(grp.weight_decay, grp.maximize):
                continue  # the grad hooks wrote these partials during backward (backward_sums.py)
            ops.sumsq(b.param, b.grad, chunks, grp.weight_decay, grp.maximize, plan.partials, off)
            launched += 1
    buckets.steps += 1
    buckets.sums_steps += plan.full and launched == 0 and buckets.sums_backend is not None
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

    pending = Pending()
    for b, present in zip(buckets.buckets, presents):
        b.write_back(present, pending)
    pending.apply()
    for b in buckets.buckets:
        if b.sums is not None:
            b.sums.reset()  # the next backward's hooks start over
    return finish_norm(sumsq[0], skipped_steps)


def finish_norm(total_sumsq: Tensor, skipped_steps: Tensor) -> Tensor:
    """The global norm from the global sum of squares, counting a non-finite one as skipped."""
    skipped_steps.add_((~torch.isfinite(total_sumsq)).to(skipped_steps.dtype))
    return total_sumsq.sqrt()
