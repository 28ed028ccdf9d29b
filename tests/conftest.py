"""Shared fixtures.

Triton's interpreter (what runs the "triton" backend on CPU tensors) is switched on by the caller,
before triton is first imported: scripts/test.sh exports TRITON_INTERPRET=1. Nothing here sets it:
on a GPU machine, with the variable unset, the GPU tests compile Triton for real.
"""

import importlib.util
import os

import pytest
import torch

import sngm_ext
from kit import CPU_BACKENDS, backend_available

# The names test_distributed.py imports from here (kit.py holds them now).
_available = backend_available

# Where the package has its native layer, the "cpu" backend must build in CI (scripts/setup.sh
# builds it): there a missing one is a failure.
_HAS_NATIVE_LAYER = importlib.util.find_spec("sngm_ext.native") is not None


def _usable(name):
    """The backend's name, or skip (fail in CI where it must exist)."""
    if not backend_available(name):
        if os.environ.get("CI") and name == "cpu" and _HAS_NATIVE_LAYER:
            pytest.fail(f"backend {name!r} must be available in CI")
        pytest.skip(f"backend {name!r} is not available here")
    return name


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return _usable(request.param)


@pytest.fixture(params=["triton", "cpu"])
def fused_backend(request):
    """Only the fused (multi-tensor kernel) backends."""
    return _usable(request.param)


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request):
    """Both GPU backends, compiled for real: skipped without CUDA or under the interpreter; a
    CUDA device without the native CUDA backend is a failure."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the GPU tests need compiled kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        sngm_ext.resolve_backend(request.param, torch.device("cuda"))
    except sngm_ext.BackendUnavailable as e:
        if request.param == "cuda":
            pytest.fail(f"a CUDA device is present but the native CUDA backend is not: {e}")
        pytest.skip(str(e))
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "gpu_extra: the GPU kit's extra checks (needs a CUDA device)")
