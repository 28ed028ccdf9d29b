"""Phase 1 in the backward pass: each grad's partial sums of squares, taken as its hook moves it in.

With ``SNGM(..., norm_in_backward=True)`` the post-accumulate-grad hook that copies a fresh grad
into its bucket (buckets.py) also runs the backend's ``sumsq`` op over that tensor's chunks, while
the grad is still in cache, writing the very partials the step's own phase 1 would write: the same
chunk rows, the same kernel, so the same bits. Where the backend has ``copy_sumsq`` (the C++ CPU
one) the copy and the sum are one op that sums each chunk right after copying it, from L1/L2.
When every tensor's partials are fresh the step skips its ``sumsq`` launches and reads grads from
memory once (the update) instead of twice.

Whether the partials still describe the buckets is decided from the tensors' version counters,
which every in-place write through torch bumps (views share their base's counter): the hooks
record the versions after their own writes, and a step trusts the partials only if nothing else
wrote to the grads or params since (``clip_grad_norm_``, ``GradScaler.unscale_``, DDP's averaged
grads, ``zero_grad(set_to_none=False)``, a grad assigned by hand: each of these sends the step
back to computing phase 1 itself). What the counters cannot see is a write that bypasses them:
through ``.data`` or by native code outside the dispatcher; that is why the option is opt-in.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from torch import Tensor
from torch.autograd.graph import increment_version


class BackwardSums:
    """The hooks' side of phase 1 for one bucket: per-tensor chunk tables and freshness."""

    def __init__(self, bucket, sumsq_op, copy_sumsq_op, tables: List[Optional[Tensor]],
                 first_rows: List[int], partials: Tensor, hyper: Callable[[], Tuple[float, bool]]):
        self.bucket = bucket
        self.sumsq = sumsq_op
        self.copy_sumsq = copy_sumsq_op  # None where the backend has no fused copy
        self.tables = tables  # per tensor: its rows of the all-present chunk table (None: empty)
        self.first_rows = first_rows  # per tensor: where its partials start in `partials`
        self.partials = partials  # the all-present plan's partials (shared by every bucket)
        self.hyper = hyper  # the bucket's group's (weight_decay, maximize), read at hook time
        self.reset()

    def _param_versions(self) -> int:
        # An adopted param is a view of the bucket by its data only (``p.data = view``): it keeps a
        # version counter of its own. Counters only grow, so the sum moves iff one of them did.
        b = self.bucket
        return b.param._version + sum(p._version for p in b.params)

    def reset(self) -> None:
        """A step just ran (or the sums were just attached): nothing fresh, versions as they are."""
        self.fresh = [n == 0 for n in self.bucket.numels]  # empty tensors have nothing to sum
        self.broken = False
        self.used: Optional[Tuple[float, bool]] = None
        self.expect = self.bucket.grad._version  # p.grad *is* its view: one shared counter
        self.param_expect = self._param_versions()

    def _may_sum(self, grad_v: int, writes: int) -> Optional[Tuple[float, bool]]:
        """The group's (weight_decay, maximize) if tensor k's partials can be taken now, else None
        (and from then on none until the next step)."""
        if self.broken or grad_v - writes != self.expect:
            self.broken = True  # someone else wrote to the grads: the step does phase 1 itself
            return None
        hyper = self.hyper()
        if self.used is None:
            self.used = hyper
        elif self.used != hyper:  # weight_decay or maximize changed during backward
            self.broken = True
            return None
        return hyper

    def copy_in(self, k: int, g: Tensor, view: Tensor) -> None:
        """Move the fresh grad ``g`` into tensor ``k``'s view, summing it on the way where the
        backend fuses the two (one pass over the grad instead of two)."""
        table = self.tables[k]
        if self.copy_sumsq is None or table is None or not g.is_contiguous():
            view.copy_(g)
            self.after_write(k, 1)
            return
        b = self.bucket
        hyper = self._may_sum(b.grad._version, 0)
        if hyper is None:
            view.copy_(g)
            return
        self.copy_sumsq(g, b.grad, b.param, table, b.offsets[k], hyper[0], hyper[1], self.partials,
                        self.first_rows[k])
        increment_version(b.grad)  # a write like any other: counted as copy_ would count it
        self.fresh[k] = True
        self.expect = b.grad._version

    def after_write(self, k: int, writes: int) -> None:
        """Tensor ``k``'s grad just took ``writes`` in-place writes (1: the hook's copy, or
        autograd accumulating into the view); sum its chunks if nothing else wrote meanwhile."""
        grad_v = self.bucket.grad._version
        hyper = self._may_sum(grad_v, writes)
        if hyper is None:
            return
        table = self.tables[k]
        if table is not None:
            b = self.bucket
            self.sumsq(b.param, b.grad, table, hyper[0], hyper[1], self.partials, self.first_rows[k])
        self.fresh[k] = True
        self.expect = grad_v  # our op writes partials only

    def ready(self, weight_decay: float, maximize: bool) -> bool:
        """True when every tensor's partials are fresh and describe the bucket as it is now.

        Params count only with weight decay (d = g + wd * w), and any write to them since the last
        step counts, even one before backward: read once per step, not in every hook.
        """
        return (not self.broken and all(self.fresh) and self.bucket.grad._version == self.expect
                and self.used == (weight_decay, maximize)
                and (weight_decay == 0 or self._param_versions() == self.param_expect))
