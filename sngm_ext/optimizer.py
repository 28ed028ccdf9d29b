"""``SNGM``: the torch.optim.Optimizer users swap in for torch.optim.SGD."""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._group import TensorGroup, check_hyperparameters
from .backends import BACKENDS
from .prepare import buffer_for
from .stepper import Stepper, check_norm

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
        check_norm(norm)
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {BACKENDS})")
        backend, require_fused = _backend_from_flags(backend, foreach, fused)
        if backend == "reference" and norm_in_backward:
            raise ValueError("norm_in_backward=True needs a fused backend; the 'reference' backend "
                             "computes the norm in the step")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize,
        )
        self.foreach, self.fused = foreach, fused
        self._init_runtime(dict(norm=norm, backend=backend, norm_in_backward=bool(norm_in_backward),
                                process_group=process_group, require_fused=require_fused))
        super().__init__(params, defaults)
        self._register_hooks()

    def _init_runtime(self, settings: Dict[str, Any]) -> None:
        """The step machinery (stepper.py) for these settings, and this class's dict hooks."""
        self._settings = dict(settings)
        self._stepper = Stepper(
            backend=settings["backend"], require_fused=settings["require_fused"],
            norm=settings["norm"], process_group=settings["process_group"],
            backward_sums_hyper=self._group_sums_hyper if settings["norm_in_backward"] else None,
        )
        self._complex_groups: set = set()  # id() of the groups with complex params
        self._state_view = _StateView()
        self._all_groups: List[dict] = []  # the groups a step must cover, all of them
        self._loading = None  # what load_state_dict restores should the loaded dict be refused

    def _register_hooks(self) -> None:
        # First of the hooks, so that users' hooks see the dicts as state_dict() returns them.
        self.register_state_dict_post_hook(SNGM._sgd_format, prepend=True)
        self.register_load_state_dict_post_hook(SNGM._after_load, prepend=True)

    # Settings are fixed at construction (the step machinery is built for them): read-only.
    norm = property(lambda self: self._settings["norm"])
    backend = property(lambda self: self._settings["backend"])
    norm_in_backward = property(lambda self: self._settings["norm_in_backward"])
    process_group = property(lambda self: self._settings["process_group"])
    _require_fused = property(lambda self: self._settings["require_fused"])
    _sums = property(lambda self: self._stepper.sums)

    def __getstate__(self) -> Dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; SNGM's settings and
        # counter travel too (pickle, deepcopy, torch.save(opt)).
        state = super().__getstate__()
        state["sngm"] = dict(self._settings, foreach=self.foreach, fused=self.fused,
                             skipped_steps=self._stepper.skipped)
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
        if settings is not None:  # a whole optimizer: pickle, deepcopy
            skipped = settings.pop("skipped_steps", None)
            self.foreach, self.fused = settings.pop("foreach", None), settings.pop("fused", None)
            self._init_runtime(settings)
            self._register_hooks()
            self._stepper.skipped = skipped
            if self._sums is not None:
                for group in self.param_groups:
                    self._sums.attach(group["params"])
        self._index_groups()

    def _index_groups(self) -> None:
        """What the step reads about the groups themselves: all of them, and the complex ones."""
        self._complex_groups = {id(g) for g in self.param_groups
                                if any(p.is_complex() for p in g["params"])}
        self._all_groups = list(self.param_groups)

    def __repr__(self) -> str:
        head = f"{type(self).__name__} ("
        return super().__repr__().replace(
            head, f"{head}\nnorm: {self.norm}\nbackend: {self.backend}", 1)

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
            devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError("SNGM needs every param on one device (one global norm), got "
                                 f"{sorted(map(str, devices))}")
            self._dist_plan()  # params on mixed process groups are refused here, not at a step
        except Exception:
            del self.param_groups[n_groups:]
            raise
        self._index_groups()
        if group["params"]:
            dist = self._stepper.dist
            self._stepper.warm(dist.device if dist is not None and dist.dtensor
                               else group["params"][0].device)
        if self._sums is not None:
            self._sums.attach(group["params"])

    def _dist_plan(self):
        """What the step reduces across ranks (distributed.py); None for a single process."""
        return self._stepper.dist_plan([g["params"] for g in self.param_groups])

    def _group_sums_hyper(self, group_index: int):
        group = self.param_groups[group_index]
        return float(group["weight_decay"]), bool(group["maximize"])

    @staticmethod
    def _check_param(p: Tensor) -> None:
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"SNGM supports params of dtype {SUPPORTED_DTYPES}, got {p.dtype}")

    @property
    def grad_norm(self) -> Optional[Tensor]:
        """The last step's global gradient norm ``n``: an fp64 0-dim tensor on the params'
        device (0 after a step in which no param had a grad; None before the first step; +inf
        when the step was skipped, or when the norm itself exceeds the fp64 range, fp64 elements
        near 1.8e308, while the step was taken)."""
        return self._stepper.grad_norm

    @property
    def skipped_steps(self) -> Optional[Tensor]:
        """Steps skipped for a non-finite gradient (or GradScaler's found inf): an int64 0-dim
        tensor on the params' device."""
        return self._stepper.skipped

    def _collect(self) -> List[TensorGroup]:
        """This step's tensors per group (grads None for params sitting out); changes nothing.
        Every tensor is checked by the step's preparation (prepare.py) before anything is
        written."""
        groups = []
        state = self.state
        # Outside a trace, C-level maps (Dynamo traces neither attrgetter nor the state view).
        views = None if torch.compiler.is_compiling() else self._state_view.of(state,
                                                                                 self.param_groups)
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            check_hyperparameters(lr, group["momentum"], group["weight_decay"], group["nesterov"],
                                  read_device_tensor=False)
            lr = lr.reshape(()) if isinstance(lr, Tensor) else float(lr)
            params = group["params"]
            grads = [p.grad for p in params] if views is None else list(map(_grad, params))
            if not group["momentum"]:
                bufs = [None] * len(params)
            elif views is not None:
                bufs = list(map(dict.get, views[gi], repeat("momentum_buffer")))
            else:  # one (Python) tensor hash each
                bufs = [None if st is None else st.get("momentum_buffer")
                        for st in map(state.get, params)]
            if id(group) in self._complex_groups:
                params, grads, bufs = _real_views(params, grads, bufs)
            groups.append(TensorGroup(
                params, grads, bufs, lr, float(group["momentum"]),
                float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]),
            ))
        return groups

    @torch.no_grad()
    def step(self, closure=None):
        """One SNGM step (see the class docstring). Under ``torch.amp.GradScaler``, ``scaler.step``
        hands the step its ``grad_scale`` and ``found_inf`` tensors (``_step_supports_amp_scaling``):
        the kernels unscale on the fly and a found inf skips the step on the device."""
        groups_now = self.param_groups
        if len(groups_now) != len(self._all_groups) or not all(map(is_, groups_now,
                                                                   self._all_groups)):
            self._check_group_subset(groups_now)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        run, prepared = self._stepper.step(
            self._collect(), [g["params"] for g in self.param_groups],
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        if prepared is not None:  # store the momentum buffers made or moved by this step
            dist = self._stepper.dist
            for gi, i in prepared.new_buffers:
                p, buf = self.param_groups[gi]["params"][i], run[gi].momentum_buffers[i]
                if dist is not None and dist.dtensor:  # momentum laid out like the param
                    buf = dist.wrap_state(p, buf, self.state[p].get("momentum_buffer"))
                elif p.is_complex():
                    buf = torch.view_as_complex(buf)  # SGD's format: the param's dtype
                self.state[p]["momentum_buffer"] = buf
        return loss

    def _check_group_subset(self, groups_now) -> None:
        """A step over only some of SNGM's groups would divide them by their own norm: DeepSpeed
        ZeRO 1/2 steps its optimizer one group at a time (``optimizer.param_groups =
        [group]``). Refused; any other edit of the list is taken as the new set of groups."""
        ids = {id(g) for g in self._all_groups}
        if len(groups_now) < len(self._all_groups) and all(id(g) in ids for g in groups_now):
            raise ValueError(
                f"SNGM was asked to step {len(groups_now)} of its {len(self._all_groups)} param "
                "groups: its one global norm needs every group in the same step (DeepSpeed ZeRO "
                "steps one group at a time: give SNGM a single param group there)")
        self._all_groups = list(groups_now)

    # ------------------------------------------------------------------ checkpoints

    @staticmethod
    def _sgd_format(opt: "SNGM", sd: Dict[str, Any]) -> Dict[str, Any]:
        """state_dict() in torch.optim.SGD's format (its group keys, so SGD loads it) plus the
        skipped-step counter."""
        for g in sd["param_groups"]:
            for k, v in _SGD_ONLY_KEYS.items():
                g.setdefault(k, v)
        if opt._stepper.skipped is not None:
            sd["sngm"] = {"skipped_steps": opt._stepper.skipped.clone()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim.Optimizer's, then every group and momentum buffer checked (_after_load); a
        refused dict leaves the optimizer exactly as it was."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"SNGM.load_state_dict needs a dict, got {type(state_dict).__name__}")
        self._loading = (self.state, self.param_groups, self._stepper.skipped,
                         state_dict.get("sngm"))
        try:
            super().load_state_dict(state_dict)
        except Exception:  # put back what was there
            self.state, self.param_groups, self._stepper.skipped, _ = self._loading
            self._index_groups()
            raise
        finally:
            self._loading = None

    @staticmethod
    def _after_load(opt: "SNGM") -> None:
        """The first load post hook: SGD's extra keys dropped, each group and buffer checked, the
        counter loaded; anything refused raises (and load_state_dict restores what was there)."""
        if opt._loading is None:
            return  # Optimizer.load_state_dict called on us directly: nothing to restore to
        extra = opt._loading[3]
        for g in opt.param_groups:
            for k in ("lr", "momentum"):
                if k not in g:
                    raise ValueError(f"cannot load a param group without {k!r}: {sorted(g)}")
            if g.get("dampening", 0):
                raise ValueError(
                    f"cannot load an SGD state with dampening={g['dampening']}: SNGM has no dampening"
                )
            for k in _SGD_ONLY_KEYS:
                g.pop(k, None)
            check_hyperparameters(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"])
            for p in g["params"]:
                st = opt.state.get(p)
                if st is not None and not isinstance(st, dict):
                    raise ValueError(f"cannot load a param's state that is a {type(st).__name__}, "
                                     "not a dict")
                if st and st.get("momentum_buffer") is not None:
                    _check_loaded_buffer(p, st["momentum_buffer"])
        skipped = opt._loading[2]
        if extra is not None:
            skipped = _loaded_counter(extra)
            device = next((p.device for g in opt.param_groups for p in g["params"]), None)
            if device is not None and device.type != "meta":
                skipped = skipped.to(device)
        opt._stepper.skipped = skipped


_grad = attrgetter("grad")
_NO_STATE: Dict[str, Any] = {}  # read-only stand-in for a param without a state entry


class _StateView:
    """Each param's state dict, per group, found without hashing a tensor per param per step.

    ``state.get(p)`` runs ``Tensor.__hash__`` (Python code) for each of a model's params on every
    step: ~40 us for ResNet-50's 161. The view keeps the state dict's keys and values as of the
    last lookup and checks them by identity, walking the dict in C (no hashing): any entry added,
    removed or replaced (``opt.state[p] = {...}``, ``load_state_dict``, a new param) changes them
    and the view is made again. Writes into a param's own dict (``state[p]["momentum_buffer"] =
    u``) need no check: the view holds those very dicts."""

    def __init__(self):
        self.state = self.keys = self.values = self.params = self.dicts = None

    def of(self, state, param_groups) -> List[List[dict]]:
        if not (state is self.state and len(state) == len(self.keys)
                and len(param_groups) == len(self.params)
                and all(map(is_, state, self.keys)) and all(map(is_, state.values(), self.values))
                and all(len(g["params"]) == len(ps) and all(map(is_, g["params"], ps))
                        for g, ps in zip(param_groups, self.params))):
            self.state, self.keys, self.values = state, list(state), list(state.values())
            self.params = [list(g["params"]) for g in param_groups]
            self.dicts = [[state[p] if p in state else _NO_STATE for p in ps]
                          for ps in self.params]
        return self.dicts


def _check_loaded_buffer(p: Tensor, buf) -> None:
    """A loaded momentum buffer SNGM can step with: a finite floating tensor of p's shape (a
    DTensor param's may be its local shard)."""
    from .distributed import is_dtensor, local_tensor

    if is_dtensor(p):
        shard = (isinstance(buf, Tensor) and not is_dtensor(buf)
                 and buf.shape == local_tensor(p).shape)
        if not shard and not (isinstance(buf, Tensor) and buf.shape == p.shape):
            raise ValueError(f"SNGM: a momentum buffer of {getattr(buf, 'shape', buf)!r} for a "
                             f"param of shape {tuple(p.shape)}")
        values = local_tensor(buf)
    else:
        values = buffer_for(p, buf)  # the step's own checks of a buffer
    if values.device.type != "meta" and values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"SNGM: the momentum buffer of a param of shape {tuple(p.shape)} holds "
                         "NaN or Inf values (a step would write them into the param)")


def _loaded_counter(extra) -> Tensor:
    """The ``"sngm"`` entry's skipped-step count as an int64 0-dim tensor, or ValueError."""
    if not isinstance(extra, dict) or "skipped_steps" not in extra:
        raise ValueError(f"cannot load an 'sngm' entry without 'skipped_steps': {extra!r}")
    v = extra["skipped_steps"]
    if isinstance(v, Tensor):
        if v.numel() != 1 or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"'sngm' skipped_steps must be one integer, got {v.numel()} x {v.dtype}")
        v = v.reshape(()).to(torch.int64)
    elif isinstance(v, int) and not isinstance(v, bool):
        v = torch.tensor(v, dtype=torch.int64)
    else:
        raise ValueError(f"'sngm' skipped_steps must be one integer, got {v!r}")
    if int(v) < 0:
        raise ValueError(f"'sngm' skipped_steps must be >= 0, got {int(v)}")
    return v.clone()
