"""Phase 2 of the fused step: normalize, update the momentum and the params in one read-modify-write.

The sums of squares (rows med, big, small: scaled.py), and a tensor learning rate, are read from
device memory (never from the host); when the global sum of squares is not finite every chunk is
empty, so a skipped step neither loads nor stores a byte of the tensors. Each chunk combines its
segment's three sums into (q, pre, post) and normalizes by ((d * pre) * (1 / sqrt(q))) * post.
The per-element maths is csrc/sngm_math.h's ``update``, each operation rounded once in its order
(launched with fp fusion off: no fma).
"""

import torch
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
    load_lr,
    num_warps,
    store_c,
)
from .scaled import combine
from .tables import constant, pointer_table


@triton.jit
def _chunk_update(pw, pg, pu, length, inv, pre, post, gscale, sign, wd, lr, beta, nesterov,
                  BLOCK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FP64: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    mask = idx < length
    w = load_c(pw + idx, mask, FP64)
    d = direction(load_c(pg + idx, mask, FP64), w, gscale, sign, wd)
    # In double: inv may lie outside fp32's range. pre and post are powers of two, both 1 unless
    # an fp64 gradient is out of range: then nd is bit for bit C(double(d) * inv).
    nd = (((d.to(tl.float64) * pre) * inv) * post).to(w.dtype)
    if HAS_MOMENTUM:
        u = beta * load_c(pu + idx, mask, FP64) + nd
        store_c(pu + idx, u, mask)
        step = tl.where(nesterov != 0, nd + beta * u, u)
    else:
        step = nd
    store_c(pw + idx, w - lr * step, mask)


# Integer arguments are not specialized: see norm.py's _sumsq_kernel.
@triton.jit(do_not_specialize=["n_tensors", "n_chunks", "n_sumsq", "nesterov"])
def _update_kernel(
    table_ptr,  # int64 [(3 or 4) * n_tensors]: numels, param, grad (, momentum) pointers
    n_tensors,
    chunks_ptr,  # int64 [4, n_chunks]: tensor, start, length, segment
    n_chunks,
    sumsq_ptr,  # float64 [3, n_sumsq], rows med, big, small; column 0: the global sums,
    n_sumsq,  # 1 + k: tensor k's (norm="tensor")
    scale_ptr,  # float32 0-dim: grad_scale (1 when there is none)
    lr_ptr,  # float32/float64, one element: lr_tensor (read only when HAS_LR_TENSOR)
    lr_hi,  # lr split by split_f64 (read only when not HAS_LR_TENSOR)
    lr_mid,
    lr_lo,
    mom_hi,
    mom_mid,
    mom_lo,
    wd_hi,
    wd_mid,
    wd_lo,
    sign,  # -1.0 when maximizing, else 1.0
    nesterov,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr,
):
    FP64: tl.constexpr = DTYPE == tl.float64
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 128-bit access
    t, start, length = chunk_row(chunks_ptr, n_chunks, table_ptr, n_tensors, BLOCK)
    seg = tl.load(chunks_ptr + 3 * n_chunks + tl.program_id(0).to(tl.int64))
    # A sum of squares is >= 0 or NaN (NaN < inf is false); row 2 (small) is always finite. A
    # skipped step, or a segment that does not exist, is an empty chunk: no load, no store.
    finite = (tl.load(sumsq_ptr) < float("inf")) & (tl.load(sumsq_ptr + n_sumsq) < float("inf"))
    ok = finite & (seg >= 0) & (seg < n_sumsq)
    length = tl.where(ok, length, 0)
    col = sumsq_ptr + tl.where(ok, seg, 0)
    q, pre, post = combine(tl.load(col).to(tl.float64), tl.load(col + n_sumsq).to(tl.float64),
                           tl.load(col + 2 * n_sumsq).to(tl.float64))
    n = tl.sqrt(q)  # sqrt.rn.f64
    inv = tl.where(n > 0.0, 1.0 / tl.where(n > 0.0, n, 1.0), 0.0)  # div.rn.f64; 0 when n == 0
    if HAS_LR_TENSOR:
        lr = load_lr(lr_ptr, FP64)
    else:
        lr = hyper(lr_hi, lr_mid, lr_lo, FP64)
    beta = hyper(mom_hi, mom_mid, mom_lo, FP64)
    wd = hyper(wd_hi, wd_mid, wd_lo, FP64)
    gscale = inverse_grad_scale(scale_ptr, FP64)
    aw = base_address(table_ptr, n_tensors, 1, t, start, DTYPE)
    ag = base_address(table_ptr, n_tensors, 2, t, start, DTYPE)
    if HAS_MOMENTUM:
        au = base_address(table_ptr, n_tensors, 3, t, start, DTYPE)
    else:
        au = aw  # never dereferenced
    if (((aw | ag | au) & 15) == 0) & (length % VEC == 0):
        _chunk_update(as_pointer(aw, DTYPE, True), as_pointer(ag, DTYPE, True),
                      as_pointer(au, DTYPE, True), tl.multiple_of(length // VEC * VEC, VEC), inv,
                      pre, post, gscale, sign, wd, lr, beta, nesterov, BLOCK, HAS_MOMENTUM, FP64)
    else:
        _chunk_update(as_pointer(aw, DTYPE, False), as_pointer(ag, DTYPE, False),
                      as_pointer(au, DTYPE, False), length, inv, pre, post, gscale, sign, wd, lr,
                      beta, nesterov, BLOCK, HAS_MOMENTUM, FP64)


def update(params, grads, momentum_buffers, chunks, sumsq, grad_scale, lr_tensor, lr, momentum,
           weight_decay, nesterov, maximize, *, block):
    """One normalize-momentum-update pass over the chunks (docs/ops.md), normalized by each
    chunk's segment's sums of squares (sumsq: float64 [3, m], rows med, big, small; skipped
    entirely when sumsq[0, 0] or sumsq[1, 0] is not finite); momentum_buffers empty: no
    momentum. lr_tensor: None, or a one-element float32/float64 tensor on the params' device that
    the kernel reads the learning rate from (``lr`` is then not read)."""
    device = checks.lists("update", params, grads, momentum_buffers, chunks, INTERPRETED)
    checks.scalar_f32("update", "grad_scale", grad_scale, device)
    checks.update_scalars(sumsq, lr_tensor, device)
    n_chunks = chunks.shape[1]
    if n_chunks == 0 or not params:  # no row names a tensor: nothing to read or write
        return
    has_mom = len(momentum_buffers) > 0
    n = len(params)
    dtype = params[0].dtype
    lists = (params, grads, momentum_buffers) if has_mom else (params, grads)
    table = pointer_table(device, lists)
    with launch_guard(params[0]):
        _update_kernel[(n_chunks,)](
            table,
            n,
            chunks,
            n_chunks,
            sumsq,
            sumsq.shape[1],
            constant(device, 1.0) if grad_scale is None else grad_scale,
            constant(device, 1.0) if lr_tensor is None else lr_tensor,  # not read when None
            *split_f64(0.0 if lr_tensor is not None else lr),
            *split_f64(momentum),
            *split_f64(weight_decay),
            -1.0 if maximize else 1.0,
            int(nesterov),
            DTYPE=TORCH_TO_TL[dtype],
            BLOCK=block,
            HAS_MOMENTUM=has_mom,
            HAS_LR_TENSOR=lr_tensor is not None,
            num_warps=num_warps(dtype),
            enable_fp_fusion=False,
        )

