"""Passing fp64 hyper-parameters to Triton, which types every Python float argument as fp32."""


def split_f64(x: float):
    """``x`` as an fp32 pair (hi, lo) with hi + lo == x to ~48 bits.

    Kernels rebuild ``hi.to(f64) + lo.to(f64)``: for fp64 params lr = 0.1 must not become the
    fp32 0.1 (a 1.5e-9 relative error, a million times fp64's epsilon); in fp32 compute lo
    vanishes and the value is the plain fp32 rounding.
    """
    import numpy as np

    hi = float(np.float32(x))
    lo = float(np.float32(x - hi))
    return hi, lo
