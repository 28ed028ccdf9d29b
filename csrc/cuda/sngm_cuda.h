// Launchers of the CUDA kernels (sngm_cuda.cu). Plain C++ types only, so the .cu includes no torch
// header at all and the host side (sngm_cuda_ops.cpp) keeps every at::Tensor.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sngm {
namespace cuda {

enum class Dtype : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// Chunk table rows (start, length, segment) that do not fit the bucket or sumsq are skipped.
struct Bucket {
  void* param;
  const void* grad;
  void* momentum;  // nullptr: no momentum
  Dtype dtype;
  int64_t numel;
  const int64_t* chunks;  // int64 [3, n_chunks] on the device
  int64_t n_chunks;
  bool aligned16;  // param, grad (and momentum) are 16-byte aligned: 128-bit loads where possible
};

cudaError_t launch_sumsq(const Bucket& b, double weight_decay, bool maximize, void* partials,
                         bool partials_f64, cudaStream_t stream);

cudaError_t launch_finalize(const void* partials, bool partials_f64, const int64_t* seg_ptr,
                            int64_t n_segments, void* sumsq, bool sumsq_f64, bool per_segment,
                            cudaStream_t stream);

cudaError_t launch_update(const Bucket& b, const void* sumsq, bool sumsq_f64, int64_t n_sumsq,
                          double lr, double momentum, double weight_decay, bool nesterov,
                          bool maximize, cudaStream_t stream);

}  // namespace cuda
}  // namespace sngm
