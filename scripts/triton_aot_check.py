"""Compile the Triton kernels ahead of time for real GPUs (no GPU needed) and report on the code.

For each kernel variant and architecture: the number of 128-bit global loads/stores in the PTX
(the vector path of a chunk), the other global loads/stores (the scalar path, the chunk row, the
pointer table, the sums), inexact or fused float instructions (``.approx``, ``div.full``, ``fma``:
the maths must round each operation once, correctly), ptxas's register and spill counts, and the
seconds the compile took. Per kernel, the integer arguments Triton would specialize on (none: each
variant is then one compile whatever the sizes, and the code compiled here, with no integer
assumptions, is the code that runs). The variants are every one the launchers can compile, so
their number bounds the compiles of any run (the GPU kit plans its stages from it).
Prints one JSON object; exits non-zero when a compile fails. Run without TRITON_INTERPRET
(interpreted kernels cannot be compiled). Works from a bare checkout (no install needed).
Usage: python scripts/triton_aot_check.py [--arch 80 90]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sngm_ext._triton_kernels_path import load  # noqa: E402

load()  # sngm_ext.triton_kernels, installed or the checkout's own
from sngm_ext.triton_kernels.common import num_warps  # noqa: E402
from sngm_ext.triton_kernels.norm import (  # noqa: E402
    FINALIZE_SEG_BLOCK,
    FINALIZE_TOTAL_BLOCK,
    FINALIZE_WARPS,
    _finalize_kernel,
    _sumsq_kernel,
)
from sngm_ext.triton_kernels.update import _update_kernel  # noqa: E402

CHUNK = 4096  # sngm_ext's chunk-table CHUNK (csrc/sngm_math.h kChunk): the launchers' block
DT = {
    "fp32": (torch.float32, tl.float32),
    "bf16": (torch.bfloat16, tl.bfloat16),
    "fp16": (torch.float16, tl.float16),
    "fp64": (torch.float64, tl.float64),
}


def _signature(fn, types):
    """Every argument of ``fn`` typed: pointers and scalars from ``types``, the rest constexpr."""
    return {name: types.get(name, "constexpr") for name in fn.arg_names}


def variants():
    """(name, kernel, signature, constexprs, warps) of every variant the launchers compile."""
    hyper = {f"{h}_{p}": "fp32" for h in ("lr", "mom", "wd") for p in ("hi", "mid", "lo")}
    for dt, (torch_dt, tl_dt) in DT.items():
        # With momentum or without (SNGD); lr as a float (lr_ptr then the cached float32
        # constant, never read), or read from a float32 / float64 lr_tensor.
        for mom, lrt in ((m, t) for m in (True, False) for t in (None, "fp32", "fp64")):
            name = f"update_{dt}" + ("" if mom else "_nomom") + (f"_lrt{lrt[2:]}" if lrt else "")
            yield name, _update_kernel, _signature(_update_kernel, {
                "table_ptr": "*i64", "n_tensors": "i32", "chunks_ptr": "*i64",
                "n_chunks": "i32", "sumsq_ptr": "*fp64", "n_sumsq": "i32",
                "scale_ptr": "*fp32", "lr_ptr": f"*{lrt or 'fp32'}", **hyper, "sign": "fp32",
                "nesterov": "i32",
            }), {"DTYPE": tl_dt, "BLOCK": CHUNK, "HAS_MOMENTUM": mom,
                 "HAS_LR_TENSOR": lrt is not None}, num_warps(torch_dt)
        yield f"sumsq_{dt}", _sumsq_kernel, _signature(_sumsq_kernel, {
            "table_ptr": "*i64", "n_tensors": "i32", "chunks_ptr": "*i64", "n_chunks": "i32",
            "scale_ptr": "*fp32", "wd_hi": "fp32", "wd_mid": "fp32", "wd_lo": "fp32",
            "sign": "fp32", "partials_ptr": "*fp64", "n_partials": "i32",
            "partial_offset": "i32",
        }), {"DTYPE": tl_dt, "BLOCK": CHUNK}, num_warps(torch_dt)
    yield "finalize", _finalize_kernel, _signature(_finalize_kernel, {
        "partials_ptr": "*fp64", "n_partials": "i32", "seg_ptr": "*i64", "n_segments": "i32",
        "found_inf_ptr": "*fp32", "sumsq_ptr": "*fp64", "n_sumsq": "i32",
    }), {"TOTAL_BLOCK": FINALIZE_TOTAL_BLOCK, "SEG_BLOCK": FINALIZE_SEG_BLOCK}, FINALIZE_WARPS


def ptxas_report(ptx: str, arch: int) -> dict:
    # Triton 3.9 emits PTX 9.4, newer than its own `ptxas` and CUDA 13.0's accept; it assembles
    # with the `ptxas-blackwell` (CUDA 13.4) it ships, for every architecture.
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(bindir, "ptxas-blackwell")
    if not os.path.exists(ptxas):
        ptxas = os.path.join(bindir, "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}", src,
             "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": sum(int(s) for s in spills)}


def ptx_report(ptx: str) -> dict:
    # 128-bit accesses: four 32-bit or two 64-bit lanes.
    wide = r"\.(?:v4\.(?:b32|f32|u32)|v2\.(?:b64|f64|u64))"
    return {
        "ld_128bit": len(re.findall(r"ld\.global[^\n]*" + wide, ptx)),
        "st_128bit": len(re.findall(r"st\.global[^\n]*" + wide, ptx)),
        "ld_other": len(re.findall(r"ld\.global(?![^\n]*\.v[24])[^\n]*", ptx)),
        "st_other": len(re.findall(r"st\.global(?![^\n]*\.v[24])[^\n]*", ptx)),
        "inexact": len(re.findall(r"\b(?:\w+\.approx\S*|div\.full\S*)", ptx)),
        "fma": len(re.findall(r"\bfma\.\S+", ptx)),
    }


def specialized_ints(fn, sig) -> list:
    """The integer arguments of ``fn`` Triton would compile a kernel per value class of."""
    return [p.name for p in fn.params
            if not p.is_constexpr and sig[p.name][0] in "iu" and not p.do_not_specialize]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = ap.parse_args()
    report = {"triton": triton.__version__, "kernels": {}, "specialized_ints": {}}
    for name, fn, sig, consts, warps in variants():
        report["specialized_ints"][fn.__name__] = specialized_ints(fn, sig)
        # Pointer arguments 16-byte aligned, as torch's allocations are (Triton specializes on it).
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values())
                 if t.startswith("*")}
        for arch in args.arch:
            # enable_fp_fusion=False as the launchers pass: no mul+add fused into an fma.
            t0 = time.perf_counter()
            k = triton.compile(ASTSource(fn, sig, consts, attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": warps, "enable_fp_fusion": False})
            rec = {"compile_s": round(time.perf_counter() - t0, 3), **ptx_report(k.asm["ptx"])}
            rec.update(ptxas_report(k.asm["ptx"], arch))
            report["kernels"][f"{name}_sm{arch}"] = rec
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
