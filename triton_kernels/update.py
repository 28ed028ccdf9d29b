"""Phase 2 of the fused step: normalize, update the momentum and the params in one read-modify-write.

The norm is read from device memory (never from the host); when the global norm is not finite the
whole mask is false, so a skipped step neither loads nor stores a byte.
"""

import torch
import triton
import triton.language as tl

from ._scalars import split_f64


@triton.jit
def _update_kernel(
    param_ptr,
    grad_ptr,
    mom_ptr,
    chunks_ptr,  # int64 [3, n_chunks]: start, length, segment
    n_chunks,
    sumsq_ptr,  # [0]: the global sum of squares; [1 + s]: segment s's (norm="tensor")
    lr_hi,
    lr_lo,
    mom_hi,
    mom_lo,
    wd_hi,
    wd_lo,
    grad_sign,
    nesterov,
    BLOCK: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    total = tl.load(sumsq_ptr)
    # A sum of squares is >= 0 or NaN; NaN < inf is false.
    finite = total < float("inf")
    start = tl.multiple_of(tl.load(chunks_ptr + pid), 16)
    # A skipped step is an empty chunk: no load, no store.
    length = tl.multiple_of(tl.where(finite, tl.load(chunks_ptr + n_chunks + pid), 0), 16)
    seg = tl.load(chunks_ptr + 2 * n_chunks + pid)
    n = tl.sqrt(tl.load(sumsq_ptr + seg))
    # 1/n in the norm's dtype, then to the compute dtype (the reference does the same); 0 if n == 0.
    inv = tl.where(n > 0.0, 1.0 / tl.where(n > 0.0, n, 1.0), 0.0)
    idx = tl.arange(0, BLOCK)
    offs = start + idx
    mask = idx < length
    if FP64:
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
        beta = tl.cast(mom_hi, tl.float64) + tl.cast(mom_lo, tl.float64)
        wd = tl.cast(wd_hi, tl.float64) + tl.cast(wd_lo, tl.float64)
        sign = tl.cast(grad_sign, tl.float64)
        inv = inv.to(tl.float64)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        w = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        lr = lr_hi
        beta = mom_hi
        wd = wd_hi
        sign = grad_sign
        inv = inv.to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nd = (sign * g + wd * w) * inv
    if HAS_MOMENTUM:
        u = beta * tl.load(mom_ptr + offs, mask=mask, other=0.0).to(w.dtype) + nd
        tl.store(mom_ptr + offs, u.to(mom_ptr.dtype.element_ty), mask=mask)
        step = tl.where(nesterov != 0, nd + beta * u, u)
    else:
        step = nd
    tl.store(param_ptr + offs, (w - lr * step).to(param_ptr.dtype.element_ty), mask=mask)


def update(
    param,
    grad,
    momentum_buffer,
    chunks,
    sumsq,
    lr,
    momentum,
    weight_decay,
    nesterov,
    maximize,
):
    """One normalize-momentum-update pass over the chunks of a bucket (see reference.py)."""
    n_chunks = chunks.shape[1]
    if n_chunks == 0:
        return
    from sngm_ext.buckets import CHUNK

    has_mom = momentum_buffer is not None
    _update_kernel[(n_chunks,)](
        param,
        grad,
        momentum_buffer if has_mom else param,  # never read without HAS_MOMENTUM
        chunks,
        n_chunks,
        sumsq,
        *split_f64(lr),
        *split_f64(momentum),
        *split_f64(weight_decay),
        -1.0 if maximize else 1.0,
        int(nesterov),
        BLOCK=CHUNK,
        HAS_MOMENTUM=has_mom,
        FP64=param.dtype == torch.float64,
        num_warps=num_warps(param.dtype),
    )


def num_warps(dtype) -> int:
    """8 warps: 16 elements per thread, four 128-bit loads per fp32 tensor, 64 registers at sm_90
    (scripts/triton_aot_check.py). fp64 at 8 warps needs 130 registers (one block per SM
    resident); 16 warps halve the elements per thread."""
    return 16 if dtype == torch.float64 else 8
