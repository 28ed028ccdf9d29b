"""Chunk tables: how one launch per phase covers every tensor of a (param group, dtype).

The kernels read and write each user's tensor where it lives. A step hands each op a list of
tensors and a *chunk table*: int64 ``[4, n]`` rows of (tensor, start, length, segment), at most
``CHUNK`` elements each, never crossing a tensor (``docs/ops.md`` is the contract). One program (a
GPU block, a CPU task) per row: the launch count depends on the number of (group, dtype) lists,
never on the number of tensors. Starts are multiples of ``CHUNK``, so a chunk of a 16-byte aligned
tensor is aligned too and the kernels pick 128-bit accesses per chunk.

Only tensors whose grad is present this step are listed, which is how a param with ``grad is
None`` is skipped exactly. The segment column picks the sum of squares a chunk's norm comes from:
0 the global one, ``1 + k`` the k-th present tensor's for ``norm="tensor"``.

Tables depend on shapes only (never on data pointers), so they are cached by the pattern of
present tensors and their sizes: a steady training loop uploads them once, even with
``zero_grad(set_to_none=True)`` handing out new grad tensors every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .device_cache import Built, DeviceCache
from .scaled_norm import ROWS  # med, big, small

# Elements per chunk-table row (csrc/sngm_math.h kChunk too, which the CUDA kernels size their
# passes by: a test keeps the two equal; the Triton launchers receive it as their BLOCK). 4096 fp32 = 16 KiB per tensor read per program: ResNet-50 (25.6M params) gives ~6.3k
# programs and partials, enough to balance 2 CPU cores or 132 SMs, few enough that the partials
# are nothing next to the tensors.
CHUNK = 4096

# The accumulation dtype of every sum of squares: every fp32 square fits a double, so no finite
# fp32/bf16/fp16 gradient overflows the norm or underflows it to zero; fp64 gradients add two
# scaled rows beside it (scaled_norm.py), so partials and sums are [3, n].
ACC_DTYPE = torch.float64


def chunk_rows(numels: Sequence[int], first_segment: int, per_tensor: bool):
    """(tensor, start, length, segment) columns for tensors of ``numels``, and the chunks of each.

    With ``per_tensor`` tensor k is segment ``first_segment + k`` (an empty tensor too, with no
    rows, so segment numbers agree across ranks holding uneven shards); otherwise every row uses
    segment 0, the global sum.
    """
    ts: List[int] = []
    starts: List[int] = []
    lens: List[int] = []
    segs: List[int] = []
    counts: List[int] = []
    for k, n in enumerate(numels):
        cs = range(0, n, CHUNK)
        ts += [k] * len(cs)
        starts += cs
        lens += [min(CHUNK, n - c) for c in cs]
        segs += [first_segment + k if per_tensor else 0] * len(cs)
        counts.append(len(cs))
    return (ts, starts, lens, segs), counts


@dataclass
class StepPlan:
    """Device-side tables of one step pattern: per list its table and where its partials start."""

    chunks: List[Tensor]  # per list: int64 [4, n] on the device
    rows: List[List[int]]  # per list: chunk rows of each tensor (norm_in_backward slices by it)
    partial_offsets: List[int]  # per list: its first partial in `partials`
    partials: Tensor  # float64 [3, n]: a chunk's med, big and small sums (at least one column)
    seg_ptr: Tensor  # int64 [n_segments + 1]: segment s owns partials[:, seg_ptr[s]:seg_ptr[s+1]]
    n_sumsq: int  # 1 (norm="global": the total) or 1 + n_segments (norm="tensor")
    sumsq: Tensor  # float64 [3, n_sumsq]: finalize's output, rewritten by every step
    total: Tensor  # sumsq[0, 0], the view made once (each tiny op costs a few us per step): the
    #                total's square without fp64 lists (their other rows are then 0)


class PlanCache:
    """Plans keyed by (norm, device, each list's sizes), kept by device_cache.py's rules: a plan
    built during a CUDA graph capture is never served to another call, plans a captured graph uses
    are never dropped, and at most ``limit`` others are kept (least recently used dropped first),
    so a never-repeating pattern does not grow memory forever."""

    def __init__(self, limit: int = 64):
        self._cache = DeviceCache(limit)

    @property
    def limit(self) -> int:
        return self._cache.limit

    @property
    def plans(self) -> Dict[Tuple, StepPlan]:
        """Every plan the cache can serve, by key (diagnostics: the benchmarks count its bytes)."""
        return self._cache.entries()

    def get(self, key: Tuple, numels: Sequence[Sequence[int]], per_tensor: bool,
            device: torch.device) -> StepPlan:
        return self._cache.get(key, device, _build_plan, numels, per_tensor, device)


def _build_plan(numels, per_tensor, device) -> Built:
    sources: List[Tensor] = []
    plan = make_plan(numels, per_tensor, device, sources)
    return Built(plan, plan.chunks + [plan.partials, plan.seg_ptr, plan.sumsq], sources)


def _upload(host: Tensor, device: torch.device, sources: Optional[List[Tensor]]) -> Tensor:
    """A host table on ``device``: from pinned memory with a non-blocking copy on a GPU (no host
    sync; the caching host allocator keeps the pinned block until the copy is done). The pinned
    buffer goes to ``sources``: a copy captured into a CUDA graph reads it again at each replay."""
    if device.type == "cpu":
        return host
    pinned = host.pin_memory()
    if sources is not None:
        sources.append(pinned)
    return pinned.to(device, non_blocking=True)


def make_plan(numels: Sequence[Sequence[int]], per_tensor: bool, device: torch.device,
              sources: Optional[List[Tensor]] = None) -> StepPlan:
    """The tables for lists of tensors with these sizes (one list per (group, dtype)); the pinned
    buffers their uploads copy from are appended to ``sources``."""
    chunks, rows, offsets, seg_sizes = [], [], [], []
    n_partials = 0
    for ns in numels:
        cols, counts = chunk_rows(ns, 1 + len(seg_sizes), per_tensor)
        offsets.append(n_partials)
        n_partials += len(cols[0])
        rows.append(counts)
        if per_tensor:
            seg_sizes += counts
        chunks.append(_upload(torch.tensor(cols, dtype=torch.int64).reshape(4, -1), device,
                              sources))
    n_sumsq = 1 + len(seg_sizes) if per_tensor else 1
    if not per_tensor:
        seg_sizes = [n_partials]
    seg_ptr = [0]
    for s in seg_sizes:
        seg_ptr.append(seg_ptr[-1] + s)
    sumsq = torch.empty(ROWS, n_sumsq, dtype=ACC_DTYPE, device=device)
    return StepPlan(
        chunks=chunks,
        rows=rows,
        partial_offsets=offsets,
        partials=torch.zeros(ROWS, max(n_partials, 1), dtype=ACC_DTYPE, device=device),
        seg_ptr=_upload(torch.tensor(seg_ptr, dtype=torch.int64), device, sources),
        n_sumsq=n_sumsq,
        sumsq=sumsq,
        total=sumsq[0, 0],
    )
