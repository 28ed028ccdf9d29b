// The host-side argument checks of the ops, written once for the CPU and CUDA entry points (light
// headers only: both sides compile it under C++17 and C++20).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

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

// Every message starts with "sngm_native::<op>: " and names the tensor (its list and index) and
// what was expected. The CPU (cpu/sngm_cpu.cpp) and CUDA (cuda/sngm_cuda_ops.cpp) entry points
// run exactly these checks before they touch any memory; what only one side can check (the CPU
// reads the chunk table's rows on the host, CUDA bounds a launch's grid) stays in that file.

inline bool is_param_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kBFloat16 || t == c10::kHalf;
}

inline void check_param_dtype(c10::ScalarType t, const char* op, const char* what) {
  TORCH_CHECK(is_param_dtype(t), "sngm_native::", op, ": ", what, " has dtype ", t,
              "; supported param dtypes are float32, float64, bfloat16 and float16");
}

// The device of a call: that of `anchor` (chunks, or sumsq for finalize), which must be a tensor of
// the type this kernel runs on; every other tensor of the call is then checked against it.
inline c10::Device call_device(const char* op, const char* what, const at::Tensor& anchor,
                               c10::DeviceType kernel_type) {
  TORCH_CHECK(anchor.device().type() == kernel_type, "sngm_native::", op,
              ": this kernel runs on ", c10::DeviceTypeName(kernel_type, /*lower_case=*/true),
              " tensors, got ", what, " on ", anchor.device());
  return anchor.device();
}

// A tensor of the op's own (chunks, partials, seg_ptr, sumsq): its dtype, on `device`, contiguous.
inline void check_aux(const char* op, const char* what, const at::Tensor& t,
                      c10::ScalarType dtype, const c10::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, "sngm_native::", op, ": ", what, " has dtype ",
              t.scalar_type(), ", expected ", dtype,
              dtype == c10::kDouble ? " (the sums of squares are float64)" : "");
  TORCH_CHECK(t.device() == device, "sngm_native::", op, ": ", what, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), "sngm_native::", op, ": ", what, " must be contiguous");
}

// Whether the kernels may walk t in memory order beside its param (element i of one is element i
// of the other): both contiguous, or both dense with the same strides (channels_last conv weights
// and their grads).
inline bool walkable_with(const at::Tensor& t, const at::Tensor& param) {
  return (t.is_contiguous() && param.is_contiguous()) ||
         (t.is_non_overlapping_and_dense() && t.strides() == param.strides());
}

// The tensor lists of one call: one dtype, all on `device`, matching sizes and layouts.
// `momentum` may be empty (no momentum).
inline void check_lists(const char* op, const c10::Device& device, at::TensorList params,
                        at::TensorList grads, at::TensorList momentum) {
  TORCH_CHECK(grads.size() == params.size(), "sngm_native::", op, ": ", params.size(),
              " params but ", grads.size(), " grads");
  TORCH_CHECK(momentum.empty() || momentum.size() == params.size(), "sngm_native::", op, ": ",
              params.size(), " params but ", momentum.size(),
              " momentum buffers (expected none or one per param)");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, "sngm_native::", op, ": params[", i, "] is on ",
                p.device(), ", expected ", device, " (the device of the call's chunks)");
    check_param_dtype(p.scalar_type(), op, "params");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "sngm_native::", op, ": params[", i,
                "] has dtype ", p.scalar_type(), " but params[0] has ",
                params[0].scalar_type(), " (one dtype per call)");
    TORCH_CHECK(p.is_contiguous() || p.is_non_overlapping_and_dense(), "sngm_native::", op,
                ": params[", i, "] (sizes ", p.sizes(), ", strides ", p.strides(),
                ") is neither contiguous nor dense");
    for (int which = 0; which < (momentum.empty() ? 1 : 2); ++which) {
      const at::Tensor& t = which == 0 ? grads[i] : momentum[i];
      const char* what = which == 0 ? "grads" : "momentum_buffers";
      TORCH_CHECK(t.scalar_type() == p.scalar_type() && t.device() == p.device() &&
                      t.numel() == p.numel(),
                  "sngm_native::", op, ": ", what, "[", i, "] is ", t.numel(), " x ",
                  t.scalar_type(), " on ", t.device(), " but params[", i, "] is ", p.numel(),
                  " x ", p.scalar_type(), " on ", p.device());
      TORCH_CHECK(walkable_with(t, p), "sngm_native::", op, ": ", what, "[", i, "] (strides ",
                  t.strides(), ") must be contiguous like its param, or dense with the param's "
                  "strides (params[", i, "]: ", p.strides(), ")");
    }
  }
}

// chunks: int64 [4, n_chunks] (tensor, start, length, segment), contiguous, on `device`.
inline void check_table(const char* op, const at::Tensor& chunks, const c10::Device& device) {
  check_aux(op, "chunks", chunks, c10::kLong, device);
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(0) == 4, "sngm_native::", op,
              ": chunks must have shape [4, n_chunks] (tensor, start, length, segment), got ",
              chunks.sizes());
}

// GradScaler's float32 scalars (grad_scale, found_inf): one element on `device`, if given.
inline void check_scalar(const char* op, const char* what, const std::optional<at::Tensor>& t,
                         const c10::Device& device) {
  if (t.has_value()) {
    TORCH_CHECK(t->scalar_type() == c10::kFloat && t->numel() == 1 && t->device() == device,
                "sngm_native::", op, ": ", what, " must be a one-element float32 tensor on ",
                device, ", got ", t->numel(), " x ", t->scalar_type(), " (shape ", t->sizes(),
                ") on ", t->device());
  }
}

// A [3, n] float64 tensor of sums (partials, sumsq): rows med, big, small (../sngm_math.h).
inline void check_rows3(const char* op, const char* what, const at::Tensor& t,
                        const c10::Device& device) {
  check_aux(op, what, t, c10::kDouble, device);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == 3 && t.size(1) >= 1, "sngm_native::", op, ": ", what,
              " must have shape [3, n >= 1] (med, big and small sums of squares), got ",
              t.sizes());
}

// sumsq's output: partials[:, partial_offset : partial_offset + n_chunks] must exist.
inline void check_partials(const at::Tensor& partials, int64_t partial_offset, int64_t n_chunks,
                           const c10::Device& device) {
  check_rows3("sumsq", "partials", partials, device);
  TORCH_CHECK(partial_offset >= 0 && partial_offset <= partials.size(1) - n_chunks,
              "sngm_native::sumsq: partials[:, ", partial_offset, ":", partial_offset + n_chunks,
              "] is out of range for ", partials.size(1), " partials");
}

// finalize's tensors (seg_ptr's contents aside: only the CPU can read them before it runs).
inline void check_finalize(const at::Tensor& partials, const at::Tensor& seg_ptr,
                           const std::optional<at::Tensor>& found_inf, const at::Tensor& sumsq,
                           const c10::Device& device) {
  check_rows3("finalize", "partials", partials, device);
  check_aux("finalize", "seg_ptr", seg_ptr, c10::kLong, device);
  check_rows3("finalize", "sumsq", sumsq, device);
  check_scalar("finalize", "found_inf", found_inf, device);
  TORCH_CHECK(seg_ptr.dim() == 1 && seg_ptr.numel() >= 1,
              "sngm_native::finalize: seg_ptr must have shape [n_segments + 1], got ",
              seg_ptr.sizes());
  const int64_t n_seg = seg_ptr.numel() - 1;
  TORCH_CHECK(sumsq.size(1) == 1 || sumsq.size(1) >= 1 + n_seg, "sngm_native::finalize: sumsq "
              "has ", sumsq.size(1), " columns: 1 (the total) or at least 1 + ", n_seg,
              " (the total and one per segment)");
}

// update's inputs besides the lists and the table: the sums of squares, GradScaler's scale and
// torch.optim.SGD's tensor lr (one float32 or float64 element, read where it lies).
inline void check_update_inputs(const at::Tensor& sumsq,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& lr_tensor,
                                const c10::Device& device) {
  check_rows3("update", "sumsq", sumsq, device);
  check_scalar("update", "grad_scale", grad_scale, device);
  if (lr_tensor.has_value()) {
    const at::Tensor& t = *lr_tensor;
    TORCH_CHECK(t.numel() == 1 && t.device() == device &&
                    (t.scalar_type() == c10::kFloat || t.scalar_type() == c10::kDouble),
                "sngm_native::update: lr_tensor must be a one-element float32 or float64 tensor "
                "on ", device, " (the params' device), got ", t.numel(), " x ", t.scalar_type(),
                " (shape ", t.sizes(), ") on ", t.device());
  }
}

}  // namespace sngm
