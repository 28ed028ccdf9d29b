"""Passing fp64 hyper-parameters to Triton, which types every Python float argument as fp32."""

import numpy as np


def split_f64(x: float):
    """``x`` as three fp32 values (hi, mid, lo) with hi + mid + lo == x exactly.

    Kernels rebuild ``(hi.to(f64) + mid.to(f64)) + lo.to(f64)`` for fp64 params: lr = 0.1 must be
    the double 0.1, not the fp32 0.1 (a 1.5e-9 relative error). Each part holds the next 24 bits of
    the residual, so three parts cover the 53-bit significand; both additions are exact (the parts'
    bits do not overlap beyond a double's width). Exact for x == 0 and 2**-97 <= |x| < 2**127 (lo
    must not fall below fp32's subnormal step 2**-149), every practical hyper-parameter. In fp32
    compute kernels use hi alone: the fp32 rounding (to nearest even) of x.
    """
    hi = float(np.float32(x))
    mid = float(np.float32(x - hi))
    lo = float(np.float32(x - hi - mid))
    return hi, mid, lo
