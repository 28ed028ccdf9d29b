"""Triton kernels of the fused SNGM step (installed as ``sngm_ext.triton_kernels``).

The three ops of docs/ops.md over per-tensor lists: one launch per call, each program one
chunk-table row, its tensor's pointers read from a cached device table (tables.py).
Importing this package imports triton; ``sngm_ext`` only does so when the "triton" backend is used.
Set ``TRITON_INTERPRET=1`` before the first import to run the kernels on CPU tensors.
"""

from .norm import finalize, sumsq
from .update import update

__all__ = ["sumsq", "finalize", "update"]
