// Per-element maths of the fused SNGM step, shared by the CPU kernels (scalar and
// at::vec::Vectorized types) and the CUDA kernels (float/double): one definition, so the CPU tests
// exercise the very expressions the GPU runs. Must stay free of torch headers (nvcc includes it).
//
// The step (sngm_ext/reference.py is the oracle; C is the compute type: double for fp64 params,
// float otherwise; sums of squares, the norm and its inverse are always double):
//     g    = g_stored * inv_scale     (inv_scale = 1 / grad_scale under GradScaler, else 1: exact)
//     d    = sign * g + wd * w        (wd == 0: w is not read; the reference adds nothing either)
//     sumsq += double(d) * double(d)  (every fp32 square fits a double: no finite fp32/bf16/fp16
//                                      gradient overflows the norm or underflows it to zero)
//     inv  = n > 0 ? 1 / n : 0,  n = sqrt(sumsq)          (double)
//     nd   = C(double(d) * inv)       (in double: inv may lie outside fp32's range, d * inv not)
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

// The whole per-element update for scalars (the CUDA kernels and the CPU scalar tails).
template <bool HAS_MOM, bool NESTEROV, bool HAS_WD, typename C>
SNGM_HD void update(C& w, C& u, C g, const Hyper<C>& h, double inv) {
  const C d = direction<HAS_WD>(g * h.gscale, w, h.sign, h.wd);
  apply<HAS_MOM, NESTEROV>(w, u, normalize(d, inv), h);
}

// One element's square for phase 1, in double.
template <bool HAS_WD, typename C>
SNGM_HD double square(C g, C w, C sign, C wd, C gscale) {
  const double d = static_cast<double>(direction<HAS_WD>(g * gscale, w, sign, wd));
  return d * d;
}

}  // namespace sngm
