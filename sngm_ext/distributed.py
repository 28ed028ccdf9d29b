r"""One global norm across ranks and shards: every element of the model counted exactly once.

SNGM divides by the norm of the WHOLE gradient, whatever part of it each rank holds. What the
step reduces follows from the params and ``process_group`` (docs/distributed.md has the table of
setups, with an example for each):

* **DTensor params** (FSDP2, tensor parallel, FSDP2 x TP, HSDP; any mix of ``Shard``,
  ``_StridedShard`` and ``Replicate`` per param) and plain tensors beside them (a norm layer left
  unparallelized): the placements say who holds what. Each rank weights its local sum of squares
  of param ``p`` by ``1 / m_p``, ``m_p`` = the number of ranks of the mesh holding the same piece
  (``|mesh| / pieces``; a plain tensor is held whole by every rank, ``m = |mesh|``); the weighted
  sums are gathered over the mesh and added up. A plain tensor counted that way must be the same
  on every rank: checked at the first step.
* **Plain tensors, no process_group, several ranks**: DDP (every rank holds the full averaged
  gradient: the local norm is the global one, nothing to reduce) or a partition (ZeRO, FSDP1,
  DeepSpeed, a hand-made split: each rank holds a part) are indistinguishable from the params.
  The first step gathers each rank's sum of squares once and refuses (before anything is
  written) when they differ, naming ``process_group=``.
* **Plain tensors and a process_group**: each rank holds its own part (whole tensors, or flat
  shards); the total is summed over the group. Refused at the first step when every rank holds
  the same gradient (DDP: the copies would be counted W times).
* ``process_group="local"``: the rank's own norm, no collective and no check (ranks that train
  different models on purpose, or DDP without the first step's check).

The collective: the local fp64 sums (``[3, m]``: scaled_norm.py's rows, each a plain sum) are
``all_gather``-ed (one per group: one group, the world or the mesh's, in every usual set-up) and
summed in rank order on every rank, so every rank ends with the same norm bit for bit, whatever
the collective's own reduction order. It runs between the two phases of the step
(``DistPlan.reducer``), on the device: no host sync, except on a step that runs a check (the
first, and the first after the params change). Every rank sees the same
gathered values, so every rank takes the same decision: all raise or none does.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import scaled_norm
from ._group import TensorGroup
from .layout import ACC_DTYPE
from .scaled_norm import ROWS

__all__ = ["DistPlan", "LOCAL", "plan_for", "is_dtensor", "local_tensor"]

LOCAL = "local"  # process_group value: this rank's own norm, no collective, no check

# Two ranks hold "the same" gradient when their norms agree to this relative tolerance (compared
# as norms, not squares: an fp64 norm's square may exceed the double range; a norm's relative
# difference is half its square's, so the bound below holds with room). The squares of fp32
# elements are exact in fp64 and all terms are >= 0, so summing the same n squares in another
# order changes the sum by at most (n - 1) * 2^-53 relative (Higham, Accuracy and Stability of
# Numerical Algorithms, 2nd ed., eq. (4.4)): 1.2e-7 for n = 2^30;
# weight decay computed with or without an FMA moves each d by <= 2^-24 relative, its square by
# <= 2^-23 (1.2e-7). A partition of a real model differs by O(1).
_SAME_RTOL = 1e-6


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None, None
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        _StridedShard = None
    return DTensor, _StridedShard


_DTENSOR, _STRIDED_SHARD = _dtensor_types()


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


def _pieces(p: Tensor) -> int:
    """How many distinct pieces the ranks of ``p``'s mesh hold: the product of the sizes of the
    mesh dims ``p`` is sharded over (``_StridedShard`` is FSDP2's shard of a TP shard)."""
    mesh, n = p.device_mesh, 1
    for dim, pl in enumerate(p.placements):
        if pl.is_shard() or (_STRIDED_SHARD is not None and isinstance(pl, _STRIDED_SHARD)):
            n *= mesh.size(dim)
        elif not pl.is_replicate():
            raise ValueError(
                f"SNGM cannot step a DTensor param with placement {pl} (placements "
                f"{tuple(p.placements)}): a param must be Shard or Replicate on every mesh dim"
            )
    return n


def _mesh_ranks(mesh) -> frozenset:
    return frozenset(mesh.mesh.flatten().tolist())


def _is_fsdp1(p: Tensor) -> bool:
    """A param flattened by FSDP1 (FullyShardedDataParallel): a FlatParameter or, with
    use_orig_params=True, a view into one (torch.distributed.fsdp._common_utils.FSDP_FLATTENED)."""
    return bool(getattr(p, "_fsdp_flattened", False))


_RECIPE = (
    "DeepSpeed ZeRO-1/2: process_group=<its data-parallel group> (dist.group.WORLD without model "
    "parallelism); FSDP1 (FullyShardedDataParallel): process_group=fsdp_model.process_group; "
    "ZeroRedundancyOptimizer: optimizer_class=functools.partial(SNGM, process_group=pg); a "
    "hand-made partition: the group it is split over. Ranks that train different models on "
    "purpose: process_group='local'. See docs/distributed.md"
)


_UNWIRED = (
    "SNGM: these params' placements weight each tensor's sum of squares "
    "(DistPlan.needs_per_tensor_sums), but the step produced only the total; nothing was written"
)


class DistPlan:
    """What one optimizer's step reduces across ranks, worked out once per set of params.

    ``groups``: the process groups the local vector is gathered over, in order (one in every
    usual set-up; the mesh's dims one after another when the mesh is not the whole world);
    ``weights``: per param (all the optimizer's params, in group order), ``1 / m_p``, the inverse
    of how many ranks of the groups hold the same piece of it, or None when they are all equal
    (``uniform_weight``). ``needs_per_tensor_sums``: the weights differ, so the step must produce
    per-tensor sums of squares whatever ``norm`` is (see :meth:`reducer`). ``check``: what the
    next check step verifies (None once verified): ``"replicas"`` (every rank holds the same
    gradient: DDP, or the plain tensors beside DTensors), ``"partition"`` (not every rank holds
    the same one). ``reduce``: False when the step never needs the reduced values (DDP, after
    its check). ``dtensor``: the params are DTensors (stepped through their local tensors).
    ``per_tensor_reduce``: with ``norm="tensor"`` the per-tensor sums are partial (shards) and
    are reduced too; with whole tensors per rank (ZeRO) only the total is.
    """

    def __init__(self, groups, *, dtensor: bool, per_tensor_reduce: bool, device, n_params: int,
                 weights: Optional[List[float]] = None, uniform_weight: float = 1.0,
                 check: Optional[str] = None, check_params: Optional[List[int]] = None,
                 reduce: bool = True, fsdp1: bool = False):
        self.groups = tuple(groups)
        self.dtensor = dtensor
        self.per_tensor_reduce = per_tensor_reduce
        self.device = device
        self.n_params = n_params
        self.acc_dtype = ACC_DTYPE
        self.uniform_weight = uniform_weight
        self.weights = (None if weights is None else
                        torch.tensor(weights, dtype=ACC_DTYPE).to(device))
        self.needs_per_tensor_sums = weights is not None
        self.check = check
        self.check_params = check_params  # the params whose sums the check compares (None: all)
        self.reduce = reduce
        self.fsdp1 = fsdp1
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
                if g is not None and is_dtensor(p):
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
                elif g is not None and is_dtensor(g):
                    raise ValueError(f"SNGM: a plain param of shape {tuple(p.shape)} has a "
                                     "DTensor grad")
                grads.append(g)
            bufs: List[Optional[Tensor]] = []
            for p, b in zip(grp.params, grp.momentum_buffers):
                if b is not None and is_dtensor(p) and not is_dtensor(b):
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

    # ---------------------------------------------------------------- the reduction

    def _index(self, order: Tuple[int, ...]) -> Tensor:
        """Positions of sumsq's entries in the full vector [total, one per param]."""
        idx = self._index_cache.get(order)
        if idx is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            idx = torch.tensor([0] + [1 + i for i in order], dtype=torch.int64).to(self.device)
            self._index_cache[order] = idx
        return idx

    def reducer(self, norm: str, segment_params: Optional[List[int]]) -> Optional[Callable]:
        """The in-place ``reduce_sumsq`` of this step, or None when it communicates nothing.

        It receives the fp64 sums of squares, ``[3, 1]`` (the total) or ``[3, 1 + k]`` (and one
        column per present tensor; ``segment_params[k]``: the index among all params of the
        param behind column ``1 + k``), rows scaled_norm.py's additive med, big and small sums,
        between the two phases of the step, before anything user-visible is written, and leaves
        the global sums in place: the total in column 0; with ``norm="tensor"`` each tensor's
        own; with ``norm="global"`` and per-tensor columns (``needs_per_tensor_sums``) the total
        in EVERY column, so that an update that reads each tensor's column uses the global norm.
        """
        if not self.groups or (not self.reduce and self.check is None):
            return None
        if norm == "tensor" and self.fsdp1 and not self.dtensor:
            raise ValueError(
                "SNGM: norm='tensor' under FSDP1 would normalize each flat shard, not each of "
                "your params; use norm='global' (or FSDP2, whose params are DTensors)"
            )
        per_tensor_out = norm == "tensor" and self.per_tensor_reduce  # slots reduced one by one
        uses_slots = self.needs_per_tensor_sums or per_tensor_out
        order = tuple(segment_params) if segment_params is not None else None
        if uses_slots and order is None:
            raise RuntimeError(_UNWIRED)
        check, plan = self.check, self
        acc, device, n = ACC_DTYPE, self.device, self.n_params

        def reduce_sumsq(sumsq: Tensor) -> None:
            local = sumsq.to(device=device, dtype=acc)  # [3, m]: scaled_norm's additive rows
            full = per = None
            if uses_slots:
                if local.shape[1] != 1 + len(order):
                    raise RuntimeError(_UNWIRED if local.shape[1] == 1 else
                                       f"SNGM internal error: {local.shape[1] - 1} sums of squares "
                                       f"for {len(order)} tensors")
                if order == tuple(range(n)):
                    full = local
                else:
                    full = torch.zeros(ROWS, 1 + n, dtype=acc, device=device)
                    full.index_copy_(1, plan._index(order), local)
                per = full[:, 1:]
                if plan.weights is not None:
                    per = per * plan.weights
                elif plan.uniform_weight != 1.0:
                    per = per * plan.uniform_weight
            if plan.weights is not None:
                # the kernels mark GradScaler's found_inf in the total alone: keep it
                total = torch.where(torch.isfinite(local[:, :1]), per.sum(1, keepdim=True),
                                    local[:, :1])
            elif plan.uniform_weight != 1.0:
                total = local[:, :1] * plan.uniform_weight
            else:
                total = local[:, :1]
            # a check-only step (DDP) gathers the check's entries alone
            cols = ([total, per] if per_tensor_out else [total]) if plan.reduce else []
            width = (1 + (n if per_tensor_out else 0)) if plan.reduce else 0
            parts = [torch.cat(cols, 1).reshape(-1)] if cols else []
            if check is not None:
                parts.append(_check_column(local, full, plan.check_params))
            n_sum = ROWS * width
            reduced = _gather_sum(torch.cat(parts), plan.groups, n_sum, check is not None)
            if check is not None:
                plan._run_check(reduced[n_sum:])
                if not plan.reduce:
                    return
            sums = reduced[:n_sum].view(ROWS, width)
            if per_tensor_out:
                sumsq.copy_(sums.index_select(1, plan._index(order)))
            elif norm == "tensor":  # whole tensors per rank: their own sums are complete
                sumsq[:, :1].copy_(sums[:, :1])
            else:
                sumsq.copy_(sums[:, :1].expand_as(sumsq))

        return reduce_sumsq

    def _run_check(self, stats: Tensor) -> None:
        """Decide on the gathered (max, min, non-finite count) of the checked sums: a host sync,
        on check steps only. Every rank holds the same values, so all take the same decision."""
        hi, lo, nonfinite = stats.tolist()
        world = _world(self.groups)
        same = hi - lo <= _SAME_RTOL * hi
        if self.check == "replicas":
            if 0 < nonfinite < world:
                raise RuntimeError(
                    f"SNGM: the gradient is NaN/Inf on {int(nonfinite)} of {world} ranks only, "
                    "so the ranks hold different gradients: " + self._differ_advice()
                    + "; nothing was written")
            if nonfinite == world or hi == 0:
                return  # cannot tell yet (a skipped step, or all-zero grads): check next step
            if not same:
                raise RuntimeError(
                    f"SNGM: the ranks hold different gradients (local norms from {lo:.6g} "
                    f"to {hi:.6g} across {world} ranks): " + self._differ_advice()
                    + "; nothing was written")
        else:  # "partition"
            if nonfinite == world or (nonfinite == 0 and hi == 0):
                return
            if nonfinite == 0 and same and world > 1:
                raise RuntimeError(
                    f"SNGM: process_group was given, but all {world} of its ranks hold the same "
                    f"gradient (local norm {hi:.6g} on each), as under DDP: summing the "
                    f"copies would shrink every step by sqrt({world}). Leave process_group unset "
                    "under DDP, FSDP1 NO_SHARD and DeepSpeed ZeRO stage 0; pass it only when each "
                    "rank holds its own part of the gradient; nothing was written")
        self.check = None

    def _differ_advice(self) -> str:
        if self.dtensor:
            return ("a plain-tensor param beside DTensor params is counted once for the whole "
                    "mesh, which needs its gradient to be the same on every rank. Make such "
                    "params DTensors with the placements they really have (parallelize_module / "
                    "distribute_module; e.g. SequenceParallel for norm layers in a sequence-"
                    "parallel region), or reduce their grads before step()")
        where = " (these are FSDP1 params)" if self.fsdp1 else ""
        return ("each rank holds only part of the gradient" + where + ", so its own norm is not "
                "the model's. Pass the group the gradient is split over as process_group=. "
                + _RECIPE)


def _check_column(local: Tensor, full: Optional[Tensor], check_params) -> Tensor:
    """The checked norm, twice (for max and min) and its non-finiteness: [n, n, !finite(n)].
    A norm beyond the fp64 range itself (elements near 1.8e308) is compared as the largest
    double: equal on every rank that has one."""
    if check_params is None or full is None:
        sums = local[:, 0]
    else:
        sums = full[:, 1:].index_select(1, check_params).sum(1)
    s = scaled_norm.norm(sums)
    bad = ~scaled_norm.finite(sums)
    s = torch.where(bad, torch.zeros_like(s), s.clamp(max=torch.finfo(s.dtype).max))
    return torch.stack([s, s, bad.to(s.dtype)])


def _world(groups) -> int:
    import torch.distributed as dist

    return math.prod(dist.get_world_size(g) for g in groups)


def _gather_sum(v: Tensor, groups, n_sum: int, with_check: bool) -> Tensor:
    """``v`` gathered over each group in turn and combined in rank order: the first ``n_sum``
    entries summed, then (max, min, sum) of the three check entries. The same operations on the
    same gathered values on every rank: every rank ends with the same bits."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    for g in groups:
        out = v.new_empty(dist.get_world_size(g) * v.numel())
        gather(out, v, group=g)
        out = out.view(-1, v.numel())
        parts = [out[:, :n_sum].sum(0)]
        if with_check:
            c = out[:, n_sum:]
            parts += [c[:, 0].amax().reshape(1), c[:, 1].amin().reshape(1),
                      c[:, 2].sum().reshape(1)]
        v = torch.cat(parts)
    return v


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


def _dtensor_plan(params: List[Tensor], process_group) -> DistPlan:
    """DTensors (and plain tensors beside them): weights from the placements, groups from the
    mesh that holds every param's mesh."""
    import torch.distributed as dist

    meshes = {}
    for p in params:
        if is_dtensor(p) and id(p.device_mesh) not in meshes:
            meshes[id(p.device_mesh)] = (p.device_mesh, _mesh_ranks(p.device_mesh))
    union = frozenset().union(*(r for _, r in meshes.values()))
    big = next((m for m, r in meshes.values() if r == union), None)
    types = {m.device_type for m, _ in meshes.values()}
    if big is None or len(types) > 1:
        raise ValueError(
            "SNGM reduces the norm over ONE device mesh, but its DTensor params lie on meshes "
            f"{sorted(sorted(r) for _, r in meshes.values())} ({sorted(types)}) and none holds "
            "them all; build them from one mesh (slices of one init_device_mesh)"
        )
    size = len(union)
    if process_group is not None:
        want = frozenset(dist.get_process_group_ranks(process_group))
        if want != union:
            raise ValueError(
                f"SNGM: process_group spans ranks {sorted(want)} but the DTensor params' mesh "
                f"spans {sorted(union)}; leave process_group=None to use the params' mesh"
            )
        groups = [process_group]
    elif size == dist.get_world_size():
        groups = [dist.group.WORLD]
    else:
        groups = [big.get_group(d) for d in range(big.ndim)]
    mult = [size // _pieces(p) if is_dtensor(p) else size for p in params]
    plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
    uniform = len(set(mult)) <= 1
    device = local_tensor(params[0]).device
    plan = DistPlan(
        groups, dtensor=True, per_tensor_reduce=True, device=device, n_params=len(params),
        weights=None if uniform else [1.0 / m for m in mult],
        uniform_weight=1.0 / mult[0] if uniform and mult else 1.0,
        check="replicas" if plain else None, reduce=True,
    )
    if plain and not uniform:
        plan.check_params = torch.tensor(plain, dtype=torch.int64).to(device)
    return plan


def plan_for(params: Sequence[Tensor], process_group=None) -> Optional[DistPlan]:
    """The :class:`DistPlan` of an optimizer over ``params`` (all its params, in group order).

    None when nothing is distributed: a single process, or ``process_group="local"``. Raises
    ValueError for what no reduction can make right (DTensors on unrelated meshes, a placement
    other than Shard/Replicate, a process_group other than the params' mesh). Makes no
    collective: the checks run at the first step.
    """
    params = list(params)
    has_dtensor = any(is_dtensor(p) for p in params)
    if isinstance(process_group, str) or isinstance(process_group, bool):
        if process_group != LOCAL:
            raise ValueError(f"SNGM: process_group={process_group!r}: give a ProcessGroup, None "
                             f"(inferred, checked at the first step) or {LOCAL!r}")
        if has_dtensor:
            raise ValueError("SNGM: process_group='local' with DTensor params: a shard's own "
                             "norm is not a norm of anything; leave process_group=None")
        return None
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if has_dtensor or process_group is not None:
            raise RuntimeError(
                "SNGM: DTensor params or a process_group need torch.distributed to be initialized"
            )
        return None
    if has_dtensor:
        return _dtensor_plan(params, process_group)
    fsdp1 = any(_is_fsdp1(p) for p in params)
    if process_group is None:
        world = dist.get_world_size()
        if world == 1:
            return None
        # DDP, or a partition: the first step tells (and refuses a partition)
        device = params[0].device if params else _fallback_device(None)
        return DistPlan([dist.group.WORLD], dtensor=False, per_tensor_reduce=False,
                        device=device, n_params=len(params), check="replicas", reduce=False,
                        fsdp1=fsdp1)
    device = params[0].device if params else _fallback_device(process_group)
    return DistPlan([process_group], dtensor=False, per_tensor_reduce=False, device=device,
                    n_params=len(params), check="partition", reduce=True, fsdp1=fsdp1)

