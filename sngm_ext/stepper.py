"""What an optimizer's steps keep, and the step itself: prepare, run a backend, report.

:class:`Stepper` owns everything a step builds and keeps that is not optimizer state: the
resolved ops per device, the chunk-table cache, the skipped-step counter and the last norm, the
backward-sums hooks (``norm_in_backward``), the distributed plan and where the params were at
the last step. ``SNGM.step`` collects the groups' tensors, calls :meth:`Stepper.step` once, and
stores the momentum buffers it made; the functional ``sngm_groups`` calls the same method on a
one-off Stepper, so both run one code path.

Its outputs live on the Stepper, not on the optimizer: ``torch.compile`` (torch 2.13) keeps a
traced step's attribute writes on a plain object and drops those on the optimizer itself.
"""

from __future__ import annotations

from operator import is_
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import device_cache  # its _capturing: the one capture flag (tests set it)
from . import fused as _fused  # looked up per step: tests count the launches through it
from ._group import TensorGroup, lr_operands
from .backends import BackendUnavailable, resolve_backend
from .layout import ACC_DTYPE, PlanCache
from .prepare import Prepared, prepare
from .reference import sngm_reference

NORMS = ("global", "tensor")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class Stepper:
    """One optimizer's step machinery (see the module docstring)."""

    def __init__(self, *, backend: str = "auto", require_fused: bool = False,
                 norm: str = "global", process_group=None,
                 backward_sums_hyper: Optional[Callable[[int], Tuple[float, bool]]] = None):
        check_norm(norm)
        self.backend = backend
        self.require_fused = require_fused
        self.norm = norm
        self.process_group = process_group
        self.ops: Dict[torch.device, tuple] = {}  # device -> (backend name, FusedOps or None)
        self.plans = PlanCache()  # chunk tables, by layout (layout.py)
        self.sums = None  # backward_sums.BackwardSums under norm_in_backward
        if backward_sums_hyper is not None:
            from .backward_sums import BackwardSums

            self.sums = BackwardSums(None, backward_sums_hyper)
        self.dist = None  # distributed.DistPlan of the current params, None when single-process
        self._dist_key: Optional[list] = None
        self.device: Optional[torch.device] = None  # where the params were at the last step
        self.known: List[Optional[tuple]] = []  # per group: prepare.Known, what the last step checked
        self.grad_norm: Optional[Tensor] = None
        self.skipped: Optional[Tensor] = None
        self.counter_moves = True  # False: a caller's counter, never replaced

    # ------------------------------------------------------------------ set-up, outside steps

    def resolve(self, device: torch.device) -> tuple:
        """(name, ops) of this Stepper's backend on ``device``, resolved once per device."""
        hit = self.ops.get(device)
        if hit is None:
            hit = self.ops[device] = resolve_backend(self.backend, device, self.require_fused)
        return hit

    def warm(self, device: torch.device) -> None:
        """Resolve (load, build) the backend for ``device`` now, when params are added, so that a
        step traced by ``torch.compile`` as the first call of a process finds it resolved. A
        backend that cannot run raises at the step instead, where the user asked for it."""
        try:
            self.resolve(device)
        except BackendUnavailable:
            pass

    def dist_plan(self, param_lists: Sequence[Sequence[Tensor]]):
        """What the step reduces across ranks (distributed.py), worked out again when the params
        or the process group change; None for a single process."""
        key = self._dist_key  # (the lists of params the plan was made for)
        if key is None or len(key) != len(param_lists) or not all(
                len(a) == len(b) and all(map(is_, a, b)) for a, b in zip(key, param_lists)):
            from .distributed import plan_for

            self.dist = plan_for([p for ps in param_lists for p in ps], self.process_group)
            self._dist_key = [list(ps) for ps in param_lists]
        return self.dist

    def _counter(self, device: torch.device) -> Tensor:
        """The skipped-step counter on ``device``: it follows the params when they move."""
        prev = self.skipped
        if prev is not None and prev.device != device and not self.counter_moves:
            raise ValueError(f"SNGM: skipped_steps is on {prev.device} but the params are on "
                             f"{device}")
        if prev is None or prev.device != device:
            self.skipped = torch.zeros((), dtype=torch.int64, device=device)
            if prev is not None:
                self.skipped.copy_(prev)
        return self.skipped

    # ------------------------------------------------------------------ the step

    def step(self, groups: Sequence[TensorGroup], param_lists: Sequence[Sequence[Tensor]], *,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             reduce_sumsq: Optional[Callable[[Tensor], None]] = None
             ) -> Tuple[Sequence[TensorGroup], Optional[Prepared]]:
        """One SNGM step of ``groups`` (``param_lists``: the optimizer's params, for the
        distributed plan). Everything is checked before anything is written; ``grad_norm`` and
        the counter are updated. Returns the groups as stepped (local tensors for DTensor
        params) and their preparation (None when nothing was stepped), whose ``new_buffers``
        are the momentum buffers to store."""
        dist = self.dist_plan(param_lists)
        run = dist.localize(groups) if dist is not None and dist.dtensor else groups
        prepared = prepare(run, self.device, self.known)
        device = prepared.device
        if device is None:  # no grad anywhere this step
            if dist is None:
                device = next((p.device for ps in param_lists for p in ps), torch.device("cpu"))
                self.grad_norm = torch.zeros((), dtype=ACC_DTYPE, device=device)
                return run, None
            device = dist.device  # a rank without grads still joins the collective
        _, ops = self.resolve(device)
        lrs = [lr_operands(grp.lr, device) for grp in run]
        if (prepared.new_buffers or self.skipped is None or self.skipped.device != device) \
                and device_cache._capturing(device):
            raise RuntimeError(
                "SNGM: this step would create its momentum buffers or skipped-step counter inside "
                "a CUDA graph capture (every replay would zero them again): take one eager step "
                "before capturing (torch.cuda.graph's warm-up on a side stream)")
        skipped = self._counter(device)
        # Per-tensor sums from the kernels: norm="tensor", or a distributed plan that weights each
        # tensor's sum by how many ranks hold it (its reducer then writes the global total into
        # every entry, so each tensor is still divided by the one global norm).
        per_tensor = self.norm == "tensor" or (dist is not None and dist.needs_per_tensor_sums)
        if dist is not None:
            segments = per_tensor and (dist.per_tensor_reduce or dist.needs_per_tensor_sums)
            reduce_sumsq = dist.reducer(self.norm,
                                        prepared.segment_params(run) if segments else None)
        if ops is None:
            norm = sngm_reference(prepared, run, device=device,
                                  norm="tensor" if per_tensor else "global",
                                  skipped_steps=skipped,
                                  reduce_sumsq=reduce_sumsq, grad_scale=grad_scale,
                                  found_inf=found_inf)
        else:
            sums = self.sums if dist is None or not dist.dtensor else None
            if sums is not None and sums.ops is not ops:
                sums.ops = ops
            norm = _fused.fused_step(prepared, ops, device=device, tensor_groups=run,
                                     per_tensor=per_tensor,
                                     skipped_steps=skipped, plans=self.plans,
                                     reduce_sumsq=reduce_sumsq, grad_scale=grad_scale,
                                     found_inf=found_inf, backward_sums=sums, lrs=lrs)
        self.device = device
        self.known = prepared.known
        self.grad_norm = norm
        return run, prepared
