"""The tensors and hyper-parameters of one parameter group, as every backend receives them."""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Union

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


def present(grp: TensorGroup):
    """(index, param, grad) of the params that take part in this step."""
    return [(i, p, g) for i, (p, g) in enumerate(zip(grp.params, grp.grads)) if g is not None]


def momentum_buffer_for(p: Tensor, u: Optional[Tensor]) -> Tensor:
    """p's momentum buffer: a new one (u_0 = 0), or ``u`` moved to p's dtype and device (after
    ``model.double()`` or ``.to()``: what load_state_dict does with state too). A buffer of another
    size than its param is refused: the kernels would write past one of them."""
    import torch

    if u is None:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    if u.shape != p.shape:
        raise ValueError(f"SNGM: a momentum buffer of shape {tuple(u.shape)} for a param of "
                         f"shape {tuple(p.shape)}")
    return u.to(device=p.device, dtype=p.dtype)


def compute_dtype(dtype):
    """fp64 params compute in fp64; everything else computes in fp32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


# The kernels compute in fp32 for fp32/bf16/fp16 params: a larger value would become inf there.
_FP32_MAX = 3.4028234663852886e38


def _lr_value(lr, read_device_tensor: bool):
    """lr as a float for checking, or None where reading it would sync with a device."""
    import torch

    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid lr: a tensor lr must hold one float32 or float64 value, got "
                             f"{lr.numel()} x {lr.dtype}")
        if lr.requires_grad:
            raise ValueError("Invalid lr: a tensor lr must not require grad (SNGM's step is not "
                             "differentiable)")
        if lr.device.type != "cpu" and not read_device_tensor:
            return None
        return lr.item()
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise ValueError(f"Invalid lr: {lr!r} (must be a number or a one-element tensor)")
    return float(lr)


def check_hyperparameters(lr, momentum, weight_decay, nesterov, read_device_tensor=True) -> None:
    """ValueError naming the argument, for values SNGM cannot use. A tensor ``lr`` on a device is
    read (a host sync) only when ``read_device_tensor``: when a group is added, not every step."""
    value = _lr_value(lr, read_device_tensor)
    if value is not None and not 0.0 <= value <= _FP32_MAX:
        raise ValueError(f"Invalid lr: {value!r} (must be a finite number >= 0 that fits in float32)")
    for name, v in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise ValueError(f"Invalid {name}: {v!r} (must be a number; only lr may be a tensor)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum!r} (must lie in [0, 1))")
    if not 0.0 <= weight_decay <= _FP32_MAX:
        raise ValueError(
            f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0 that fits in "
            "float32)"
        )
    if nesterov and momentum == 0:
        raise ValueError("Invalid nesterov=True with momentum=0: Nesterov needs momentum > 0")
