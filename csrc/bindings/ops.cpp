// The op schemas of the native extension, exactly sngm_ext/_ops.py's SCHEMAS (and CPU_SCHEMAS)
// in namespace sngm_native, their CPU kernels (../cpu/sngm_cpu.cpp) and the module's Python face
// (pybind11).
// Linked into every CPU module (sngm_ext._C_<capability>); the CUDA module (sngm_ext._C_cuda) only
// adds CUDA kernels, so sngm_ext/native.py loads a CPU module first.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "../cpu/sngm_cpu.h"
#include "../sngm_common.h"


extern "C" SNGM_USED const char sngm_cpu_source_marker[] =
    "sngm-source-hash:" SNGM_STR(SNGM_SOURCE_HASH);

TORCH_LIBRARY(sngm_native, m) {
  m.def(
      "sumsq(Tensor param, Tensor grad, Tensor chunks, float weight_decay, bool maximize, "
      "Tensor(a!) partials, int partial_offset) -> ()");
  m.def(
      "copy_sumsq(Tensor src, Tensor(a!) grad, Tensor param, Tensor chunks, int segment_offset, "
      "float weight_decay, bool maximize, Tensor(b!) partials, int partial_offset) -> ()");
  m.def("finalize(Tensor partials, Tensor seg_ptr, Tensor(a!) sumsq) -> ()");
  m.def(
      "update(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor chunks, "
      "Tensor sumsq, float lr, float momentum, float weight_decay, bool nesterov, "
      "bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(sngm_native, CPU, m) {
  m.impl("sumsq", &sngm::cpu::sumsq);
  m.impl("copy_sumsq", &sngm::cpu::copy_sumsq);
  m.impl("finalize", &sngm::cpu::finalize);
  m.impl("update", &sngm::cpu::update);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sngm_ext native extension: schemas of sngm_native::* and their CPU kernels";
  m.attr("source_hash") = SNGM_STR(SNGM_SOURCE_HASH);
  m.attr("cpu_capability") = sngm::cpu::capability();
  m.attr("vector_bytes") = sngm::cpu::vector_bytes();
}
