"""How the native extension (csrc/) is built: shared by setup.py (ahead of time) and native.py (on
first use). Plain Python with no package imports, so setup.py can load it by path; torch is
imported only inside the functions that need it.

Modules (each a separate shared library, so a failed CUDA build never costs the CPU kernels):

    sngm_ext._C_<cap>   the CPU kernels (cpu/sngm_cpu.cpp) registered for sngm_native::* (
                        bindings/ops.cpp, pybind11), built for one CPU capability: "default" (any
                        CPU), "avx2" or "avx512" (x86-64), with ATen's CPU_CAPABILITY macros and
                        -m flags; exactly one is loaded, the best this CPU supports
    sngm_ext._C_cuda    the CUDA kernels (cuda/sngm_cuda.cu, cuda/sngm_cuda_ops.cpp); no pybind11,
                        no torch header in the .cu

The op schemas are sngm_ext/_ops.py's (Python); the modules only register implementations, so each
loads alone.
"""

from __future__ import annotations

import hashlib
import os
import platform
from typing import Dict, List, Optional

# Per-capability compiler flags: the ones ATen compiles its own kernels of that capability with.
CPU_CAPABILITY_FLAGS: Dict[str, List[str]] = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# torch.backends.cpu.get_cpu_capability() -> the capabilities of ours that run there, best first.
_USABLE = {"AVX512": ["avx512", "avx2", "default"], "AVX2": ["avx2", "default"]}

CPU_SOURCES = ["bindings/ops.cpp", "cpu/sngm_cpu.cpp"]
CUDA_SOURCES = ["cuda/sngm_cuda.cu", "cuda/sngm_cuda_ops.cpp"]
_SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def csrc_dir() -> Optional[str]:
    """The C++/CUDA sources: $SNGM_CSRC_DIR, the package's installed copy, or the checkout's."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("SNGM_CSRC_DIR", ""), os.path.join(here, "csrc"),
                  os.path.join(os.path.dirname(here), "csrc")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "sngm_math.h")):
            return c
    return None


_PART_DIRS = {"cpu": ("", "bindings", "cpu"), "cuda": ("", "cuda")}


def source_hash(csrc: str, part: str) -> str:
    """16 hex digits over the sources of one part ("cpu" or "cuda": the top-level headers and its
    folders) and this build description: a module built from other sources has another one."""
    h = hashlib.sha256()
    named = []
    for sub in _PART_DIRS[part]:
        folder = os.path.join(csrc, sub)
        if not os.path.isdir(folder):
            continue
        for n in sorted(os.listdir(folder)):
            f = os.path.join(folder, n)
            if os.path.isfile(f) and n.endswith(_SOURCE_SUFFIXES):
                named.append((f"{sub}/{n}" if sub else n, f))
    named.append(("<build>/_native_build.py", os.path.abspath(__file__)))
    for name, f in named:
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def usable_cpu_capabilities() -> List[str]:
    """Our CPU capabilities that run on this machine, best first (follows ATEN_CPU_CAPABILITY)."""
    if not is_x86():
        return ["default"]
    import torch

    return list(_USABLE.get(torch.backends.cpu.get_cpu_capability(), ["default"]))


def capabilities_to_build(spec: str) -> List[str]:
    """SNGM_CPU_CAPABILITIES: "native" (the best for this machine), "all", or a comma list."""
    spec = (spec or "native").strip().lower()
    if spec == "native":
        return usable_cpu_capabilities()[:1]
    if spec == "all":
        return list(CPU_CAPABILITY_FLAGS) if is_x86() else ["default"]
    caps = [c.strip() for c in spec.split(",") if c.strip()]
    bad = [c for c in caps if c not in CPU_CAPABILITY_FLAGS]
    if bad:
        raise ValueError(
            f"SNGM_CPU_CAPABILITIES: unknown {bad}; use native, all or some of "
            f"{sorted(CPU_CAPABILITY_FLAGS)}"
        )
    return caps


def _openmp() -> bool:
    import torch

    return bool(getattr(torch._C, "has_openmp", False))


def cpu_cflags(cap: str, src_hash: str) -> List[str]:
    # -ffp-contract=off: one rounding per operation, as the reference's torch ops round (no FMA).
    flags = ["-O3", "-ffp-contract=off", f"-DSNGM_SOURCE_HASH=h{src_hash}"]
    flags += [f"-DCPU_CAPABILITY={cap.upper()}", f"-DCPU_CAPABILITY_{cap.upper()}"]
    flags += CPU_CAPABILITY_FLAGS[cap]
    if _openmp():  # at::parallel_for is an inline `#pragma omp parallel` in an OpenMP torch
        flags.append("-fopenmp")
    return flags


def cpu_ldflags() -> List[str]:
    # libgomp.so.1: the dynamic loader reuses the copy torch has loaded (one OpenMP runtime).
    return ["-fopenmp"] if _openmp() else []


def cuda_cflags(src_hash: str) -> Dict[str, List[str]]:
    # --fmad=false: every operation rounds once, in the reference's order (as -ffp-contract=off
    # does on CPU), so GPU results differ from the reference only through the norm's summation
    # order (tests/scenarios.py). The kernels are memory-bound: FMAs would buy no time.
    return {
        "cxx": ["-O3", f"-DSNGM_SOURCE_HASH=h{src_hash}"],
        "nvcc": ["-O3", "-lineinfo", "--fmad=false", f"-DSNGM_SOURCE_HASH=h{src_hash}"],
    }


def jit_build_root() -> str:
    """Where first-use builds go: $SNGM_EXTENSIONS_DIR, $TORCH_EXTENSIONS_DIR/sngm_ext, or
    $XDG_CACHE_HOME (~/.cache)/sngm_ext; one folder per torch and Python version below it."""
    import sys

    import torch

    root = os.environ.get("SNGM_EXTENSIONS_DIR")
    if not root and os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "sngm_ext")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "sngm_ext")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, tag.replace("+", "_"))
