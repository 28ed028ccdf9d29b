r"""One global norm across ranks and shards: DDP, ZeroRedundancyOptimizer, FSDP2 (DTensor params).

SNGM divides by the norm of the WHOLE gradient. What each rank holds decides what has to be reduced:

* **DDP** (and any data-parallel wrapper that averages grads before ``step()``): every rank holds
  the full gradient, so the local norm *is* the global one. Nothing to do, no collective: build
  ``SNGM`` with no ``process_group`` (passing one here would be wrong: it would add up W identical
  sums of squares and divide every update by ``sqrt(W)`` too much).
* **FSDP2** (``fully_shard``) and other DTensor params: each rank holds a shard of every param and
  of its grad. The process group is inferred from the params' ``device_mesh``: the group of each
  mesh dim whose placement is ``Shard`` (for FSDP2 on a 1-D mesh, the mesh's one group; under HSDP,
  the shard dim's group, the replicate dim needs nothing). The sums of squares, ``[total]`` or
  ``[total, one per tensor]`` for ``norm="tensor"``, are all-reduced in ONE collective per step.
* **ZeroRedundancyOptimizer**: every rank holds the full (DDP-averaged) gradient but steps only its
  partition of the params, so the local sum of squares covers that partition alone and must be
  summed over the ZeRO group. That group cannot be inferred (the params are plain tensors): give it
  to ``SNGM(process_group=...)``. ``ZeroRedundancyOptimizer`` keeps a ``process_group`` keyword of
  its own and does not pass it on; it forwards its other ``**defaults`` both to
  ``optimizer_class(param_groups, **defaults)`` and into its own param groups (copied into the
  local optimizer's groups on every step and written into ``state_dict()``, where a process group
  cannot be pickled). So bind the group to the class::

      ZeroRedundancyOptimizer(params, optimizer_class=functools.partial(SNGM, process_group=pg),
                              process_group=pg, lr=0.1, momentum=0.9)

  With plain tensors and a ``process_group`` each rank is taken to hold *whole* tensors, so only
  the total is all-reduced: per-tensor norms (``norm="tensor"``) are complete on their own rank.

The collective is ``dist.all_reduce(sumsq, op=SUM, group=pg)`` on the device, between the two
phases of the step (``reduce_sumsq`` in :func:`sngm_ext.functional.sngm_groups`): no ``.item()``,
no host sync, no per-tensor collective. Every rank then sees the same total, so a non-finite one
skips the step on every rank. A rank with no grad at all this step still joins the collective.

DTensor params are stepped through their local tensors: the backends see plain tensors and update
them in place (FSDP2 keeps owning their storage), and the momentum buffer kept in ``state[p]["momentum_buffer"]`` is a DTensor
with the param's mesh and placements, so ``torch.distributed.checkpoint`` saves it sharded.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import TensorGroup
from .layout import ACC_DTYPE

__all__ = ["DistPlan", "plan_for", "is_dtensor", "local_tensor"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_dtensor(t) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor this rank stores for ``t`` (itself unless ``t`` is a DTensor).

    ``DTensor._local_tensor`` rather than ``to_local()``: the latter returns a new alias on every
    call, and the step compares momentum buffers by identity to know what to store.
    """
    if is_dtensor(t):
        lt = getattr(t, "_local_tensor", None)
        return lt if lt is not None else t.to_local()
    return t


def _ranks(group) -> Tuple[int, ...]:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group))


def _shard_groups(p: Tensor) -> Tuple[object, ...]:
    """The process groups over which a DTensor param is sharded (one per ``Shard`` mesh dim)."""
    mesh = p.device_mesh
    groups = []
    for dim, pl in enumerate(p.placements):
        if pl.is_shard() or type(pl).__name__ == "_StridedShard":  # (FSDP2 over TP: strided)
            groups.append(mesh.get_group(dim))
        elif not pl.is_replicate():
            raise ValueError(
                f"SNGM cannot step a DTensor param with placement {pl} (placements "
                f"{tuple(p.placements)}): params must be Shard or Replicate on every mesh dim"
            )
    return tuple(groups)


def _describe(key) -> str:
    if key is None:
        return "a plain tensor (no process group)"
    if not key:
        return "a replicated DTensor (no reduction)"
    return "sharded over ranks " + " x ".join(str(list(r)) for r in key)


class DistPlan:
    """What one optimizer's step must reduce, worked out once per set of params.

    ``groups``: the process groups to all-reduce the sums of squares over, in order (one for
    FSDP2, DDP-with-ZeRO; several only for params sharded over several mesh dims); empty when
    nothing needs reducing. ``dtensor``: the params are DTensors (stepped through their local
    tensors). ``per_tensor_reduce``: with ``norm="tensor"`` the per-tensor sums are partial
    (shards) and are reduced with the total; otherwise only the total is.
    """

    def __init__(self, groups, dtensor: bool, per_tensor_reduce: bool, acc_dtype, device,
                 n_params: int):
        self.groups = tuple(groups)
        self.dtensor = dtensor
        self.per_tensor_reduce = per_tensor_reduce
        self.acc_dtype = acc_dtype
        self.device = device
        self.n_params = n_params
        self._index_cache: Dict[Tuple[int, ...], Tensor] = {}

    # ---------------------------------------------------------------- DTensor <-> local tensors

    def localize(self, groups: Sequence[TensorGroup]) -> List[TensorGroup]:
        """The same groups with every DTensor replaced by this rank's local tensor."""
        if not self.dtensor:
            return list(groups)
        out = []
        for grp in groups:
            grads: List[Optional[Tensor]] = []
            for p, g in zip(grp.params, grp.grads):
                if g is not None:
                    if not is_dtensor(g):
                        raise ValueError(
                            f"SNGM: a DTensor param of shape {tuple(p.shape)} has a grad of type "
                            f"{type(g).__name__}; its grad must be a DTensor laid out like it"
                        )
                    if g.placements != p.placements or (
                        g.device_mesh is not p.device_mesh and g.device_mesh != p.device_mesh
                    ):
                        raise ValueError(
                            f"SNGM: a param with placements {tuple(p.placements)} has a grad with "
                            f"placements {tuple(g.placements)}; redistribute the grad to the "
                            "param's placements (a Partial grad is not reduced yet) before step()"
                        )
                    g = local_tensor(g)
                grads.append(g)
            bufs: List[Optional[Tensor]] = []
            for p, b in zip(grp.params, grp.momentum_buffers):
                if b is not None and not is_dtensor(b):
                    lp = local_tensor(p)
                    if b.shape != lp.shape:  # a plain tensor loaded from elsewhere: must be the shard
                        raise ValueError(
                            "SNGM: the momentum buffer of a DTensor param is a plain tensor of "
                            f"shape {tuple(b.shape)}, not this rank's shard {tuple(lp.shape)}"
                        )
                bufs.append(local_tensor(b) if b is not None else None)
            out.append(grp._replace(
                params=[local_tensor(p) for p in grp.params], grads=grads, momentum_buffers=bufs,
            ))
        return out

    @staticmethod
    def wrap_state(p: Tensor, buf: Optional[Tensor], prev) -> Optional[Tensor]:
        """``buf`` (a local tensor) as a DTensor laid out like ``p``; ``prev`` kept if it is it."""
        if buf is None or not is_dtensor(p):
            return buf
        if is_dtensor(prev):
            lt = local_tensor(prev)
            if lt is buf or (lt.data_ptr() == buf.data_ptr() and lt.shape == buf.shape
                             and lt.stride() == buf.stride()):
                return prev
        return _DTENSOR.from_local(
            buf, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    # ---------------------------------------------------------------- the one collective

    def reducer(self, norm: str, segment_params: Optional[List[int]]) -> Optional[Callable]:
        """The in-place ``reduce_sumsq`` for this step, or None when nothing needs reducing.

        ``segment_params[k]`` is the index (among all the optimizer's params) of the param whose
        sum of squares is ``sumsq[1 + k]`` (``norm="tensor"`` only). Ranks may hold different
        grads (an unused param on one rank, no grad at all on another): per-tensor sums are then
        scattered into a vector of one slot per param, the same on every rank, before the one
        all-reduce; with every grad present, in order, the vector is reduced as it is.
        """
        if not self.groups:
            return None
        import torch.distributed as dist

        groups, acc, device = self.groups, self.acc_dtype, self.device
        per_tensor = norm == "tensor" and self.per_tensor_reduce

        def all_reduce(t: Tensor) -> None:
            """``t`` summed over the group(s) in place; ranks agree on dtype and device."""
            if t.dtype == acc and t.device == device:
                for g in groups:
                    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
            else:  # sums made elsewhere (a rank without params makes them on the CPU, say)
                u = t.to(device=device, dtype=acc)
                all_reduce(u)
                t.copy_(u)

        if not per_tensor:
            return lambda sumsq: all_reduce(sumsq[:1])  # in place: a view of sumsq

        order = tuple(segment_params or ())
        if order == tuple(range(self.n_params)):
            return all_reduce

        idx = self._index_cache.get(order)
        if idx is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            idx = torch.tensor([0] + [1 + i for i in order], dtype=torch.int64).to(device)
            self._index_cache[order] = idx
        n = self.n_params

        def reduce_scattered(sumsq: Tensor) -> None:
            full = torch.zeros(1 + n, dtype=acc, device=device)
            full.index_copy_(0, idx, sumsq.to(device=device, dtype=acc))
            all_reduce(full)
            sumsq.copy_(full.index_select(0, idx))
        return reduce_scattered


def _fallback_device(group) -> torch.device:
    """Where a rank that holds no param at all puts the sums it reduces."""
    import torch.distributed as dist

    try:
        backend = str(dist.get_backend(group))
    except Exception:  # noqa: BLE001
        backend = ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plan_for(params: Sequence[Tensor], process_group=None) -> Optional[DistPlan]:
    """The :class:`DistPlan` of an optimizer over ``params`` (all its params, in group order).

    None when nothing is distributed: plain tensors and no ``process_group`` (single process, DDP).
    Raises ValueError for params on mixed process groups: one global norm needs one group.
    """
    params = list(params)
    has_dtensor = any(is_dtensor(p) for p in params)
    if not has_dtensor and process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "SNGM: DTensor params or a process_group need torch.distributed to be initialized"
        )
    key0 = groups0 = None
    for i, p in enumerate(params):
        if is_dtensor(p):
            groups = _shard_groups(p)
            key = tuple(_ranks(g) for g in groups)
        else:
            groups, key = None, None
        if i == 0:
            key0, groups0 = key, groups
        elif key != key0:
            raise ValueError(
                "SNGM needs every param on one process group (one global norm): param 0 is "
                f"{_describe(key0)}, param {i} (shape {tuple(p.shape)}) is {_describe(key)}. "
                "Shard them all the same way (one fully_shard mesh)"
            )
    acc = ACC_DTYPE
    device = local_tensor(params[0]).device if params else _fallback_device(process_group)
    n = len(params)
    if not has_dtensor:  # ZeRO: whole tensors per rank, the total is summed over the group
        return DistPlan([process_group], False, False, acc, device, n)
    groups = list(groups0 or ())
    if process_group is not None:
        want = _ranks(process_group)
        if len(groups) != 1 or _ranks(groups[0]) != want:
            raise ValueError(
                f"SNGM: process_group spans ranks {list(want)} but the DTensor params are "
                f"{_describe(key0)}; leave process_group=None to use the params' mesh"
            )
        groups = [process_group]
    return DistPlan(groups, True, True, acc, device, n)


def segment_order(groups: Sequence[TensorGroup], fused: bool) -> List[int]:
    """For ``norm="tensor"``: the index, among all params in group order, of the param behind each
    per-tensor sum of squares.

    The reference numbers the params that have a grad in group order; the fused backends number
    them list by list (one list per (group, dtype), dtypes in order of first appearance: fused.py).
    """
    out, offset = [], 0
    for grp in groups:
        present = [(i, p.dtype) for i, (p, g) in enumerate(zip(grp.params, grp.grads))
                   if g is not None]
        if fused:
            dtypes = list(dict.fromkeys(d for _, d in present))
            present = [(i, d) for dt in dtypes for i, d in present if d == dt]
        out += [offset + i for i, _ in present]
        offset += len(grp.params)
    return out
