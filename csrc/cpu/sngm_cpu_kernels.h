// The CPU kernels of the fused step: at::parallel_for over the chunk table, at::vec::Vectorized
// inside a chunk, the per-element maths of ../sngm_math.h. Included by sngm_cpu.cpp, which is
// compiled once per CPU capability with CPU_CAPABILITY (and the matching CPU_CAPABILITY_* macro)
// defined, the way ATen builds its own kernels: everything here lives in namespace
// sngm::CPU_CAPABILITY.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

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

// The lanes of v folded left to right from init: a fixed order, the same bits on every run.
template <typename V, typename F>
inline auto fold_lanes(const V& v, typename V::value_type init, F f) {
  alignas(64) std::array<typename V::value_type, V::size()> lanes;
  v.store(lanes.data());
  for (auto x : lanes) {
    init = f(init, x);
  }
  return init;
}

template <typename V>
inline auto horizontal_sum(const V& v) {
  return fold_lanes(v, typename V::value_type(0), [](auto s, auto x) { return s + x; });
}

// fp32 lanes <-> fp64 lanes (at::vec converts float to double one lane at a time). The low half
// of a float vector becomes the first double vector. Conversions round to nearest, like casts.
using DVec = Vectorized<double>;
static_assert(Vectorized<float>::size() == 2 * DVec::size(), "a float vector is two doubles");

inline std::pair<DVec, DVec> widen(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  return {DVec(_mm512_cvtps_pd(_mm512_castps512_ps256(x))),
          DVec(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  return {DVec(_mm256_cvtps_pd(_mm256_castps256_ps128(x))),
          DVec(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)))};
#else
  alignas(64) float f[Vectorized<float>::size()];
  alignas(64) double d[Vectorized<float>::size()];
  v.store(f);
  for (int i = 0; i < Vectorized<float>::size(); ++i) {
    d[i] = static_cast<double>(f[i]);
  }
  return {DVec::loadu(d), DVec::loadu(d + DVec::size())};
#endif
}

inline Vectorized<float> narrow(const DVec& lo, const DVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
#else
  alignas(64) double d[Vectorized<float>::size()];
  alignas(64) float f[Vectorized<float>::size()];
  lo.store(d);
  hi.store(d + DVec::size());
  for (int i = 0; i < Vectorized<float>::size(); ++i) {
    f[i] = static_cast<float>(d[i]);
  }
  return Vectorized<float>::loadu(f);
#endif
}

// acc0/acc1 += the squares of d, in double (the two halves of d in turn). Fused multiply-adds:
// a partial is this kernel's own sum (the same bits for a chunk whoever asks, hooks or step), and
// in fp64 the rounding it saves is far below what the tests can see.
inline void add_squares(DVec& acc0, DVec& acc1, const Vectorized<float>& d) {
  const auto [lo, hi] = widen(d);
  acc0 = at::vec::fmadd(lo, lo, acc0);
  acc1 = at::vec::fmadd(hi, hi, acc1);
}
inline void add_squares(DVec& acc0, DVec& acc1, const DVec& d) {
  acc0 = at::vec::fmadd(d, d, acc0);
  (void)acc1;
}

// fp64 lanes into the three accumulators (../sngm_math.h range_of): med, big, small. NaN compares
// false both ways and stays in med.
inline void add_scaled_squares(std::array<DVec, 3>& acc, const DVec& d) {
  const DVec x = d.abs();
  const DVec is_big = x > DVec(sngm::kBig);
  const DVec is_small = x < DVec(sngm::kSmall);
  const DVec zero(0.0);
  const DVec mid = DVec::blendv(x, zero, is_big | is_small);
  const DVec big = DVec::blendv(zero, x * DVec(sngm::kBigScale), is_big);
  const DVec small = DVec::blendv(zero, x * DVec(sngm::kSmallScale), is_small);
  acc[0] = at::vec::fmadd(mid, mid, acc[0]);
  acc[1] = at::vec::fmadd(big, big, acc[1]);
  acc[2] = at::vec::fmadd(small, small, acc[2]);
}

// nd = C(double(d) * inv), lane by lane.
inline Vectorized<float> normalize(const Vectorized<float>& d, const DVec& inv) {
  const auto [lo, hi] = widen(d);
  return narrow(lo * inv, hi * inv);
}
inline DVec normalize(const DVec& d, const DVec& inv) { return d * inv; }

// nd = C(((double(d) * pre) * inv) * post): an fp64 gradient out of range (combine's scales).
inline Vectorized<float> normalize(const Vectorized<float>& d, const DVec& inv, const DVec& pre,
                                   const DVec& post) {
  const auto [lo, hi] = widen(d);
  return narrow(((lo * pre) * inv) * post, ((hi * pre) * inv) * post);
}
inline DVec normalize(const DVec& d, const DVec& inv, const DVec& pre, const DVec& post) {
  return ((d * pre) * inv) * post;
}

// Loads 2 * W compute-type lanes at p (one reduced-precision vector, or two full ones).
template <typename scalar_t>
inline std::pair<Vectorized<compute_t<scalar_t>>, Vectorized<compute_t<scalar_t>>> load2(
    const scalar_t* p) {
  using Vec = Vectorized<compute_t<scalar_t>>;
  if constexpr (is_reduced<scalar_t>) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    return {a, b};
  } else {
    return {Vec::loadu(p), Vec::loadu(p + Vec::size())};
  }
}

template <typename scalar_t>
inline void store2(scalar_t* p, const Vectorized<compute_t<scalar_t>>& a,
                   const Vectorized<compute_t<scalar_t>>& b) {
  if constexpr (is_reduced<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  } else {
    a.store(p);
    b.store(p + Vectorized<compute_t<scalar_t>>::size());
  }
}

// Phase 1 on K chunks of the same length, in lock step: for chunk k, out[k] = the sum over it of
// double(d)^2 (fp32/bf16/fp16), or its three scaled sums out[k], out[stride + k],
// out[2 * stride + k] (fp64: med, big, small; ../sngm_math.h), d = sign * g * gscale + wd * w in
// the compute type. One chunk's loop is a single sequential read stream, which a core cannot keep
// busy enough to fill its memory bandwidth (the hardware prefetcher stops at 4 KiB page edges); K
// streams keep K times the cache-line fills in flight. Each chunk has its own accumulators and
// the same order of additions for every K, so a partial sum is the same bits whichever K
// computed it (a grad hook sums one tensor, the step many).
template <typename scalar_t, bool HAS_WD, bool HAS_SCALE, int K>
void chunks_sumsq(const scalar_t* const* w, const scalar_t* const* g, int64_t len,
                  const sngm::Hyper<compute_t<scalar_t>>& h, double* out, int64_t stride) {
  using C = compute_t<scalar_t>;
  using Vec = Vectorized<C>;
  constexpr bool F64 = std::is_same_v<scalar_t, double>;
  constexpr int64_t W = Vec::size();
  const Vec vsign(h.sign), vwd(h.wd), vscale(h.gscale);
  // Without weight decay d^2 = (g * gscale)^2 and |d| = |g * gscale|: the sign drops out
  // exactly, and so does a scale of 1, so the vector loop skips those multiplies (the same
  // values, fewer instructions).
  auto direction = [&](const Vec& gv, const Vec& wv) {
    const Vec gs = HAS_SCALE ? gv * vscale : gv;
    if constexpr (HAS_WD) {
      return sngm::direction<true>(gs, wv, vsign, vwd);
    } else {
      return gs;
    }
  };
  // fp64: the plain sum of squares (acc0) and the range of |d| over the chunk (vmax, and vmin
  // over the nonzero lanes), 6 vector ops a vector; a chunk with an element outside
  // [kSmall, kBig] (or a NaN) is summed again with the three-way split (12 ops a vector:
  // ResNet-20's fp64 grads took 1.8x as long in phase 1 when every chunk was split). Zeros
  // belong to no row (they add 0 to small), so where every nonzero element is in range the
  // plain sum is the split's med, bit for bit: the same fused multiply-adds in the same order.
  std::array<DVec, K> acc0, acc1, vmax, vmin;
  acc0.fill(DVec(0.0));
  acc1.fill(DVec(0.0));
  vmax.fill(DVec(0.0));
  vmin.fill(DVec(std::numeric_limits<double>::infinity()));
  auto load_d = [&](int k, int64_t at) {
    auto [g0, g1] = load2(g[k] + at);
    Vec w0(C(0)), w1(C(0));
    if constexpr (HAS_WD) {
      std::tie(w0, w1) = load2(w[k] + at);
    }
    return std::pair<Vec, Vec>{direction(g0, w0), direction(g1, w1)};
  };
  // clamp_min / clamp_max: plain max and min instructions (a NaN may or may not stick; either
  // way the sum is NaN and the chunk's rows do not matter)
  const DVec inf(std::numeric_limits<double>::infinity()), zero(0.0);
  auto track = [&](DVec& acc, DVec& hi, DVec& lo, const DVec& d) {
    acc = at::vec::fmadd(d, d, acc);
    const DVec x = d.abs();
    hi = at::vec::clamp_min(x, hi);
    lo = at::vec::clamp_max(DVec::blendv(x, inf, x == zero), lo);
  };
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    for (int k = 0; k < K; ++k) {
      const auto [d0, d1] = load_d(k, i);
      if constexpr (F64) {
        track(acc0[k], vmax[k], vmin[k], d0);
        track(acc0[k], vmax[k], vmin[k], d1);
      } else {
        add_squares(acc0[k], acc1[k], d0);
        add_squares(acc0[k], acc1[k], d1);
      }
    }
  }
  for (int k = 0; k < K; ++k) {
    const C wz(0);
    if constexpr (F64) {
      double s[3] = {horizontal_sum(acc0[k]), 0.0, 0.0};
      // a NaN lane sticks (x != x), so its chunk is split like any other out of range
      const double hi =
          fold_lanes(vmax[k], 0.0, [](double m, double x) { return x > m || x != x ? x : m; });
      const double lo = fold_lanes(vmin[k], std::numeric_limits<double>::infinity(),
                                   [](double m, double x) { return x < m || x != x ? x : m; });
      if (!(hi <= sngm::kBig && lo >= sngm::kSmall)) {
        std::array<DVec, 3> a;
        a.fill(DVec(0.0));
        for (int64_t j = 0; j < i; j += 2 * W) {
          const auto [d0, d1] = load_d(k, j);
          add_scaled_squares(a, d0);
          add_scaled_squares(a, d1);
        }
        for (int r = 0; r < 3; ++r) {
          s[r] = horizontal_sum(a[r]);
        }
      }
      for (int64_t j = i; j < len; ++j) {  // the tail of a tensor whose size is not a multiple
        sngm::add_scaled_square<HAS_WD>(s[0], s[1], s[2], g[k][j], HAS_WD ? w[k][j] : wz,
                                        h.sign, h.wd, h.gscale);
      }
      for (int r = 0; r < 3; ++r) {
        out[r * stride + k] = s[r];
      }
    } else {
      double s = horizontal_sum(acc0[k] + acc1[k]);
      for (int64_t j = i; j < len; ++j) {
        s += sngm::square<HAS_WD>(static_cast<C>(g[k][j]), HAS_WD ? static_cast<C>(w[k][j]) : wz,
                                  h.sign, h.wd, h.gscale);
      }
      out[k] = s;
      out[stride + k] = 0.0;  // no fp32/bf16/fp16 value leaves the med range
      out[2 * stride + k] = 0.0;
    }
  }
}

// Phase 2 on one chunk: w, g, u point at the chunk's first element.
// SCALED: combine's scales are not both 1 (an fp64 gradient out of range); else they are left out,
// which gives the same bits.
template <typename scalar_t, bool HAS_MOM, bool NESTEROV, bool HAS_WD, bool SCALED>
void chunk_update(scalar_t* w, const scalar_t* g, scalar_t* u, int64_t len,
                  const sngm::Hyper<compute_t<scalar_t>>& h, double inv, double pre,
                  double post) {
  using C = compute_t<scalar_t>;
  using Vec = Vectorized<C>;
  constexpr int64_t W = Vec::size();
  const sngm::Hyper<Vec> hv{Vec(h.lr), Vec(h.beta), Vec(h.wd), Vec(h.sign), Vec(h.gscale)};
  const DVec vinv(inv), vpre(pre), vpost(post);
  auto normalized = [&](const Vec& d) {
    if constexpr (SCALED) {
      return normalize(d, vinv, vpre, vpost);
    } else {
      return normalize(d, vinv);
    }
  };
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    auto [w0, w1] = load2(w + i);
    auto [g0, g1] = load2(g + i);
    Vec u0(C(0)), u1(C(0));
    if constexpr (HAS_MOM) {
      std::tie(u0, u1) = load2(u + i);
    }
    sngm::apply<HAS_MOM, NESTEROV>(
        w0, u0, normalized(sngm::direction<HAS_WD>(g0 * hv.gscale, w0, hv.sign, hv.wd)), hv);
    sngm::apply<HAS_MOM, NESTEROV>(
        w1, u1, normalized(sngm::direction<HAS_WD>(g1 * hv.gscale, w1, hv.sign, hv.wd)), hv);
    store2(w + i, w0, w1);
    if constexpr (HAS_MOM) {
      store2(u + i, u0, u1);
    }
  }
  for (; i < len; ++i) {  // the scalar path of the same maths
    C wv = static_cast<C>(w[i]);
    C uv = HAS_MOM ? static_cast<C>(u[i]) : C(0);
    sngm::update<HAS_MOM, NESTEROV, HAS_WD>(wv, uv, static_cast<C>(g[i]), h, inv, pre, post);
    w[i] = static_cast<scalar_t>(wv);
    if constexpr (HAS_MOM) {
      u[i] = static_cast<scalar_t>(uv);
    }
  }
}

// One chunk-table row, unpacked.
struct Row {
  int64_t tensor, start, len, seg;
};

inline Row row_at(const int64_t* chunks, int64_t n, int64_t c) {
  return {chunks[c], chunks[n + c], chunks[2 * n + c], chunks[3 * n + c]};
}

// Phase 1 over a chunk table: partials[r * stride + c] for every row c and accumulator r.
template <typename scalar_t>
void sumsq_kernel(const std::vector<const scalar_t*>& w, const std::vector<const scalar_t*>& g,
                  const int64_t* chunks, int64_t n_chunks, int64_t grain,
                  const sngm::Hyper<compute_t<scalar_t>>& h, double* partials, int64_t stride) {
  bool_dispatch(h.wd != 0, [&](auto has_wd) {
   bool_dispatch(h.gscale != 1, [&](auto has_scale) {
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      constexpr bool HAS_WD = decltype(has_wd)::value;
      constexpr bool HAS_SCALE = decltype(has_scale)::value;
      // ResNet-50's grads at 2 threads: 4.9-5.7 ms one chunk at a time, 3.5-5.0 ms four at a
      // time; eight measured no better (within this VM's run-to-run spread).
      constexpr int K = 4;
      std::array<const scalar_t*, K> wk, gk;
      for (int64_t c = begin; c < end;) {
        const int64_t len = chunks[2 * n_chunks + c];
        int k = 0;  // how many chunks from c share c's length (full-size chunks mostly)
        for (; k < K && c + k < end && chunks[2 * n_chunks + c + k] == len; ++k) {
          const Row r = row_at(chunks, n_chunks, c + k);
          wk[k] = HAS_WD ? w[r.tensor] + r.start : nullptr;
          gk[k] = g[r.tensor] + r.start;
        }
        if (k == K) {
          chunks_sumsq<scalar_t, HAS_WD, HAS_SCALE, K>(wk.data(), gk.data(), len, h, partials + c,
                                                       stride);
        } else {
          chunks_sumsq<scalar_t, HAS_WD, HAS_SCALE, 1>(wk.data(), gk.data(), len, h, partials + c,
                                                       stride);
          k = 1;
        }
        c += k;
      }
    });
   });
  });
}

// sumsq: [3, n_sumsq] (med, big, small per segment).
template <typename scalar_t>
void update_kernel(const std::vector<scalar_t*>& w, const std::vector<const scalar_t*>& g,
                   const std::vector<scalar_t*>& u, const int64_t* chunks, int64_t n_chunks,
                   int64_t grain, const double* sumsq, int64_t n_sumsq,
                   const sngm::Hyper<compute_t<scalar_t>>& h, bool nesterov) {
  auto run = [&](auto has_mom, auto nesterov_t, auto has_wd) {
    constexpr bool HAS_MOM = decltype(has_mom)::value;
    constexpr bool NEST = decltype(nesterov_t)::value;
    constexpr bool HAS_WD = decltype(has_wd)::value;
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Row r = row_at(chunks, n_chunks, c);
        const sngm::Scaled sc = sngm::combine(sumsq[r.seg], sumsq[n_sumsq + r.seg],
                                              sumsq[2 * n_sumsq + r.seg]);
        const double inv = sngm::inverse_norm(sc.q);
        scalar_t* wc = w[r.tensor] + r.start;
        const scalar_t* gc = g[r.tensor] + r.start;
        scalar_t* uc = HAS_MOM ? u[r.tensor] + r.start : nullptr;
        if (sc.pre == 1.0 && sc.post == 1.0) {
          chunk_update<scalar_t, HAS_MOM, NEST, HAS_WD, false>(wc, gc, uc, r.len, h, inv, 1.0,
                                                               1.0);
        } else {
          chunk_update<scalar_t, HAS_MOM, NEST, HAS_WD, true>(wc, gc, uc, r.len, h, inv, sc.pre,
                                                              sc.post);
        }
      }
    });
  };
  bool_dispatch(h.wd != 0, [&](auto has_wd) {
    if (u.empty()) {
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
