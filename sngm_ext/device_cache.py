"""Device tensors built once from host data and reused across steps, safe under CUDA graph capture
and across streams: the rules of the Triton pointer tables (triton_kernels/tables.py) and of the
step plans (layout.py), written once. csrc/cuda/sngm_cuda_ops.cpp's ``device_table`` keeps the
same rules in C++ for the CUDA backend.

1. Never serve memory that is not filled yet. An entry built while its stream is being captured
   into a CUDA graph (``torch.cuda.graph``) has its uploads and fills recorded as graph nodes:
   its memory is filled only when the graph replays, so an eager step before the first replay
   would read garbage. It is returned to the capturing call alone, never cached; the next eager
   call builds (and caches) its own.
2. Never free memory a graph may read or write. A captured kernel keeps its tensors' addresses
   for every replay: a cached entry used during a capture is pinned for the cache's life (no limit
   counts it, no eviction drops it), and an entry built during a capture is kept for the cache's
   life with the host buffers its copy nodes read again at each replay. An entry served while
   torch.compile traces is pinned too (the compiled code reads it at every call). Eviction, least
   recently used first, only ever drops entries nothing compiled or captured uses.
3. Streams. An entry lives in blocks of the caching allocator on the stream that built it. A use
   on another stream first makes that stream wait for everything queued so far on the stream that
   last used the entry (its upload, and kernels that wrote it: the plans' partials are written
   every step), and marks the entry's blocks as used there (``record_stream``), so that freeing
   them on eviction never hands memory to new work while a kernel on any stream still uses it. No
   wait is captured into a graph (waiting on an event from outside a capture is not allowed):
   ``torch.cuda.graph`` synchronizes the device before capturing, so a cached entry's upload is
   done by then.

Everything CUDA-specific goes through ``_capturing``, ``_current_stream`` and ``_order_after``, so
tests check each rule on CPU by replacing them (tests/test_capture_rules.py). Not thread-safe:
callers that share a cache between threads hold a lock around ``get``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


def _capturing(device: torch.device) -> bool:
    """Whether work queued now on ``device``'s current stream is being captured into a CUDA graph
    (status active or invalidated). False while torch.compile traces: the lookup then happens
    at trace time, not when the compiled code runs."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _current_stream(device: torch.device):
    """The stream work on ``device`` is queued on now; None where there are no streams."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return None
    return torch.cuda.current_stream(device)


def _order_after(tensors: Sequence[Tensor], producer, consumer) -> None:
    """Work queued on ``consumer`` from now on runs after all work queued so far on ``producer``,
    and the blocks of ``tensors`` count as used on ``consumer`` (no host sync)."""
    event = torch.cuda.Event()
    event.record(producer)
    consumer.wait_event(event)
    for t in tensors:
        t.record_stream(consumer)


class Built(NamedTuple):
    """What a build function returns."""

    value: object  # what the cache serves
    device_tensors: List[Tensor]  # every device tensor the value's memory lives in
    host_sources: List[Tensor]  # pinned buffers its non-blocking uploads were copied from


class _Entry:
    __slots__ = ("built", "stream")

    def __init__(self, built: Built, stream):
        self.built = built
        self.stream = stream  # the last stream that used the entry (None off CUDA)


class DeviceCache:
    """``get(key, device, build, *args)``: the value cached under ``key``, built by
    ``build(*args)`` (its uploads queued on ``device``'s current stream) where there is none.
    ``limit``: how many entries no graph uses are kept (None: no limit)."""

    def __init__(self, limit: Optional[int] = None):
        self.limit = limit
        self._lru: "OrderedDict[Hashable, _Entry]" = OrderedDict()  # droppable, oldest first
        self._pinned: Dict[Hashable, _Entry] = {}  # used by a captured graph: never dropped
        self._graph_only: List[Built] = []  # built during a capture: never served, never freed

    def get(self, key: Hashable, device: torch.device, build: Callable[..., Built], *args):
        capturing = _capturing(device)
        stream = _current_stream(device)
        # torch.compile looks an entry up once, while tracing; the compiled code then reads it at
        # every call (mode="reduce-overhead": at every CUDA graph replay) without asking again
        pin = capturing or torch.compiler.is_compiling()
        entry = self._lru.get(key)
        if entry is not None:
            if pin:
                self._pinned[key] = self._lru.pop(key)
            else:
                self._lru.move_to_end(key)
        else:
            entry = self._pinned.get(key)
        if entry is not None:
            if stream is not None and entry.stream != stream and not capturing:
                _order_after(entry.built.device_tensors, entry.stream, stream)
                entry.stream = stream
            return entry.built.value
        built = build(*args)
        if capturing:
            self._graph_only.append(built)
            return built.value
        if pin:
            self._pinned[key] = _Entry(built, stream)
            return built.value
        if self.limit is not None:
            while self._lru and len(self._lru) >= self.limit:
                self._lru.popitem(last=False)
        self._lru[key] = _Entry(built, stream)
        return built.value

    def entries(self) -> Dict[Hashable, object]:
        """Every value the cache can serve (pinned ones included) by key, for diagnostics."""
        return {k: e.built.value for d in (self._pinned, self._lru) for k, e in d.items()}

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def pinned(self) -> int:
        """How many entries a captured graph uses (never dropped)."""
        return len(self._pinned)

    def graph_only(self) -> int:
        """How many values were built during a capture (kept, never served again)."""
        return len(self._graph_only)
