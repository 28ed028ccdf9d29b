"""Device-side tables of the user's tensors, cached so that a steady training loop builds none.

A table is one int64 tensor on the tensors' device: ``[numels | ptrs of list 0 | ptrs of list 1 |
...]``, each part ``n_tensors`` long (the lists: params, grads and, for update with momentum, the
momentum buffers). The kernels read a chunk's base pointers from it, so one launch covers every
tensor whatever their number.

Tables and constants are kept by sngm_ext/device_cache.py's rules (the one module of sngm_ext this
package uses: torch only, no sngm_ext state): nothing built during a CUDA graph capture is served
to another call, nothing a captured graph uses is ever dropped, and a use on another stream waits
for the upload and marks the memory as used there.
"""

import threading

import torch

from ..device_cache import Built, DeviceCache

# One table per (device, exact pointers, numels): a changed pointer or shape is a new key, so a
# table never points at memory its tensors left. The hooks of norm_in_backward ask for one table
# per param every step (sumsq([p], [g])): room for a large model's params, or every step would
# rebuild them all; 4096 tables are ~2 MB of device memory. Least recently used dropped first.
_MAX_TABLES = 4096
_tables = DeviceCache(_MAX_TABLES)
_constants = DeviceCache(None)  # a few values per device: never dropped
_lock = threading.Lock()  # the caches are shared by every optimizer, in any thread


def _build_table(values, device: torch.device) -> Built:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return Built(host, [host], [])  # CPU tensors under TRITON_INTERPRET=1
    # Pinned and non-blocking: the copy is queued on the current stream, no host sync.
    host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    return Built(table, [table], [host])


def pointer_table(device: torch.device, lists) -> torch.Tensor:
    """The int64 table of ``lists`` (equal-length lists of tensors on ``device``)."""
    numels = tuple(t.numel() for t in lists[0])
    key = (device, numels, tuple(t.data_ptr() for ts in lists for t in ts))
    with _lock:
        return _tables.get(key, device, _build_table, numels + key[2], device)


def _build_constant(value: float, device: torch.device) -> Built:
    t = torch.full((), value, dtype=torch.float32, device=device)
    return Built(t, [t], [])


def constant(device: torch.device, value: float) -> torch.Tensor:
    """A cached 0-dim float32 tensor: the kernels' operand where an optional tensor is None."""
    with _lock:
        return _constants.get((device, value), device, _build_constant, value, device)
