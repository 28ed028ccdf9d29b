"""The functional entry point: one SNGM step over lists of tensors, through a chosen backend.

The update rule is :class:`sngm_ext.SNGM`'s (its docstring; README.md "For every parameter");
these functions run the same step machinery (stepper.py) on the tensors they are given, without an
optimizer around them. Backends: see :mod:`sngm_ext.backends`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

from torch import Tensor

from ._group import TensorGroup, check_hyperparameters
from .stepper import NORMS, Stepper  # noqa: F401  (NORMS: part of the public API)


def sngm_groups(
    groups: Sequence[TensorGroup],
    *,
    norm: str = "global",
    backend: str = "auto",
    skipped_steps: Optional[Tensor] = None,
    reduce_sumsq: Optional[Callable[[Tensor], None]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Tensor:
    """One SNGM step over several param groups sharing ONE norm; returns it (fp64 0-dim, on device).

    Params, grads and momentum buffers are read and written in place; everything is checked
    before anything is written. Entries of ``momentum_buffers`` that are None (with momentum != 0)
    are created, and the lists are updated with the buffers to keep. ``reduce_sumsq`` sees the
    fp64 sums of squares between the two phases, a ``[3, 1]`` tensor (the total) or ``[3, 1 + k]``
    (and one column per tensor, for ``norm="tensor"``) whose rows are scaled_norm.py's med, big
    and small sums, and may change them in place: each row is a plain sum, so an all-reduce SUM
    of the whole tensor is right. ``grad_scale`` /
    ``found_inf``: ``torch.amp.GradScaler``'s tensors (grads still multiplied by ``grad_scale``;
    ``found_inf`` nonzero skips the step). ``skipped_steps`` (int64 0-dim, on the params' device)
    grows by one when the step is skipped.
    """
    stepper = Stepper(backend=backend, norm=norm)
    stepper.skipped, stepper.counter_moves = skipped_steps, False  # the caller's counter
    stepper.step(groups, [grp.params for grp in groups], grad_scale=grad_scale,
                 found_inf=found_inf, reduce_sumsq=reduce_sumsq)
    return stepper.grad_norm


def sngm(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Optional[Tensor]],
    *,
    lr: Union[float, Tensor],
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    norm: str = "global",
    backend: str = "auto",
    skipped_steps: Optional[Tensor] = None,
) -> Tensor:
    """Functional SNGM over one list of params (``torch.optim.sgd.sgd``'s counterpart).

    ``momentum_buffers`` is updated in place: None entries become the new buffers. A tensor
    ``lr`` on a device is read there by the kernels: no host sync.
    """
    check_hyperparameters(lr, momentum, weight_decay, nesterov, read_device_tensor=False)
    grp = TensorGroup(
        list(params), list(grads), momentum_buffers,
        lr.reshape(()) if isinstance(lr, Tensor) else float(lr), float(momentum),
        float(weight_decay), bool(nesterov), bool(maximize),
    )
    return sngm_groups([grp], norm=norm, backend=backend, skipped_steps=skipped_steps)
