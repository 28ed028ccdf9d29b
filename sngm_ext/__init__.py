"""sngm-ext: SNGM (stochastic normalized gradient descent with momentum) for PyTorch.

    from sngm_ext import SNGM
    opt = SNGM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

Importing this package builds nothing and imports neither triton nor the native extension: each
backend is loaded when a step first needs it.
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
