// The CPU kernels (../cpu/sngm_cpu.cpp) as implementations of sngm_native::{sumsq, finalize,
// update}, whose schemas sngm_ext/_ops.py defines (this module only registers kernels), and the
// module's Python face (pybind11). Linked into every CPU module (sngm_ext._C_<capability>).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "../cpu/sngm_cpu.h"
#include "../sngm_common.h"

extern "C" SNGM_USED const char sngm_cpu_source_marker[] =
    "sngm-source-hash:" SNGM_STR(SNGM_SOURCE_HASH);

TORCH_LIBRARY_IMPL(sngm_native, CPU, m) {
  m.impl("sumsq", &sngm::cpu::sumsq);
  m.impl("finalize", &sngm::cpu::finalize);
  m.impl("update", &sngm::cpu::update);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sngm_ext native extension: the CPU kernels of sngm_native::*";
  m.attr("source_hash") = SNGM_STR(SNGM_SOURCE_HASH);
  m.attr("cpu_capability") = sngm::cpu::capability();
  m.attr("vector_bytes") = sngm::cpu::vector_bytes();
}
