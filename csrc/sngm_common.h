// Host-side argument checks shared by the CPU and CUDA entry points (light headers only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include <cstdint>

// The sources' hash, compiled into each module as a marker that sngm_ext/native.py finds in the
// file's bytes: a prebuilt module older than csrc/ is skipped.
#ifndef SNGM_SOURCE_HASH
#define SNGM_SOURCE_HASH unknown
#endif
#define SNGM_STR2(x) #x
#define SNGM_STR(x) SNGM_STR2(x)
#if defined(__GNUC__)
#define SNGM_USED __attribute__((used))
#else
#define SNGM_USED
#endif

namespace sngm {

inline bool is_param_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kBFloat16 || t == c10::kHalf;
}

inline void check_param_dtype(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(is_param_dtype(t.scalar_type()), "sngm_native::", op, ": ", what, " has dtype ",
              t.scalar_type(),
              "; supported param dtypes are float32, float64, bfloat16 and float16");
}

inline void check_acc_dtype(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.scalar_type() == c10::kFloat || t.scalar_type() == c10::kDouble, "sngm_native::",
              op, ": ", what, " has dtype ", t.scalar_type(),
              "; the sums of squares must be float32 or float64");
}

inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* op,
                       const char* what) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sngm_native::", op, ": ", what,
              " has dtype ", t.scalar_type(), " but param has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "sngm_native::", op, ": ", what, " is on ", t.device(),
              " but param is on ", ref.device());
  TORCH_CHECK(t.numel() == ref.numel(), "sngm_native::", op, ": ", what, " has ", t.numel(),
              " elements but param has ", ref.numel());
  TORCH_CHECK(t.is_contiguous(), "sngm_native::", op, ": ", what, " must be contiguous");
}

// The tensors of one bucket and its chunk table (buckets.py): checks everything but the table's
// contents (CPU kernels validate those before touching memory; CUDA kernels skip bad rows).
inline void check_bucket(const char* op, c10::DeviceType device, const at::Tensor& param,
                         const at::Tensor& grad, const std::optional<at::Tensor>& momentum,
                         const at::Tensor& chunks) {
  TORCH_CHECK(param.device().type() == device, "sngm_native::", op, ": this kernel runs on ",
              c10::DeviceTypeName(device), " tensors, got param on ", param.device());
  check_param_dtype(param, op, "param");
  TORCH_CHECK(param.is_contiguous(), "sngm_native::", op, ": param must be contiguous");
  check_same(param, grad, op, "grad");
  if (momentum.has_value()) {
    check_same(param, *momentum, op, "momentum_buffer");
  }
  TORCH_CHECK(chunks.scalar_type() == c10::kLong && chunks.dim() == 2 && chunks.size(0) == 3,
              "sngm_native::", op, ": chunks must be an int64 tensor of shape [3, n_chunks], got ",
              chunks.scalar_type(), " ", chunks.sizes());
  TORCH_CHECK(chunks.is_contiguous() && chunks.device() == param.device(), "sngm_native::", op,
              ": chunks must be contiguous and on the param's device");
}

// finalize's tensors, all but their device (each backend checks its own).
inline void check_finalize(const at::Tensor& partials, const at::Tensor& seg_ptr,
                           const at::Tensor& sumsq) {
  check_acc_dtype(partials, "finalize", "partials");
  check_acc_dtype(sumsq, "finalize", "sumsq");
  TORCH_CHECK(partials.is_contiguous() && sumsq.is_contiguous() && seg_ptr.is_contiguous(),
              "sngm_native::finalize: tensors must be contiguous");
  TORCH_CHECK(seg_ptr.scalar_type() == c10::kLong && seg_ptr.dim() == 1 && seg_ptr.numel() >= 1,
              "sngm_native::finalize: seg_ptr must be a 1-D int64 tensor [n_segments + 1]");
  TORCH_CHECK(sumsq.numel() >= 1, "sngm_native::finalize: sumsq is empty");
  const int64_t n_seg = seg_ptr.numel() - 1;
  TORCH_CHECK(sumsq.numel() == 1 || sumsq.numel() >= 1 + n_seg, "sngm_native::finalize: sumsq has ",
              sumsq.numel(), " entries, fewer than 1 + ", n_seg, " segments");
}

}  // namespace sngm
