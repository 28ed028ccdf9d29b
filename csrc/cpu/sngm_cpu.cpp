// The CPU kernels of sngm_native::{sumsq, finalize, update} (registered for the CPU dispatch key by
// ../bindings/ops.cpp; this file stays free of torch/library.h, which costs seconds to compile).
//
// This file is compiled once per CPU capability, each time into its own extension module together
// with ../bindings/ops.cpp (setup.py: sngm_ext._C_default / _C_avx2 / _C_avx512; the JIT build: the
// one for this machine), with -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name> and that capability's
// -m flags, the way ATen builds its kernels. sngm_ext/native.py loads exactly one: the best this
// CPU supports according to torch (torch.backends.cpu.get_cpu_capability()).
#include "sngm_cpu.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include "../sngm_common.h"
#include "sngm_cpu_kernels.h"

namespace sngm {
namespace cpu {
namespace {

namespace K = sngm::CPU_CAPABILITY;

// Every row of the table must address elements inside its tensor (and, for update, a sum of
// squares that exists): checked before any thread touches memory, so a bad table raises and
// writes nothing. Returns the elements the table covers.
int64_t check_rows(const char* op, const int64_t* ch, int64_t n, at::TensorList params,
                   int64_t n_sumsq) {
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  int64_t total = 0;
  for (int64_t c = 0; c < n; ++c) {
    const K::Row r = K::row_at(ch, n, c);
    TORCH_CHECK(r.tensor >= 0 && r.tensor < n_tensors, "sngm_native::", op, ": chunk ", c,
                " names tensor ", r.tensor, " of ", n_tensors);
    const int64_t numel = params[r.tensor].numel();
    TORCH_CHECK(r.start >= 0 && r.len >= 0 && r.start <= numel && r.len <= numel - r.start,
                "sngm_native::", op, ": chunk ", c, " (start ", r.start, ", length ", r.len,
                ") lies outside tensor ", r.tensor, " of ", numel, " elements");
    TORCH_CHECK(n_sumsq < 0 || (r.seg >= 0 && r.seg < n_sumsq), "sngm_native::", op, ": chunk ",
                c, " names segment ", r.seg, " but sumsq has ", n_sumsq, " entries");
    total += r.len;
  }
  return total;
}

// Chunks per at::parallel_for task: about 32k elements (chunks of small tensors are short), so a
// small list runs on the calling thread alone.
int64_t grain_chunks(int64_t n_chunks, int64_t elements) {
  constexpr int64_t kGrainElements = 32768;
  if (elements <= kGrainElements) {
    return n_chunks;
  }
  return std::max<int64_t>(1, n_chunks * kGrainElements / elements);
}

// 1 / grad_scale in float (GradScaler's inv_scale), 1 without a scaler.
float inverse_scale(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() ? 1.0f / *grad_scale->const_data_ptr<float>() : 1.0f;
}

template <typename scalar_t>
sngm::Hyper<K::compute_t<scalar_t>> hyper(double lr, double momentum, double weight_decay,
                                          bool maximize, float gscale) {
  using C = K::compute_t<scalar_t>;
  return {static_cast<C>(lr), static_cast<C>(momentum), static_cast<C>(weight_decay),
          maximize ? C(-1) : C(1), static_cast<C>(gscale)};
}

template <typename P>
std::vector<P*> pointers(at::TensorList ts) {
  std::vector<P*> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) {
    out.push_back(reinterpret_cast<P*>(t.data_ptr()));
  }
  return out;
}

}  // namespace

void sumsq(at::TensorList params, at::TensorList grads, const at::Tensor& chunks,
           const std::optional<at::Tensor>& grad_scale, double weight_decay, bool maximize,
           const at::Tensor& partials, int64_t partial_offset) {
  const c10::Device cpu = call_device("sumsq", "chunks", chunks, c10::DeviceType::CPU);
  check_table("sumsq", chunks, cpu);
  check_lists("sumsq", cpu, params, grads, {});
  check_scalar("sumsq", "grad_scale", grad_scale, cpu);
  const int64_t n = chunks.size(1);
  check_partials(partials, partial_offset, n, cpu);
  if (n == 0) {
    return;
  }
  const int64_t* ch = chunks.const_data_ptr<int64_t>();
  const int64_t grain = grain_chunks(n, check_rows("sumsq", ch, n, params, -1));
  const float gscale = inverse_scale(grad_scale);
  K::dtype_dispatch(params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    K::sumsq_kernel<scalar_t>(pointers<const scalar_t>(params),
                              pointers<const scalar_t>(grads), ch, n, grain,
                              hyper<scalar_t>(0.0, 0.0, weight_decay, maximize, gscale),
                              partials.data_ptr<double>() + partial_offset, partials.size(1));
  });
}

void finalize(const at::Tensor& partials, const at::Tensor& seg_ptr,
              const std::optional<at::Tensor>& found_inf, const at::Tensor& sumsq) {
  const c10::Device cpu = call_device("finalize", "sumsq", sumsq, c10::DeviceType::CPU);
  check_finalize(partials, seg_ptr, found_inf, sumsq, cpu);
  const int64_t n_seg = seg_ptr.numel() - 1;
  const int64_t n_partials = partials.size(1), n_sumsq = sumsq.size(1);
  const bool per_segment = n_sumsq > 1;
  const int64_t* sp = seg_ptr.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < n_seg; ++s) {
    TORCH_CHECK(sp[s] >= 0 && sp[s] <= sp[s + 1] && sp[s + 1] <= n_partials,
                "sngm_native::finalize: seg_ptr must be non-decreasing within [0, ", n_partials,
                "]");
  }
  for (int64_t r = 0; r < 3; ++r) {  // med, big, small: each a plain sum
    const double* p = partials.const_data_ptr<double>() + r * n_partials;
    double* out = sumsq.data_ptr<double>() + r * n_sumsq;
    double total = 0.0;
    for (int64_t s = 0; s < n_seg; ++s) {
      double v = 0.0;  // always in index order: the same bits on every run
      for (int64_t i = sp[s]; i < sp[s + 1]; ++i) {
        v += p[i];
      }
      if (per_segment) {
        out[1 + s] = v;
      }
      total += v;
    }
    if (r == 0 && found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) {
      total = std::numeric_limits<double>::infinity();  // GradScaler found an inf: skip the step
    }
    out[0] = total;
  }
}

void update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
            const at::Tensor& chunks, const at::Tensor& sumsq,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& lr_tensor, double lr, double momentum,
            double weight_decay, bool nesterov, bool maximize) {
  const c10::Device cpu = call_device("update", "chunks", chunks, c10::DeviceType::CPU);
  check_table("update", chunks, cpu);
  check_lists("update", cpu, params, grads, momentum_buffers);
  check_update_inputs(sumsq, grad_scale, lr_tensor, cpu);
  if (lr_tensor.has_value()) {  // torch.optim.SGD's tensor lr: read where it lies (CPU here)
    lr = lr_tensor->scalar_type() == c10::kFloat
             ? static_cast<double>(*lr_tensor->const_data_ptr<float>())
             : *lr_tensor->const_data_ptr<double>();
  }
  const int64_t n = chunks.size(1);
  if (n == 0) {
    return;
  }
  const int64_t* ch = chunks.const_data_ptr<int64_t>();
  const int64_t n_sumsq = sumsq.size(1);
  const int64_t grain = grain_chunks(n, check_rows("update", ch, n, params, n_sumsq));
  const double* s = sumsq.const_data_ptr<double>();
  if (!sngm::is_finite(s[0]) || !sngm::is_finite(s[n_sumsq])) {
    return;  // a skipped step (med or big not finite; small cannot be): nothing is written
  }
  const float gscale = inverse_scale(grad_scale);
  K::dtype_dispatch(params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    K::update_kernel<scalar_t>(pointers<scalar_t>(params),
                               pointers<const scalar_t>(grads),
                               pointers<scalar_t>(momentum_buffers), ch, n, grain, s, n_sumsq,
                               hyper<scalar_t>(lr, momentum, weight_decay, maximize, gscale),
                               nesterov);
  });
}

const char* capability() { return SNGM_STR(CPU_CAPABILITY); }

int vector_bytes() { return static_cast<int>(at::vec::Vectorized<float>::size() * sizeof(float)); }

}  // namespace cpu
}  // namespace sngm
