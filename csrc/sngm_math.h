// Per-element maths of the fused SNGM step, shared by the CPU kernels (scalar and
// at::vec::Vectorized types) and the CUDA kernels (float/double): one definition, so the CPU tests
// exercise the very expressions the GPU runs. Must stay free of torch headers (nvcc includes it).
//
// The step (sngm_ext/reference.py is the oracle; C is the compute type: double for fp64 params,
// float otherwise; A is the sums-of-squares type, float or double):
//     d    = sign * g + wd * w        (wd == 0: w is not read; the reference adds nothing either)
//     inv  = n > 0 ? 1 / n : 0,  n = sqrt(sumsq)   (in A, then cast to C)
//     nd   = d * inv
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

constexpr long kAlign = 16;  // buckets.ALIGN: chunk starts and lengths are multiples of this

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
SNGM_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
SNGM_HD double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// 1 / sqrt(sumsq), 0 when the norm is 0, computed in A then rounded to C (as the reference does).
template <typename C, typename A>
SNGM_HD C inverse_norm(A sumsq) {
  A n = sqrt_rn(sumsq);
  return static_cast<C>(n > A(0) ? A(1) / n : A(0));
}

// x * 0 == 0 exactly when x is finite (NaN and +-inf give NaN): no <cmath> classification needed.
template <typename A>
SNGM_HD bool is_finite(A x) {
  return x * A(0) == A(0);
}

// Phase 2 ---------------------------------------------------------------------------------------
template <typename T>
struct Hyper {  // hyper-parameters in the compute type (or broadcast to a vector of it)
  T lr, beta, wd, sign, inv;
};

// Updates w (and u when HAS_MOM) in place from g: one element (or one vector of elements).
template <bool HAS_MOM, bool NESTEROV, bool HAS_WD, typename T>
SNGM_HD void update(T& w, T& u, T g, const Hyper<T>& h) {
  T nd = direction<HAS_WD>(g, w, h.sign, h.wd) * h.inv;
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

}  // namespace sngm
