"""``SNGM``: the torch.optim.Optimizer users swap in for torch.optim.SGD."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._group import TensorGroup, check_hyperparameters
from .buckets import BucketSet, LayoutChanged, owns_storage
from .functional import BACKENDS, _check_norm, resolve_backend, sngm_groups

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Keys torch.optim.SGD keeps in its param groups that SNGM has no use for: written into
# state_dict() so SGD can load an SNGM checkpoint, dropped again when SNGM loads one of SGD's.
_SGD_ONLY_KEYS = {"dampening": 0, "foreach": None, "differentiable": False, "fused": None}


def _buffer(param_state):
    return None if param_state is None else param_state.get("momentum_buffer")


class SNGM(Optimizer):
    r"""Stochastic normalized gradient descent with momentum (Zhao et al., Algorithm 1).

    For every param ``i`` that has a grad, in every param group:

    .. math::
        d_i &= \pm g_i + \lambda w_i \qquad (- \text{ when maximize}) \\
        n &= \sqrt{\textstyle\sum_i \lVert d_i \rVert^2} \qquad \text{one norm over ALL groups} \\
        u_i &\leftarrow \beta u_i + d_i / n \qquad (d_i / n := 0 \text{ when } n = 0,\ u_0 = 0) \\
        w_i &\leftarrow w_i - \eta u_i \qquad \text{nesterov: } w_i - \eta (d_i / n + \beta u_i)

    If ``n`` is not finite (a NaN or Inf gradient) params and momentum are left untouched and
    :attr:`skipped_steps` grows by one, on device. ``norm="tensor"`` divides each param by its own
    norm instead (the block-wise variant of the paper's Section 6). A param whose grad is None is
    skipped entirely, as torch.optim.SGD skips it. Each step moves ``||w_{t+1} - w_t||`` by at most
    ``lr / (1 - momentum)`` (the paper's Lemma 2).

    Args:
        params: iterable of params or of dicts defining param groups.
        lr, momentum, weight_decay, nesterov, maximize: per group, as in torch.optim.SGD
            (no dampening). ``momentum=0`` is SNGD.
        norm: ``"global"`` (the paper's SNGM) or ``"tensor"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``
            (see :mod:`sngm_ext.functional`).
        norm_in_backward: compute each grad's share of the norm (phase 1 of the fused step) in
            the backward pass, as the grad hook moves it into its bucket while it is still in
            cache; the step then reads the grads once instead of twice. Results are bitwise the
            same. The step checks tensor version counters and computes the norm itself whenever
            grads or params were written after backward (``clip_grad_norm_``,
            ``GradScaler.unscale_``, DDP, ``zero_grad(set_to_none=False)``, a grad set by hand), so
            it is exact with those too; what it cannot see is a write that bypasses the counters
            (through ``.data``, or by native code outside the dispatcher) between backward and
            step: do not turn it on where such writes happen. Needs a fused backend.
        process_group: the group to sum the squared norm over when each rank steps only part of
            the params and it cannot be inferred: ``ZeroRedundancyOptimizer`` (bind it with
            ``functools.partial(SNGM, process_group=pg)``, see :mod:`sngm_ext.distributed`).
            Leave it None under DDP (every rank holds the whole gradient: nothing to reduce) and
            under FSDP2 (DTensor params: the group comes from their device mesh).

    After each step, :attr:`grad_norm` holds ``n`` as a 0-dim tensor on the params' device: reading
    it is the only thing that would sync. ``state_dict()`` keeps torch.optim.SGD's format
    (``state[i]["momentum_buffer"]``), so checkpoints move between SGD and SNGM both ways.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        *,
        norm: str = "global",
        backend: str = "auto",
        norm_in_backward: bool = False,
        process_group=None,
    ):
        check_hyperparameters(lr, momentum, weight_decay, nesterov)
        _check_norm(norm)
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {BACKENDS})")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize,
        )
        self.norm = norm
        self.backend = backend
        if backend == "reference" and norm_in_backward:
            raise ValueError("norm_in_backward=True needs a fused backend; the 'reference' backend "
                             "computes the norm in the step")
        self.norm_in_backward = bool(norm_in_backward)
        self.process_group = process_group
        self._dist = None  # distributed.DistPlan of the current params, None when single-process
        self._dist_key: Optional[tuple] = None
        super().__init__(params, defaults)
        self.grad_norm: Optional[Tensor] = None
        self._skipped: Optional[Tensor] = None
        self._buckets: Optional[BucketSet] = None

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group["lr"], group["momentum"], group["weight_decay"],
                              group["nesterov"])
        devices = {p.device for g in self.param_groups for p in g["params"]}
        for p in group["params"]:
            self._check_param(p)
        if len(devices) > 1:
            self.param_groups.pop()
            raise ValueError(
                f"SNGM needs every param on one device (one global norm), got {sorted(map(str, devices))}"
            )
        try:  # params on mixed process groups are refused here rather than at the first step
            self._dist_plan()
        except ValueError:
            self.param_groups.pop()
            raise

    def _params_signature(self):
        return BucketSet.signature_of([g["params"] for g in self.param_groups])

    def _dist_plan(self, signature=None):
        """What the step reduces across ranks (distributed.py); None for plain tensors and no
        ``process_group`` (single process, DDP), where nothing is. ``signature``: the params'
        (``_params_signature()``), when the caller has it already."""
        key = (id(self.process_group), signature or self._params_signature())
        if key != self._dist_key:
            from .distributed import plan_for

            self._dist = plan_for([p for g in self.param_groups for p in g["params"]],
                                  self.process_group)
            self._dist_key = key
        return self._dist

    def _rebuild(self, params, adopt: bool) -> BucketSet:
        if self._buckets is not None:
            self._buckets.release()  # the old buckets' grad hooks go with them
        return BucketSet.build(params, adopt=adopt)

    def _group_sums_hyper(self, group_index: int):
        group = self.param_groups[group_index]
        return float(group["weight_decay"]), bool(group["maximize"])

    def _attach_backward_sums(self, buckets: BucketSet, name: str, ops) -> None:
        if self.norm_in_backward and ops is not None:
            buckets.attach_backward_sums(name, ops.sumsq, ops.copy_sumsq, self._group_sums_hyper)
        elif buckets.sums_backend is not None:
            buckets.detach_backward_sums()

    def _bucket_params(self, dist_plan) -> List[List[Tensor]]:
        if dist_plan is not None and dist_plan.dtensor:
            from .distributed import local_tensor

            return [[local_tensor(p) for p in g["params"]] for g in self.param_groups]
        return [g["params"] for g in self.param_groups]

    def _reducer(self, dist_plan, groups, buckets):
        if dist_plan is None:
            return None
        order = None
        if self.norm == "tensor" and dist_plan.per_tensor_reduce:
            from .distributed import segment_order

            order = segment_order(groups, buckets)
        return dist_plan.reducer(self.norm, order)

    @staticmethod
    def _check_param(p: Tensor) -> None:
        if p.is_complex():
            raise ValueError("SNGM does not support complex params; view them as real "
                             "(torch.view_as_real) first")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"SNGM supports params of dtype {SUPPORTED_DTYPES}, got {p.dtype}")

    @property
    def skipped_steps(self) -> Optional[Tensor]:
        """Steps skipped for a non-finite norm: an int64 0-dim tensor on the params' device."""
        return self._skipped

    def _collect(self) -> List[TensorGroup]:
        """This step's tensors per group (grads None for params sitting out); changes nothing.

        Per-param checks live where they are cheap: dtype and complexity at add_param_group, sparse
        grads and moved params when a grad or param is not the bucket's view (buckets.py), device
        changes through the buckets' layout check.
        """
        groups = []
        state = self.state
        for group in self.param_groups:
            check_hyperparameters(group["lr"], group["momentum"], group["weight_decay"],
                                  group["nesterov"])
            params = group["params"]
            grads = [p.grad for p in params]
            if group["momentum"]:
                bufs = [_buffer(state.get(p)) for p in params]  # one (Python) tensor hash each
            else:
                bufs = [None] * len(params)
            groups.append(TensorGroup(
                params, grads, bufs, float(group["lr"]), float(group["momentum"]),
                float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]),
            ))
        return groups

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        if self._dist is not None:  # a ZeRO rank that holds no param still joins the all-reduce
            return self._dist.device
        return torch.device("cpu")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._collect()
        signature = self._params_signature()  # one walk over the params serves both checks
        dist_plan = self._dist_plan(signature)
        # DTensor params (FSDP2) are stepped through their local shards
        dtensor = dist_plan is not None and dist_plan.dtensor
        run = dist_plan.localize(groups) if dtensor else groups
        device = self._device()
        name, ops = resolve_backend(self.backend, device)
        if self._skipped is None or self._skipped.device != device:
            prev = self._skipped
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
            if prev is not None:
                self._skipped.copy_(prev)
        before = [(list(g.grads), list(g.momentum_buffers)) for g in groups]
        buckets = None
        if name != "reference":
            # Local shards of DTensor params are never re-pointed (FSDP2 owns their storage).
            all_params = self._bucket_params(dist_plan)
            if dtensor:  # buckets hold the local shards: their identities are what must match
                signature = BucketSet.signature_of(all_params)
            if self._buckets is None or self._buckets.signature != signature:
                self._buckets = self._rebuild(all_params, adopt=not dtensor)
            buckets = self._buckets
            if not dtensor:  # FSDP2's shards have no grad hooks
                self._attach_backward_sums(buckets, name, ops)
        try:
            grad_norm = sngm_groups(run, norm=self.norm, backend=self.backend,
                                    skipped_steps=self._skipped, buckets=buckets,
                                    reduce_sumsq=self._reducer(dist_plan, run, buckets))
        except LayoutChanged:  # a param moved, changed dtype or shape: rebuild, nothing was written
            self._buckets = self._rebuild(self._bucket_params(dist_plan), adopt=not dtensor)
            if not dtensor:
                self._attach_backward_sums(self._buckets, name, ops)
            groups = self._collect()  # sync may have pointed entries at the old buckets' views
            run = dist_plan.localize(groups) if dtensor else groups
            grad_norm = sngm_groups(run, norm=self.norm, backend=self.backend,
                                    skipped_steps=self._skipped, buckets=self._buckets,
                                    reduce_sumsq=self._reducer(dist_plan, run, self._buckets))
        state = self.state
        for grp, rgrp, (old_grads, old_bufs) in zip(groups, run, before):
            for p, g, buf, old_g, old_buf in zip(grp.params, rgrp.grads, rgrp.momentum_buffers,
                                                 old_grads, old_bufs):
                if g is None:
                    continue
                if dtensor:  # grads stay FSDP's; momentum is a DTensor laid out like the param
                    st = state[p]
                    buf = dist_plan.wrap_state(p, buf, st.get("momentum_buffer"))
                    if st.get("momentum_buffer", 0) is not buf:
                        st["momentum_buffer"] = buf
                    continue
                # Identity compares against what _collect read: in a steady loop nothing below
                # runs, and no tensor is hashed (Tensor.__hash__ is Python code).
                if g is not old_g and owns_storage(old_g):  # the grad now lives in the bucket
                    p.grad = g  # (one that is a view of someone's buffer, DDP's, stays theirs)
                if buf is not old_buf or (buf is None and p not in state):
                    state[p]["momentum_buffer"] = buf
        self.grad_norm = grad_norm
        return loss

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            for k, v in _SGD_ONLY_KEYS.items():
                g.setdefault(k, v)
        if self._skipped is not None:
            sd["sngm"] = {"skipped_steps": self._skipped.clone()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sngm", None)
        groups = []
        for g in state_dict["param_groups"]:
            if g.get("dampening", 0):
                raise ValueError(
                    f"cannot load an SGD state with dampening={g['dampening']}: SNGM has no dampening"
                )
            groups.append({k: v for k, v in g.items() if k not in _SGD_ONLY_KEYS})
        for g in groups:
            check_hyperparameters(g["lr"], g.get("momentum", 0.0), g.get("weight_decay", 0.0),
                                  g.get("nesterov", False))
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        if extra is not None:
            self._skipped = extra["skipped_steps"].to(self._device()).clone()
