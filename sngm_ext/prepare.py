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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._group import TensorGroup

_CHANNELS_LAST = (torch.channels_last, torch.channels_last_3d)
_dtype = attrgetter("dtype")
_device = attrgetter("device")
_size = Tensor.size
_numel = Tensor.numel
_data_ptr = Tensor.data_ptr
_device_index = Tensor.get_device


def _index_of(device: torch.device) -> int:
    """What Tensor.get_device() returns for a tensor on ``device``: -1 on CPU."""
    return -1 if device.type == "cpu" else (device.index if device.index is not None else 0)
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
    update, the params' device (None when no param has a grad), ``new_buffers``: the (group,
    index) of each momentum buffer made or moved for this step, which the caller stores, and
    ``known``: what the next step's fast path may trust once this step has run."""

    __slots__ = ("lists", "copies", "device", "new_buffers", "known")

    def __init__(self, lists: List[StepList], copies: List[Tuple[Tensor, Tensor]],
                 device: Optional[torch.device], new_buffers: List[Tuple[int, int]],
                 known: List[Optional["Known"]]):
        self.lists = lists
        self.copies = copies
        self.device = device
        self.new_buffers = new_buffers
        self.known = known  # per group: what the next step may trust (Known), once this one ran

    def segment_params(self, groups: Sequence[TensorGroup]) -> List[int]:
        """For ``norm="tensor"``: the index, among all params in group order, of the param behind
        each per-tensor sum (``sumsq[:, 1 + k]``): the lists' order, which every backend follows."""
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


class Known(NamedTuple):
    """What a step checked of a uniform group (prepare's fast path): its params' data pointers,
    dtype, sizes and numels, and its momentum buffers. The next step trusts the params' dtype,
    device, sizes and layout while their pointers are these (``p.data = ...`` and
    ``model.double()`` move them) and its momentum buffers while they are these very tensors;
    the grads, new each step, are checked every step."""

    ptrs: List[int]
    dtype: torch.dtype
    sizes: List[torch.Size]
    numels: List[int]
    bufs: Tuple[Tensor, ...]


def _known(grp: TensorGroup, n_lists: int, copied: bool) -> Optional[Known]:
    """The Known of a group the per-tensor checks passed, when it is uniform (one list, every
    grad present, everything contiguous): the next step can then take the fast path."""
    params = grp.params
    if n_lists != 1 or copied or any(map(is_, grp.grads, repeat(None))) \
            or not all(map(_contiguous, params)):
        return None
    bufs = tuple(grp.momentum_buffers) if grp.momentum != 0 else ()
    return Known(list(map(_data_ptr, params)), params[0].dtype, list(map(_size, params)),
                 list(map(_numel, params)), bufs)


def _uniform_group(gi: int, grp: TensorGroup, device: torch.device,
                   known: Optional[Known]) -> Optional[Tuple[StepList, Known]]:
    """The group as one kernel list when it is the common case (see the module docstring), with
    C-level maps (~10-15 us each for ResNet-50's 161 tensors; a Python loop over the same checks
    costs ~0.6 us per tensor). None otherwise: the caller then checks tensor by tensor."""
    params, grads = grp.params, grp.grads
    if not params or any(map(is_, grads, repeat(None))):
        return None
    ptrs = list(map(_data_ptr, params))
    if known is not None and ptrs == known.ptrs:  # the params the last step checked
        dt, sizes, numels = known.dtype, known.sizes, known.numels
    else:
        dt = params[0].dtype
        if not (all(map(is_, map(_dtype, params), repeat(dt)))
                and all(map(eq, map(_device, params), repeat(device)))
                and all(map(_contiguous, params))):
            return None
        sizes, numels = list(map(_size, params)), list(map(_numel, params))
    # The grads' device by its index (an int: ~half the cost of a torch.device): torch itself
    # refuses a grad of another device type (p.grad = t, and p.grad.data = t alike), so an index
    # is all that can differ.
    if not (all(map(is_, map(_dtype, grads), repeat(dt)))
            and all(map(eq, map(_device_index, grads), repeat(_index_of(device))))
            and list(map(_size, grads)) == sizes and all(map(_contiguous, grads))):
        return None  # sparse grads too: they are not contiguous
    bufs = grp.momentum_buffers if grp.momentum != 0 else []
    if bufs and (known is None or known.dtype is not dt or len(known.bufs) != len(bufs)
                 or not all(map(is_, bufs, known.bufs)) or any(map(is_, bufs, repeat(None)))):
        return None  # a buffer the last step did not check (new, loaded, set by hand, or the
        # params changed dtype under it: model.double())
    lst = StepList(gi)
    lst.params, lst.grads, lst.bufs = list(params), list(grads), list(bufs)
    lst.numels, lst.index = numels, range(len(params))
    return lst, Known(ptrs, dt, sizes, numels, tuple(bufs))


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
    case skip the per-tensor checks; ``known[gi]``: what the last step checked of group ``gi``
    (its ``Prepared.known``). Entries of ``momentum_buffers`` that are None (momentum != 0), or of another
    dtype or device than their param, are replaced in those lists by the buffers to keep.
    """
    lists: List[StepList] = []
    copies: List[Tuple[Tensor, Tensor]] = []
    new_buffers: List[Tuple[int, int]] = []
    checked: List[Optional[Known]] = []
    fast = device is not None and not torch.compiler.is_compiling()
    found = None
    for gi, grp in enumerate(groups):
        if fast:
            want = device if found is None else found  # one device for every group
            hit = _uniform_group(gi, grp, want, known[gi] if known and gi < len(known) else None)
            if hit is not None:
                found = want
                lists.append(hit[0])
                checked.append(hit[1])
                continue
        n_lists, n_copies = len(lists), len(copies)
        found = _checked_group(gi, grp, found, lists, copies, new_buffers)
        checked.append(_known(grp, len(lists) - n_lists, len(copies) > n_copies))
    return Prepared(lists, copies, found, new_buffers, checked)
