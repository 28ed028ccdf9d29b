"""``SNGM``: the torch.optim.Optimizer users swap in for torch.optim.SGD."""

from __future__ import annotations

from operator import is_
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._group import TensorGroup, check_hyperparameters
from .backends import BACKENDS, resolve_backend
from .functional import _check_norm, sngm_groups
from .layout import PlanCache

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                    torch.complex64, torch.complex128)  # complex: stepped as real views
# Keys torch.optim.SGD keeps in its param groups that SNGM has no use for: written into
# state_dict() so SGD can load an SNGM checkpoint, dropped again when SNGM loads one of SGD's.
_SGD_ONLY_KEYS = {"dampening": 0, "foreach": None, "differentiable": False, "fused": None}


def _backend_from_flags(backend: str, foreach: Optional[bool], fused: Optional[bool]):
    """(backend, whether a fused one is required) from torch.optim.SGD's ``foreach``/``fused``.

    ``fused=True`` / ``foreach=True``: the multi-tensor kernels (what SNGM's fused backends are);
    with ``fused=True`` a step raises BackendUnavailable rather than fall back to the reference.
    ``fused=False`` / ``foreach=False``: the per-tensor ``reference`` backend. None: no say.
    """
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    wants = fused if fused is not None else foreach
    if wants is None:
        return backend, False
    which = "fused" if fused is not None else "foreach"
    if wants and backend == "reference":
        raise ValueError(f"{which}=True asks for SNGM's multi-tensor kernels, but "
                         "backend='reference' is the per-tensor implementation")
    if not wants and backend not in ("auto", "reference"):
        raise ValueError(f"{which}=False asks for the per-tensor implementation (backend="
                         f"'reference'), but backend={backend!r} is a fused one")
    return (backend if wants else "reference"), bool(fused)


def _real_views(params, grads, bufs):
    """Complex tensors as their real views (torch.view_as_real: a trailing dim of 2), which share
    their memory: the kernels update them in place, and the norm counts real and imaginary parts,
    as torch.optim.SGD steps complex params."""
    def real(t):
        return torch.view_as_real(t.resolve_conj()) if t is not None and t.is_complex() else t

    return [real(p) for p in params], [real(g) for g in grads], [real(u) for u in bufs]


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
            the backward pass, in a grad hook while the grad is still in cache; the step then
            reads the grads once instead of twice. Results are bitwise the same. The step
            computes the norm itself whenever grads or params were written after backward
            (``clip_grad_norm_``, ``GradScaler.unscale_``, DDP, ``zero_grad(set_to_none=False)``,
            ``p.grad.data = ...``, ``model.double()``), so it is exact with those too; what it
            cannot see is an in-place write through ``.data`` of an existing grad, or by native
            code outside the dispatcher, between backward and step, and ``scaler.unscale_(opt)``
            followed by ``opt.step()`` without ``scaler.step`` (see :mod:`sngm_ext.backward_sums`).
            Needs a fused backend.
        process_group: the group to sum the squared norm over when each rank steps only part of
            the params and it cannot be inferred: ``ZeroRedundancyOptimizer`` (bind it with
            ``functools.partial(SNGM, process_group=pg)``, see :mod:`sngm_ext.distributed`).
            Leave it None under DDP (every rank holds the whole gradient: nothing to reduce) and
            under FSDP2 (DTensor params: the group comes from their device mesh).

    After each step, :attr:`grad_norm` holds ``n`` as a 0-dim tensor on the params' device: reading
    it is the only thing that would sync. ``state_dict()`` keeps torch.optim.SGD's format
    (``state[i]["momentum_buffer"]``), so checkpoints move between SGD and SNGM both ways.
    """

    _step_supports_amp_scaling = True  # GradScaler hands step() grad_scale and found_inf

    def __init__(
        self,
        params,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        norm: str = "global",
        backend: str = "auto",
        norm_in_backward: bool = False,
        process_group=None,
    ):
        check_hyperparameters(lr, momentum, weight_decay, nesterov)
        if dampening != 0:
            raise ValueError(
                f"Invalid dampening: {dampening!r}. SNGM has no dampening: its momentum averages "
                "normalized directions (u = momentum * u + d / n), whose length the normalization "
                "already fixes; use dampening=0"
            )
        if differentiable:
            raise ValueError(
                "differentiable=True is not supported: SNGM's step (a global norm and fused "
                "in-place kernels) is not differentiable through; use differentiable=False"
            )
        _check_norm(norm)
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {BACKENDS})")
        self.backend, self._require_fused = _backend_from_flags(backend, foreach, fused)
        if self.backend == "reference" and norm_in_backward:
            raise ValueError("norm_in_backward=True needs a fused backend; the 'reference' backend "
                             "computes the norm in the step")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize,
        )
        self.norm = norm
        self.norm_in_backward = bool(norm_in_backward)
        self.process_group = process_group
        self.foreach, self.fused = foreach, fused
        self._init_runtime()
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        """What a step builds and keeps that is not state: caches, hooks, the counters."""
        self._dist = None  # distributed.DistPlan of the current params, None when single-process
        self._dist_key: Optional[tuple] = None
        self._plans = PlanCache()  # chunk tables, by layout (layout.py)
        self._sums = None  # backward_sums.BackwardSums under norm_in_backward
        if self.norm_in_backward:
            from .backward_sums import BackwardSums

            self._sums = BackwardSums(None, self._group_sums_hyper)
        self.grad_norm: Optional[Tensor] = None
        self._skipped: Optional[Tensor] = None
        self._complex_groups: set = set()  # id() of the groups with complex params

    # The settings that are not torch.optim.Optimizer's (which pickles only defaults, state and
    # param_groups): they travel through deepcopy, pickle and torch.save(opt) too.
    _SETTINGS = ("norm", "backend", "norm_in_backward", "process_group", "foreach", "fused",
                 "_require_fused")

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["sngm"] = {k: getattr(self, k) for k in self._SETTINGS}
        state["sngm"]["skipped_steps"] = self._skipped
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Unpickling, deepcopy, and (with only state and param_groups) load_state_dict: groups
        saved by an older SNGM or by torch.optim.SGD get the keys they lack, as SGD fills its."""
        state = dict(state)
        settings = state.pop("sngm", None)
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("momentum", 0.0)  # SGD's default (SNGM's own groups always have it)
        if settings is not None:  # a whole optimizer: pickle, deepcopy
            skipped = settings.pop("skipped_steps", None)
            for k, v in settings.items():
                setattr(self, k, v)
            self._init_runtime()
            self._skipped = skipped
            if self._sums is not None:
                for group in self.param_groups:
                    self._sums.attach(group["params"])
        self._complex_groups = {id(g) for g in self.param_groups
                                if any(p.is_complex() for p in g["params"])}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch.optim.Optimizer's, refusing (and leaving the optimizer as it was) a group with a
        bad hyper-parameter, an unsupported param, a param already given, or a second device."""
        n_groups = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group["lr"], group["momentum"], group["weight_decay"],
                                  group["nesterov"])
            seen = set()
            for g in self.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError(
                            f"SNGM: a param of shape {tuple(p.shape)} is given twice; each param "
                            "may appear once, in one group (it would be stepped twice)"
                        )
                    seen.add(id(p))
            for p in group["params"]:
                self._check_param(p)
            if any(p.is_complex() for p in group["params"]):
                self._complex_groups.add(id(group))
            devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError("SNGM needs every param on one device (one global norm), got "
                                 f"{sorted(map(str, devices))}")
            self._dist_plan()  # params on mixed process groups are refused here, not at a step
        except Exception:
            del self.param_groups[n_groups:]
            raise
        if self._sums is not None:
            self._sums.attach(group["params"])

    def _params_signature(self):
        return tuple(tuple(map(id, g["params"])) for g in self.param_groups)

    def _dist_plan(self, signature=None):
        """What the step reduces across ranks (distributed.py); None for plain tensors and no
        ``process_group`` (single process, DDP), where nothing is."""
        key = (id(self.process_group), signature or self._params_signature())
        if key != self._dist_key:
            from .distributed import plan_for

            self._dist = plan_for([p for g in self.param_groups for p in g["params"]],
                                  self.process_group)
            self._dist_key = key
        return self._dist

    def _group_sums_hyper(self, group_index: int):
        group = self.param_groups[group_index]
        return float(group["weight_decay"]), bool(group["maximize"])

    @staticmethod
    def _check_param(p: Tensor) -> None:
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"SNGM supports params of dtype {SUPPORTED_DTYPES}, got {p.dtype}")

    @property
    def skipped_steps(self) -> Optional[Tensor]:
        """Steps skipped for a non-finite norm: an int64 0-dim tensor on the params' device."""
        return self._skipped

    def _collect(self) -> List[TensorGroup]:
        """This step's tensors per group (grads None for params sitting out); changes nothing.

        Dtype and complexity are checked at add_param_group; sparse grads, shapes and devices by
        the functional step, before it writes anything.
        """
        groups = []
        state = self.state
        for group in self.param_groups:
            lr = group["lr"]
            check_hyperparameters(lr, group["momentum"], group["weight_decay"], group["nesterov"],
                                  read_device_tensor=False)
            lr = lr.reshape(()) if isinstance(lr, Tensor) else float(lr)
            params = group["params"]
            grads = [p.grad for p in params]
            if group["momentum"]:  # one (Python) tensor hash each
                bufs = [None if st is None else st.get("momentum_buffer")
                        for st in map(state.get, params)]
            else:
                bufs = [None] * len(params)
            if id(group) in self._complex_groups:
                params, grads, bufs = _real_views(params, grads, bufs)
            groups.append(TensorGroup(
                params, grads, bufs, lr, float(group["momentum"]),
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

    def _reducer(self, dist_plan, groups, fused: bool):
        if dist_plan is None:
            return None
        order = None
        if self.norm == "tensor" and dist_plan.per_tensor_reduce:
            from .distributed import segment_order

            order = segment_order(groups, fused)
        return dist_plan.reducer(self.norm, order)

    @torch.no_grad()
    def step(self, closure=None):
        """One SNGM step (see the class docstring). Under ``torch.amp.GradScaler``, ``scaler.step``
        hands the step its ``grad_scale`` and ``found_inf`` tensors (``_step_supports_amp_scaling``):
        the kernels unscale on the fly and a found inf skips the step on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._collect()
        dist_plan = self._dist_plan()
        if dist_plan is None and all(g is None for grp in groups for g in grp.grads):
            return loss  # nothing to step, on any device (meta params included)
        dtensor = dist_plan is not None and dist_plan.dtensor
        run = dist_plan.localize(groups) if dtensor else groups  # FSDP2: the local shards
        device = self._device()
        if dtensor:
            device = dist_plan.device
        name, ops = resolve_backend(self.backend, device, self._require_fused)
        last_device = device  # the counter lives where the params were at the last step
        if self._skipped is None or self._skipped.device != device:
            last_device = None
            prev = self._skipped
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
            if prev is not None:
                self._skipped.copy_(prev)
        sums = None
        if self._sums is not None and not dtensor and name != "reference":
            sums = self._sums
            sums.ops = ops
        before = [list(g.momentum_buffers) for g in run]
        grad_norm = sngm_groups(
            run, norm=self.norm, backend=self.backend, skipped_steps=self._skipped,
            reduce_sumsq=self._reducer(dist_plan, run, name != "reference"),
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            plans=self._plans, last_device=last_device, backward_sums=sums,
        )
        state = self.state
        for group, grp, rgrp, old_bufs in zip(self.param_groups, groups, run, before):
            if not dtensor and grp.momentum != 0 and all(map(is_, rgrp.momentum_buffers, old_bufs)):
                continue  # a steady loop: every buffer is the one already in state
            for p, g, buf, old_buf in zip(group["params"], rgrp.grads, rgrp.momentum_buffers,
                                          old_bufs):
                if g is None:
                    continue
                if dtensor:  # grads stay FSDP's; momentum is a DTensor laid out like the param
                    st = state[p]
                    buf = dist_plan.wrap_state(p, buf, st.get("momentum_buffer"))
                    if st.get("momentum_buffer", 0) is not buf:
                        st["momentum_buffer"] = buf
                    continue
                # An identity compare: in a steady loop nothing is stored and no tensor is hashed
                # (Tensor.__hash__ is Python code).
                if buf is not old_buf or (buf is None and p not in state):
                    if buf is not None and p.is_complex():
                        buf = torch.view_as_complex(buf)  # SGD's format: the param's dtype
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
