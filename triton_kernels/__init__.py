"""Triton kernels of the fused SNGM step (installed as ``sngm_ext.triton_kernels``).

Importing this package imports triton; ``sngm_ext`` only does so when the "triton" backend is used.
Set ``TRITON_INTERPRET=1`` before the first import to run the kernels on CPU tensors.
"""

from .norm import finalize, sumsq
from .update import update

__all__ = ["sumsq", "finalize", "update"]
