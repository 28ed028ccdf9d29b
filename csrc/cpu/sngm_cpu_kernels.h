// The CPU kernels of the fused step: at::parallel_for over the chunk table, at::vec::Vectorized
// inside a chunk, the per-element maths of ../sngm_math.h. Included by one translation unit per CPU
// capability (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp), each of which defines
// CPU_CAPABILITY (and the matching CPU_CAPABILITY_* macro) before including this header, the way
// ATen builds its own kernels: everything here lives in namespace sngm::CPU_CAPABILITY.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../sngm_math.h"

namespace sngm {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// fp64 params compute in fp64, everything else in fp32 (reference.py).
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
constexpr bool is_reduced = !std::is_same_v<scalar_t, compute_t<scalar_t>>;

// Calls f(std::integral_constant<bool, b>{}).
template <typename F>
inline void bool_dispatch(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename V>
inline auto horizontal_sum(const V& v) {
  using T = typename V::value_type;
  alignas(64) std::array<T, V::size()> lanes;
  v.store(lanes.data());
  T s = T(0);
  for (T x : lanes) {  // a fixed order: the same bits on every run
    s += x;
  }
  return s;
}

// Phase 1 on K chunks of the same length, in lock step: out[k] = sum of d^2 over chunk k in the
// compute type, d = sign * g + wd * w. One chunk's loop is a single sequential read stream, which a
// core cannot keep busy enough to fill its memory bandwidth (the hardware prefetcher stops at 4 KiB
// page edges); K streams keep K times the cache-line fills in flight. Each chunk has its own
// accumulators and the same order of additions for every K, so a partial sum is the same bits
// whichever K computed it.
template <typename scalar_t, bool HAS_WD, int K>
void chunks_sumsq(const scalar_t* const* w, const scalar_t* const* g, int64_t len,
                  compute_t<scalar_t> sign, compute_t<scalar_t> wd, compute_t<scalar_t>* out) {
  using C = compute_t<scalar_t>;
  using Vec = Vectorized<C>;
  constexpr int64_t W = Vec::size();
  const Vec vsign(sign), vwd(wd);
  std::array<Vec, K> acc0, acc1;
  acc0.fill(Vec(C(0)));
  acc1.fill(Vec(C(0)));
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    for (int k = 0; k < K; ++k) {
      Vec g0, g1, w0(C(0)), w1(C(0));
      if constexpr (!is_reduced<scalar_t>) {
        g0 = Vec::loadu(g[k] + i);
        g1 = Vec::loadu(g[k] + i + W);
        if constexpr (HAS_WD) {
          w0 = Vec::loadu(w[k] + i);
          w1 = Vec::loadu(w[k] + i + W);
        }
      } else {
        using RVec = Vectorized<scalar_t>;  // 2 * W elements
        std::tie(g0, g1) = at::vec::convert_to_float<scalar_t>(RVec::loadu(g[k] + i));
        if constexpr (HAS_WD) {
          std::tie(w0, w1) = at::vec::convert_to_float<scalar_t>(RVec::loadu(w[k] + i));
        }
      }
      Vec d0 = sngm::direction<HAS_WD>(g0, w0, vsign, vwd);
      Vec d1 = sngm::direction<HAS_WD>(g1, w1, vsign, vwd);
      acc0[k] = acc0[k] + d0 * d0;
      acc1[k] = acc1[k] + d1 * d1;
    }
  }
  for (int k = 0; k < K; ++k) {
    C s = horizontal_sum(acc0[k] + acc1[k]);
    for (int64_t j = i; j < len; ++j) {  // lengths are multiples of 16: only tables not from buckets.py
      C d = sngm::direction<HAS_WD>(static_cast<C>(g[k][j]),
                                    HAS_WD ? static_cast<C>(w[k][j]) : C(0), sign, wd);
      s += d * d;
    }
    out[k] = s;
  }
}

// Phase 2 on one chunk.
template <typename scalar_t, bool HAS_MOM, bool NESTEROV, bool HAS_WD>
void chunk_update(scalar_t* w, const scalar_t* g, scalar_t* u, int64_t len,
                  const sngm::Hyper<compute_t<scalar_t>>& h) {
  using C = compute_t<scalar_t>;
  using Vec = Vectorized<C>;
  constexpr int64_t W = Vec::size();
  const sngm::Hyper<Vec> hv{Vec(h.lr), Vec(h.beta), Vec(h.wd), Vec(h.sign), Vec(h.inv)};
  int64_t i = 0;
  if constexpr (!is_reduced<scalar_t>) {
    for (; i + W <= len; i += W) {
      Vec wv = Vec::loadu(w + i);
      Vec uv = HAS_MOM ? Vec::loadu(u + i) : Vec(C(0));
      sngm::update<HAS_MOM, NESTEROV, HAS_WD>(wv, uv, Vec::loadu(g + i), hv);
      wv.store(w + i);
      if constexpr (HAS_MOM) {
        uv.store(u + i);
      }
    }
  } else {
    using RVec = Vectorized<scalar_t>;  // 2 * W elements
    for (; i + 2 * W <= len; i += 2 * W) {
      auto [w0, w1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(w + i));
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(g + i));
      Vec u0(C(0)), u1(C(0));
      if constexpr (HAS_MOM) {
        std::tie(u0, u1) = at::vec::convert_to_float<scalar_t>(RVec::loadu(u + i));
      }
      sngm::update<HAS_MOM, NESTEROV, HAS_WD>(w0, u0, g0, hv);
      sngm::update<HAS_MOM, NESTEROV, HAS_WD>(w1, u1, g1, hv);
      at::vec::convert_from_float<scalar_t>(w0, w1).store(w + i);
      if constexpr (HAS_MOM) {
        at::vec::convert_from_float<scalar_t>(u0, u1).store(u + i);
      }
    }
  }
  for (; i < len; ++i) {  // the scalar path of the same maths
    C wv = static_cast<C>(w[i]);
    C uv = HAS_MOM ? static_cast<C>(u[i]) : C(0);
    sngm::update<HAS_MOM, NESTEROV, HAS_WD>(wv, uv, static_cast<C>(g[i]), h);
    w[i] = static_cast<scalar_t>(wv);
    if constexpr (HAS_MOM) {
      u[i] = static_cast<scalar_t>(uv);
    }
  }
}

// Phase 1 over a chunk table. With ``src`` (copy_sumsq: a grad hook moving a fresh grad into its
// bucket segment, which starts at ``src_offset``), each group of chunks is first copied in from
// ``src`` and then summed while it is still in L1/L2: one pass over the grad instead of a copy
// and a sum. Padding past ``src_numel`` is not written (it stays zero). Either way a chunk's
// partial is the same bits (chunks_sumsq reads the bucket in both).
template <typename scalar_t>
void sumsq_kernel(const at::Tensor& param, const at::Tensor& grad, const int64_t* chunks,
                  int64_t n_chunks, int64_t grain, double weight_decay, bool maximize,
                  const at::Tensor& partials, int64_t partial_offset,
                  const scalar_t* src = nullptr, int64_t src_offset = 0, int64_t src_numel = 0) {
  using C = compute_t<scalar_t>;
  const scalar_t* w = param.const_data_ptr<scalar_t>();
  scalar_t* g = grad.data_ptr<scalar_t>();
  const bool f64 = partials.scalar_type() == c10::kDouble;
  void* out = partials.data_ptr();
  const C sign = maximize ? C(-1) : C(1);
  const C wd = static_cast<C>(weight_decay);
  bool_dispatch(weight_decay != 0.0, [&](auto has_wd) {
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      constexpr bool HAS_WD = decltype(has_wd)::value;
      // ResNet-50's grads at 2 threads: 4.9-5.7 ms one chunk at a time, 3.5-5.0 ms four at a
      // time; eight measured no better (within this VM's run-to-run spread).
      constexpr int K = 4;
      std::array<const scalar_t*, K> wk, gk;
      std::array<C, K> s;
      for (int64_t c = begin; c < end;) {
        const int64_t len = chunks[n_chunks + c];
        int k = 0;  // how many chunks from c share c's length (full-size chunks mostly)
        for (; k < K && c + k < end && chunks[n_chunks + c + k] == len; ++k) {
          wk[k] = w + chunks[c + k];
          gk[k] = g + chunks[c + k];
        }
        if (k < K) {
          k = 1;
        }
        if (src != nullptr) {
          for (int j = 0; j < k; ++j) {
            const int64_t from = chunks[c + j] - src_offset;
            const int64_t n = std::min(len, src_numel - from);
            if (n > 0) {
              std::memcpy(g + chunks[c + j], src + from, n * sizeof(scalar_t));
            }
          }
        }
        if (k == K) {
          chunks_sumsq<scalar_t, HAS_WD, K>(wk.data(), gk.data(), len, sign, wd, s.data());
        } else {
          chunks_sumsq<scalar_t, HAS_WD, 1>(wk.data(), gk.data(), len, sign, wd, s.data());
        }
        for (int j = 0; j < k; ++j, ++c) {
          if (f64) {
            static_cast<double*>(out)[partial_offset + c] = static_cast<double>(s[j]);
          } else {
            static_cast<float*>(out)[partial_offset + c] = static_cast<float>(s[j]);
          }
        }
      }
    });
  });
}

template <typename scalar_t, typename A>
void update_kernel(const at::Tensor& param, const at::Tensor& grad,
                   const std::optional<at::Tensor>& momentum, const int64_t* chunks,
                   int64_t n_chunks, int64_t grain, const A* sumsq, double lr, double beta,
                   double weight_decay, bool nesterov, bool maximize) {
  using C = compute_t<scalar_t>;
  scalar_t* w = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* u = momentum.has_value() ? momentum->data_ptr<scalar_t>() : nullptr;
  const sngm::Hyper<C> base{static_cast<C>(lr), static_cast<C>(beta),
                            static_cast<C>(weight_decay), maximize ? C(-1) : C(1), C(0)};
  auto run = [&](auto has_mom, auto nesterov_t, auto has_wd) {
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = chunks[c], len = chunks[n_chunks + c], seg = chunks[2 * n_chunks + c];
        sngm::Hyper<C> h = base;
        h.inv = sngm::inverse_norm<C>(sumsq[seg]);
        chunk_update<scalar_t, decltype(has_mom)::value, decltype(nesterov_t)::value,
                     decltype(has_wd)::value>(w + start, g + start,
                                              u == nullptr ? nullptr : u + start, len, h);
      }
    });
  };
  bool_dispatch(weight_decay != 0.0, [&](auto has_wd) {
    if (u == nullptr) {
      run(std::false_type{}, std::false_type{}, has_wd);
    } else {
      bool_dispatch(nesterov, [&](auto nest) { run(std::true_type{}, nest, has_wd); });
    }
  });
}

template <typename F>
inline void dtype_dispatch(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::kFloat:
      return f(float{});
    case c10::kDouble:
      return f(double{});
    case c10::kBFloat16:
      return f(c10::BFloat16{});
    case c10::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "sngm_native: unsupported dtype ", t,
                  "; supported param dtypes are float32, float64, bfloat16 and float16");
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace sngm
