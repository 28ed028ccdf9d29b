"""Flat parameter buckets: the params, grads and momentum of one (group, dtype) in one buffer each.

Every tensor is a view into its bucket, so a fused backend walks a whole bucket with one launch per
phase whatever the number of tensors. Segments start at multiples of ``ALIGN`` elements (zero
padding between them): 16 elements keep every segment 16-byte aligned for fp16 up to fp64, which is
what lets the kernels use 128-bit loads (DESIGN.md: Triton emits none under a mask whose bound is
not a multiple of 16). The padding is zero in params, grads and momentum and stays zero through an
update, so it never changes a norm.

A step walks a *chunk table* rather than the raw buffer: (start, length, segment) rows of at most
``CHUNK`` elements that never cross a tensor. Only tensors whose grad is present this step are
listed, which is how a param with ``grad is None`` is skipped exactly (no weight decay, no momentum
decay, no part in the norm) without touching its memory; the segment column picks the sum of squares a
chunk's norm comes from (index 0: the global one; 1 + k: tensor k's for ``norm="tensor"``). Tables are built on the host
and cached per pattern of present grads, so a steady training loop uploads them once.

Views break in ordinary use: autograd hands out a fresh ``.grad`` after ``zero_grad()`` (torch's
default ``set_to_none=True``), ``load_state_dict`` brings new momentum tensors, ``p.data = t`` moves a
param. :meth:`Bucket.sync` finds each of those (a data pointer compare per tensor), copies the values
into the bucket with one ``_foreach_copy_`` and re-points the tensor at its view. Params that do not
own their storage (non-contiguous, a slice of a larger tensor) are never re-pointed: their values
are copied in before the step and back after it, so whatever else shares their memory still does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import accumulate_dtype

if TYPE_CHECKING:
    from .backward_sums import BackwardSums

ALIGN = 16
# One partial sum per CHUNK elements. 4096 fp32 = 16 KiB per tensor read per program: large enough
# that a launch over ResNet-50 (25.6M params) has ~6.3k programs and a 6.3k-entry partials buffer,
# small enough that a 2-core CPU or a 132-SM GPU stays balanced. Kernels use it as their BLOCK.
CHUNK = 4096


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _storage_refs(t: Tensor) -> int:
    """How many tensors (and storage wrappers) hold ``t``'s storage; 0 where torch cannot say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count(t.untyped_storage()._cdata) if use_count is not None else 0


# A tensor alone with its storage, as counted while a wrapper of the storage is being asked.
_ALONE = _storage_refs(torch.empty(1))


def owns_storage(t: Tensor) -> bool:
    """True when ``t`` is the only thing its storage holds, so re-pointing it loses no aliasing.

    A tensor that spans its whole storage may still share it with another tensor object: the flat
    buffer it was cut from (ZeroRedundancyOptimizer's ``parameters_as_bucket_view``, DDP's
    ``gradient_as_bucket_view`` with one param in a bucket); the storage's use count tells.
    """
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_contiguous():
        return False
    if t.storage_offset() != 0:
        return False
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    return _storage_refs(t) <= _ALONE


class LayoutChanged(RuntimeError):
    """A param changed shape, dtype or device since the bucket was built: build the buckets again."""


class Bucket:
    """Params of one param group that share a dtype (and the optimizer's one device).

    ``index[k]`` is the position of ``params[k]`` in its group's param list.
    """

    def __init__(self, group_index: int, index: Sequence[int], params: Sequence[Tensor],
                 adopt: bool = True):
        self.group_index = group_index
        self.index: List[int] = list(index)
        self.params: List[Tensor] = list(params)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets: List[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(n, ALIGN)
        self.numel = total
        kw = dict(dtype=self.dtype, device=self.device)
        self.param = torch.zeros(total, **kw)
        self.grad = torch.zeros(total, **kw)
        self.momentum: Optional[Tensor] = None
        self.param_views = self._views(self.param)
        self.param_ptrs = [v.data_ptr() for v in self.param_views]
        self.grad_views = self._views(self.grad)
        self.momentum_views: Optional[List[Tensor]] = None
        # adopted[k]: params[k] *is* its view (p.data was re-pointed); else copied in and out.
        self.adopted: List[bool] = []
        self.hooks: List[Optional[object]] = []
        self.fired: List[bool] = [False] * len(self.params)  # the hook moved a grad since the last step
        self.sums: Optional["BackwardSums"] = None  # phase 1 in the hooks (norm_in_backward)
        with torch.no_grad():
            for k, (p, v) in enumerate(zip(self.params, self.param_views)):
                v.copy_(p.detach())
                own = adopt and owns_storage(p) and p.numel() > 0
                if own:
                    p.data = v
                self.adopted.append(own)
                self.hooks.append(self._hook(k) if own and p.requires_grad else None)

    def _hook(self, k: int):
        """Move a fresh grad into the bucket as soon as backward has accumulated it.

        After ``zero_grad(set_to_none=True)`` (torch's default) autograd allocates a new ``.grad``
        every backward; copying it here, while it is still in cache, and pointing ``p.grad`` at the
        view frees it at once (one grad's memory, not two) and leaves the step nothing to gather.
        Later accumulations (gradient accumulation, ``no_sync``) then land in the view in place.
        The step's own checks do not rely on this: a grad that is not the view is still copied.
        """
        bucket = weakref.ref(self)
        view = self.grad_views[k]

        def hook(p):
            g = p.grad
            b = bucket()
            if g is None or b is None or g.requires_grad:
                return
            if g is view:  # autograd accumulated into the view in place: one write
                if b.sums is not None:
                    b.sums.after_write(k, 1)
                return
            if g.layout != torch.strided or g.shape != view.shape or g.dtype != view.dtype:
                return  # left for the step to refuse or to rebuild over
            with torch.no_grad():
                if b.sums is not None:
                    b.sums.copy_in(k, g, view)
                else:
                    view.copy_(g)
            p.grad = view
            b.fired[k] = True

        return self.params[k].register_post_accumulate_grad_hook(hook)

    def release(self) -> None:
        """Remove the grad hooks (the bucket is being replaced)."""
        for k, h in enumerate(self.hooks):
            if h is not None:
                h.remove()
                self.hooks[k] = None

    def _views(self, flat: Tensor) -> List[Tensor]:
        return [flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def ensure_momentum(self) -> List[Tensor]:
        if self.momentum is None:
            self.momentum = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.momentum_views = self._views(self.momentum)
        return self.momentum_views

    def _check_layout(self, k: int) -> None:
        p, s = self.params[k], self.shapes[k]
        if p.shape != s or p.dtype != self.dtype or p.device != self.device:
            raise LayoutChanged(
                f"a param changed from {tuple(s)} {self.dtype} on {self.device} to "
                f"{tuple(p.shape)} {p.dtype} on {p.device}"
            )

    def sync(self, grp, pending: "Pending") -> Tuple[bool, ...]:
        """Find what this step must copy into the bucket; returns which params take part.

        ``grp`` is the bucket's group (a TensorGroup over all its params, None grads for those
        sitting out). Nothing is written: copies, zero-fills and re-pointings go to ``pending``,
        carried out once every bucket has been checked, so a refused step changes nothing. Entries
        of ``grp.grads`` / ``grp.momentum_buffers`` are replaced by the bucket views the caller
        should keep. In a steady training loop every test below is an identity or pointer compare.
        """
        grads, bufs = grp.grads, grp.momentum_buffers
        mviews = self.ensure_momentum() if grp.momentum != 0 else None
        present = []
        for k, i in enumerate(self.index):
            g = grads[i]
            if g is None:
                present.append(False)
                continue
            present.append(True)
            if self.numels[k] == 0:  # nothing to copy; an (empty) momentum buffer all the same
                if mviews is not None:
                    bufs[i] = mviews[k]
                continue
            p = self.params[k]
            adopted = self.adopted[k]
            if not adopted or p.data_ptr() != self.param_ptrs[k]:
                # Copied in every step, or `p.data = t` moved it off its view.
                self._check_layout(k)
                pending.copy(self.param_views[k], p.detach())
                if adopted:
                    if owns_storage(p):
                        pending.repoint.append((p, self.param_views[k]))
                    else:
                        self.adopted[k] = adopted = False
            gv = self.grad_views[k]
            if g is not gv:
                if g.layout != torch.strided:
                    raise RuntimeError("SNGM does not support sparse gradients")
                if g.shape != gv.shape:
                    raise LayoutChanged(f"a grad of shape {tuple(g.shape)} for {tuple(gv.shape)}")
                if g.data_ptr() != gv.data_ptr():
                    pending.copy(gv, g)
                if adopted:
                    grads[i] = gv
                    if self.fired[k] and self.hooks[k] is not None:
                        # The hook moved this step's grad, yet p.grad is elsewhere again: some
                        # other owner re-points it (DDP's gradient_as_bucket_view). Stop copying
                        # in backward; the step gathers instead.
                        self.hooks[k].remove()
                        self.hooks[k] = None
            self.fired[k] = False
            if mviews is not None:
                mv = mviews[k]
                b = bufs[i]
                if b is not mv:
                    if b is None:
                        pending.zero.append(mv)
                    elif b.data_ptr() != mv.data_ptr():
                        pending.copy(mv, b)
                    bufs[i] = mv
        return tuple(present)

    def write_back(self, present: Sequence[bool], pending: "Pending") -> None:
        """Params that are not views of the bucket get their updated values copied back."""
        for k, p in enumerate(self.params):
            if present[k] and not self.adopted[k] and self.numels[k]:
                pending.copy(p.detach(), self.param_views[k])


    def chunk_rows(self, present: Sequence[bool], first_segment: int, per_tensor: bool):
        """(start, length, segment) rows for the present tensors, and the chunk count per segment.

        With ``per_tensor`` every present tensor is a segment (numbered from ``first_segment``),
        an empty one too, so that segment numbers agree across ranks that hold uneven shards;
        otherwise all rows use segment 0, the global sum.
        """
        starts: List[int] = []
        lens: List[int] = []
        segs: List[int] = []
        seg_chunks: List[int] = []
        seg = first_segment
        for off, n, here in zip(self.offsets, self.numels, present):
            if not here:
                continue
            end = off + _round_up(n, ALIGN)
            cs = list(range(off, end, CHUNK))
            starts += cs
            lens += [min(CHUNK, end - c) for c in cs]
            segs += [seg if per_tensor else 0] * len(cs)
            if per_tensor:
                seg_chunks.append(len(cs))
                seg += 1
        return starts, lens, segs, seg_chunks


class Pending:
    """Writes collected while checking a step, issued together: one ``_foreach_copy_``, one
    ``_foreach_zero_``, then the ``p.data`` re-pointings."""

    def __init__(self):
        self.dst: List[Tensor] = []
        self.src: List[Tensor] = []
        self.zero: List[Tensor] = []
        self.repoint: List[Tuple[Tensor, Tensor]] = []

    def copy(self, dst: Tensor, src: Tensor) -> None:
        self.dst.append(dst)
        self.src.append(src)

    def apply(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)
        if self.zero:
            torch._foreach_zero_(self.zero)
        for p, view in self.repoint:
            p.data = view


@dataclass
class StepPlan:
    """Device-side tables of one step pattern (which grads are present, which norm)."""

    chunks: List[Optional[Tensor]]  # per bucket: int64 [3, n] (start, length, segment), or None
    partial_offsets: List[int]  # per bucket: where its partial sums start in `partials`
    partials: Tensor  # one partial sum of squares per chunk, in the accumulation dtype
    seg_ptr: Tensor  # int64 [n_segments + 1]: segment s owns partials[seg_ptr[s]:seg_ptr[s+1]]
    n_sumsq: int  # 1 (norm="global": the total) or 1 + n_segments (norm="tensor")
    acc_dtype: torch.dtype
    full: bool  # every param of every bucket takes part (the layout the backward sums use)


@dataclass
class BucketSet:
    """All buckets of an optimizer: one per (param group, dtype), all on one device."""

    buckets: List[Bucket]
    signature: Tuple
    plans: Dict[Tuple, StepPlan] = field(default_factory=dict)
    # The all-present plans' partials (both norms share the rows): kept across plan-cache resets,
    # since the backward sums write into it between steps.
    full_partials: Optional[Tensor] = None
    sums_backend: Optional[str] = None  # whose ops the buckets' BackwardSums call
    steps: int = 0  # fused steps taken over these buckets
    sums_steps: int = 0  # ... of which took all of phase 1 from the backward sums

    @classmethod
    def build(cls, groups_params: Sequence[Sequence[Tensor]], adopt: bool = True) -> "BucketSet":
        buckets = []
        for gi, params in enumerate(groups_params):
            by_dtype: Dict[torch.dtype, List[int]] = {}
            for i, p in enumerate(params):
                by_dtype.setdefault(p.dtype, []).append(i)
            buckets += [Bucket(gi, idx, [params[i] for i in idx], adopt)
                        for idx in by_dtype.values()]
        return cls(buckets, cls.signature_of(groups_params))

    @staticmethod
    def signature_of(groups_params: Sequence[Sequence[Tensor]]) -> Tuple:
        return tuple(tuple(id(p) for p in ps) for ps in groups_params)

    def release(self) -> None:
        for b in self.buckets:
            b.release()

    def full_presents(self) -> List[Tuple[bool, ...]]:
        return [(True,) * len(b.params) for b in self.buckets]

    def attach_backward_sums(self, backend: str, sumsq_op, copy_sumsq_op, hyper) -> None:
        """Give every bucket a :class:`BackwardSums` that runs ``sumsq_op`` (``copy_sumsq_op``,
        where not None, for fresh grads) from the grad hooks.

        ``hyper(group_index)`` returns that group's current (weight_decay, maximize).
        """
        from .backward_sums import BackwardSums

        if self.sums_backend == backend:
            return
        presents = self.full_presents()
        plan = self.plan(presents, per_tensor=False)
        for b, present, table, off in zip(self.buckets, presents, plan.chunks, plan.partial_offsets):
            # rows per tensor, as the table was cut (per_tensor lists empty tensors too: 0 rows)
            counts = b.chunk_rows(present, 0, per_tensor=True)[3]
            tables, first_rows, row = [], [], 0
            for rows in counts:
                tables.append(table[:, row:row + rows].contiguous() if rows else None)
                first_rows.append(off + row)
                row += rows
            gi = b.group_index
            b.sums = BackwardSums(b, sumsq_op, copy_sumsq_op, tables, first_rows, plan.partials,
                                  lambda gi=gi: hyper(gi))
        self.sums_backend = backend

    def detach_backward_sums(self) -> None:
        for b in self.buckets:
            b.sums = None
        self.sums_backend = None

    @property
    def device(self) -> torch.device:
        return self.buckets[0].device if self.buckets else torch.device("cpu")

    def plan(self, presents: Sequence[Tuple[bool, ...]], per_tensor: bool) -> StepPlan:
        key = (per_tensor, tuple(presents))
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) > 64:  # a pattern that never repeats must not grow memory forever
                self.plans.clear()
            plan = self.plans[key] = self._make_plan(presents, per_tensor)
        return plan

    def _make_plan(self, presents, per_tensor: bool) -> StepPlan:
        device = self.device
        chunks: List[Optional[Tensor]] = []
        offsets: List[int] = []
        seg_sizes: List[int] = []
        n_partials = 0
        for b, present in zip(self.buckets, presents):
            starts, lens, segs, seg_chunks = b.chunk_rows(present, 1 + len(seg_sizes), per_tensor)
            offsets.append(n_partials)
            n_partials += len(starts)
            seg_sizes += seg_chunks
            chunks.append(
                torch.tensor([starts, lens, segs], dtype=torch.int64).to(device) if starts else None
            )
        n_sumsq = 1 + len(seg_sizes) if per_tensor else 1
        if not per_tensor:
            seg_sizes = [n_partials]
        seg_ptr = [0]
        for s in seg_sizes:
            seg_ptr.append(seg_ptr[-1] + s)
        acc = accumulate_dtype([b.dtype for b, pr in zip(self.buckets, presents) if any(pr)])
        full = all(all(pr) for pr in presents)
        if full:
            if self.full_partials is None:
                self.full_partials = torch.zeros(max(n_partials, 1), dtype=acc, device=device)
            partials = self.full_partials
        else:
            partials = torch.zeros(max(n_partials, 1), dtype=acc, device=device)
        return StepPlan(
            chunks=chunks,
            partial_offsets=offsets,
            partials=partials,
            seg_ptr=torch.tensor(seg_ptr, dtype=torch.int64).to(device),
            n_sumsq=n_sumsq,
            acc_dtype=acc,
            full=full,
        )
