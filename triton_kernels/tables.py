"""Device-side tables of the user's tensors, cached so that a steady training loop builds none.

A table is one int64 tensor on the tensors' device: ``[numels | ptrs of list 0 | ptrs of list 1 |
...]``, each part ``n_tensors`` long (the lists: params, grads and, for update with momentum, the
momentum buffers). The kernels read a chunk's base pointers from it, so one launch covers every
tensor whatever their number.
"""

import torch

# One table per (device, exact pointers, numels): a changed pointer or shape is a new key, so a
# table never points at memory its tensors left. The hooks of norm_in_backward ask for one table
# per param every step (sumsq([p], [g])): room for a large model's params, or every step would
# rebuild them all; 4096 tables are ~2 MB of device memory.
_MAX_TABLES = 4096
_tables = {}
_constants = {}


def pointer_table(device: torch.device, lists) -> torch.Tensor:
    """The int64 table of ``lists`` (equal-length lists of tensors on ``device``)."""
    numels = tuple(t.numel() for t in lists[0])
    key = (device, numels, tuple(t.data_ptr() for ts in lists for t in ts))
    table = _tables.get(key)
    if table is None:
        if len(_tables) >= _MAX_TABLES:
            _tables.clear()
        host = torch.tensor(numels + key[2], dtype=torch.int64)
        if device.type == "cuda":
            # Pinned and non-blocking: the copy is queued on the current stream, no host sync.
            host = host.pin_memory()
        table = _tables[key] = host.to(device, non_blocking=True)
    return table


def constant(device: torch.device, value: float) -> torch.Tensor:
    """A cached 0-dim float32 tensor: the kernels' operand where an optional tensor is None."""
    key = (device, value)
    t = _constants.get(key)
    if t is None:
        t = _constants[key] = torch.full((), value, dtype=torch.float32, device=device)
    return t
