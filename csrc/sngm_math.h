// Per-element maths of the fused SNGM step, shared by the CPU kernels (scalar and
// at::vec::Vectorized types) and the CUDA kernels (float/double): one definition, so the CPU tests
// exercise the very expressions the GPU runs. Must stay free of torch headers (nvcc includes it).
//
// The step (sngm_ext/reference.py is the oracle; C is the compute type: double for fp64 params,
// float otherwise; sums of squares, the norm and its inverse are always double):
//     g    = g_stored * inv_scale     (inv_scale = 1 / grad_scale under GradScaler, else 1: exact)
//     d    = sign * g + wd * w        (wd == 0: w is not read; the reference adds nothing either)
//     x    = |double(d)|, summed into three accumulators (Blue's scaled sum of squares, so that
//            no finite gradient of any dtype, fp64 included, overflows or underflows the norm):
//              med   += x^2                 for kSmall <= x <= kBig (and NaN: it must propagate)
//              big   += (x * kBigScale)^2   for x > kBig   (fp64 only: no fp32 value is that big)
//              small += (x * kSmallScale)^2 for x < kSmall (fp64 only: no nonzero fp32 value's
//                                           square is small enough to matter; zero adds nothing)
//            every fp32/bf16/fp16 square fits a double, so other dtypes sum into med alone
//     (q, pre, post) = combine(med, big, small)       (the norm is n = sqrt(q) / (pre * post))
//     inv  = q > 0 ? 1 / sqrt(q) : 0                   (double)
//     nd   = C(((double(d) * pre) * inv) * post)       (pre = post = 1 unless an fp64 gradient is
//                                                       beyond ~1e+-150: then the same bits as
//                                                       double(d) * inv; powers of two are exact)
//     u'   = beta * u + nd
//     step = nesterov ? nd + beta * u' : u'
//     w'   = w - lr * step
// Each operation rounds once, in this order (CPU builds use -ffp-contract=off so the compiler does
// not fuse them); the reference's torch ops round the same way.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SNGM_HD __host__ __device__ __forceinline__
#else
#define SNGM_HD inline
#endif

#include <cmath>

namespace sngm {

// Elements per chunk-table row (sngm_ext/layout.py CHUNK): every row's start is a multiple of it.
constexpr long kChunk = 4096;

// Phase 1 ---------------------------------------------------------------------------------------
template <bool HAS_WD, typename T>
SNGM_HD T direction(T g, T w, T sign, T wd) {
  if constexpr (HAS_WD) {
    return sign * g + wd * w;
  } else {
    return sign * g;
  }
}

// The range of the sum of squares (fp64 gradients) ------------------------------------------------
// Thresholds and scales are powers of two (exact to multiply by), after Blue (ACM TOMS 4(1), 1978)
// and LAPACK 3.10's dnrm2 (Anderson, "Algorithm 978", ACM TOMS 2017), with a larger small scale:
//   x > kBig = 2^486: (x * 2^-538)^2 <= 2^972, so 2^52 such terms cannot overflow;
//   x < kSmall = 2^-511: (x * 2^600)^2 >= 2^-948 for every subnormal x, a normal double;
//   otherwise x^2 lies in [2^-1022, 2^972]: normal, rounded once.
// sngm_ext/scaled_norm.py (the reference) and triton_kernels/scaled.py hold the same constants
// and rules; tests/test_scaled_norm.py keeps the three equal.
constexpr double kBig = 0x1p486;
constexpr double kBigScale = 0x1p-538;
constexpr double kSmall = 0x1p-511;
constexpr double kSmallScale = 0x1p600;
// Below this, med is folded into the small accumulator (when there is one): med < 2^-900 gives
// med * 2^1200 < 2^300; above it, the small terms (each < 2^-1022, at most 2^40 of them) weigh
// less than 2^-82 of med and are dropped.
constexpr double kMedFloor = 0x1p-900;

// Which accumulator x = |d| (double) belongs to: 1 big, 2 small, 0 med (NaN included).
SNGM_HD int range_of(double x) { return x > kBig ? 1 : (x < kSmall ? 2 : 0); }

// A segment's three sums as one scaled square: n^2 = q / (pre * post)^2.
struct Scaled {
  double q, pre, post;
};

// Every branch keeps med in q, so a NaN or inf anywhere makes q non-finite (a skipped step).
SNGM_HD Scaled combine(double med, double big, double small) {
  if (big > 0.0) {
    return {big + (med * kBigScale) * kBigScale, 1.0, kBigScale};
  }
  if (small > 0.0 && med < kMedFloor) {
    return {small + (med * kSmallScale) * kSmallScale, kSmallScale, 1.0};
  }
  return {med, 1.0, 1.0};
}

// Between the phases -----------------------------------------------------------------------------
SNGM_HD double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// 1 / sqrt(sumsq), 0 when the norm is 0; all in double.
SNGM_HD double inverse_norm(double sumsq) {
  const double n = sqrt_rn(sumsq);
  return n > 0.0 ? 1.0 / n : 0.0;
}

// x * 0 == 0 exactly when x is finite (NaN and +-inf give NaN): no <cmath> classification needed.
template <typename A>
SNGM_HD bool is_finite(A x) {
  return x * A(0) == A(0);
}

// Phase 2 ---------------------------------------------------------------------------------------
// T: the compute type (or a vector of it); D: double (or a vector of doubles) for the
// normalization. `normalize` turns d into nd = T(D(d) * inv).
template <typename T>
struct Hyper {  // hyper-parameters in the compute type (or broadcast to a vector of it)
  T lr, beta, wd, sign, gscale;  // gscale: 1 / grad_scale (1 without GradScaler)
};

// Scalar normalization: C(double(d) * inv).
template <typename C>
SNGM_HD C normalize(C d, double inv) {
  return static_cast<C>(static_cast<double>(d) * inv);
}

// The scaled normalization: the scales are exactly 1 unless an fp64 gradient is out of range.
template <typename C>
SNGM_HD C normalize(C d, double inv, double pre, double post) {
  return static_cast<C>(((static_cast<double>(d) * pre) * inv) * post);
}

// Updates w (and u when HAS_MOM) in place from g, given nd = normalize(d): one element (or one
// vector of elements). The caller computes d = direction(g * gscale, w, ...) and normalizes it.
template <bool HAS_MOM, bool NESTEROV, typename T>
SNGM_HD void apply(T& w, T& u, T nd, const Hyper<T>& h) {
  T step;
  if constexpr (HAS_MOM) {
    u = h.beta * u + nd;
    if constexpr (NESTEROV) {
      step = nd + h.beta * u;
    } else {
      step = u;
    }
  } else {
    step = nd;
  }
  w = w - h.lr * step;
}

// The whole per-element update for scalars (the CUDA kernels and the CPU scalar tails); pre and
// post are combine()'s scales (1 and 1 in range: then exactly normalize(d, inv)).
template <bool HAS_MOM, bool NESTEROV, bool HAS_WD, typename C>
SNGM_HD void update(C& w, C& u, C g, const Hyper<C>& h, double inv, double pre, double post) {
  const C d = direction<HAS_WD>(g * h.gscale, w, h.sign, h.wd);
  apply<HAS_MOM, NESTEROV>(w, u, normalize(d, inv, pre, post), h);
}

// One element's square for phase 1, in double (fp32/bf16/fp16: all into med).
template <bool HAS_WD, typename C>
SNGM_HD double square(C g, C w, C sign, C wd, C gscale) {
  const double d = static_cast<double>(direction<HAS_WD>(g * gscale, w, sign, wd));
  return d * d;
}

// One fp64 element into the three accumulators. Three named references, not an array indexed by
// range_of: on a GPU such an array lives in local memory.
template <bool HAS_WD>
SNGM_HD void add_scaled_square(double& med, double& big, double& small, double g, double w,
                               double sign, double wd, double gscale) {
  const double d = direction<HAS_WD>(g * gscale, w, sign, wd);
  const double x = d < 0.0 ? -d : d;
  const int r = range_of(x);
  const double y = r == 1 ? x * kBigScale : (r == 2 ? x * kSmallScale : x);
  const double yy = y * y;
  if (r == 1) {
    big += yy;
  } else if (r == 2) {
    small += yy;
  } else {
    med += yy;
  }
}

}  // namespace sngm
