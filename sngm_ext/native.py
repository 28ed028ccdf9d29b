"""The C++/CUDA extension (csrc/): find it or build it on first use, load it, hand out its ops.

``load_ops("cpu")`` / ``load_ops("cuda")`` return the :class:`~sngm_ext._ops.FusedOps` of the
``sngm_native`` ops, or raise :class:`~sngm_ext.backends.BackendUnavailable` saying why not.
Nothing happens at import; the first call per process does, in this order:

1. A module built ahead of time by ``pip install`` (setup.py): ``sngm_ext._C_<cap>`` for the best
   CPU capability this machine supports that was built (see ``_native_build.py``), then for CUDA
   ``sngm_ext._C_cuda``. In a source checkout, one built from other sources than csrc/ is skipped.
2. Otherwise a build now, with ``torch.utils.cpp_extension.load`` and ninja, into a cache folder
   (``$SNGM_EXTENSIONS_DIR``, ``$TORCH_EXTENSIONS_DIR/sngm_ext`` or ``~/.cache/sngm_ext``); it
   says so on stderr when it starts and when it is done (time taken, the library's path). A build
   already there from the same sources and flags (its stamp says so) is loaded as it is, with no
   compiler or ninja needed. ``SNGM_NO_JIT=1`` turns both off. A failure is remembered for the
   process.

``SNGM_CPU_CAPABILITY=default|avx2|avx512`` picks the CPU kernels' capability (for comparisons);
``ATEN_CPU_CAPABILITY`` lowers torch's and hence ours. ``SNGM_PREBUILT=0`` ignores the modules built
ahead of time (tests of the first-use build). ``SNGM_VERBOSE_BUILD=1`` shows the build.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

from . import _native_build as nb
from ._env import BackendUnavailable, flag
from ._ops import FusedOps

_lock = threading.RLock()
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load links
_state: Dict[str, object] = {}  # "cpu" / "cuda" -> info dict, or the BackendUnavailable raised


def _unavailable(msg: str) -> Exception:
    return BackendUnavailable(msg)


def _truthy(name: str) -> bool:
    return bool(flag(name, False))


def load_ops(device_type: str) -> FusedOps:
    """The native ops for tensors on ``device_type`` ("cpu" or "cuda"), loading them if needed."""
    if device_type not in ("cpu", "cuda"):
        raise _unavailable(f"the native extension has no kernels for {device_type} tensors")
    with _lock:
        _ensure(device_type)  # the schemas are _ops.py's: each module only registers kernels
    return FusedOps("sngm_native")


def info() -> Dict[str, object]:
    """What is loaded, from where and how (prebuilt or built on first use); for diagnostics."""
    out = {}
    for part, st in _state.items():
        out[part] = {k: v for k, v in st.items() if k != "module"} if isinstance(st, dict) else st
    return out


def _ensure(part: str) -> None:
    st = _state.get(part)
    if isinstance(st, Exception):
        raise st
    if st is not None:
        return
    try:
        _state[part] = _load_cpu() if part == "cpu" else _load_cuda()
    except BackendUnavailable as e:
        _state[part] = e
        raise
    except Exception as e:
        err = BackendUnavailable(f"loading the native {part} extension failed: {e}")
        _state[part] = err
        raise err from e


def _prebuilt_path(module: str) -> Optional[str]:
    if flag("SNGM_PREBUILT") is False:
        return None
    pkg = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(pkg, module + suffix)
        if os.path.isfile(path):
            return path
    return None


_MARKER = re.compile(rb"sngm-source-hash:h([0-9a-f]{16})")


def _stale(path: str, want: Optional[str]) -> Optional[str]:
    """Why the prebuilt module at ``path`` does not match the sources (None: it does, or unknown).
    """
    if want is None:  # an installed package without sources: trust what was installed
        return None
    with open(path, "rb") as f:
        m = _MARKER.search(f.read())
    if m is None or m.group(1).decode() == want:
        return None
    return f"built from sources {m.group(1).decode()}, csrc/ is now {want}"


def _say(msg: str) -> None:
    print(f"sngm_ext: {msg}", file=sys.stderr, flush=True)


def _load_cpu() -> Dict[str, object]:
    csrc = nb.csrc_dir()
    want = nb.source_hash(csrc, "cpu") if csrc else None
    caps = nb.usable_cpu_capabilities()
    forced = os.environ.get("SNGM_CPU_CAPABILITY", "").strip().lower()
    if forced:
        if forced not in nb.CPU_CAPABILITY_FLAGS:
            raise _unavailable(
                f"SNGM_CPU_CAPABILITY={forced!r} is not one of {sorted(nb.CPU_CAPABILITY_FLAGS)}"
            )
        if forced not in caps:
            raise _unavailable(f"SNGM_CPU_CAPABILITY={forced!r}, but this CPU runs only {caps}")
        caps = [forced]
    notes: List[str] = []
    for cap in caps:
        path = _prebuilt_path(f"_C_{cap}")
        if path is None:
            continue
        why = _stale(path, want)
        if why:
            notes.append(f"skipped the prebuilt {os.path.basename(path)} ({why})")
            continue
        try:
            mod = importlib.import_module(f"sngm_ext._C_{cap}")
        except Exception as e:  # built against another torch, say
            notes.append(f"the prebuilt {os.path.basename(path)} does not load ({e})")
            continue
        return {"how": "prebuilt", "path": path, "capability": cap, "module": mod}
    # the best capability; should its build fail (an old compiler, say), the portable one
    tries = caps[:1] + (["default"] if caps[0] != "default" and not forced else [])
    first_error = None
    for cap in tries:
        try:
            mod, reused = _jit_build(
                part="cpu",
                name=f"sngm_native_cpu_{cap}",
                describe=f"the CPU kernels ({cap})",
                csrc=csrc,
                sources=nb.CPU_SOURCES,
                notes=notes,
                kwargs=dict(extra_cflags=nb.cpu_cflags(cap, want or "unknown"),
                            extra_ldflags=nb.cpu_ldflags(), is_python_module=True),
            )
        except Exception as e:  # BackendUnavailable
            if first_error is None:
                first_error = e
            if not getattr(e, "build_failed", False):  # no compiler, ninja or sources: no retry
                raise
            notes.append(f"the {cap} build failed")
            continue
        return {"how": "built on first use", "path": getattr(mod, "__file__", None),
                "capability": cap, "reused": reused, "module": mod}
    raise first_error


def _load_cuda() -> Dict[str, object]:
    if torch.version.cuda is None:
        raise _unavailable(f"this torch ({torch.__version__}) is not a CUDA build")
    csrc = nb.csrc_dir()
    want = nb.source_hash(csrc, "cuda") if csrc else None
    notes: List[str] = []
    path = _prebuilt_path("_C_cuda")
    if path is not None:
        why = _stale(path, want)
        if why:
            notes.append(f"skipped the prebuilt {os.path.basename(path)} ({why})")
        else:
            try:
                torch.ops.load_library(path)
                return {"how": "prebuilt", "path": path}
            except Exception as e:
                notes.append(f"the prebuilt {os.path.basename(path)} does not load ({e})")
    from torch.utils import cpp_extension

    no_nvcc = None
    if cpp_extension.CUDA_HOME is None:
        no_nvcc = ("no prebuilt CUDA kernels and no CUDA toolkit to build them (nvcc not found: "
                   "set CUDA_HOME)")
    flags = nb.cuda_cflags(want or "unknown")
    path, reused = _jit_build(
        part="cuda",
        name="sngm_native_cuda",
        describe="the CUDA kernels",
        csrc=csrc,
        sources=nb.CUDA_SOURCES,
        notes=notes,
        kwargs=dict(extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"],
                    is_python_module=False),
        missing_tool=no_nvcc,
    )
    return {"how": "built on first use", "path": path, "reused": reused}


def _jit_build(*, part, name, describe, csrc, sources, notes, kwargs, missing_tool=None):
    """``cpp_extension.load`` of ``sources`` (relative to csrc/), and whether an earlier build was
    loaded as it was (a build in the cache whose stamp matches these sources and flags needs no
    compiler or ninja: a machine that built once keeps its kernels); BackendUnavailable saying why.
    """
    pre = "".join(f"; {n}" for n in notes)
    if _truthy("SNGM_NO_JIT"):
        raise _unavailable(
            f"no usable prebuilt native {part} extension and SNGM_NO_JIT is set{pre}"
        )
    if csrc is None:
        raise _unavailable(
            f"no usable prebuilt native {part} extension, and no csrc/ sources to build one{pre}"
        )
    build_dir = os.path.join(nb.jit_build_root(), name)
    # The stamp names what the cached build was made from: the sources (and this build
    # description) and the flags. cpp_extension rebuilds by itself when either changes; the stamp
    # tells us when it will not, so that the build it left can be loaded without it.
    stamp = os.path.join(build_dir, "sngm_source_hash")
    want = nb.source_hash(csrc, part) + " " + hashlib.sha256(
        json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:16]
    try:
        with open(stamp) as f:
            cached = f.read().strip() == want
    except OSError:
        cached = False
    library = os.path.join(build_dir, name + _LIB_EXT)
    if cached and os.path.isfile(library):
        try:
            return _load_built(name, library, kwargs["is_python_module"]), True
        except Exception as e:  # a damaged or foreign file: build it again
            notes.append(f"the cached build {library} does not load ({e})")
            pre = "".join(f"; {n}" for n in notes)
    if missing_tool is not None:  # what this part needs beyond a C++ compiler and ninja
        raise _unavailable(missing_tool + pre)
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise _unavailable(
            f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX), so the native "
            f"{part} extension cannot be built{pre}"
        )
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise _unavailable(
            f"building the native {part} extension needs ninja (pip install ninja){pre}"
        )
    os.makedirs(build_dir, exist_ok=True)
    _say(
        f"building {describe} of the native extension on first use (a minute or two, once; "
        f"cached in {build_dir}){pre}"
    )
    start = time.monotonic()
    try:
        out = cpp_extension.load(
            name=name,
            sources=[os.path.join(csrc, s) for s in sources],
            build_directory=build_dir,
            verbose=_truthy("SNGM_VERBOSE_BUILD"),
            **kwargs,
        )
    except Exception as e:
        err = _unavailable(
            f"building the native {part} extension failed ({_summary(e)}); build folder "
            f"{build_dir}, SNGM_VERBOSE_BUILD=1 shows the full log"
        )
        err.build_failed = True
        raise err from e
    if not kwargs["is_python_module"]:
        out = library  # load() returns nothing for a library of ops alone
    _say(f"built {describe} in {time.monotonic() - start:.0f} s: {library}")
    try:
        with open(stamp, "w") as f:
            f.write(want)
    except OSError:
        pass
    return out, False


def _load_built(name: str, library: str, is_python_module: bool):
    """What ``cpp_extension.load`` returns for a build it already made: the module (imported from
    ``library`` under ``name``) or, for a library of ops alone, its path once loaded."""
    if not is_python_module:
        torch.ops.load_library(library)
        return library
    spec = importlib.util.spec_from_file_location(name, library)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(e: BaseException, limit: int = 1500) -> str:
    """The first line of a build error plus the compiler's error lines, short enough to read."""
    lines = [ln.rstrip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    keep = [lines[0]] + [ln for ln in lines[1:] if re.search(r"error|Error|not found", ln)][:8]
    text = " | ".join(keep)
    return text if len(text) <= limit else text[: limit - 3] + "..."
