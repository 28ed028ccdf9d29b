// CUDA kernels of the fused SNGM step (the same three ops as csrc/cpu and triton_kernels/):
//   sumsq    one block per chunk: the chunk's sum of d^2 in the compute type, a CUB block reduction
//            (a fixed tree: deterministic, no float atomics), one partial per chunk
//   finalize one block: each segment's partials summed in fp64 in a fixed order, the total last
//   update   one block per chunk: normalize, momentum, param in one read-modify-write with 128-bit
//            loads and stores; it reads the sums of squares from device memory and returns at once
//            when the global one is not finite (a skipped step writes nothing). It walks the chunks
//            in reverse (block b takes chunk n-1-b): the grads sumsq read last may still be in L2
//            (up to 50 MB on an H100, against 102 MB of fp32 grads for ResNet-50). Not measured
//            yet: no GPU was at hand when this was written.
// Offsets are int64 throughout. No torch header here: sngm_cuda_ops.cpp owns the tensors.
#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../sngm_math.h"
#include "sngm_cuda.h"

namespace sngm {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // sumsq and update: one block per chunk (CHUNK = 4096)
// 16-byte packs in flight per thread and array (fp64 with momentum spills at 4 on sm_90).
template <typename S>
constexpr int kUnroll = sizeof(S) == 8 ? 2 : 4;
constexpr int kFinalizeThreads = 512;  // finalize: one block

// Storage type S, compute type C and the conversions of each param dtype.
template <Dtype D>
struct Traits;
template <>
struct Traits<Dtype::kFloat> {
  using S = float;
  using C = float;
  static __device__ __forceinline__ C load(S x) { return x; }
  static __device__ __forceinline__ S store(C x) { return x; }
};
template <>
struct Traits<Dtype::kDouble> {
  using S = double;
  using C = double;
  static __device__ __forceinline__ C load(S x) { return x; }
  static __device__ __forceinline__ S store(C x) { return x; }
};
template <>
struct Traits<Dtype::kBFloat16> {
  using S = uint16_t;
  using C = float;
  static __device__ __forceinline__ C load(S x) {
    return __bfloat162float(__ushort_as_bfloat16(x));
  }
  static __device__ __forceinline__ S store(C x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));  // round to nearest even, like c10
  }
};
template <>
struct Traits<Dtype::kHalf> {
  using S = uint16_t;
  using C = float;
  static __device__ __forceinline__ C load(S x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ S store(C x) { return __half_as_ushort(__float2half_rn(x)); }
};

// 16 bytes of elements: one 128-bit load or store.
template <typename S>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(S);
  S v[N];
};

template <typename S>
__device__ __forceinline__ Pack<S> load_pack(const S* p) {  // may be written by this kernel
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  Pack<S> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename S>
__device__ __forceinline__ Pack<S> load_pack_readonly(const S* p) {  // read-only: the nc path
  uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<S> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename S>
__device__ __forceinline__ void store_pack(S* p, const Pack<S>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

// Chunk c's row, or false when it does not fit the bucket.
__device__ __forceinline__ bool chunk_row(const int64_t* __restrict__ chunks, int64_t n_chunks,
                                          int64_t c, int64_t numel, int64_t& start, int64_t& len,
                                          int64_t& seg) {
  start = chunks[c];
  len = chunks[n_chunks + c];
  seg = chunks[2 * n_chunks + c];
  return start >= 0 && len >= 0 && start <= numel && len <= numel - start;
}

template <Dtype D, bool HAS_WD>
__global__ void __launch_bounds__(kThreads)
    sumsq_kernel(const typename Traits<D>::S* __restrict__ w,
                 const typename Traits<D>::S* __restrict__ g, const int64_t* __restrict__ chunks,
                 int64_t n_chunks, int64_t numel, typename Traits<D>::C sign,
                 typename Traits<D>::C wd, void* __restrict__ partials, bool partials_f64,
                 bool aligned16) {
  using T = Traits<D>;
  using S = typename T::S;
  using C = typename T::C;
  constexpr int N = Pack<S>::N;
  int64_t start, len, seg;
  if (!chunk_row(chunks, n_chunks, blockIdx.x, numel, start, len, seg)) {
    len = 0;
  }
  C acc = C(0);
  int64_t scalar_from = 0;
  if (aligned16 && start % N == 0) {
    const int64_t n_packs = len / N;
    scalar_from = n_packs * N;
    for (int64_t base = threadIdx.x; base < n_packs; base += kThreads * kUnroll<S>) {
      Pack<S> gp[kUnroll<S>], wp[kUnroll<S>];
#pragma unroll
      for (int k = 0; k < kUnroll<S>; ++k) {
        const int64_t i = base + k * kThreads;
        if (i < n_packs) {
          gp[k] = load_pack_readonly(g + start + i * N);
          if constexpr (HAS_WD) {
            wp[k] = load_pack(w + start + i * N);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll<S>; ++k) {
        if (base + k * kThreads < n_packs) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            const C d = sngm::direction<HAS_WD>(T::load(gp[k].v[j]),
                                                HAS_WD ? T::load(wp[k].v[j]) : C(0), sign, wd);
            acc += d * d;
          }
        }
      }
    }
  }
  for (int64_t i = scalar_from + threadIdx.x; i < len; i += kThreads) {
    const C wc = HAS_WD ? T::load(w[start + i]) : C(0);
    const C d = sngm::direction<HAS_WD>(T::load(g[start + i]), wc, sign, wd);
    acc += d * d;
  }
  using Reduce = cub::BlockReduce<C, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const C sum = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) {
    if (partials_f64) {
      static_cast<double*>(partials)[blockIdx.x] = static_cast<double>(sum);
    } else {
      static_cast<float*>(partials)[blockIdx.x] = static_cast<float>(sum);
    }
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const void* __restrict__ partials, bool partials_f64,
                    const int64_t* __restrict__ seg_ptr, int64_t n_segments,
                    void* __restrict__ sumsq, bool sumsq_f64, bool per_segment) {
  using Reduce = cub::BlockReduce<double, kFinalizeThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double* pd = static_cast<const double*>(partials);
  const float* pf = static_cast<const float*>(partials);
  auto put = [&](int64_t i, double v) {
    if (sumsq_f64) {
      static_cast<double*>(sumsq)[i] = v;
    } else {
      static_cast<float*>(sumsq)[i] = static_cast<float>(v);
    }
  };
  double total = 0.0;  // thread 0's
  for (int64_t s = 0; s < n_segments; ++s) {
    const int64_t lo = seg_ptr[s], hi = seg_ptr[s + 1];
    double acc = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kFinalizeThreads) {
      acc += partials_f64 ? pd[i] : static_cast<double>(pf[i]);
    }
    const double v = Reduce(tmp).Sum(acc);
    __syncthreads();  // tmp is reused by the next segment
    if (threadIdx.x == 0) {
      if (per_segment) {
        put(1 + s, v);
      }
      total += v;
    }
  }
  if (threadIdx.x == 0) {
    put(0, total);
  }
}

template <Dtype D, bool HAS_MOM, bool NESTEROV, bool HAS_WD>
__global__ void __launch_bounds__(kThreads)
    update_kernel(typename Traits<D>::S* __restrict__ w,
                  const typename Traits<D>::S* __restrict__ g,
                  typename Traits<D>::S* __restrict__ u, const int64_t* __restrict__ chunks,
                  int64_t n_chunks, int64_t numel, const void* __restrict__ sumsq, bool sumsq_f64,
                  int64_t n_sumsq, typename Traits<D>::C lr, typename Traits<D>::C beta,
                  typename Traits<D>::C wd, typename Traits<D>::C sign, bool aligned16) {
  using T = Traits<D>;
  using S = typename T::S;
  using C = typename T::C;
  constexpr int N = Pack<S>::N;
  const double* sd = static_cast<const double*>(sumsq);
  const float* sf = static_cast<const float*>(sumsq);
  // The finite check on device: a skipped step neither loads nor stores a byte of the bucket.
  if (sumsq_f64 ? !sngm::is_finite(sd[0]) : !sngm::is_finite(sf[0])) {
    return;
  }
  int64_t start, len, seg;
  const int64_t c = n_chunks - 1 - static_cast<int64_t>(blockIdx.x);  // in reverse: see the top
  if (!chunk_row(chunks, n_chunks, c, numel, start, len, seg) || seg < 0 || seg >= n_sumsq) {
    return;
  }
  const C inv = sumsq_f64 ? sngm::inverse_norm<C>(sd[seg]) : sngm::inverse_norm<C>(sf[seg]);
  const sngm::Hyper<C> h{lr, beta, wd, sign, inv};
  int64_t scalar_from = 0;
  if (aligned16 && start % N == 0) {
    const int64_t n_packs = len / N;
    scalar_from = n_packs * N;
    S* wb = w + start;
    const S* gb = g + start;
    S* ub = HAS_MOM ? u + start : nullptr;
    for (int64_t base = threadIdx.x; base < n_packs; base += kThreads * kUnroll<S>) {
      Pack<S> wp[kUnroll<S>], gp[kUnroll<S>], up[kUnroll<S>];
#pragma unroll
      for (int k = 0; k < kUnroll<S>; ++k) {  // every load of the unrolled group first
        const int64_t i = base + k * kThreads;
        if (i < n_packs) {
          wp[k] = load_pack(wb + i * N);
          gp[k] = load_pack_readonly(gb + i * N);
          if constexpr (HAS_MOM) {
            up[k] = load_pack(ub + i * N);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll<S>; ++k) {
        const int64_t i = base + k * kThreads;
        if (i < n_packs) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            C wc = T::load(wp[k].v[j]);
            C uc = HAS_MOM ? T::load(up[k].v[j]) : C(0);
            sngm::update<HAS_MOM, NESTEROV, HAS_WD>(wc, uc, T::load(gp[k].v[j]), h);
            wp[k].v[j] = T::store(wc);
            if constexpr (HAS_MOM) {
              up[k].v[j] = T::store(uc);
            }
          }
          store_pack(wb + i * N, wp[k]);
          if constexpr (HAS_MOM) {
            store_pack(ub + i * N, up[k]);
          }
        }
      }
    }
  }
  for (int64_t i = start + scalar_from + threadIdx.x; i < start + len; i += kThreads) {
    C wc = T::load(w[i]);
    C uc = HAS_MOM ? T::load(u[i]) : C(0);
    sngm::update<HAS_MOM, NESTEROV, HAS_WD>(wc, uc, T::load(g[i]), h);
    w[i] = T::store(wc);
    if constexpr (HAS_MOM) {
      u[i] = T::store(uc);
    }
  }
}

template <typename F>
void bool_dispatch(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
cudaError_t dtype_dispatch(Dtype d, F&& f) {
  switch (d) {
    case Dtype::kFloat:
      f(std::integral_constant<Dtype, Dtype::kFloat>{});
      break;
    case Dtype::kDouble:
      f(std::integral_constant<Dtype, Dtype::kDouble>{});
      break;
    case Dtype::kBFloat16:
      f(std::integral_constant<Dtype, Dtype::kBFloat16>{});
      break;
    case Dtype::kHalf:
      f(std::integral_constant<Dtype, Dtype::kHalf>{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sumsq(const Bucket& b, double weight_decay, bool maximize, void* partials,
                         bool partials_f64, cudaStream_t stream) {
  if (b.n_chunks == 0) {
    return cudaSuccess;
  }
  return dtype_dispatch(b.dtype, [&](auto d) {
    constexpr Dtype D = decltype(d)::value;
    using T = Traits<D>;
    using S = typename T::S;
    using C = typename T::C;
    bool_dispatch(weight_decay != 0.0, [&](auto has_wd) {
      sumsq_kernel<D, decltype(has_wd)::value>
          <<<static_cast<unsigned>(b.n_chunks), kThreads, 0, stream>>>(
              static_cast<const S*>(b.param), static_cast<const S*>(b.grad), b.chunks, b.n_chunks,
              b.numel, maximize ? C(-1) : C(1), static_cast<C>(weight_decay), partials,
              partials_f64, b.aligned16);
    });
  });
}

cudaError_t launch_finalize(const void* partials, bool partials_f64, const int64_t* seg_ptr,
                            int64_t n_segments, void* sumsq, bool sumsq_f64, bool per_segment,
                            cudaStream_t stream) {
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, partials_f64, seg_ptr, n_segments,
                                                       sumsq, sumsq_f64, per_segment);
  return cudaGetLastError();
}

cudaError_t launch_update(const Bucket& b, const void* sumsq, bool sumsq_f64, int64_t n_sumsq,
                          double lr, double momentum, double weight_decay, bool nesterov,
                          bool maximize, cudaStream_t stream) {
  if (b.n_chunks == 0) {
    return cudaSuccess;
  }
  return dtype_dispatch(b.dtype, [&](auto d) {
    constexpr Dtype D = decltype(d)::value;
    using T = Traits<D>;
    using S = typename T::S;
    using C = typename T::C;
    auto launch = [&](auto has_mom, auto nest, auto has_wd) {
      update_kernel<D, decltype(has_mom)::value, decltype(nest)::value, decltype(has_wd)::value>
          <<<static_cast<unsigned>(b.n_chunks), kThreads, 0, stream>>>(
              static_cast<S*>(b.param), static_cast<const S*>(b.grad), static_cast<S*>(b.momentum),
              b.chunks, b.n_chunks, b.numel, sumsq, sumsq_f64, n_sumsq, static_cast<C>(lr),
              static_cast<C>(momentum), static_cast<C>(weight_decay), maximize ? C(-1) : C(1),
              b.aligned16);
    };
    bool_dispatch(weight_decay != 0.0, [&](auto has_wd) {
      if (b.momentum == nullptr) {
        launch(std::false_type{}, std::false_type{}, has_wd);
      } else {
        bool_dispatch(nesterov, [&](auto nest) { launch(std::true_type{}, nest, has_wd); });
      }
    });
  });
}

}  // namespace cuda
}  // namespace sngm
