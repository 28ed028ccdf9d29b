"""Where ``sngm_ext.triton_kernels`` comes from.

Installed (``pip install``, editable or not), pyproject.toml maps the checkout's top-level
``triton_kernels/`` to the subpackage ``sngm_ext.triton_kernels``. A source checkout that was
never installed (on ``sys.path`` only: the GPU kit on a bare machine) has no such mapping, so
when this ``sngm_ext`` lives in a checkout, its own ``triton_kernels/`` is loaded under that name
(never another checkout's or install's, and never the unrelated PyPI package named
``triton_kernels``). Importing this module imports nothing; :func:`load` imports triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Optional

NAME = "sngm_ext.triton_kernels"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()


def checkout_kernels_dir() -> Optional[str]:
    """The checkout's ``triton_kernels/`` when this sngm_ext is the ``sngm_ext/`` of a source
    checkout of sngm-ext (its pyproject.toml names the project), else None."""
    root = os.path.dirname(_PACKAGE_DIR)
    kernels = os.path.join(root, "triton_kernels")
    if not os.path.isfile(os.path.join(kernels, "__init__.py")):
        return None
    try:
        with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            ours = 'name = "sngm-ext"' in f.read()
    except OSError:
        return None
    return kernels if ours else None


def load() -> ModuleType:
    """``sngm_ext.triton_kernels``, imported once (the checkout's own in a source checkout).
    Raises ImportError when triton is missing, or when neither an installed subpackage nor a
    checkout's folder exists."""
    mod = sys.modules.get(NAME)
    if mod is not None:
        return mod
    with _lock:
        mod = sys.modules.get(NAME)
        if mod is not None:
            return mod
        kernels = checkout_kernels_dir()
        if kernels is None:
            return importlib.import_module(NAME)
        spec = importlib.util.spec_from_file_location(
            NAME, os.path.join(kernels, "__init__.py"), submodule_search_locations=[kernels])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = mod  # before running it: its `from .norm import ...` needs it
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            for key in [k for k in sys.modules if k == NAME or k.startswith(NAME + ".")]:
                del sys.modules[key]
            raise
        setattr(sys.modules["sngm_ext"], "triton_kernels", mod)
        return mod
