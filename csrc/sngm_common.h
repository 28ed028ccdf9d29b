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
  TORCH_CHECK(t.scalar_type() == c10::kDouble, "sngm_native::", op, ": ", what, " has dtype ",
              t.scalar_type(), "; the sums of squares are float64");
}

// Whether the kernels may walk t in memory order beside its param (element i of one is element i
// of the other): both contiguous, or both dense with the same strides (channels_last conv weights
// and their grads).
inline bool walkable_with(const at::Tensor& t, const at::Tensor& param) {
  return (t.is_contiguous() && param.is_contiguous()) ||
         (t.is_non_overlapping_and_dense() && t.strides() == param.strides());
}

// The tensor lists of one call: one dtype and device, matching sizes and layouts. `momentum` may be
// empty (no momentum). Messages name the op and the tensor's index.
inline void check_lists(const char* op, c10::DeviceType device, at::TensorList params,
                        at::TensorList grads, at::TensorList momentum) {
  TORCH_CHECK(grads.size() == params.size(), "sngm_native::", op, ": ", params.size(),
              " params but ", grads.size(), " grads");
  TORCH_CHECK(momentum.empty() || momentum.size() == params.size(), "sngm_native::", op, ": ",
              params.size(), " params but ", momentum.size(), " momentum buffers");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device, "sngm_native::", op, ": this kernel runs on ",
                c10::DeviceTypeName(device), " tensors, got params[", i, "] on ", p.device());
    TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(),
                "sngm_native::", op, ": params[", i, "] is ", p.scalar_type(), " on ", p.device(),
                " but params[0] is ", params[0].scalar_type(), " on ", params[0].device());
    check_param_dtype(p, op, "params");
    TORCH_CHECK(p.is_contiguous() || p.is_non_overlapping_and_dense(), "sngm_native::", op,
                ": params[", i, "] is neither contiguous nor dense");
    for (int which = 0; which < (momentum.empty() ? 1 : 2); ++which) {
      const at::Tensor& t = which == 0 ? grads[i] : momentum[i];
      const char* what = which == 0 ? "grads" : "momentum_buffers";
      TORCH_CHECK(t.scalar_type() == p.scalar_type() && t.device() == p.device() &&
                      t.numel() == p.numel(),
                  "sngm_native::", op, ": ", what, "[", i, "] is ", t.numel(), " x ",
                  t.scalar_type(), " on ", t.device(), " but params[", i, "] is ", p.numel(),
                  " x ", p.scalar_type(), " on ", p.device());
      TORCH_CHECK(walkable_with(t, p), "sngm_native::",
                  op, ": ", what, "[", i, "] must be contiguous like its param, or dense with the "
                  "param's strides");
    }
  }
}

// chunks: int64 [4, n] (tensor, start, length, segment), contiguous, on `device`.
inline void check_table(const char* op, const at::Tensor& chunks, const c10::Device& device) {
  TORCH_CHECK(chunks.scalar_type() == c10::kLong && chunks.dim() == 2 && chunks.size(0) == 4,
              "sngm_native::", op, ": chunks must be an int64 tensor of shape [4, n_chunks], got ",
              chunks.scalar_type(), " ", chunks.sizes());
  TORCH_CHECK(chunks.is_contiguous() && chunks.device() == device, "sngm_native::", op,
              ": chunks must be contiguous and on the tensors' device");
}

// GradScaler's 0-dim float32 tensors (grad_scale, found_inf), on `device`.
inline void check_scalar(const char* op, const char* what, const std::optional<at::Tensor>& t,
                         const c10::Device& device) {
  if (t.has_value()) {
    TORCH_CHECK(t->scalar_type() == c10::kFloat && t->numel() == 1 && t->device() == device,
                "sngm_native::", op, ": ", what, " must be a one-element float32 tensor on ",
                device, ", got ", t->numel(), " x ", t->scalar_type(), " on ", t->device());
  }
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
