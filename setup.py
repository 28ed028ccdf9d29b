"""The optional native extension (csrc/) of sngm-ext, built ahead of time where it can be.

Metadata and the package layout (sngm_ext, triton_kernels/ as sngm_ext.triton_kernels, csrc/ as
sngm_ext.csrc) are pyproject.toml's; this file only adds the native modules.

``pip install --no-build-isolation .`` (or ``-e .``) builds them ahead of time against the torch
already installed. A plain (isolated) ``pip install .`` has no torch in its build environment
(pyproject.toml does not ask for one: that would download a multi-GB torch): it builds nothing
here and installs the sources, and sngm_ext builds the kernels on first use (sngm_ext/native.py).

The native extension never fails an install: without torch, a C++ compiler, ninja, nvcc or a CUDA
build of torch, the part that cannot be built is skipped with a message, and sngm_ext builds it on
first use or falls back to another backend. Switches (environment variables):

    SNGM_SKIP_NATIVE_BUILD=1   build nothing ahead of time (the first use builds what it needs)
    SNGM_SKIP_CPU_BUILD=1      no CPU module (the first use builds it)
    SNGM_SKIP_CUDA_BUILD=1     no CUDA module
    SNGM_CPU_CAPABILITIES      native (default: the best this machine runs), all (default, avx2 and
                               avx512: for a wheel that runs anywhere) or a comma list of those
    TORCH_CUDA_ARCH_LIST       CUDA archs, e.g. "8.0;9.0" (torch's default: the visible GPUs')
    MAX_JOBS                   parallel compile jobs (ninja)
"""

import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg):
    print(f"WARNING: sngm_ext: {msg}", file=sys.stderr, flush=True)


def _build_description():
    path = os.path.join(HERE, "sngm_ext", "_native_build.py")
    spec = importlib.util.spec_from_file_location("_sngm_native_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def native_extensions():
    """(ext_modules, cmdclass) of the native extension: ([], {}), with a warning, for none."""
    if _truthy("SNGM_SKIP_NATIVE_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any import failure means: no ahead-of-time build
        _warn(
            f"torch is not importable in this build environment ({type(e).__name__}: {e}), as in "
            "an isolated `pip install .`: the native extension is not built ahead of time; its "
            "sources are installed and sngm_ext builds it on first use (needs a C++ compiler and "
            "ninja). To build it now against your torch: pip install --no-build-isolation ."
        )
        return [], {}
    nb = _build_description()
    csrc = os.path.join(HERE, "csrc")

    def rel(sources):
        return [os.path.join("csrc", s) for s in sources]

    exts = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _warn(f"no C++ compiler ({cxx!r} is not on PATH): the native extension is not built")
        return [], {}
    if not _truthy("SNGM_SKIP_CPU_BUILD"):
        try:
            caps = nb.capabilities_to_build(os.environ.get("SNGM_CPU_CAPABILITIES", "native"))
        except ValueError as e:
            _warn(f"{e}; building the native capability only")
            caps = nb.capabilities_to_build("native")
        cpu_hash = nb.source_hash(csrc, "cpu")
        for cap in caps:
            exts.append(
                cpp_extension.CppExtension(
                    f"sngm_ext._C_{cap}",
                    sources=rel(nb.CPU_SOURCES),
                    extra_compile_args={"cxx": nb.cpu_cflags(cap, cpu_hash)},
                    extra_link_args=nb.cpu_ldflags(),
                    optional=True,
                )
            )
    if not _truthy("SNGM_SKIP_CUDA_BUILD"):
        if torch.version.cuda is None:
            print(f"sngm_ext: torch {torch.__version__} is a CPU build: no CUDA kernels built")
        elif cpp_extension.CUDA_HOME is None:
            _warn("torch is a CUDA build but no CUDA toolkit (nvcc) was found (set CUDA_HOME): "
                  "the CUDA kernels are not built ahead of time")
        else:
            flags = nb.cuda_cflags(nb.source_hash(csrc, "cuda"))
            exts.append(
                cpp_extension.CUDAExtension(
                    "sngm_ext._C_cuda",
                    sources=rel(nb.CUDA_SOURCES),
                    extra_compile_args=flags,
                    optional=True,
                )
            )
    if not exts:
        return [], {}

    def failed(what, e):
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        _warn(
            f"could not build {what} ({lines[0] if lines else type(e).__name__}); sngm_ext "
            "installs without it: the first use tries to build it again, and backend='auto' "
            "falls back where that fails"
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, except that what fails to build is a warning (the modules are
        optional=True, so setuptools copies only the ones that exist)."""

        def build_extensions(self):
            try:  # also torch's compiler checks, which run before any module
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                failed("the native extension", e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                failed(ext.name, e)

    use_ninja = cpp_extension.is_ninja_available()
    if not use_ninja:
        _warn("ninja is not installed: compiling without it (slower; pip install ninja)")
    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = native_extensions()

# Everything else (name, version, dependencies, packages, package data) is in pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
