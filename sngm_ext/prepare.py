"""One preparation of a step's tensors, for the reference and every fused backend alike.

``prepare(groups, ...)`` checks everything the step will read (device, dtype, shape, layout of
each grad and momentum buffer against its param) and raises before any backend writes anything:
a refused step leaves params, grads, state and counters exactly as they were. It creates the
missing momentum buffers (``u_0 = 0``), moves ones left behind by ``model.double()`` or ``.to()``
to their param's dtype and device, and sorts the present tensors into kernel lists, one per
(param group, dtype) in order of first appearance. Every backend walks these same lists, so the
order of the per-tensor sums (``norm="tensor"``) is one order everywhere by construction.

The common case (every param has a grad of its own dtype, shape and device, everything
contiguous, the momentum buffers the very tensors checked at the last step) is checked with
C-level maps, a few tens of ns per tensor; anything else takes the per-tensor checks, which name
the offending tensor. While ``torch.compile`` traces the step the per-tensor checks always run
(Dynamo traces plain loops, not ``map`` over attribute getters).
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, eq, is_
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import TensorGroup

_CHANNELS_LAST = (torch.channels_last, torch.channels_last_3d)
_dtype = attrgetter("dtype")
_device = attrgetter("device")
_size = Tensor.size
_numel = Tensor.numel
_contiguous = Tensor.is_contiguous


class StepList:
    """The present tensors of one (param group, dtype), as the kernels receive them."""

    __slots__ = ("group_index", "params", "grads", "bufs", "numels", "index")

    def __init__(self, group_index: int):
        self.group_index = group_index
        self.params: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.bufs: List[Tensor] = []  # empty where the group has momentum 0
        self.numels: List[int] = []
        self.index: List[int] = []  # position of each tensor in its group's param list


class Prepared:
    """A step's checked tensors: the kernel lists, the contiguous stand-ins to copy back after the
    update, the params' device (None when no param has a grad), and ``new_buffers``: the
    (group, index) of each momentum buffer made or moved for this step, which the caller stores."""

    __slots__ = ("lists", "copies", "device", "new_buffers")

    def __init__(self, lists: List[StepList], copies: List[Tuple[Tensor, Tensor]],
                 device: Optional[torch.device], new_buffers: List[Tuple[int, int]]):
        self.lists = lists
        self.copies = copies
        self.device = device
        self.new_buffers = new_buffers

    def segment_params(self, groups: Sequence[TensorGroup]) -> List[int]:
        """For ``norm="tensor"``: the index, among all params in group order, of the param behind
        each per-tensor sum (``sumsq[1 + k]``): the lists' order, which every backend follows."""
        offsets, n = [], 0
        for grp in groups:
            offsets.append(n)
            n += len(grp.params)
        return [offsets[lst.group_index] + i for lst in self.lists for i in lst.index]

    def write_back(self) -> None:
        """Copy the updated stand-ins of non-contiguous tensors back into them."""
        if self.copies:
            torch._foreach_copy_([c[0] for c in self.copies], [c[1] for c in self.copies])


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype} on {t.device}"


def check_grad(p: Tensor, g: Tensor, device: torch.device) -> None:
    """A grad the step can use for ``p``: strided, and p's own shape, dtype and device."""
    if not isinstance(g, Tensor):
        raise TypeError(f"SNGM: a param of shape {tuple(p.shape)} has a grad of type "
                        f"{type(g).__name__}")
    if g.layout is not torch.strided:
        raise RuntimeError("SNGM does not support sparse gradients")
    if p.device != device:
        raise ValueError(f"SNGM needs every param on one device, got {device} and {p.device}")
    if g.shape != p.shape or g.dtype is not p.dtype or g.device != p.device:
        raise ValueError(f"SNGM: a param of {_describe(p)} has a grad of {_describe(g)}")


def buffer_for(p: Tensor, u) -> Tensor:
    """p's momentum buffer: a new one (u_0 = 0), or ``u`` moved to p's dtype and device (after
    ``model.double()`` or ``.to()``, as load_state_dict moves state). Refused: anything but a
    floating tensor of p's shape holding data (a meta tensor has none)."""
    if u is None:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    if not isinstance(u, Tensor):
        raise TypeError(f"SNGM: the momentum buffer of a param of shape {tuple(p.shape)} is a "
                        f"{type(u).__name__}, not a tensor")
    if u.shape != p.shape or u.layout is not torch.strided or not (
            u.is_floating_point() or u.is_complex()):
        raise ValueError(f"SNGM: a momentum buffer of {_describe(u)} ({u.layout}) for a param of "
                         f"{_describe(p)}")
    if u.device != p.device and u.device.type == "meta":
        raise ValueError(f"SNGM: the momentum buffer of a param of {_describe(p)} is on the meta "
                         "device (it holds no values)")
    if u.dtype is p.dtype and u.device == p.device:
        return u
    return u.to(device=p.device, dtype=p.dtype)


def _one_layout(p: Tensor, g: Tensor, u: Optional[Tensor]) -> bool:
    """True when p, g (and u), not all contiguous, can still be walked in memory order as they
    are: one dense channels-last layout with identical strides (conv weights and their grads)."""
    if p.dim() not in (4, 5):
        return False
    fmt = _CHANNELS_LAST[p.dim() - 4]
    stride = p.stride()
    return (p.is_contiguous(memory_format=fmt) and g.stride() == stride
            and (u is None or u.stride() == stride))


def _uniform_group(gi: int, grp: TensorGroup, device: torch.device,
                   known: Optional[tuple]) -> Optional[StepList]:
    """The group as one kernel list when it is the common case (see the module docstring), with
    C-level maps where a Python loop over the same checks costs ~0.6 us per tensor. None
    otherwise: the caller then checks tensor by tensor."""
    params, grads = grp.params, grp.grads
    if not params or any(map(is_, grads, repeat(None))):
        return None
    dt = params[0].dtype
    if not (all(map(is_, map(_dtype, params), repeat(dt)))
            and all(map(is_, map(_dtype, grads), repeat(dt)))
            and all(map(eq, map(_device, params), repeat(device)))
            and all(map(eq, map(_device, grads), repeat(device)))):
        return None
    sizes = list(map(_size, params))
    if sizes != list(map(_size, grads)):
        return None
    if not (all(map(_contiguous, params)) and all(map(_contiguous, grads))):
        return None  # sparse grads too: they are not contiguous
    bufs = grp.momentum_buffers if grp.momentum != 0 else []
    if bufs and (known is None or known[0] is not dt or len(known[1]) != len(bufs)
                 or not all(map(is_, bufs, known[1])) or any(map(is_, bufs, repeat(None)))):
        return None  # a buffer the last step did not check (new, loaded, set by hand, or the
        # params changed dtype under it: model.double())
    lst = StepList(gi)
    lst.params, lst.grads, lst.bufs = list(params), list(grads), list(bufs)
    lst.numels, lst.index = list(map(_numel, params)), range(len(params))
    return lst


def _checked_group(gi: int, grp: TensorGroup, device: Optional[torch.device],
                   lists: List[StepList], copies: List[Tuple[Tensor, Tensor]],
                   new_buffers: List[Tuple[int, int]]) -> Optional[torch.device]:
    """The group's present tensors, checked one by one, appended to ``lists`` by dtype."""
    has_mom = grp.momentum != 0
    bufs = grp.momentum_buffers
    by_dtype: Dict[torch.dtype, StepList] = {}
    for i, (p, g) in enumerate(zip(grp.params, grp.grads)):
        if g is None:
            continue
        if device is None:
            device = p.device
        check_grad(p, g, device)
        u = None
        if has_mom:
            u = buffer_for(p, bufs[i])
            if u is not bufs[i]:
                bufs[i] = u
                new_buffers.append((gi, i))
        lst = by_dtype.get(p.dtype)
        if lst is None:
            lst = by_dtype[p.dtype] = StepList(gi)
            lists.append(lst)
        if not (p.is_contiguous() and g.is_contiguous() and (u is None or u.is_contiguous())) \
                and not _one_layout(p, g, u):
            pc = p.contiguous()
            if pc is not p:
                copies.append((p, pc))
            g = g.contiguous()
            if u is not None and not u.is_contiguous():
                uc = u.contiguous()
                copies.append((u, uc))
                u = uc
            p = pc
        lst.params.append(p)
        lst.grads.append(g)
        if u is not None:
            lst.bufs.append(u)
        lst.numels.append(p.numel())
        lst.index.append(i)
    return device


def prepare(groups: Sequence[TensorGroup], device: Optional[torch.device] = None,
            known: Optional[Sequence[Optional[tuple]]] = None) -> Prepared:
    """Check this step's tensors and sort them into kernel lists; writes nothing a caller can see.

    ``device``: where the params were at the last step (None: unknown), which lets the common
    case skip the per-tensor checks; ``known[gi]``: (params' dtype, momentum buffers) of group
    ``gi`` as the last step checked them. Entries of ``momentum_buffers`` that are None (momentum != 0), or of another
    dtype or device than their param, are replaced in those lists by the buffers to keep.
    """
    lists: List[StepList] = []
    copies: List[Tuple[Tensor, Tensor]] = []
    new_buffers: List[Tuple[int, int]] = []
    fast = device is not None and not torch.compiler.is_compiling()
    found = None
    for gi, grp in enumerate(groups):
        if fast:
            want = device if found is None else found  # one device for every group
            lst = _uniform_group(gi, grp, want, known[gi] if known and gi < len(known) else None)
            if lst is not None:
                found = want
                lists.append(lst)
                continue
        found = _checked_group(gi, grp, found, lists, copies, new_buffers)
    return Prepared(lists, copies, found, new_buffers)
