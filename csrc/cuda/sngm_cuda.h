// Launchers of the CUDA kernels (sngm_cuda.cu). Plain C++ types only, so the .cu includes no torch
// header at all and the host side (sngm_cuda_ops.cpp) keeps every at::Tensor. Each launcher
// returns the error of its own launch (cudaLaunchKernelEx's return value), never one that an
// earlier, unrelated call left pending.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sngm {
namespace cuda {

enum class Dtype : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// Row t of the device table: where tensor t of the lists lives and how many elements it has.
// Addresses are stored as integers so that the host fills a plain int64 tensor [n_tensors, 4].
// 8-byte aligned on purpose: the row is read with 64-bit loads, so every 128-bit access in the
// PTX is one of the data path's (scripts/cuda_compile_check.py counts them).
struct TensorRow {
  int64_t param;
  int64_t grad;
  int64_t momentum;  // 0 without momentum
  int64_t numel;
};
static_assert(sizeof(TensorRow) == 4 * sizeof(int64_t), "TensorRow is one int64 row of 4");

// What sumsq and update walk: the tensor lists (through the device table) and the chunk table.
// A column that does not fit (tensor index outside the lists, start or length outside the tensor;
// for update also a segment outside sumsq) is skipped: the host cannot read the device's chunk
// table without a sync. sumsq still writes the skipped column's partial, as 0.
struct Lists {
  Dtype dtype;
  const TensorRow* table;   // [n_tensors] on the device
  int64_t n_tensors;
  const int64_t* chunks;    // int64 [4, n_chunks] on the device: tensor, start, length, segment
  int64_t n_chunks;         // < 2^31 (one block each, grid x)
  const float* grad_scale;  // 0-dim float32 on the device; nullptr: gscale = 1
};

// The sums of squares are float64 [3, n], contiguous: rows med, big, small (../sngm_math.h), row r
// of column c at r * n + c.

// partials[r * partial_stride + c] = chunk c's sum of row r (the caller offsets partials by
// partial_offset; partial_stride is the partials tensor's n_partials, its size(1)). fp64: the
// three rows of range_of; other dtypes: every square in row 0, rows 1 and 2 written 0.
cudaError_t launch_sumsq(const Lists& l, double weight_decay, bool maximize, double* partials,
                         int64_t partial_stride, cudaStream_t stream);

// partials [3, n_partials], sumsq [3, n_sumsq]. For each row r: sumsq[r, 0] = the sum over the
// segments of partials[r, seg_ptr[s]:seg_ptr[s+1]]; with per_segment also sumsq[r, 1 + s] =
// segment s's sum. found_inf given and nonzero: sumsq[0, 0] = +inf (rows 1 and 2 as summed).
cudaError_t launch_finalize(const double* partials, int64_t n_partials, const int64_t* seg_ptr,
                            int64_t n_segments, const float* found_inf, double* sumsq,
                            int64_t n_sumsq, bool per_segment, cudaStream_t stream);

// The learning rate of update: `value`, or where a pointer is set (at most one), the one element
// of lr_tensor (torch.optim.SGD's tensor lr) on the device, which the kernel loads when it runs:
// no host sync, and a captured CUDA graph reads each replay's value. Either way it becomes the
// compute type as static_cast<C> of the value (fp32 compute rounds an fp64 lr to float).
struct LearningRate {
  double value;       // read only when both pointers are nullptr
  const float* f32;   // a float32 lr_tensor's element
  const double* f64;  // a float64 lr_tensor's element
};

// sumsq [3, n_sumsq]: nothing when sumsq[0, 0] or sumsq[1, 0] is not finite; else each chunk is
// normalized by combine() of its segment's column.
cudaError_t launch_update(const Lists& l, bool has_momentum, const double* sumsq, int64_t n_sumsq,
                          const LearningRate& lr, double momentum, double weight_decay,
                          bool nesterov, bool maximize, cudaStream_t stream);

}  // namespace cuda
}  // namespace sngm
