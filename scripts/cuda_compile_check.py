#!/usr/bin/env python3
"""Compile and link the CUDA sources (csrc/cuda) without a GPU, so they cannot rot where none is.

Against a torch tree that need not import (the CUDA 13 wheel of torch 2.14.1, unpacked with
``pip install --no-deps --target DIR torch==2.14.1``) and nvcc 13:

1. the kernels (sngm_cuda.cu, no torch header) for sm_80 and sm_90, C++17 (torch 2.11 builds with
   it), with ``-Xptxas -v``: every kernel must have no register spills;
2. the same file to PTX for sm_90 under C++20 (torch 2.14's standard): every update kernel must
   load and store through 128-bit accesses (ld.global[.nc].v4.b32 / .v2.f64, st.global.v4 ...),
   every sumsq kernel load through them, and neither may access memory through generic addresses
   (ld/st without .global: the kernels take their pointers from a table in device memory, which
   the compiler cannot tell apart from any other generic pointer);
3. the host side (sngm_cuda_ops.cpp: at::Tensor, c10::cuda streams, TORCH_LIBRARY_IMPL) with the
   host compiler under C++20 against the tree's headers;
4. one shared object of both, linked with -Wl,--no-undefined against libtorch, libtorch_cpu, libc10,
   libc10_cuda and libcudart: every symbol the sources use must exist in those libraries. That is
   all of sngm_ext._C_cuda: it registers implementations only (the schemas are defined in Python),
   so it needs nothing from the CPU module.

Usage: cuda_compile_check.py [--tree DIR] [--out DIR] [--json FILE]. Exit status 0 when all pass,
1 when a check fails, 2 when nvcc or the tree is missing. Steps 1-3 run in parallel (2 jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_TREE = os.path.join(os.path.expanduser("~"), ".cache", "sngm_ext", "torch-2.14.1-cuda")
ARCHS = ("80", "90")


def find_tree(arg: str | None) -> str:
    return arg or os.environ.get("SNGM_TORCH_CUDA_TREE") or DEFAULT_TREE


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands = (os.environ.get("NVCC"), shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc"))
    for cand in cands:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_home_of(nvcc: str) -> str:
    """$CUDA_HOME, else the toolkit nvcc belongs to (the folder with include/cuda_runtime.h)."""
    cands = [os.environ.get("CUDA_HOME", ""),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for cand in cands:
        if cand and os.path.isfile(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return "/usr/local/cuda"


def missing_prerequisites(tree: str) -> list[str]:
    out = []
    if find_nvcc() is None:
        out.append("nvcc not found (PATH, $NVCC, $CUDA_HOME/bin)")
    inc = os.path.join(tree, "torch", "include")
    if not os.path.isfile(os.path.join(inc, "c10", "cuda", "CUDAStream.h")):
        out.append(
            f"no CUDA torch tree at {tree} (pip install --no-deps --target {tree} torch==2.14.1)"
        )
    return out


def run(cmd: list[str], log: str) -> tuple[int, float, str]:
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n" + p.stdout)
    return p.returncode, time.time() - t, p.stdout


def ptxas_report(text: str) -> dict:
    """Per kernel: registers and spill bytes, from -Xptxas -v."""
    kernels = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            kernels[current] = {"spill_stores": None, "spill_loads": None, "registers": None}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current]["spill_stores"] = int(m.group(1))
            kernels[current]["spill_loads"] = int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


_V128 = r"(?:v4\.(?:b|u|f|s)32|v2\.(?:b|u|f|s)64)"  # 4 x 32 or 2 x 64 bits
_LOAD128 = re.compile(r"\bld\.global(?:\.nc)?(?:\.[a-z0-9_]+)*\." + _V128 + r"\b")
_STORE128 = re.compile(r"\bst\.global(?:\.[a-z0-9_]+)*\." + _V128 + r"\b")
# ld/st with no state space (memory-model qualifiers aside): a generic address
_GENERIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:ld|st)(?:\.(?:volatile|relaxed|acquire|release|weak|"
                      r"sys|gpu|cta))*\.(?!(?:global|shared|param|local|const)\b)[a-z]", re.M)


def ptx_report(ptx: str) -> dict:
    """Per .entry: its counts of 128-bit global loads and stores, and of generic accesses."""
    out = {}
    parts = re.split(r"^\.visible \.entry |^\.entry ", ptx, flags=re.M)
    for part in parts[1:]:
        name = part.split("(", 1)[0].strip()
        out[name] = {"load128": len(_LOAD128.findall(part)),
                     "store128": len(_STORE128.findall(part)),
                     "generic": len(_GENERIC.findall(part))}
    return out


def kernel_kind(mangled: str) -> str:
    for k in ("update_kernel", "sumsq_kernel", "finalize_kernel"):
        if k in mangled:
            return k
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", help="unpacked CUDA torch (default: $SNGM_TORCH_CUDA_TREE or "
                    f"{DEFAULT_TREE})")
    ap.add_argument("--out", help="folder for objects, PTX and logs (default: a temporary one)")
    ap.add_argument("--json", help="write the report here as JSON")
    args = ap.parse_args(argv)

    tree = find_tree(args.tree)
    missing = missing_prerequisites(tree)
    if missing:
        print("cuda_compile_check: cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    nvcc = find_nvcc()
    cuda_home = cuda_home_of(nvcc)
    out = args.out or tempfile.mkdtemp(prefix="sngm_cuda_check_")
    os.makedirs(out, exist_ok=True)
    tinc = os.path.join(tree, "torch", "include")
    tlib = os.path.join(tree, "torch", "lib")
    cu = os.path.join(CSRC, "cuda", "sngm_cuda.cu")
    ops = os.path.join(CSRC, "cuda", "sngm_cuda_ops.cpp")
    # torch's own extension flags for nvcc (cpp_extension's COMMON_NVCC_FLAGS)
    torch_nvcc = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                  "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                  "--expt-relaxed-constexpr"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    # the package's own nvcc flags that change code generation (_native_build.cuda_cflags)
    ours = ["--fmad=false"]
    cxx = os.environ.get("CXX", "c++")
    steps = {
        "kernels_cxx17": [nvcc, "-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC",
                          *ours, *torch_nvcc, *gencode, "-Xptxas", "-v", "-c", cu, "-o",
                          os.path.join(out, "sngm_cuda.o")],
        "ptx_sm90_cxx20": [nvcc, "-std=c++20", "-O3", *ours, *torch_nvcc, "-arch=sm_90", "-ptx", cu,
                           "-o", os.path.join(out, "sngm_cuda.sm_90.ptx")],
        "host_cxx20": [cxx, "-std=c++20", "-O2", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=1",
                       "-DSNGM_SOURCE_HASH=hcheck", "-isystem", tinc, "-isystem",
                       os.path.join(tinc, "torch", "csrc", "api", "include"), "-isystem",
                       os.path.join(cuda_home, "include"), "-c", ops, "-o",
                       os.path.join(out, "sngm_cuda_ops.o")],
    }
    report: dict = {"tree": tree, "nvcc": nvcc, "out": out, "steps": {}, "failures": []}
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", "2"))) as pool:
        futs = {k: pool.submit(run, v, os.path.join(out, f"{k}.log")) for k, v in steps.items()}
        results = {k: f.result() for k, f in futs.items()}
    for k, (rc, secs, text) in results.items():
        report["steps"][k] = {"rc": rc, "seconds": round(secs, 1)}
        if rc != 0:
            tail = "\n".join(text.splitlines()[-25:])
            report["failures"].append(f"{k} failed (rc {rc}):\n{tail}")

    if not report["failures"]:
        lib = os.path.join(out, "sngm_cuda_check.so")
        link = [cxx, "-shared", "-o", lib, os.path.join(out, "sngm_cuda.o"),
                os.path.join(out, "sngm_cuda_ops.o"), "-Wl,--no-undefined",
                f"-L{tlib}", "-ltorch", "-ltorch_cpu", "-lc10", "-lc10_cuda",
                f"-L{os.path.join(cuda_home, 'lib64')}", "-lcudart"]
        rc, secs, text = run(link, os.path.join(out, "link.log"))
        report["steps"]["link"] = {"rc": rc, "seconds": round(secs, 1)}
        if rc != 0:
            report["failures"].append("link failed:\n" + "\n".join(text.splitlines()[-25:]))

    # ptxas: no spills in any kernel of any arch
    kernels = ptxas_report(results["kernels_cxx17"][2])
    report["kernels"] = {f"{kernel_kind(k)}:{sm}:{k}": v for (k, sm), v in kernels.items()}
    if results["kernels_cxx17"][0] == 0:
        seen = {sm for _, sm in kernels}
        for a in ARCHS:
            if f"sm_{a}" not in seen:
                report["failures"].append(f"ptxas reported no kernel for sm_{a}")
        for (k, sm), v in kernels.items():
            if v["spill_stores"] is None:
                report["failures"].append(f"no spill report for {k} ({sm})")
            elif v["spill_stores"] or v["spill_loads"]:
                report["failures"].append(f"{kernel_kind(k)} spills on {sm}: {v} ({k})")

    # PTX: 128-bit loads and stores in every streaming kernel
    ptx_path = os.path.join(out, "sngm_cuda.sm_90.ptx")
    if os.path.isfile(ptx_path):
        with open(ptx_path) as f:
            entries = ptx_report(f.read())
        report["ptx"] = entries
        n_update = 0
        for name, v in entries.items():
            kind = kernel_kind(name)
            if kind == "update_kernel":
                n_update += 1
                if not (v["load128"] and v["store128"]):
                    report["failures"].append(
                        f"update kernel without 128-bit loads/stores: {name} {v}")
            elif kind == "sumsq_kernel" and not v["load128"]:
                report["failures"].append(f"sumsq kernel without 128-bit loads: {name} {v}")
            if kind in ("update_kernel", "sumsq_kernel") and v["generic"]:
                report["failures"].append(f"{kind} with generic loads/stores: {name} {v}")
        if n_update == 0:
            report["failures"].append("no update kernel in the PTX")

    report["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    n_k = len(kernels)
    max_regs = max((v["registers"] or 0 for v in kernels.values()), default=0)
    print(f"cuda_compile_check: {len(steps) + 1} steps in {report['seconds']} s; {n_k} kernels "
          f"(sm_{'/sm_'.join(ARCHS)}), max {max_regs} registers; logs in {out}")
    for fail in report["failures"]:
        print("FAIL: " + fail)
    if not report["failures"]:
        print("cuda_compile_check: OK (no spills, 128-bit loads/stores, no generic accesses, "
              "linked with --no-undefined)")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
