"""Compile the Triton kernels ahead of time for real GPUs (no GPU needed) and report on the code.

For each kernel variant and architecture: the number of 128-bit global loads/stores in the PTX,
scalar global loads, and ptxas's register and spill counts. Prints one JSON object; exits non-zero
when a compile fails. Run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
Usage: python scripts/triton_aot_check.py [--arch 80 90]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what launches use; silences 3.9's notice

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sngm_ext.buckets import CHUNK  # noqa: E402
from sngm_ext.triton_kernels.norm import _finalize_kernel, _sumsq_kernel  # noqa: E402
from sngm_ext.triton_kernels.update import _update_kernel  # noqa: E402
from sngm_ext.triton_kernels.update import num_warps as update_warps  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def variants():
    for dt in ("fp32", "bf16", "fp64"):
        acc = "fp64" if dt == "fp64" else "fp32"
        yield f"update_{dt}", _update_kernel, {
            "param_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "mom_ptr": f"*{dt}", "chunks_ptr": "*i64",
            "n_chunks": "i32", "sumsq_ptr": f"*{acc}", "lr_hi": "fp32", "lr_lo": "fp32",
            "mom_hi": "fp32", "mom_lo": "fp32", "wd_hi": "fp32", "wd_lo": "fp32",
            "grad_sign": "fp32", "nesterov": "i32", "BLOCK": "constexpr",
            "HAS_MOMENTUM": "constexpr", "FP64": "constexpr",
        }, {"BLOCK": CHUNK, "HAS_MOMENTUM": True, "FP64": dt == "fp64"}, 6, update_warps(DT[dt])
    yield "sumsq_fp32", _sumsq_kernel, {
        "param_ptr": "*fp32", "grad_ptr": "*fp32", "chunks_ptr": "*i64", "n_chunks": "i32",
        "partials_ptr": "*fp32", "partial_offset": "i32", "wd_hi": "fp32", "wd_lo": "fp32",
        "grad_sign": "fp32", "BLOCK": "constexpr", "FP64": "constexpr",
    }, {"BLOCK": CHUNK, "FP64": False}, 5, 8
    yield "finalize_fp32", _finalize_kernel, {
        "partials_ptr": "*fp32", "seg_ptr": "*i64", "n_segments": "i32", "sumsq_ptr": "*fp32",
        "PER_SEGMENT": "constexpr", "BLOCK": "constexpr",
    }, {"PER_SEGMENT": True, "BLOCK": 1024}, 4, 4


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = ap.parse_args()
    report = {"triton": triton.__version__, "kernels": {}}
    for name, fn, sig, consts, n_ptrs, warps in variants():
        # Pointers 16-byte aligned, as the launcher's tensors are (Triton specializes on it).
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_ptrs)}
        for arch in args.arch:
            k = triton.compile(ASTSource(fn, sig, consts, attrs),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            ptx = k.asm["ptx"]
            # 128-bit accesses: four 32-bit or two 64-bit lanes.
            wide = r"\.(?:v4\.(?:b32|f32|u32)|v2\.(?:b64|f64|u64))"
            rec = {
                "ld_128bit": len(re.findall(r"ld\.global[^\n]*" + wide, ptx)),
                "st_128bit": len(re.findall(r"st\.global[^\n]*" + wide, ptx)),
                "ld_other": len(re.findall(r"ld\.global(?![^\n]*\.v[24])[^\n]*", ptx)),
            }
            rec.update(ptxas_report(ptx, arch))
            report["kernels"][f"{name}_sm{arch}"] = rec
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
