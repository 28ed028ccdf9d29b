"""sngm-ext: SNGM (stochastic normalized gradient descent with momentum) for PyTorch.

    from sngm_ext import SNGM
    opt = SNGM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

Importing this package builds nothing and imports neither triton nor the native extension: each
backend is loaded when params are first added for its device.

Where things live (one step, top to bottom):

    optimizer.py      SNGM: arguments, param groups, state_dict/load_state_dict (checked before
                      anything changes), step = collect -> Stepper.step -> store new buffers
    functional.py     sngm / sngm_groups: the same step on plain lists of tensors
    stepper.py        Stepper: what a step keeps (ops per device, plans, counter, grad_norm,
                      backward sums, distributed plan) and the step: prepare, reduce, run, report
    prepare.py        every check of a step's tensors, momentum buffers made or moved, the kernel
                      lists (one per group and dtype) that every backend walks
    _group.py         TensorGroup (one group's tensors and hyper-parameters), the hyper-parameter
                      checks, the one tensor-lr rule
    reference.py      the plain PyTorch step over the prepared lists: the oracle
    fused.py          the two-phase fused step over the prepared lists (sumsq, finalize, update)
    scaled_norm.py    the sums of squares as three additive rows (med, big, small: Blue's scaled
                      sum, so no finite fp64 gradient overflows the norm), their combine, the
                      reported norm
    layout.py         chunk tables and step plans; device_cache.py: their capture-safe caching
    _ops.py           the ops' schemas (once), their fake kernels, the Triton implementations,
                      the traced (torch.compile) forms; docs/ops.md is their contract
    backends.py       which backend runs on which device, and why not; native.py and
                      _native_build.py: the C++/CUDA extension (csrc/), prebuilt or built on
                      first use; _triton_kernels_path.py: the Triton kernels (triton_kernels/)
    backward_sums.py  norm_in_backward: phase 1 in grad hooks, and when the step may trust it
    distributed.py    the one global norm across ranks (DTensor placements, process_group, the
                      first-step check that refuses a per-rank norm)
    __main__.py       python -m sngm_ext [--check]: versions, backends, the self-check
                      (_selfcheck.py)
"""

from . import _ops  # noqa: F401  (declares the torch.library ops)
from .backends import BACKENDS, BackendUnavailable, resolve_backend
from .functional import NORMS, sngm, sngm_groups
from .optimizer import SNGM

__version__ = "0.1.0"

__all__ = [
    "SNGM",
    "sngm",
    "sngm_groups",
    "resolve_backend",
    "BackendUnavailable",
    "BACKENDS",
    "NORMS",
]
