"""Phase 1 of the fused step: the squared norm of d = sign * g + weight_decay * w, deterministically.

``_sumsq_kernel`` writes one partial sum per chunk (no atomics: a float atomic_add would make the norm
depend on scheduling); ``_finalize_kernel`` is a single program that adds the partials of each
segment in a fixed order, so the same inputs give the same bits on every run. The square root and
the finite check come later, after a distributed all-reduce of the sums if there is one.
"""

import torch
import triton
import triton.language as tl

from ._scalars import split_f64


@triton.jit
def _sumsq_kernel(
    param_ptr,
    grad_ptr,
    chunks_ptr,  # int64 [3, n_chunks]: start, length, segment
    n_chunks,
    partials_ptr,
    partial_offset,
    wd_hi,
    wd_lo,
    grad_sign,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Starts and lengths are multiples of 16 elements (buckets.ALIGN): telling Triton so is what
    # turns the masked loads below into 128-bit vector loads.
    start = tl.multiple_of(tl.load(chunks_ptr + pid), 16)
    length = tl.multiple_of(tl.load(chunks_ptr + n_chunks + pid), 16)
    idx = tl.arange(0, BLOCK)
    offs = start + idx
    mask = idx < length
    if FP64:
        wd = tl.cast(wd_hi, tl.float64) + tl.cast(wd_lo, tl.float64)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        w = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        d = tl.cast(grad_sign, tl.float64) * g + wd * w
    else:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = grad_sign * g + wd_hi * w
    tl.store(partials_ptr + partial_offset + pid, tl.sum(d * d, axis=0))


@triton.jit
def _finalize_kernel(
    partials_ptr,
    seg_ptr,  # int64 [n_segments + 1]
    n_segments,
    sumsq_ptr,
    PER_SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    total = tl.zeros([BLOCK], dtype=partials_ptr.dtype.element_ty)
    for s in range(0, n_segments):
        lo = tl.load(seg_ptr + s)
        hi = tl.load(seg_ptr + s + 1)
        acc = tl.zeros([BLOCK], dtype=partials_ptr.dtype.element_ty)
        for c in range(lo, hi, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            acc += tl.load(partials_ptr + offs, mask=offs < hi, other=0.0)
        if PER_SEGMENT:
            tl.store(sumsq_ptr + 1 + s, tl.sum(acc, axis=0))
        total += acc
    tl.store(sumsq_ptr, tl.sum(total, axis=0))


def sumsq(param, grad, chunks, weight_decay, maximize, partials, partial_offset):
    """partials[partial_offset + c] = ||d||^2 over chunk c of the bucket (see buckets.py)."""
    n_chunks = chunks.shape[1]
    if n_chunks == 0:
        return
    from sngm_ext.buckets import CHUNK

    wd_hi, wd_lo = split_f64(weight_decay)
    _sumsq_kernel[(n_chunks,)](
        param,
        grad,
        chunks,
        n_chunks,
        partials,
        partial_offset,
        wd_hi,
        wd_lo,
        -1.0 if maximize else 1.0,
        BLOCK=CHUNK,
        FP64=param.dtype == torch.float64,
        num_warps=8,
    )


def finalize(partials, seg_ptr, sumsq):
    """sumsq[0] = sum of all partials; sumsq[1 + s] = segment s's sum when sumsq has room."""
    n_segments = seg_ptr.shape[0] - 1
    # One program of 1024 lanes: ResNet-50's 6.3k partials are 7 vector loads.
    _finalize_kernel[(1,)](
        partials,
        seg_ptr,
        n_segments,
        sumsq,
        PER_SEGMENT=sumsq.shape[0] > 1,
        BLOCK=1024,
        num_warps=4,
    )
