"""Phase 1 of the fused step: the squared norm of d = sign * (g * gscale) + weight_decay * w,
deterministically.

The sums are three rows (med, big, small: Blue's scaled sum of squares, scaled.py), so that no
finite fp64 gradient overflows or underflows them; fp32/bf16/fp16 squares all fit a double and go
to med alone (rows big and small are 0). ``_sumsq_kernel`` writes one fp64 partial per chunk and
row into ``partials`` [3, n_partials] (no atomics: a float atomic_add would make the norm depend on
scheduling); ``_finalize_kernel`` adds each row up in one launch into ``sumsq`` [3, m]: one program
the total (column 0), and with norm="tensor" one program per segment (column 1 + s), each in a
fixed order, so the same inputs give the same bits on every run (the total is summed from the
partials, not from the segment sums: equal up to rounding, not bit for bit). The combination of
the rows, the square root and the finite check come later (update.py), after a distributed
all-reduce of the sums if there is one.
"""

import triton
import triton.language as tl

from . import checks
from ._scalars import split_f64
from .common import (
    INTERPRETED,
    TORCH_TO_TL,
    as_pointer,
    base_address,
    chunk_row,
    direction,
    hyper,
    inverse_grad_scale,
    launch_guard,
    load_c,
    num_warps,
)
from .scaled import split_squares
from .tables import constant, pointer_table


@triton.jit
def _chunk_sumsq(pw, pg, length, gscale, sign, wd, BLOCK: tl.constexpr, FP64: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    mask = idx < length
    g = load_c(pg + idx, mask, FP64)
    w = load_c(pw + idx, idx < tl.where(wd != 0, length, 0), FP64)  # unread without decay
    d = direction(g, w, gscale, sign, wd).to(tl.float64)
    if FP64:  # the three rows (masked lanes are 0: they add 0 to small)
        med, big, small = split_squares(tl.where(mask, tl.abs(d), 0.0))
        return tl.sum(med, axis=0), tl.sum(big, axis=0), tl.sum(small, axis=0)
    else:  # every square fits a double: med alone, as before the rows existed
        zero = tl.zeros([], dtype=tl.float64)
        return tl.sum(tl.where(mask, d * d, 0.0), axis=0), zero, zero


# Integer arguments are not specialized (Triton would compile a kernel per n_chunks % 16, == 1,
# ...): one compile per dtype, and the code that runs is the code scripts/triton_aot_check.py
# checks (it compiles with no integer assumptions).
@triton.jit(do_not_specialize=["n_tensors", "n_chunks", "n_partials", "partial_offset"])
def _sumsq_kernel(
    table_ptr,  # int64 [3 * n_tensors]: numels, param pointers, grad pointers (tables.py)
    n_tensors,
    chunks_ptr,  # int64 [4, n_chunks]: tensor, start, length, segment
    n_chunks,
    scale_ptr,  # float32 0-dim: grad_scale (1 when there is none)
    wd_hi,
    wd_mid,
    wd_lo,
    sign,  # -1.0 when maximizing, else 1.0
    partials_ptr,  # float64 [3, n_partials]: rows med, big, small
    n_partials,
    partial_offset,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    FP64: tl.constexpr = DTYPE == tl.float64
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 128-bit access
    t, start, length = chunk_row(chunks_ptr, n_chunks, table_ptr, n_tensors, BLOCK)
    wd = hyper(wd_hi, wd_mid, wd_lo, FP64)
    gscale = inverse_grad_scale(scale_ptr, FP64)
    aw = base_address(table_ptr, n_tensors, 1, t, start, DTYPE)
    ag = base_address(table_ptr, n_tensors, 2, t, start, DTYPE)
    if (((aw | ag) & 15) == 0) & (length % VEC == 0):
        med, big, small = _chunk_sumsq(as_pointer(aw, DTYPE, True), as_pointer(ag, DTYPE, True),
                                       tl.multiple_of(length // VEC * VEC, VEC), gscale, sign, wd,
                                       BLOCK, FP64)
    else:
        med, big, small = _chunk_sumsq(as_pointer(aw, DTYPE, False),
                                       as_pointer(ag, DTYPE, False), length, gscale, sign, wd,
                                       BLOCK, FP64)
    p = partials_ptr + partial_offset + tl.program_id(0).to(tl.int64)  # row r: p + r * n_partials
    tl.store(p, med)
    tl.store(p + n_partials, big)
    tl.store(p + 2 * n_partials, small)


# finalize's launch: program 0 (the total) streams every partial with FINALIZE_TOTAL_BLOCK lanes
# (ResNet-50's 6.3k partials are 4 passes); the segment programs (norm="tensor": one per tensor,
# mostly a few partials each) use FINALIZE_SEG_BLOCK. scripts/triton_aot_check.py compiles these.
FINALIZE_TOTAL_BLOCK = 2048
FINALIZE_SEG_BLOCK = 256
FINALIZE_WARPS = 4


@triton.jit
def _range_sum(partials_ptr, lo, hi, BLOCK: tl.constexpr):
    """partials_ptr[lo:hi] (one row) summed in a fixed order: lane i adds lo + i, lo + i + BLOCK,
    ... in index order, then one tree over the lanes (the same shape on every run)."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for c in range(lo, hi, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < hi, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["n_partials", "n_segments", "n_sumsq"])
def _finalize_kernel(
    partials_ptr,  # float64 [3, n_partials]: rows med, big, small
    n_partials,
    seg_ptr,  # int64 [n_segments + 1]
    n_segments,
    found_inf_ptr,  # float32 0-dim (0 when there is none)
    sumsq_ptr,  # float64 [3, n_sumsq]
    n_sumsq,
    TOTAL_BLOCK: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
):
    # Program 0: column 0, the partials every segment covers; program 1 + s (norm="tensor" only):
    # column 1 + s; each for the three rows. seg_ptr lives on the device: each bound is clamped to
    # [0, n_partials] (an empty or reversed range sums to 0), and nothing is read of it when there
    # are no segments. found_inf sets sumsq[0, 0] alone (+inf: a skipped step).
    pid = tl.program_id(0)
    has = n_segments > 0
    if pid == 0:
        lo = tl.maximum(tl.load(seg_ptr, mask=has, other=0), 0)
        hi = tl.minimum(tl.load(seg_ptr + n_segments, mask=has, other=0), n_partials)
        inf_found = tl.load(found_inf_ptr) != 0
        for r in tl.static_range(3):
            total = _range_sum(partials_ptr + r * n_partials, lo, hi, TOTAL_BLOCK)
            if r == 0:
                total = tl.where(inf_found, float("inf"), total)
            tl.store(sumsq_ptr + r * n_sumsq, total.to(sumsq_ptr.dtype.element_ty))
    else:
        s = pid - 1
        lo = tl.maximum(tl.load(seg_ptr + s), 0)
        hi = tl.minimum(tl.load(seg_ptr + s + 1), n_partials)
        for r in tl.static_range(3):
            seg = _range_sum(partials_ptr + r * n_partials, lo, hi, SEG_BLOCK)
            tl.store(sumsq_ptr + r * n_sumsq + 1 + s, seg.to(sumsq_ptr.dtype.element_ty))


def sumsq(params, grads, chunks, grad_scale, weight_decay, maximize, partials, partial_offset, *,
          block):
    """partials[:, partial_offset + c] = chunk c's sums of squares of double(d), rows med, big,
    small (docs/ops.md): fp32/bf16/fp16 params sum into med (big and small 0), fp64 params split
    each |d| into its range (scaled.py)."""
    device = checks.lists("sumsq", params, grads, [], chunks, INTERPRETED)
    checks.scalar_f32("sumsq", "grad_scale", grad_scale, device)
    n_chunks = chunks.shape[1]
    checks.partials_range(partials, partial_offset, n_chunks, device)
    if n_chunks == 0:
        return
    if not params:  # no row names a tensor: every chunk's sums are 0, as the CUDA kernel writes
        partials[:, partial_offset:partial_offset + n_chunks].zero_()
        return
    dtype = params[0].dtype
    table = pointer_table(device, (params, grads))
    with launch_guard(params[0]):
        _sumsq_kernel[(n_chunks,)](
            table,
            len(params),
            chunks,
            n_chunks,
            constant(device, 1.0) if grad_scale is None else grad_scale,
            *split_f64(weight_decay),
            -1.0 if maximize else 1.0,
            partials,
            partials.shape[1],
            partial_offset,
            DTYPE=TORCH_TO_TL[dtype],
            BLOCK=block,
            num_warps=num_warps(dtype),
            enable_fp_fusion=False,
        )


def finalize(partials, seg_ptr, found_inf, sumsq):
    """Per row r (med, big, small): sumsq[r, 0] = the sum of row r's partials the segments cover
    (sumsq[0, 0] = +inf when found_inf is nonzero); sumsq[r, 1 + s] = segment s's sum when sumsq
    has more than one column. One launch."""
    checks.finalize_args(partials, seg_ptr, found_inf, sumsq, INTERPRETED)
    n_segments = seg_ptr.shape[0] - 1
    per_segment = sumsq.shape[1] > 1
    with launch_guard(sumsq):
        _finalize_kernel[(1 + n_segments if per_segment else 1,)](
            partials,
            partials.shape[1],
            seg_ptr,
            n_segments,
            constant(sumsq.device, 0.0) if found_inf is None else found_inf,
            sumsq,
            sumsq.shape[1],
            TOTAL_BLOCK=FINALIZE_TOTAL_BLOCK,
            SEG_BLOCK=FINALIZE_SEG_BLOCK,
            num_warps=FINALIZE_WARPS,
        )
