// Entry points of the CPU kernels (sngm_cpu.cpp), registered by ../bindings/ops.cpp for the
// schemas sngm_ext/_ops.py defines (docs/ops.md is the contract).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sngm {
namespace cpu {

void sumsq(at::TensorList params, at::TensorList grads, const at::Tensor& chunks,
           const std::optional<at::Tensor>& grad_scale, double weight_decay, bool maximize,
           const at::Tensor& partials, int64_t partial_offset);

void finalize(const at::Tensor& partials, const at::Tensor& seg_ptr,
              const std::optional<at::Tensor>& found_inf, const at::Tensor& sumsq);

void update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
            const at::Tensor& chunks, const at::Tensor& sumsq,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& lr_tensor, double lr, double momentum,
            double weight_decay, bool nesterov, bool maximize);

const char* capability();  // the CPU_CAPABILITY this module was compiled for
int vector_bytes();        // bytes of an at::vec::Vectorized<float>

}  // namespace cpu
}  // namespace sngm
