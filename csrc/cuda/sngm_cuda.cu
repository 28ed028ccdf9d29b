// CUDA kernels of the fused SNGM step over per-tensor lists (the contract: docs/ops.md; the
// same three ops as csrc/cpu and triton_kernels/). sumsq and update are one launch per op call
// whatever the number of tensors: one block per column of the chunk table, which finds its tensor
// through the device table of pointers (sngm_cuda.h TensorRow).
// The sums of squares are float64 [3, n] (rows med, big, small: Blue's scaled sum of squares,
// ../sngm_math.h range_of / add_scaled_square / combine), row r of column c at r * n + c.
//   sumsq    a chunk's three sums: per-thread double accumulators, then one CUB block reduction
//            per row (a fixed tree: deterministic, no float atomics); one partial per chunk and
//            row. fp64 params split x = |d| by range_of; fp32/bf16/fp16 sum every double(d)^2
//            into med (every such square fits a double) and write 0 to big and small
//   finalize one block: each segment's partials summed per row in double in a fixed order, the
//            total per row (found_inf makes the med total +inf)
//   update   normalize, momentum, param in one read-modify-write; it reads the sums of squares
//            (and lr_tensor's learning rate, when one is given) from device memory and returns at
//            once when the global med or big sum is not finite (a skipped step loads and stores
//            nothing). Per chunk, combine() of its segment's three sums gives (q, pre, post) and
//            inv = 1 / sqrt(q); a block whose pre and post are both 1 (every segment without an
//            fp64 element beyond ~1e+-150) takes the walk without the two multiplies by 1. It
//            walks the chunks in reverse (block b takes chunk n-1-b): the grads sumsq read last
//            may still be in L2 (60 MB on an H200). Not measured.
// A chunk moves 16 bytes per access when every pointer it touches is 16-byte aligned at its start
// and its length is a whole number of 16-byte packs; otherwise it takes the scalar path, same
// maths. Offsets are int64 throughout. No torch header here: sngm_cuda_ops.cpp owns the tensors.
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../sngm_math.h"
#include "sngm_cuda.h"

namespace sngm {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // sumsq and update: one block per chunk (CHUNK = 4096 elements)
// Accesses of V elements each thread loads before it uses any (per array): 4, 2 for fp64 (4 spills
// with momentum on sm_90), and never more than one pass over a chunk needs (2 for 16-bit types on
// the vector path): registers beyond that would only cost resident blocks.
template <typename S, int V>
constexpr int unroll() {
  const int cap = sizeof(S) == 8 ? 2 : 4;
  const int one_pass = static_cast<int>(sngm::kChunk / (kThreads * V));
  return one_pass < cap ? one_pass : cap;
}
// update's blocks per SM to fit: a block makes dependent round trips to memory (the column, then
// the segment's sum and the table row) before it streams, and more resident blocks hide them.
// ptxas (nvcc 13.0) keeps the 4-byte and 2-byte types within the 64 registers that asks for
// without spills; fp64 would spill, so it keeps ptxas's choice. Not measured on a GPU yet.
template <typename S>
constexpr int kUpdateMinBlocks = sizeof(S) == 8 ? 1 : 4;
constexpr int kWarp = 32;
constexpr int kFinalizeThreads = 1024;  // finalize: one block
constexpr int kFinalizeWarps = kFinalizeThreads / kWarp;

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

// V elements at once: V = 16 / sizeof(S) is one 128-bit access (the vector path), V = 1 the
// scalar path. Both walk a chunk the same way, so they differ only in the width of an access.
template <typename S, int V>
struct alignas(sizeof(S) * V) Vec {
  S v[V];
};
template <typename S>
constexpr int kVec = 16 / sizeof(S);

// The accesses name the global space: the pointers come from the device table, so the compiler
// sees generic ones and would emit generic ld/st (not ld.global/st.global) for plain C++ accesses.
// load: param and momentum (update writes them); load_nc: read-only for the whole kernel (the
// non-coherent path); store: write-back, the default policy.
template <typename S, int V>
__device__ __forceinline__ Vec<S, V> load(const S* p) {
  Vec<S, V> out;
  if constexpr (V == 1) {
    out.v[0] = __ldca(p);
  } else {
    static_assert(sizeof(Vec<S, V>) == sizeof(uint4), "a vector access is 16 bytes");
    const uint4 raw = __ldca(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, sizeof(raw));
  }
  return out;
}

template <typename S, int V>
__device__ __forceinline__ Vec<S, V> load_nc(const S* p) {
  Vec<S, V> out;
  if constexpr (V == 1) {
    out.v[0] = __ldg(p);
  } else {
    static_assert(sizeof(Vec<S, V>) == sizeof(uint4), "a vector access is 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, sizeof(raw));
  }
  return out;
}

template <typename S, int V>
__device__ __forceinline__ void store(S* p, const Vec<S, V>& x) {
  if constexpr (V == 1) {
    __stwb(p, x.v[0]);
  } else {
    static_assert(sizeof(Vec<S, V>) == sizeof(uint4), "a vector access is 16 bytes");
    uint4 raw;
    memcpy(&raw, &x, sizeof(raw));
    __stwb(reinterpret_cast<uint4*>(p), raw);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename S>
__device__ __forceinline__ S* address(int64_t a) {
  return reinterpret_cast<S*>(static_cast<intptr_t>(a));
}

// Column c of the chunk table.
struct Chunk {
  int64_t tensor, start, len, seg;
};

__device__ __forceinline__ Chunk column(const Lists& l, int64_t c) {
  const int64_t n = l.n_chunks;
  return Chunk{l.chunks[c], l.chunks[n + c], l.chunks[2 * n + c], l.chunks[3 * n + c]};
}

__device__ __forceinline__ bool known_tensor(const Lists& l, const Chunk& ch) {
  return ch.tensor >= 0 && ch.tensor < l.n_tensors;
}

// Whether the chunk's elements lie inside its tensor (row: the tensor's entry of the table).
__device__ __forceinline__ bool inside(const Chunk& ch, const TensorRow& row) {
  return ch.start >= 0 && ch.len >= 0 && ch.start <= row.numel && ch.len <= row.numel - ch.start;
}

// gscale = 1 / grad_scale in float (as GradScaler's unscale_ computes it), then in C.
template <typename C>
__device__ __forceinline__ C grad_scale_inverse(const float* grad_scale) {
  return grad_scale == nullptr ? C(1) : static_cast<C>(__fdiv_rn(1.0f, *grad_scale));
}

// The learning rate in C: lr_tensor's element where one is given (float32 or float64), converted
// as the host converts the float lr (static_cast<C>: round to nearest; exact into fp64), else lr.
template <typename C>
__device__ __forceinline__ C learning_rate(C lr, const float* lr_f32, const double* lr_f64) {
  if (lr_f64 != nullptr) {
    return static_cast<C>(*lr_f64);
  }
  return lr_f32 != nullptr ? static_cast<C>(*lr_f32) : lr;
}

// Both chunk walkers: len / V accesses per array; thread t takes accesses t, t + kThreads, ...,
// and loads unroll() of them before using any, so that their latencies overlap.

// A thread's (or a chunk's) three sums of squares: med, big, small (../sngm_math.h).
struct Sums {
  double med = 0.0, big = 0.0, small = 0.0;
};

// This thread's share of the chunk's sums of squares, each added in a fixed order.
template <Dtype D, bool HAS_WD, int V>
__device__ __forceinline__ Sums sumsq_chunk(const typename Traits<D>::S* __restrict__ g,
                                            const typename Traits<D>::S* __restrict__ w,
                                            int64_t len, typename Traits<D>::C sign,
                                            typename Traits<D>::C wd,
                                            typename Traits<D>::C gscale) {
  using T = Traits<D>;
  using S = typename T::S;
  using C = typename T::C;
  constexpr int U = unroll<S, V>();
  const int64_t n = len / V;
  Sums acc;
  for (int64_t base = threadIdx.x; base < n; base += kThreads * U) {
    Vec<S, V> gv[U], wv[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < n) {
        gv[k] = load_nc<S, V>(g + i * V);
        if constexpr (HAS_WD) {
          wv[k] = load_nc<S, V>(w + i * V);  // params are read-only in sumsq
        }
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (base + k * kThreads < n) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const C wc = HAS_WD ? T::load(wv[k].v[j]) : C(0);
          if constexpr (D == Dtype::kDouble) {
            sngm::add_scaled_square<HAS_WD>(acc.med, acc.big, acc.small, T::load(gv[k].v[j]),
                                            wc, sign, wd, gscale);
          } else {
            acc.med += sngm::square<HAS_WD>(T::load(gv[k].v[j]), wc, sign, wd, gscale);
          }
        }
      }
    }
  }
  return acc;
}

// SCALED: combine()'s pre and post apply; without it both are 1 (the multiplies fold away).
template <Dtype D, bool HAS_MOM, bool NESTEROV, bool HAS_WD, bool SCALED, int V>
__device__ __forceinline__ void update_chunk(typename Traits<D>::S* __restrict__ w,
                                             const typename Traits<D>::S* __restrict__ g,
                                             typename Traits<D>::S* __restrict__ u, int64_t len,
                                             const sngm::Hyper<typename Traits<D>::C>& h,
                                             double inv, double pre, double post) {
  using T = Traits<D>;
  using S = typename T::S;
  using C = typename T::C;
  constexpr int U = unroll<S, V>();
  const int64_t n = len / V;
  for (int64_t base = threadIdx.x; base < n; base += kThreads * U) {
    Vec<S, V> wv[U], gv[U], uv[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < n) {
        wv[k] = load<S, V>(w + i * V);
        gv[k] = load_nc<S, V>(g + i * V);
        if constexpr (HAS_MOM) {
          uv[k] = load<S, V>(u + i * V);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < n) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          C wc = T::load(wv[k].v[j]);
          C uc = HAS_MOM ? T::load(uv[k].v[j]) : C(0);
          sngm::update<HAS_MOM, NESTEROV, HAS_WD>(wc, uc, T::load(gv[k].v[j]), h, inv,
                                                  SCALED ? pre : 1.0, SCALED ? post : 1.0);
          wv[k].v[j] = T::store(wc);
          if constexpr (HAS_MOM) {
            uv[k].v[j] = T::store(uc);
          }
        }
        store<S, V>(w + i * V, wv[k]);
        if constexpr (HAS_MOM) {
          store<S, V>(u + i * V, uv[k]);
        }
      }
    }
  }
}

template <Dtype D, bool HAS_WD>
__global__ void __launch_bounds__(kThreads)
    sumsq_kernel(const Lists l, typename Traits<D>::C sign, typename Traits<D>::C wd,
                 double* __restrict__ partials, int64_t partial_stride) {
  using S = typename Traits<D>::S;
  using C = typename Traits<D>::C;
  const int64_t c = blockIdx.x;
  const Chunk ch = column(l, c);
  const TensorRow row = known_tensor(l, ch) ? l.table[ch.tensor] : TensorRow{};
  // A column that does not fit adds nothing, but its partial is still written: all are defined.
  const int64_t len = inside(ch, row) ? ch.len : 0;
  const S* g = address<const S>(row.grad) + ch.start;
  const S* w = address<const S>(row.param) + ch.start;  // read only when HAS_WD
  const C gscale = grad_scale_inverse<C>(l.grad_scale);
  const Sums acc = len % kVec<S> == 0 && aligned16(g) && (!HAS_WD || aligned16(w))
                       ? sumsq_chunk<D, HAS_WD, kVec<S>>(g, w, len, sign, wd, gscale)
                       : sumsq_chunk<D, HAS_WD, 1>(g, w, len, sign, wd, gscale);
  using Reduce = cub::BlockReduce<double, kThreads>;
  if constexpr (D == Dtype::kDouble) {
    __shared__ typename Reduce::TempStorage tmp[3];  // one per row: no barrier between them
    const double med = Reduce(tmp[0]).Sum(acc.med);
    const double big = Reduce(tmp[1]).Sum(acc.big);
    const double small = Reduce(tmp[2]).Sum(acc.small);
    if (threadIdx.x == 0) {
      partials[c] = med;
      partials[partial_stride + c] = big;
      partials[2 * partial_stride + c] = small;
    }
  } else {
    __shared__ typename Reduce::TempStorage tmp;
    const double med = Reduce(tmp).Sum(acc.med);
    if (threadIdx.x == 0) {
      partials[c] = med;
      partials[partial_stride + c] = 0.0;
      partials[2 * partial_stride + c] = 0.0;
    }
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const double* __restrict__ partials, int64_t n_partials,
                    const int64_t* __restrict__ seg_ptr, int64_t n_segments,
                    const float* __restrict__ found_inf, double* __restrict__ sumsq,
                    int64_t n_sumsq, bool per_segment) {
  // partials [3, n_partials] and sumsq [3, n_sumsq]: row r of column c at r * n + c
  // seg_ptr lives on the device (the host cannot check it without a sync): clamp each segment to
  // [0, n_partials]; an empty or reversed one sums to 0.
  auto bounds = [&](int64_t s, int64_t& lo, int64_t& hi) {
    lo = seg_ptr[s] < 0 ? 0 : seg_ptr[s];
    hi = seg_ptr[s + 1] > n_partials ? n_partials : seg_ptr[s + 1];
  };
  using WarpReduce = cub::WarpReduce<double>;
  __shared__ typename WarpReduce::TempStorage wtmp[kFinalizeWarps];
  using Reduce = cub::BlockReduce<double, kFinalizeThreads>;
  __shared__ typename Reduce::TempStorage tmp[3];  // one per row: no barrier between the rows
  // One pass per row (med, big, small), each the same fixed order (not unrolled: three
  // accumulators at once would not fit 1024 threads' registers on sm_80).
#pragma unroll 1
  for (int r = 0; r < 3; ++r) {
    const double* row = partials + r * n_partials;
    double* out = sumsq + r * n_sumsq;
    double mine = 0.0;  // this thread's share of the row's total
    if (per_segment) {
      // norm="tensor": one segment per tensor, many and mostly a few partials each: a warp each.
      const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
      for (int64_t s = warp; s < n_segments; s += kFinalizeWarps) {
        int64_t lo, hi;
        bounds(s, lo, hi);
        double acc = 0.0;
        for (int64_t i = lo + lane; i < hi; i += kWarp) {
          acc += row[i];
        }
        const double v = WarpReduce(wtmp[warp]).Sum(acc);  // valid in lane 0
        __syncwarp();  // wtmp[warp] is reused by this warp's next segment (and row)
        if (lane == 0) {
          out[1 + s] = v;
          mine += v;
        }
      }
    } else {
      // norm="global": one segment over every partial (up to ~1e6): the whole block on each.
      for (int64_t s = 0; s < n_segments; ++s) {
        int64_t lo, hi;
        bounds(s, lo, hi);
        for (int64_t i = lo + threadIdx.x; i < hi; i += kFinalizeThreads) {
          mine += row[i];
        }
      }
    }
    const double total = Reduce(tmp[r]).Sum(mine);
    if (threadIdx.x == 0) {
      // GradScaler found an inf or NaN in a grad: the step is skipped like any non-finite norm
      // (med's total alone is set: update skips when it is not finite).
      out[0] = r == 0 && found_inf != nullptr && *found_inf != 0.0f ? CUDART_INF : total;
    }
  }
}

template <Dtype D, bool HAS_MOM, bool NESTEROV, bool HAS_WD>
__global__ void __launch_bounds__(kThreads, kUpdateMinBlocks<typename Traits<D>::S>)
    update_kernel(const Lists l, const double* __restrict__ sumsq, int64_t n_sumsq,
                  typename Traits<D>::C lr, const float* __restrict__ lr_f32,
                  const double* __restrict__ lr_f64, typename Traits<D>::C beta,
                  typename Traits<D>::C wd, typename Traits<D>::C sign) {
  using S = typename Traits<D>::S;
  using C = typename Traits<D>::C;
  const int64_t c = l.n_chunks - 1 - static_cast<int64_t>(blockIdx.x);  // in reverse: see the top
  // sumsq [3, n_sumsq]: rows med, big, small. The totals' med and big (small cannot be
  // non-finite) loaded with the column: one round trip for all.
  const double total_med = sumsq[0];
  const double total_big = sumsq[n_sumsq];
  const Chunk ch = column(l, c);
  // The finite check on device: a skipped step neither loads nor stores a byte of the tensors.
  if (!sngm::is_finite(total_med) || !sngm::is_finite(total_big) || !known_tensor(l, ch) ||
      ch.seg < 0 || ch.seg >= n_sumsq) {
    return;
  }
  // lr_tensor's element (where given) loaded with the segment's sums and the table row
  const C rate = learning_rate(lr, lr_f32, lr_f64);
  const sngm::Scaled s =
      sngm::combine(sumsq[ch.seg], sumsq[n_sumsq + ch.seg], sumsq[2 * n_sumsq + ch.seg]);
  const double inv = sngm::inverse_norm(s.q);
  const TensorRow row = l.table[ch.tensor];
  if (!inside(ch, row)) {
    return;
  }
  const sngm::Hyper<C> h{rate, beta, wd, sign, grad_scale_inverse<C>(l.grad_scale)};
  S* w = address<S>(row.param) + ch.start;
  const S* g = address<const S>(row.grad) + ch.start;
  S* u = HAS_MOM ? address<S>(row.momentum) + ch.start : nullptr;
  const bool vec = ch.len % kVec<S> == 0 && aligned16(w) && aligned16(g) &&
                   (!HAS_MOM || aligned16(u));
  if (s.pre == 1.0 && s.post == 1.0) {  // the same bits as with the scales: nd = C(d * inv)
    if (vec) {
      update_chunk<D, HAS_MOM, NESTEROV, HAS_WD, false, kVec<S>>(w, g, u, ch.len, h, inv, 1.0,
                                                                 1.0);
    } else {
      update_chunk<D, HAS_MOM, NESTEROV, HAS_WD, false, 1>(w, g, u, ch.len, h, inv, 1.0, 1.0);
    }
  } else if (vec) {
    update_chunk<D, HAS_MOM, NESTEROV, HAS_WD, true, kVec<S>>(w, g, u, ch.len, h, inv, s.pre,
                                                              s.post);
  } else {
    update_chunk<D, HAS_MOM, NESTEROV, HAS_WD, true, 1>(w, g, u, ch.len, h, inv, s.pre, s.post);
  }
}

// Both dispatchers return what f returns: each launcher's f is one launch, whose cudaError_t is
// that launch's own error (see launch_config).
template <typename F>
cudaError_t bool_dispatch(bool b, F&& f) {
  if (b) {
    return f(std::true_type{});
  }
  return f(std::false_type{});
}

template <typename F>
cudaError_t dtype_dispatch(Dtype d, F&& f) {
  switch (d) {
    case Dtype::kFloat:
      return f(std::integral_constant<Dtype, Dtype::kFloat>{});
    case Dtype::kDouble:
      return f(std::integral_constant<Dtype, Dtype::kDouble>{});
    case Dtype::kBFloat16:
      return f(std::integral_constant<Dtype, Dtype::kBFloat16>{});
    case Dtype::kHalf:
      return f(std::integral_constant<Dtype, Dtype::kHalf>{});
    default:
      return cudaErrorInvalidValue;
  }
}

dim3 one_block_per_chunk(int64_t n_chunks) {  // grid x: up to 2^31 - 1 blocks
  return dim3(static_cast<unsigned int>(n_chunks));
}

// Every launch goes through cudaLaunchKernelEx (cuda_runtime.h's type-checked template: the
// arguments are converted to the kernel's parameter types), whose return value is the error of
// that launch alone. `<<<>>>` followed by cudaGetLastError() would also report (and clear) an
// earlier, unrelated error left pending by someone else's call as ours. A sticky error (a dead
// context) is still returned by any call, ours included: that one concerns every launch.
cudaLaunchConfig_t launch_config(dim3 grid, int threads, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned int>(threads));
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = nullptr;
  config.numAttrs = 0;
  return config;
}

}  // namespace

cudaError_t launch_sumsq(const Lists& l, double weight_decay, bool maximize, double* partials,
                         int64_t partial_stride, cudaStream_t stream) {
  if (l.n_chunks == 0) {
    return cudaSuccess;
  }
  return dtype_dispatch(l.dtype, [&](auto d) {
    constexpr Dtype D = decltype(d)::value;
    using C = typename Traits<D>::C;
    return bool_dispatch(weight_decay != 0.0, [&](auto has_wd) {
      const cudaLaunchConfig_t config =
          launch_config(one_block_per_chunk(l.n_chunks), kThreads, stream);
      return cudaLaunchKernelEx(&config, sumsq_kernel<D, decltype(has_wd)::value>, l,
                                maximize ? C(-1) : C(1), static_cast<C>(weight_decay), partials,
                                partial_stride);
    });
  });
}

cudaError_t launch_finalize(const double* partials, int64_t n_partials, const int64_t* seg_ptr,
                            int64_t n_segments, const float* found_inf, double* sumsq,
                            int64_t n_sumsq, bool per_segment, cudaStream_t stream) {
  const cudaLaunchConfig_t config = launch_config(dim3(1), kFinalizeThreads, stream);
  return cudaLaunchKernelEx(&config, finalize_kernel, partials, n_partials, seg_ptr, n_segments,
                            found_inf, sumsq, n_sumsq, per_segment);
}

cudaError_t launch_update(const Lists& l, bool has_momentum, const double* sumsq, int64_t n_sumsq,
                          const LearningRate& lr, double momentum, double weight_decay,
                          bool nesterov, bool maximize, cudaStream_t stream) {
  if (l.n_chunks == 0) {
    return cudaSuccess;
  }
  return dtype_dispatch(l.dtype, [&](auto d) {
    constexpr Dtype D = decltype(d)::value;
    using C = typename Traits<D>::C;
    auto launch = [&](auto has_mom, auto nest, auto has_wd) {
      const cudaLaunchConfig_t config =
          launch_config(one_block_per_chunk(l.n_chunks), kThreads, stream);
      return cudaLaunchKernelEx(
          &config,
          update_kernel<D, decltype(has_mom)::value, decltype(nest)::value,
                        decltype(has_wd)::value>,
          l, sumsq, n_sumsq, static_cast<C>(lr.value), lr.f32, lr.f64, static_cast<C>(momentum),
          static_cast<C>(weight_decay), maximize ? C(-1) : C(1));
    };
    return bool_dispatch(weight_decay != 0.0, [&](auto has_wd) {
      if (!has_momentum) {
        return launch(std::false_type{}, std::false_type{}, has_wd);
      }
      return bool_dispatch(nesterov,
                           [&](auto nest) { return launch(std::true_type{}, nest, has_wd); });
    });
  });
}

}  // namespace cuda
}  // namespace sngm
