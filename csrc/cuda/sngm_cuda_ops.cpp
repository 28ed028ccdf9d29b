// sngm_native::{sumsq, finalize, update} for the CUDA dispatch key: argument checks, the current
// stream and device, then the launchers of sngm_cuda.cu. Module sngm_ext._C_cuda; the op schemas
// come from the CPU module (csrc/bindings/ops.cpp), which sngm_ext/native.py loads first.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../sngm_common.h"
#include "sngm_cuda.h"


extern "C" SNGM_USED const char sngm_cuda_source_marker[] =
    "sngm-source-hash:" SNGM_STR(SNGM_SOURCE_HASH);

namespace sngm {
namespace {

cuda::Dtype to_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return cuda::Dtype::kFloat;
    case c10::kDouble:
      return cuda::Dtype::kDouble;
    case c10::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case c10::kHalf:
      return cuda::Dtype::kHalf;
    default:
      TORCH_CHECK(false, "sngm_native: unsupported dtype ", t,
                  "; supported param dtypes are float32, float64, bfloat16 and float16");
  }
  return cuda::Dtype::kFloat;  // not reached
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

cuda::Bucket bucket_of(const at::Tensor& param, const at::Tensor& grad,
                       const std::optional<at::Tensor>& momentum, const at::Tensor& chunks) {
  cuda::Bucket b;
  b.param = param.data_ptr();
  b.grad = grad.const_data_ptr();
  b.momentum = momentum.has_value() ? momentum->data_ptr() : nullptr;
  b.dtype = to_dtype(param.scalar_type());
  b.numel = param.numel();
  b.chunks = chunks.const_data_ptr<int64_t>();
  b.n_chunks = chunks.size(1);
  b.aligned16 = aligned16(b.param) && aligned16(b.grad) &&
                (b.momentum == nullptr || aligned16(b.momentum));
  return b;
}

void check_on(const at::Tensor& t, const at::Tensor& param, const char* op, const char* what) {
  TORCH_CHECK(t.device() == param.device(), "sngm_native::", op, ": ", what, " is on ",
              t.device(), " but param is on ", param.device());
  TORCH_CHECK(t.is_contiguous(), "sngm_native::", op, ": ", what, " must be contiguous");
}

void sumsq_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& chunks,
                double weight_decay, bool maximize, const at::Tensor& partials,
                int64_t partial_offset) {
  check_bucket("sumsq", c10::DeviceType::CUDA, param, grad, std::nullopt, chunks);
  check_acc_dtype(partials, "sumsq", "partials");
  check_on(partials, param, "sumsq", "partials");
  const int64_t n = chunks.size(1);
  TORCH_CHECK(partial_offset >= 0 && partial_offset + n <= partials.numel(),
              "sngm_native::sumsq: partials[", partial_offset, ":", partial_offset + n,
              "] is out of range for ", partials.numel(), " partials");
  TORCH_CHECK(n < (int64_t{1} << 31), "sngm_native::sumsq: too many chunks");
  if (n == 0) {
    return;
  }
  c10::cuda::CUDAGuard guard(param.device());
  const bool f64 = partials.scalar_type() == c10::kDouble;
  char* out = static_cast<char*>(partials.data_ptr()) + partial_offset * partials.element_size();
  C10_CUDA_CHECK(cuda::launch_sumsq(bucket_of(param, grad, std::nullopt, chunks), weight_decay,
                                    maximize, out, f64, c10::cuda::getCurrentCUDAStream()));
}

void finalize_cuda(const at::Tensor& partials, const at::Tensor& seg_ptr, const at::Tensor& sumsq) {
  TORCH_CHECK(partials.is_cuda() && seg_ptr.device() == partials.device() &&
                  sumsq.device() == partials.device(),
              "sngm_native::finalize: expected partials, seg_ptr and sumsq on one CUDA device");
  check_finalize(partials, seg_ptr, sumsq);
  const int64_t n_seg = seg_ptr.numel() - 1;
  const bool per_segment = sumsq.numel() > 1;
  c10::cuda::CUDAGuard guard(partials.device());
  C10_CUDA_CHECK(cuda::launch_finalize(
      partials.const_data_ptr(), partials.scalar_type() == c10::kDouble,
      seg_ptr.const_data_ptr<int64_t>(), n_seg, sumsq.data_ptr(),
      sumsq.scalar_type() == c10::kDouble, per_segment, c10::cuda::getCurrentCUDAStream()));
}

void update_cuda(const at::Tensor& param, const at::Tensor& grad,
                 const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& chunks,
                 const at::Tensor& sumsq, double lr, double momentum, double weight_decay,
                 bool nesterov, bool maximize) {
  check_bucket("update", c10::DeviceType::CUDA, param, grad, momentum_buffer, chunks);
  check_acc_dtype(sumsq, "update", "sumsq");
  check_on(sumsq, param, "update", "sumsq");
  TORCH_CHECK(sumsq.numel() >= 1, "sngm_native::update: sumsq is empty");
  TORCH_CHECK(chunks.size(1) < (int64_t{1} << 31), "sngm_native::update: too many chunks");
  if (chunks.size(1) == 0) {
    return;
  }
  c10::cuda::CUDAGuard guard(param.device());
  C10_CUDA_CHECK(cuda::launch_update(bucket_of(param, grad, momentum_buffer, chunks),
                                     sumsq.const_data_ptr(), sumsq.scalar_type() == c10::kDouble,
                                     sumsq.numel(), lr, momentum, weight_decay, nesterov, maximize,
                                     c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace sngm

TORCH_LIBRARY_IMPL(sngm_native, CUDA, m) {
  m.impl("sumsq", &sngm::sumsq_cuda);
  m.impl("finalize", &sngm::finalize_cuda);
  m.impl("update", &sngm::update_cuda);
}
