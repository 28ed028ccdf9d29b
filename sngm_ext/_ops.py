"""The fused step's three kernels as ``torch.library`` ops: schemas defined once, fake kernels, one
implementation registered per backend.

Every fused backend implements the same three ops over lists of the user's own tensors (one
(param group, dtype) per call) and a chunk table (layout.py); ``docs/ops.md`` is the contract:

    sumsq(params, grads, chunks, grad_scale?, weight_decay, maximize, partials!, partial_offset)
        partials[:, partial_offset + c] = chunk c's three sums of squares of
        d = sign * g / grad_scale + weight_decay * w (rows med, big, small: scaled_norm.py)
    finalize(partials, seg_ptr, found_inf?, sumsq!)
        sumsq[:, 0] = the sums of all partials (sumsq[0, 0] = +inf when found_inf is nonzero);
        where sumsq has more columns (norm="tensor"), sumsq[:, 1 + s] = segment s's; always in a
        fixed order
    update(params!, grads, momentum_buffers!, chunks, sumsq, grad_scale?, lr_tensor?, lr,
           momentum, weight_decay, nesterov, maximize)
        the normalize-momentum-update of reference.py for every chunk, its norm from its
        segment's column (scaled_norm.combine), the learning rate read from lr_tensor on the
        device where one is given; nothing at all when the total is not finite

The same schemas live in two namespaces: ``sngm_triton`` (Triton; Python implementations here,
for CUDA and, under ``TRITON_INTERPRET=1``, CPU) and ``sngm_native`` (the C++/CUDA extension
registers its CPU and CUDA implementations with ``TORCH_LIBRARY_IMPL`` when it is loaded; the
schemas are not its business, so either of its modules loads alone). Mutated arguments are marked
and the fake kernels do nothing, so ``torch.compile`` traces through a step. Nothing here imports
triton or the extension.
"""

from __future__ import annotations

import torch

from .layout import CHUNK

SCHEMAS = {
    "sumsq": "(Tensor[] params, Tensor[] grads, Tensor chunks, Tensor? grad_scale, "
    "float weight_decay, bool maximize, Tensor(a!) partials, int partial_offset) -> ()",
    "finalize": "(Tensor partials, Tensor seg_ptr, Tensor? found_inf, Tensor(a!) sumsq) -> ()",
    "update": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor chunks, "
    "Tensor sumsq, Tensor? grad_scale, Tensor? lr_tensor, float lr, float momentum, "
    "float weight_decay, bool nesterov, bool maximize) -> ()",
}
NAMESPACES = ("sngm_triton", "sngm_native")


def _fake(*args, **kwargs):
    return None


def _triton_sumsq(params, grads, chunks, grad_scale, weight_decay, maximize, partials, offset):
    from ._triton_kernels_path import load

    load().sumsq(params, grads, chunks, grad_scale, weight_decay, maximize, partials, offset,
                 block=CHUNK)


def _triton_finalize(partials, seg_ptr, found_inf, sumsq):
    from ._triton_kernels_path import load

    load().finalize(partials, seg_ptr, found_inf, sumsq)


def _triton_update(params, grads, bufs, chunks, sumsq, grad_scale, lr_tensor, lr, momentum,
                   weight_decay, nesterov, maximize):
    from ._triton_kernels_path import load

    load().update(params, grads, bufs, chunks, sumsq, grad_scale, lr_tensor, lr, momentum,
                  weight_decay, nesterov, maximize, block=CHUNK)


_TRITON_IMPLS = {"sumsq": _triton_sumsq, "finalize": _triton_finalize, "update": _triton_update}

_libs = {}
for _ns in NAMESPACES:
    _libs[_ns] = torch.library.Library(_ns, "DEF")
    for _name, _schema in SCHEMAS.items():
        _libs[_ns].define(_name + _schema)
        torch.library.register_fake(f"{_ns}::{_name}", _fake, lib=_libs[_ns])
for _name, _impl in _TRITON_IMPLS.items():
    _libs["sngm_triton"].impl(_name, _impl, "CUDA")
    _libs["sngm_triton"].impl(_name, _impl, "CPU")  # runs only under TRITON_INTERPRET=1


# What a step traced by torch.compile calls instead of sumsq and update: the same ops with lr,
# momentum and weight_decay in one CPU float64 tensor ``hyper`` (built in the graph from the
# groups' values), read back here and handed to ``namespace``'s op as floats. A Python float
# that reaches a custom op is a guard (Dynamo specializes it): a scheduler that changes momentum
# or weight decay every step (OneCycleLR, CyclicLR) would recompile the step every step. A value
# in a tensor is a graph input instead. Bitwise the eager step: the floats are those values.
TRACED_SCHEMAS = {
    "sumsq": "(Tensor[] params, Tensor[] grads, Tensor chunks, Tensor? grad_scale, Tensor hyper, "
    "bool maximize, Tensor(a!) partials, int partial_offset, str namespace) -> ()",
    "update": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor chunks, "
    "Tensor sumsq, Tensor? grad_scale, Tensor? lr_tensor, Tensor hyper, bool nesterov, "
    "bool maximize, str namespace) -> ()",
}


def _traced_sumsq(params, grads, chunks, grad_scale, hyper, maximize, partials, offset, ns):
    _, _, weight_decay = hyper.tolist()  # a CPU tensor: no device sync
    getattr(torch.ops, ns).sumsq.default(params, grads, chunks, grad_scale, weight_decay,
                                         maximize, partials, offset)


def _traced_update(params, grads, bufs, chunks, sumsq, grad_scale, lr_tensor, hyper, nesterov,
                   maximize, ns):
    lr, momentum, weight_decay = hyper.tolist()
    getattr(torch.ops, ns).update.default(params, grads, bufs, chunks, sumsq, grad_scale,
                                          lr_tensor, lr, momentum, weight_decay, nesterov,
                                          maximize)


_libs["sngm_traced"] = torch.library.Library("sngm_traced", "DEF")
for _name, _schema in TRACED_SCHEMAS.items():
    _libs["sngm_traced"].define(_name + _schema)
    torch.library.register_fake(f"sngm_traced::{_name}", _fake, lib=_libs["sngm_traced"])
_libs["sngm_traced"].impl("sumsq", _traced_sumsq, "CompositeExplicitAutograd")
_libs["sngm_traced"].impl("update", _traced_update, "CompositeExplicitAutograd")
_HYPER_BASIS = torch.eye(3, dtype=torch.float64)  # rows: lr, momentum, weight_decay


def traced_hyper(lr: float, momentum: float, weight_decay: float) -> torch.Tensor:
    """[lr, momentum, weight_decay] as a CPU float64 tensor, made with arithmetic that keeps a
    traced (symbolic) float a graph input: ``torch.tensor([x])`` would specialize it. Exact:
    1 * x + 0 * y is x for finite values."""
    e = _HYPER_BASIS
    return e[0] * lr + e[1] * momentum + e[2] * weight_decay


class FusedOps:
    """The three ops of one fused backend, looked up once, and their traced forms."""

    def __init__(self, namespace: str):
        ns = getattr(torch.ops, namespace)
        self.namespace = namespace
        self.sumsq = ns.sumsq.default
        self.finalize = ns.finalize.default
        self.update = ns.update.default
        self.traced_sumsq = torch.ops.sngm_traced.sumsq.default
        self.traced_update = torch.ops.sngm_traced.update.default
