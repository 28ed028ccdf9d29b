"""The tensors and hyper-parameters of one parameter group, as every backend receives them."""

from __future__ import annotations

from typing import List, NamedTuple, Optional

from torch import Tensor


class TensorGroup(NamedTuple):
    """One param group's tensors and hyper-parameters for one step.

    ``grads[i]`` is the gradient of ``params[i]``, or None when that param sits this step out.
    ``momentum_buffers[i]`` is its buffer: None where the group has ``momentum == 0`` (as in
    torch.optim.SGD) or where the param has none yet (it starts from zero).
    """

    params: List[Tensor]
    grads: List[Tensor]
    momentum_buffers: List[Optional[Tensor]]
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    maximize: bool


def present(grp: TensorGroup):
    """(index, param, grad) of the params that take part in this step."""
    return [(i, p, g) for i, (p, g) in enumerate(zip(grp.params, grp.grads)) if g is not None]


def compute_dtype(dtype):
    """fp64 params compute in fp64; everything else computes in fp32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


# The kernels compute in fp32 for fp32/bf16/fp16 params: a larger value would become inf there.
_FP32_MAX = 3.4028234663852886e38


def check_hyperparameters(lr, momentum, weight_decay, nesterov) -> None:
    """ValueError naming the argument, for values SNGM cannot use."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0.0 <= lr <= _FP32_MAX:
        raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0 that fits in float32)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum!r} (must lie in [0, 1))")
    if not 0.0 <= weight_decay <= _FP32_MAX:
        raise ValueError(
            f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0 that fits in "
            "float32)"
        )
    if nesterov and momentum == 0:
        raise ValueError("Invalid nesterov=True with momentum=0: Nesterov needs momentum > 0")
