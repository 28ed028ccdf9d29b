"""The tensors and hyper-parameters of one parameter group, as every backend receives them."""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Union

import torch
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
    lr: Union[float, Tensor]  # a one-element tensor where the user gave one (read on the device)
    momentum: float
    weight_decay: float
    nesterov: bool
    maximize: bool


def compute_dtype(dtype):
    """fp64 params compute in fp64; everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The kernels compute in fp32 for fp32/bf16/fp16 params: a larger value would become inf there.
_FP32_MAX = 3.4028234663852886e38


def lr_value(lr, read_device_tensor: bool = True):
    """lr as a float for checking, or None where reading it would sync with a device or break a
    torch.compile trace (a tensor's value is then checked by the eager steps only)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:  # torch.optim.SGD's message
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        if lr.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid learning rate: a tensor lr must be float32 or float64, got "
                             f"{lr.dtype}")
        if lr.requires_grad:
            raise ValueError("Invalid learning rate: a tensor lr must not require grad (SNGM's "
                             "step is not differentiable)")
        if (lr.device.type != "cpu" and not read_device_tensor) or torch.compiler.is_compiling():
            return None
        return lr.item()
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise ValueError(f"Invalid learning rate: {lr!r} (lr must be a number or a one-element "
                         "tensor)")
    return float(lr)


def check_hyperparameters(lr, momentum, weight_decay, nesterov, read_device_tensor=True) -> None:
    """ValueError naming the argument (torch.optim.SGD's wording first), for values SNGM cannot
    use. A tensor ``lr`` on a device is read (a host sync) only when ``read_device_tensor``: when
    a group is added or loaded, not at every step."""
    value = lr_value(lr, read_device_tensor)
    if value is not None and not 0.0 <= value <= _FP32_MAX:
        raise ValueError(f"Invalid learning rate: {value!r} (lr must be a finite number >= 0 that "
                         "fits in float32)")
    for name, v in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise ValueError(f"Invalid {name} value: {v!r} (must be a number; only lr may be a "
                             "tensor)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum!r} (must lie in [0, 1))")
    if not 0.0 <= weight_decay <= _FP32_MAX:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be a finite number "
                         ">= 0 that fits in float32)")
    if nesterov and momentum == 0:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (nesterov=True "
                         "with momentum=0)")


def lr_operands(lr, device):
    """(lr_tensor, lr) as the update op takes them: a tensor lr on the params' device is read
    there by the kernels (no host sync: what a captured CUDA graph needs); one on the CPU is read
    here (no sync either). The one rule for where a tensor lr may live."""
    if not isinstance(lr, torch.Tensor):
        return None, lr
    if lr.device == device:
        return lr, 0.0
    if lr.device.type == "cpu":
        return None, lr.item()
    raise ValueError(f"SNGM: lr is a tensor on {lr.device} but the params are on {device}")
