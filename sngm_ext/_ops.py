"""The fused step's three kernels as ``torch.library`` ops: schemas, fake kernels, one registration
per backend.

Every fused backend implements the same three ops over a bucket (buckets.py) and its chunk table:

    sumsq(param, grad, chunks, weight_decay, maximize, partials!, partial_offset)
        partials[partial_offset + c] = sum over chunk c of d^2, d = sign * g + weight_decay * w
    finalize(partials, seg_ptr, sumsq!)
        sumsq[0] = the sum of all partials; where sumsq has more entries (norm="tensor"),
        sumsq[1 + s] = the sum of partials[seg_ptr[s]:seg_ptr[s+1]]; always in a fixed order
    update(param!, grad, momentum_buffer!?, chunks, sumsq, lr, momentum, weight_decay, nesterov,
           maximize)
        the normalize-momentum-update of reference.py for every chunk, with n = sqrt(sumsq[seg])
        for the chunk's segment column; nothing at all when sumsq[0] is not finite

Between finalize and update the caller may all-reduce ``sumsq`` (one collective for the whole
step, see distributed.py); the grad norm and the skipped-step count are then derived from
``sumsq[0]`` with plain torch ops, the same for every backend.

Triton's ops live here as ``sngm_ext::triton_*`` (registered for CUDA, and for CPU where the Triton
interpreter runs them); the C++/CUDA extension registers ``sngm_native::*`` from C++. Mutated
arguments are marked in the schemas and the fake kernels do nothing, so ``torch.compile`` can trace
a step. Nothing here imports triton or the extension: the implementations are imported on first use.
"""

from __future__ import annotations

import torch

SCHEMAS = {
    "sumsq": "(Tensor param, Tensor grad, Tensor chunks, float weight_decay, bool maximize, "
    "Tensor(a!) partials, int partial_offset) -> ()",
    "finalize": "(Tensor partials, Tensor seg_ptr, Tensor(a!) sumsq) -> ()",
    "update": "(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor chunks, "
    "Tensor sumsq, float lr, float momentum, float weight_decay, bool nesterov, "
    "bool maximize) -> ()",
}

# Ops a backend may add where fusing pays off. copy_sumsq is sumsq with the grad's segment first
# copied in from ``src`` (a fresh grad, ``segment_offset`` its start in the bucket), chunk by chunk
# so the sum reads it from cache; grad hooks use it under norm_in_backward. The C++ CPU extension
# has it; on GPUs a copy then sumsq finds the grad in L2 anyway.
CPU_SCHEMAS = {
    "copy_sumsq": "(Tensor src, Tensor(a!) grad, Tensor param, Tensor chunks, int segment_offset, "
    "float weight_decay, bool maximize, Tensor(b!) partials, int partial_offset) -> ()",
}

_lib = torch.library.Library("sngm_ext", "DEF")


def _fake(*args, **kwargs):
    return None


def _triton_impl(name):
    def impl(*args):
        from . import triton_kernels

        return getattr(triton_kernels, name)(*args)

    return impl


for _name, _schema in SCHEMAS.items():
    _lib.define(f"triton_{_name}{_schema}")
    _lib.impl(f"triton_{_name}", _triton_impl(_name), "CUDA")
    _lib.impl(f"triton_{_name}", _triton_impl(_name), "CPU")  # under TRITON_INTERPRET=1 only
    torch.library.register_fake(f"sngm_ext::triton_{_name}", _fake, lib=_lib)


class FusedOps:
    """The three ops of one fused backend, looked up once; ``copy_sumsq`` where it has one."""

    def __init__(self, namespace: str, prefix: str = "", copy_sumsq: bool = False):
        ns = getattr(torch.ops, namespace)
        self.sumsq = getattr(ns, prefix + "sumsq").default
        self.finalize = getattr(ns, prefix + "finalize").default
        self.update = getattr(ns, prefix + "update").default
        self.copy_sumsq = getattr(ns, prefix + "copy_sumsq").default if copy_sumsq else None


def register_native_fakes() -> None:
    """Fake kernels for the extension's ops (called once the extension is loaded)."""
    for name in (*SCHEMAS, *CPU_SCHEMAS):
        qualname = f"sngm_native::{name}"
        try:
            torch.library.register_fake(qualname, _fake)
        except RuntimeError:  # already registered (the extension was loaded twice)
            pass
