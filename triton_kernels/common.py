"""Pieces shared by the kernels: reading a chunk row, element loads and stores in the compute type,
the direction d, and the launch guard."""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def chunk_row(chunks_ptr, n_chunks, table_ptr, n_tensors, BLOCK: tl.constexpr):
    """This program's chunk: (tensor, start, length). A row that does not fit its tensor (or names
    none) gets length 0, so it touches no memory, like the CUDA backend."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + pid)
    start = tl.load(chunks_ptr + n_chunks + pid)
    length = tl.load(chunks_ptr + 2 * n_chunks + pid)
    ok = (t >= 0) & (t < n_tensors) & (start >= 0) & (length > 0) & (length <= BLOCK)
    t = tl.where(ok, t, 0)
    ok = ok & (start <= tl.load(table_ptr + t) - length)  # table part 0: numels
    # int32 (<= BLOCK): the per-element mask compares then need one instruction, not two.
    return t, start, tl.where(ok, length, 0).to(tl.int32)


@triton.jit
def base_address(table_ptr, n_tensors, part, t, start, DTYPE: tl.constexpr):
    """Address (an int64) of element ``start`` of tensor ``t`` in table part ``part``."""
    return tl.load(table_ptr + part * n_tensors + t) + start * (DTYPE.primitive_bitwidth // 8)


@triton.jit
def as_pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """``address`` as a pointer; ALIGNED (only on the vector path, where the kernel checked it):
    16-byte aligned, which with a length hint lets Triton emit 128-bit accesses. A hint marks the
    operation that made its value: here the cast, made inside the branch that checked it."""
    p = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def to_compute(x, FP64: tl.constexpr):
    """The compute type C: fp64 for fp64 params, fp32 otherwise."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def hyper(hi, mid, lo, FP64: tl.constexpr):
    """A hyper-parameter split by _scalars.split_f64, in the compute type (exact in fp64).
    tl.cast, not .to: the interpreter passes float arguments as Python floats."""
    if FP64:
        return (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def load_lr(lr_ptr, FP64: tl.constexpr):
    """A learning rate held in a one-element float32/float64 tensor, in the compute type as hyper
    makes a float one: fp64 compute, the exact value (an fp32 one widened); fp32 compute, the value
    rounded to fp32 to nearest even (cvt.rn.f32.f64 for a float64 one)."""
    return to_compute(tl.load(lr_ptr), FP64)


@triton.jit
def inverse_grad_scale(scale_ptr, FP64: tl.constexpr):
    """gscale = 1 / grad_scale as GradScaler's unscale_, the CUDA kernel (__fdiv_rn) and
    reference.py's ``(1.0 / grad_scale.float())`` take it: the float32 reciprocal, correctly
    rounded (div.rn.f32: fp32 ``/`` compiles to div.full), then in C (exact). An fp64 reciprocal
    would differ by up to 2^-24 relative for a scale that is not a power of two."""
    return to_compute(tl.div_rn(1.0, tl.load(scale_ptr).to(tl.float32)), FP64)


@triton.jit
def direction(g, w, gscale, sign, wd):
    """d = sign * (g * gscale) + wd * w, each operation rounded once; w unused when wd == 0."""
    d = sign * (g * gscale)
    return tl.where(wd != 0, d + wd * w, d)


@triton.jit
def load_c(ptr, mask, FP64: tl.constexpr):
    """Loads in the compute type. bf16 is widened on the bits (exact): the interpreter's cast
    loses bf16 subnormals, compiled code keeps them."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if ptr.dtype.element_ty == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return to_compute(x, FP64)


@triton.jit
def store_c(ptr, x, mask):
    """Stores x (the compute type) in the pointer's dtype, rounding to nearest even. fp32 -> bf16
    is done on the bits: the interpreter's cast truncates, compiled code rounds; this agrees with
    both and with torch's ``.to(torch.bfloat16)``."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, (b >> 16) | 0x40, r)  # NaN stays NaN (quiet), sign kept
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def num_warps(dtype) -> int:
    """8 warps: 16 elements per thread, four 128-bit loads per fp32 tensor. fp64 at 16 warps
    keeps 8 elements (four 128-bit loads) per thread and the update under 128 registers
    (scripts/triton_aot_check.py)."""
    return 16 if dtype == torch.float64 else 8


# Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 when triton.jit made them:
# they then take CPU tensors) or compiled (CUDA tensors).
INTERPRETED = not isinstance(chunk_row, triton.JITFunction)


def launch_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device, not the tensors': make them the same."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
