"""Phase 1 in the backward pass: each grad's partial sums of squares, taken while it is in cache.

With ``SNGM(..., norm_in_backward=True)`` a post-accumulate-grad hook on every param runs the
backend's ``sumsq`` op over that param's rows of the last step's chunk table, on the grad where it
lies (nothing is copied), writing the very partials the step's own phase 1 would write: the same
rows, the same kernel, so the same bits. When every tensor of a (group, dtype) list has fresh
partials the step skips that list's ``sumsq`` and reads its grads once (the update) instead of
twice.

The step trusts a tensor's partials only when it can prove they describe what it is about to
update: the grad is the very tensor object the hook summed, at the same data pointer and version
counter (every in-place write through torch bumps it), the group's weight decay and sign are those
the hook used and, with weight decay, the param's version and pointer are unchanged too. Writers
that bypass those checks are handled by name:

* ``torch.amp.GradScaler``: its unscale (``_amp_foreach_non_finite_check_and_unscale_``) rewrites
  grads without a version bump. SNGM takes GradScaler's fused path (``_step_supports_amp_scaling``),
  so ``scaler.step`` tells it whether the grads are still scaled (then, with no weight decay, the
  scale cancels exactly and the partials stand) or were unscaled by ``scaler.unscale_`` (then the
  step sums again). Calling ``scaler.unscale_(opt)`` and then ``opt.step()`` directly, bypassing
  ``scaler.step``, is the one use of GradScaler this cannot see.
* ``p.grad.data = t`` and ``Module._apply`` (``model.double()``, ``.to(memory_format=...)``):
  a new data pointer, dtype or layout; the partials are dropped.
* ``torch.compile(opt.step)``: the traced step always sums itself (version counters are not
  something a graph can check).

What no check sees is a write through ``.data`` of an existing grad (``p.grad.data.mul_(2)``) or by
native code outside the dispatcher between backward and step: that is why the option is opt-in.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import device_cache  # its _capturing: the one capture flag


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class BackwardSums:
    """The hooks' side of phase 1 for one optimizer."""

    def __init__(self, ops, hyper: Callable[[int], Tuple[float, bool]]):
        self.ops = ops
        self.hyper = hyper  # group index -> that group's current (weight_decay, maximize)
        self.handles: Dict[int, object] = {}  # id(param) -> hook handle
        self.plan = None  # the plan whose partials the hooks write
        # id(param) -> (group index, its rows of the plan's table with tensor column 0, offset)
        self.slots: Dict[int, Tuple[int, Optional[Tensor], int]] = {}
        # id(param) -> (grad, grad version, grad pointer, param version, param pointer, wd, max)
        self.records: Dict[int, tuple] = {}
        self.steps = 0  # fused steps taken with the hooks attached
        self.served = 0  # ... of which took all of phase 1 from the hooks

    def attach(self, params: Sequence[Tensor]) -> None:
        ref = weakref.ref(self)
        for p in params:
            if p.requires_grad and id(p) not in self.handles:
                self.handles[id(p)] = p.register_post_accumulate_grad_hook(
                    lambda p, ref=ref: _hook(ref, p))

    def detach(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()
        self.records.clear()
        self.plan = None

    def on_grad(self, p: Tensor) -> None:
        slot = self.slots.get(id(p))
        g = p.grad
        if slot is None or g is None or _compiling():
            return
        gi, table, offset = slot
        self.records.pop(id(p), None)
        if (g.layout is not torch.strided or g.dtype is not p.dtype or g.shape != p.shape
                or not (p.is_contiguous() and g.is_contiguous())):
            return  # the step walks this one through a copy or refuses it: it sums it itself
        wd, maximize = self.hyper(gi)
        if table is not None:
            with torch.no_grad():
                self.ops.sumsq([p], [g], table, None, wd, maximize, self.plan.partials, offset)
        self.records[id(p)] = (g, g._version, g.data_ptr(), p._version, p.data_ptr(), wd, maximize)

    def fresh_lists(self, plan, lists, groups, grad_scale, kernel_scale, found_inf
                    ) -> Optional[List[bool]]:
        """Per list: whether the hooks' partials are provably this step's; None when none can be."""
        self.steps += 1
        if plan is not self.plan or _compiling() or kernel_scale is not None:
            return None  # another layout, a traced step, or grads the kernels must unscale
        if found_inf is not None and grad_scale is None:
            return None  # GradScaler.unscale_ rewrote the grads in place (no version bump)
        records = self.records
        out = []
        for lst in lists:
            wd, maximize = groups[lst.group_index].weight_decay, groups[lst.group_index].maximize
            ok = True
            for p, g, n in zip(lst.params, lst.grads, lst.numels):
                if n == 0:
                    continue
                r = records.get(id(p))
                if (r is None or r[0] is not g or r[1] != g._version or r[2] != g.data_ptr()
                        or r[5] != wd or r[6] != maximize
                        or (wd != 0 and (r[3] != p._version or r[4] != p.data_ptr()))):
                    ok = False
                    break
            out.append(ok)
        self.served += all(out)
        return out

    def stepped(self, plan, lists, groups) -> None:
        """A step ran over ``plan``: the partials are spent; arm the hooks on this layout."""
        self.records.clear()
        if plan is self.plan:
            return
        if device_cache._capturing(plan.partials.device):
            # The hooks' table slices would be clones made in the capture: filled only when the
            # graph replays. Not armed: the steps sum phase 1 themselves until an eager step.
            self.plan, self.slots = None, {}
            return
        self.plan = plan
        self.slots = {}
        for li, lst in enumerate(lists):
            row = 0
            params = groups[lst.group_index].params
            for i, n_rows in zip(lst.index, plan.rows[li]):
                table = None
                if n_rows:
                    table = plan.chunks[li][:, row:row + n_rows].clone()
                    table[0].zero_()  # the hook passes this tensor alone
                self.slots[id(params[i])] = (lst.group_index, table, plan.partial_offsets[li] + row)
                row += n_rows


def _hook(ref, p: Tensor) -> None:
    sums = ref()
    if sums is not None:
        sums.on_grad(p)
