"""``python -m sngm_ext [--json] [--no-build] [--check]``: what a bug report needs.

Versions (sngm_ext, Python, torch, triton, numpy), the CPU and CUDA devices, and for each backend
whether it runs on this machine's devices and, where it does not, why (the BackendUnavailable
message), what ``backend="auto"`` picks per device, and how the native extension was loaded.
Every probe is guarded: a failure is printed as its error line, never raised. Loading the "cpu"
backend may build the native extension on first use (~30 s, once); ``--no-build`` sets
SNGM_NO_JIT=1 first, so a missing prebuilt module is reported instead of built.

``--check`` instead runs every fused backend available here against the reference on a few small
cases (sngm_ext/_selfcheck.py), prints one PASS / FAIL / SKIP line per backend and device, and
exits 1 when any backend is off its bounds or fails to run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import warnings

import torch

import sngm_ext

BACKENDS = ("reference", "triton", "cpu", "cuda")
ENV_VARS = ("TRITON_INTERPRET", "SNGM_NO_JIT", "SNGM_PREBUILT", "SNGM_CPU_CAPABILITY",
            "SNGM_EXTENSIONS_DIR", "TORCH_EXTENSIONS_DIR", "ATEN_CPU_CAPABILITY",
            "CUDA_VISIBLE_DEVICES", "CUDA_HOME")


def _try(fn):
    """fn(), or the error as one line."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (a diagnostic must not crash)
        return f"error: {type(e).__name__}: {e}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f
                        if ln.lower().startswith(("model name", "hardware", "cpu model")))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _probe(backend: str, device: str) -> dict:
    """{"runs": True} or {"runs": False, "why": ...} for ``backend`` on ``device`` tensors."""
    try:
        sngm_ext.resolve_backend(backend, torch.device(device))
        return {"runs": True}
    except Exception as e:  # noqa: BLE001  BackendUnavailable, or anything unexpected
        why = str(e) if isinstance(e, sngm_ext.BackendUnavailable) else f"{type(e).__name__}: {e}"
        return {"runs": False, "why": why}


def _auto(device: str) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name, _ = sngm_ext.resolve_backend("auto", torch.device(device))
    return name + "".join(f" ({w.message})" for w in caught)


def _backends(devices: list, cuda_why: str) -> dict:
    """Each backend on each of this machine's devices it could target."""
    targets = {"reference": devices, "triton": devices, "cpu": ["cpu"], "cuda": ["cuda"]}
    out = {}
    for name in BACKENDS:
        per = {d: _probe(name, d) for d in targets[name] if d in devices}
        if name == "cuda" and "cuda" not in devices:
            per = {"cuda": {"runs": False, "why": cuda_why}}
        entry = {"runs": any(p["runs"] for p in per.values()), "devices": per}
        if not entry["runs"]:
            entry["why"] = "; ".join(f"{d}: {p['why']}" for d, p in per.items())
        if name == "triton":
            entry["note"] = ("on CPU tensors only in Triton's interpreter: TRITON_INTERPRET=1 must "
                             "be set before sngm_ext/triton are imported (here it is "
                             f"{os.environ.get('TRITON_INTERPRET', 'unset')!r})")
        out[name] = entry
    return out


def collect() -> dict:
    info: dict = {
        "sngm_ext": {"version": getattr(sngm_ext, "__version__", "unknown"),
                     "location": os.path.dirname(os.path.abspath(sngm_ext.__file__))},
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": _try(platform.platform),
        "cpu": _try(_cpu_model),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda or "none (CPU build)",
                  "git": torch.version.git_version},
        "triton": _try(lambda: _version("triton")),
        "numpy": _try(lambda: _version("numpy")),
        "cpu_capability": _try(lambda: torch.backends.cpu.get_cpu_capability()),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ} or "none of ours set",
    }
    if getattr(torch.version, "hip", None):
        info["torch"]["hip"] = torch.version.hip
    cuda_ok = _try(torch.cuda.is_available)
    devices = ["cpu"] + (["cuda"] if cuda_ok is True else [])
    info["cuda_devices"] = f"none (torch.cuda.is_available() is {cuda_ok})"
    cuda_why = (f"no CUDA device here (torch.cuda.is_available() is {cuda_ok}; torch "
                f"{torch.__version__} CUDA build: {torch.version.cuda or 'no'})")
    if cuda_ok is True:
        info["cuda_devices"] = _try(lambda: [{
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
            for i in range(torch.cuda.device_count())])
    info["backends"] = _try(lambda: _backends(devices, cuda_why))
    info["auto"] = {d: _try(lambda d=d: _auto(d)) for d in devices}

    def native():
        from sngm_ext import _native_build as nb
        from sngm_ext import native as nat

        loaded = {k: (v if isinstance(v, dict) else f"unavailable: {v}")
                  for k, v in nat.info().items()}
        return {"loaded": loaded or "nothing loaded", "build_cache": _try(nb.jit_build_root)}

    info["native"] = _try(native)
    return info


def _show(value, indent: int = 0) -> None:
    pad = " " * indent
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if isinstance(v, (dict, list)) and v:
            print(f"{pad}{k}:")
            _show(v, indent + 2)
        else:
            print(f"{pad}{k}: {v}")


def _print_plain(info: dict) -> None:
    backends, auto, native = info.pop("backends"), info.pop("auto"), info.pop("native")
    _show(info)
    print("backends:")
    if not isinstance(backends, dict):
        print(f"  {backends}")
        backends = {}
    for name, b in backends.items():
        ok = [d for d, p in b["devices"].items() if p["runs"]]
        print(f"  {name:<10} {'runs on ' + ', '.join(ok) if ok else 'does not run here'}")
        for d, p in b["devices"].items():
            if not p["runs"]:
                print(f"  {'':<10}   not on {d}: {p['why']}")
        if "note" in b:
            print(f"  {'':<10}   note: {b['note']}")
    for d, pick in auto.items():
        print(f"  {'auto':<10} on {d} picks {pick}")
    _show({"native": native})


def _check() -> int:
    from ._selfcheck import run_checks

    cuda_ok = _try(torch.cuda.is_available) is True
    print(f"sngm_ext {getattr(sngm_ext, '__version__', 'unknown')} --check: torch "
          f"{torch.__version__}, triton {_try(lambda: _version('triton'))}, "
          f"{torch.cuda.get_device_name(0) if cuda_ok else 'no CUDA device'}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}", flush=True)
    rc = run_checks(["cpu"] + (["cuda"] if cuda_ok else []),
                    say=lambda line: print(line, flush=True))
    print("check: " + ("all backends match the reference" if rc == 0 else "MISMATCH (see FAIL)"))
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sngm_ext",
        description="What a bug report needs: versions, devices, which backends run here and why "
                    "the others do not.")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-build", action="store_true",
                    help="set SNGM_NO_JIT=1: never build the native extension, report it missing")
    ap.add_argument("--check", action="store_true",
                    help="run every fused backend available here against the reference on a few "
                         "small cases (seconds); exit 1 on a mismatch")
    args = ap.parse_args(argv)
    if args.no_build:
        os.environ["SNGM_NO_JIT"] = "1"
    if args.check:
        if args.json:
            ap.error("--check prints one line per backend; it has no --json form")
        return _check()
    with contextlib.redirect_stdout(sys.stderr):  # stray prints must not spoil --json
        info = _try(collect)
    if not isinstance(info, dict):
        info = {"error": info}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_plain(info) if "backends" in info else _show(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
