"""Which implementation of the fused step runs on which device, and why not: a leaf module.

Backends: ``"reference"`` (pure PyTorch, per tensor, any device), ``"triton"`` (fused Triton
kernels; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``"cpu"`` / ``"cuda"`` (the C++/CUDA
extension), ``"auto"`` (the fastest one that runs on the params' device; it warns once when it has
to fall back). An explicit backend that cannot run raises :class:`BackendUnavailable` saying why.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch

from ._env import BackendUnavailable, flag  # noqa: F401  (BackendUnavailable: public here)

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


def _triton_ops(device: torch.device):
    if device.type == "cpu":
        if not flag("TRITON_INTERPRET", False):
            raise BackendUnavailable(
                "backend 'triton' on CPU tensors runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing sngm_ext (or use backend='cpu'/'reference')"
            )
    elif device.type != "cuda":
        raise BackendUnavailable(f"backend 'triton' supports CUDA tensors, not {device.type}")
    try:
        from ._triton_kernels_path import load

        load()  # triton itself, and the kernels (installed, or this checkout's triton_kernels/)
    except ImportError as e:
        raise BackendUnavailable(f"backend 'triton' cannot import its kernels: {e} (it needs the "
                                 "triton package, pip install 'sngm-ext[triton]')") from e
    from ._ops import FusedOps

    return FusedOps("sngm_triton")


def _native_ops(device: torch.device):
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"the native extension has no kernels for {device.type}")
    try:
        from .native import load_ops
    except ImportError as e:
        raise BackendUnavailable(f"sngm_ext was installed without its native layer ({e})") from e
    return load_ops(device.type)  # raises BackendUnavailable with the build's error


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside sngm_ext and torch: the user's line
    that built or stepped the optimizer, wherever in the package the warning comes from."""
    import sys

    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


_warned: set = set()
_cache: dict = {}


def resolve_backend(backend: str, device: torch.device,
                    require_fused: bool = False) -> Tuple[str, Optional[object]]:
    """(name, fused ops or None for the reference) of ``backend`` for tensors on ``device``.

    ``require_fused`` (``SNGM(fused=True)``): where ``"auto"`` finds no fused backend, raise
    BackendUnavailable saying why instead of falling back to the reference with a warning."""
    key = (backend, device.type, os.environ.get("TRITON_INTERPRET"), require_fused)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        out = ("reference", None)
    elif backend == "triton":
        out = ("triton", _triton_ops(device))
    elif backend in ("cpu", "cuda"):
        if device.type != backend:
            raise BackendUnavailable(f"backend {backend!r} cannot run on {device.type} tensors")
        out = (backend, _native_ops(device))
    else:
        out = _auto(device, require_fused)
    _cache[key] = out
    return out


def _auto(device: torch.device, require_fused: bool = False):
    preferred = {"cuda": ["cuda", "triton"], "cpu": ["cpu"]}.get(device.type, [])
    reasons = []
    for name in preferred:
        try:
            ops = _triton_ops(device) if name == "triton" else _native_ops(device)
            return name, ops
        except BackendUnavailable as e:
            reasons.append(f"{name}: {e}")
    if require_fused:  # torch.optim.SGD's words for the same mistake, then why
        raise BackendUnavailable(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            f"devices: ['cpu', 'cuda'] but {device.type}: no fused SNGM backend runs there"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    if preferred and device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            "sngm_ext: backend='auto' falls back to the slow 'reference' backend on "
            f"{device.type} ({'; '.join(reasons)})",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )
    return "reference", None
