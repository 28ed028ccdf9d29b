"""Blue's scaled sum of squares in the kernels: the three accumulators (med, big, small) of an fp64
gradient's squares, and their combination into one in-range scaled square (docs/ops.md).

The same constants and rules as csrc/sngm_math.h (kBig, kBigScale, kSmall, kSmallScale,
kMedFloor, range_of, combine) and sngm_ext/scaled_norm.py; tests/test_scaled_norm.py keeps the
three equal. Loaded by path: imports nothing of sngm_ext. Every constant is a power of two (exact
to multiply by) outside fp32's range; the kernels use them as explicit fp64 values (``_f64``), never
through Triton's typing of a Python float (fp32 when it fits, which none of these do, but a
constant that did would silently be rounded to fp32).
"""

import triton
import triton.language as tl

BIG = 2.0 ** 486  # x > BIG: big += (x * BIG_SCALE)^2 <= 2^972 (2^52 such terms cannot overflow)
BIG_SCALE = 2.0 ** -538
SMALL = 2.0 ** -511  # x < SMALL: small += (x * SMALL_SCALE)^2 >= 2^-948 (subnormal x too)
SMALL_SCALE = 2.0 ** 600
MED_FLOOR = 2.0 ** -900  # med below it (and small > 0): med folds into small

# The kernels' copies (Triton reads only constexpr globals); fixed numbers, not hyper-parameters.
_BIG = tl.constexpr(BIG)
_BIG_SCALE = tl.constexpr(BIG_SCALE)
_SMALL = tl.constexpr(SMALL)
_SMALL_SCALE = tl.constexpr(SMALL_SCALE)
_MED_FLOOR = tl.constexpr(MED_FLOOR)


@triton.jit
def _f64(value: tl.constexpr):
    """A constant as an exact fp64 scalar."""
    return tl.full([], value, tl.float64)


@triton.jit
def split_squares(x):
    """x = |d| (fp64, a block) as three blocks of squares (med, big, small), each element in one:
    x > BIG: big (x * 2^-538)^2; x < SMALL: small (x * 2^600)^2; otherwise, NaN included: med x^2
    (csrc/sngm_math.h range_of / add_scaled_square). Zeros (masked lanes) add 0 to small."""
    big = x > _f64(_BIG)
    small = x < _f64(_SMALL)
    # One multiply by the element's own scale (x * 1 is x): nothing overflows on the way.
    y = x * tl.where(big, _f64(_BIG_SCALE), tl.where(small, _f64(_SMALL_SCALE), _f64(1.0)))
    sq = y * y
    zero = tl.zeros_like(sq)
    return tl.where(big | small, zero, sq), tl.where(big, sq, zero), tl.where(small, sq, zero)


@triton.jit
def combine(med, big, small):
    """A segment's three sums (fp64 scalars) as (q, pre, post), the norm being
    sqrt(q) / (pre * post) (csrc/sngm_math.h combine): big > 0: (big + (med*2^-538)*2^-538, 1,
    2^-538); small > 0 and med < 2^-900: (small + (med*2^600)*2^600, 2^600, 1); else (med, 1, 1).
    Every branch keeps med in q, so a NaN or inf anywhere makes q non-finite."""
    one = _f64(1.0)
    use_big = big > 0.0
    use_small = (~use_big) & (small > 0.0) & (med < _f64(_MED_FLOOR))
    q_big = big + (med * _f64(_BIG_SCALE)) * _f64(_BIG_SCALE)
    # med is < 2^-900 where q_small is used: elsewhere 0 stands in (no overflow to discard).
    med_s = tl.where(use_small, med, _f64(0.0))
    q_small = small + (med_s * _f64(_SMALL_SCALE)) * _f64(_SMALL_SCALE)
    q = tl.where(use_big, q_big, tl.where(use_small, q_small, med))
    pre = tl.where(use_small, _f64(_SMALL_SCALE), one)
    post = tl.where(use_big, _f64(_BIG_SCALE), one)
    return q, pre, post
