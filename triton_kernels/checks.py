"""Host-side argument checks of the three ops, the ones the native ops make (csrc/sngm_common.h,
run by the CPU and CUDA entry points): a bad call is refused, naming the op, the argument and the
index, before any kernel is launched. Rows of the chunk table live on the
device and are checked there (common.chunk_row skips a row that does not fit its tensor).
"""

import torch

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class OpArgumentError(RuntimeError, ValueError):
    """An argument an op refuses: a RuntimeError like the native ops' TORCH_CHECK errors, and a
    ValueError, which it is."""


def _fail(op, msg):
    raise OpArgumentError(f"sngm_triton::{op}: {msg}")


def _kernel_device(op, device, interpreted):
    """Compiled Triton runs on CUDA tensors, the interpreter on CPU ones."""
    if device.type == "cuda" and not interpreted:
        return
    if device.type == "cpu" and interpreted:
        return
    if device.type == "cpu":
        _fail(op, "CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1 set before "
                  "triton is imported); use backend 'cpu' or 'reference' for them")
    _fail(op, f"this kernel runs on {'CPU' if interpreted else 'CUDA'} tensors, got {device}")


def _aux(op, what, t, dtype, device):
    """A tensor of the op's own (chunks, partials, sumsq, seg_ptr)."""
    if t.dtype != dtype:
        _fail(op, f"{what} has dtype {t.dtype}, expected {dtype}"
                  + (" (the sums of squares are float64)" if dtype == torch.float64 else ""))
    if t.device != device:
        _fail(op, f"{what} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        _fail(op, f"{what} must be contiguous")


def scalar_f32(op, what, t, device):
    """GradScaler's grad_scale / found_inf: one float32 element on the device, or None."""
    if t is not None and not (t.dtype == torch.float32 and t.numel() == 1 and t.device == device):
        _fail(op, f"{what} must be a one-element float32 tensor on {device}, got {t.numel()} x "
                  f"{t.dtype} (shape {tuple(t.shape)}) on {t.device}")


def dense(t):
    """Non-overlapping and dense (c10's is_non_overlapping_and_dense, which Python lacks): the
    dims of size > 1, by increasing stride, tile memory with no gap."""
    if t.is_contiguous():
        return True
    expect = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _like_param(op, what, i, t, p, device):
    """grads[i] / momentum_buffers[i]: walked in memory order beside params[i]."""
    if t.dtype != p.dtype:
        _fail(op, f"{what}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype}")
    if t.device != device:
        _fail(op, f"{what}[{i}] is on {t.device}, expected {device}")
    if t.numel() != p.numel():
        _fail(op, f"{what}[{i}] has {t.numel()} elements but params[{i}] has {p.numel()}")
    if not ((t.is_contiguous() and p.is_contiguous())
            or (t.stride() == p.stride() and dense(t))):
        _fail(op, f"{what}[{i}] (strides {t.stride()}) must be contiguous like params[{i}] or "
                  f"share its strides ({p.stride()}) and be non-overlapping and dense")


def lists(op, params, grads, momentum_buffers, chunks, interpreted):
    """sumsq's and update's lists and chunk table; returns the device they are all on."""
    device = chunks.device
    _kernel_device(op, device, interpreted)
    _aux(op, "chunks", chunks, torch.int64, device)
    if chunks.dim() != 2 or chunks.shape[0] != 4:
        _fail(op, "chunks must have shape [4, n_chunks] (tensor, start, length, segment), got "
                  f"{tuple(chunks.shape)}")
    if chunks.shape[1] >= 2**31:
        _fail(op, f"{chunks.shape[1]} chunks, more than one launch takes (2^31 - 1)")
    if len(grads) != len(params):
        _fail(op, f"{len(params)} params but {len(grads)} grads")
    if momentum_buffers and len(momentum_buffers) != len(params):
        _fail(op, f"{len(params)} params but {len(momentum_buffers)} momentum_buffers (expected "
                  "none or one per param)")
    if params and params[0].dtype not in PARAM_DTYPES:
        _fail(op, f"unsupported dtype {params[0].dtype}; supported param dtypes are float32, "
                  "float64, bfloat16 and float16")
    for i, p in enumerate(params):
        if p.device != device:
            _fail(op, f"params[{i}] is on {p.device}, expected {device} (the chunks' device)")
        if p.dtype != params[0].dtype:
            _fail(op, f"params[{i}] has dtype {p.dtype} but params[0] has {params[0].dtype}")
        if not dense(p):
            _fail(op, f"params[{i}] (sizes {tuple(p.shape)}, strides {p.stride()}) must be "
                      "non-overlapping and dense")
        _like_param(op, "grads", i, grads[i], p, device)
        if momentum_buffers:
            _like_param(op, "momentum_buffers", i, momentum_buffers[i], p, device)
    return device


def _rows3(op, what, t, device):
    """A float64 [3, n >= 1] tensor of sums (partials, sumsq): rows med, big, small (scaled.py)."""
    _aux(op, what, t, torch.float64, device)
    if not (t.dim() == 2 and t.shape[0] == 3 and t.shape[1] >= 1):
        _fail(op, f"{what} must have shape [3, n >= 1] (med, big and small sums of squares), got "
                  f"{tuple(t.shape)}")


def partials_range(partials, partial_offset, n_chunks, device):
    """sumsq's output: partials[:, partial_offset : partial_offset + n_chunks] must exist."""
    _rows3("sumsq", "partials", partials, device)
    if not 0 <= partial_offset <= partials.shape[1] - n_chunks:
        _fail("sumsq", f"partials[:, {partial_offset}:{partial_offset + n_chunks}] is out of "
                       f"range for {partials.shape[1]} partials")


def finalize_args(partials, seg_ptr, found_inf, sumsq, interpreted):
    device = sumsq.device
    _kernel_device("finalize", device, interpreted)
    _rows3("finalize", "partials", partials, device)
    _aux("finalize", "seg_ptr", seg_ptr, torch.int64, device)
    _rows3("finalize", "sumsq", sumsq, device)
    scalar_f32("finalize", "found_inf", found_inf, device)
    if seg_ptr.dim() != 1 or seg_ptr.numel() < 1:
        _fail("finalize", f"seg_ptr must have shape [n_segments + 1], got {tuple(seg_ptr.shape)}")
    n_seg = seg_ptr.numel() - 1
    if not (sumsq.shape[1] == 1 or sumsq.shape[1] >= 1 + n_seg):
        _fail("finalize", f"sumsq has {sumsq.shape[1]} columns: 1 (the total) or at least "
                          f"1 + {n_seg} (the total and one per segment)")


def update_scalars(sumsq, lr_tensor, device):
    _rows3("update", "sumsq", sumsq, device)
    if lr_tensor is not None and not (lr_tensor.numel() == 1 and lr_tensor.device == device
                                      and lr_tensor.dtype in (torch.float32, torch.float64)):
        _fail("update", f"lr_tensor must be a one-element float32 or float64 tensor on {device} "
                        f"(the params' device), got {lr_tensor.numel()} x {lr_tensor.dtype} "
                        f"(shape {tuple(lr_tensor.shape)}) on {lr_tensor.device}")
