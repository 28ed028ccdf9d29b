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
#include <cmath>
#include <cstdint>
#include <optional>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define SNGM_STR2(x) #x
#define SNGM_STR(x) SNGM_STR2(x)

#include "../sngm_common.h"
#include "sngm_cpu_kernels.h"

namespace sngm {
namespace cpu {
namespace {

namespace K = sngm::CPU_CAPABILITY;

// Every row of the table must address memory inside the bucket (and, for update, a sum of squares
// that exists): checked before any thread touches memory, so a bad table raises and writes nothing.
// Returns the elements the table covers.
int64_t check_chunk_rows(const char* op, const int64_t* ch, int64_t n, int64_t numel,
                         int64_t n_sumsq) {
  int64_t total = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t start = ch[c], len = ch[n + c], seg = ch[2 * n + c];
    TORCH_CHECK(start >= 0 && len >= 0 && start <= numel && len <= numel - start, "sngm_native::",
                op, ": chunk ", c, " (start ", start, ", length ", len,
                ") lies outside the bucket of ", numel, " elements");
    TORCH_CHECK(n_sumsq < 0 || (seg >= 0 && seg < n_sumsq), "sngm_native::", op, ": chunk ", c,
                " names segment ", seg, " but sumsq has ", n_sumsq, " entries");
    total += len;
  }
  return total;
}

// Chunks per at::parallel_for task: about at::internal::GRAIN_SIZE elements (chunks of small
// tensors are short), so a small bucket runs on the calling thread alone.
int64_t grain_chunks(int64_t n_chunks, int64_t elements) {
  constexpr int64_t kGrainElements = 32768;
  if (elements <= kGrainElements) {
    return n_chunks;
  }
  return std::max<int64_t>(1, n_chunks * kGrainElements / elements);
}

// partials[partial_offset : partial_offset + n] must exist, on the param's device.
void check_partials(const char* op, const at::Tensor& partials, const at::Tensor& param,
                    int64_t partial_offset, int64_t n) {
  check_acc_dtype(partials, op, "partials");
  TORCH_CHECK(partials.is_contiguous() && partials.device() == param.device(), "sngm_native::", op,
              ": partials must be contiguous and on the param's device");
  TORCH_CHECK(partial_offset >= 0 && partial_offset + n <= partials.numel(), "sngm_native::", op,
              ": partials[", partial_offset, ":", partial_offset + n, "] is out of range for ",
              partials.numel(), " partials");
}

}  // namespace

void sumsq(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& chunks,
               double weight_decay, bool maximize, const at::Tensor& partials,
               int64_t partial_offset) {
  check_bucket("sumsq", c10::DeviceType::CPU, param, grad, std::nullopt, chunks);
  const int64_t n = chunks.size(1);
  check_partials("sumsq", partials, param, partial_offset, n);
  if (n == 0) {
    return;
  }
  const int64_t* ch = chunks.const_data_ptr<int64_t>();
  const int64_t grain = grain_chunks(n, check_chunk_rows("sumsq", ch, n, param.numel(), -1));
  K::dtype_dispatch(param.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    K::sumsq_kernel<scalar_t>(param, grad, ch, n, grain, weight_decay, maximize, partials,
                              partial_offset);
  });
}

void copy_sumsq(const at::Tensor& src, const at::Tensor& grad, const at::Tensor& param,
                const at::Tensor& chunks, int64_t segment_offset, double weight_decay,
                bool maximize, const at::Tensor& partials, int64_t partial_offset) {
  check_bucket("copy_sumsq", c10::DeviceType::CPU, param, grad, std::nullopt, chunks);
  TORCH_CHECK(src.scalar_type() == param.scalar_type() && src.device() == param.device() &&
                  src.is_contiguous(),
              "sngm_native::copy_sumsq: src must be a contiguous ", param.scalar_type(),
              " tensor on ", param.device(), ", got ", src.scalar_type(), " on ", src.device());
  const int64_t n = chunks.size(1);
  check_partials("copy_sumsq", partials, param, partial_offset, n);
  TORCH_CHECK(segment_offset >= 0 && segment_offset + src.numel() <= grad.numel(),
              "sngm_native::copy_sumsq: src (", src.numel(), " elements at ", segment_offset,
              ") does not fit in the bucket of ", grad.numel());
  if (n == 0) {
    return;
  }
  const int64_t* ch = chunks.const_data_ptr<int64_t>();
  const int64_t grain = grain_chunks(n, check_chunk_rows("copy_sumsq", ch, n, param.numel(), -1));
  for (int64_t c = 0; c < n; ++c) {
    TORCH_CHECK(ch[c] >= segment_offset, "sngm_native::copy_sumsq: chunk ", c, " starts at ",
                ch[c], ", before the segment at ", segment_offset);
  }
  K::dtype_dispatch(param.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    K::sumsq_kernel<scalar_t>(param, grad, ch, n, grain, weight_decay, maximize, partials,
                              partial_offset, src.const_data_ptr<scalar_t>(), segment_offset,
                              src.numel());
  });
}

namespace {
template <typename P>
double sum_range(const P* p, int64_t lo, int64_t hi) {
  double s = 0.0;  // fp64 whatever the partials' dtype; always in index order
  for (int64_t i = lo; i < hi; ++i) {
    s += static_cast<double>(p[i]);
  }
  return s;
}

}  // namespace

void finalize(const at::Tensor& partials, const at::Tensor& seg_ptr, const at::Tensor& sumsq) {
  TORCH_CHECK(partials.device().is_cpu() && seg_ptr.device().is_cpu() && sumsq.device().is_cpu(),
              "sngm_native::finalize: expected CPU tensors");
  check_finalize(partials, seg_ptr, sumsq);
  const int64_t n_seg = seg_ptr.numel() - 1;
  const bool per_segment = sumsq.numel() > 1;
  const int64_t* sp = seg_ptr.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < n_seg; ++s) {
    TORCH_CHECK(sp[s] >= 0 && sp[s] <= sp[s + 1] && sp[s + 1] <= partials.numel(),
                "sngm_native::finalize: seg_ptr must be non-decreasing within [0, ",
                partials.numel(), "]");
  }
  const bool p64 = partials.scalar_type() == c10::kDouble;
  const bool s64 = sumsq.scalar_type() == c10::kDouble;
  auto store = [&](int64_t i, double v) {
    if (s64) {
      sumsq.data_ptr<double>()[i] = v;
    } else {
      sumsq.data_ptr<float>()[i] = static_cast<float>(v);
    }
  };
  double total = 0.0;
  for (int64_t s = 0; s < n_seg; ++s) {
    const double v = p64 ? sum_range(partials.const_data_ptr<double>(), sp[s], sp[s + 1])
                         : sum_range(partials.const_data_ptr<float>(), sp[s], sp[s + 1]);
    if (per_segment) {
      store(1 + s, v);
    }
    total += v;
  }
  store(0, total);
}

void update(const at::Tensor& param, const at::Tensor& grad,
                const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& chunks,
                const at::Tensor& sumsq, double lr, double momentum, double weight_decay,
                bool nesterov, bool maximize) {
  check_bucket("update", c10::DeviceType::CPU, param, grad, momentum_buffer, chunks);
  check_acc_dtype(sumsq, "update", "sumsq");
  TORCH_CHECK(sumsq.device().is_cpu() && sumsq.is_contiguous() && sumsq.numel() >= 1,
              "sngm_native::update: sumsq must be a non-empty contiguous CPU tensor");
  const int64_t n = chunks.size(1);
  if (n == 0) {
    return;
  }
  const int64_t* ch = chunks.const_data_ptr<int64_t>();
  const int64_t grain =
      grain_chunks(n, check_chunk_rows("update", ch, n, param.numel(), sumsq.numel()));
  const bool s64 = sumsq.scalar_type() == c10::kDouble;
  const bool finite = s64 ? sngm::is_finite(sumsq.const_data_ptr<double>()[0])
                          : sngm::is_finite(sumsq.const_data_ptr<float>()[0]);
  if (!finite) {
    return;  // a skipped step: nothing is written
  }
  K::dtype_dispatch(param.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (s64) {
      K::update_kernel<scalar_t>(param, grad, momentum_buffer, ch, n, grain,
                                 sumsq.const_data_ptr<double>(), lr, momentum, weight_decay,
                                 nesterov, maximize);
    } else {
      K::update_kernel<scalar_t>(param, grad, momentum_buffer, ch, n, grain,
                                 sumsq.const_data_ptr<float>(), lr, momentum, weight_decay,
                                 nesterov, maximize);
    }
  });
}

const char* capability() { return SNGM_STR(CPU_CAPABILITY); }

int vector_bytes() { return static_cast<int>(at::vec::Vectorized<float>::size() * sizeof(float)); }

}  // namespace cpu
}  // namespace sngm
