// Entry points of the CPU kernels (sngm_cpu.cpp), registered by ../bindings/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sngm {
namespace cpu {

void sumsq(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& chunks,
           double weight_decay, bool maximize, const at::Tensor& partials, int64_t partial_offset);

// sumsq with the grad's segment first copied in from src (a grad hook's fresh grad), chunk by
// chunk, so the sum reads it from cache: registered for CPU only.
void copy_sumsq(const at::Tensor& src, const at::Tensor& grad, const at::Tensor& param,
                const at::Tensor& chunks, int64_t segment_offset, double weight_decay,
                bool maximize, const at::Tensor& partials, int64_t partial_offset);

void finalize(const at::Tensor& partials, const at::Tensor& seg_ptr, const at::Tensor& sumsq);

void update(const at::Tensor& param, const at::Tensor& grad,
            const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& chunks,
            const at::Tensor& sumsq, double lr, double momentum, double weight_decay,
            bool nesterov, bool maximize);

const char* capability();  // the CPU_CAPABILITY this module was compiled for
int vector_bytes();        // bytes of an at::vec::Vectorized<float>

}  // namespace cpu
}  // namespace sngm
