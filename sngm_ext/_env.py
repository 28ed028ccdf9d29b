"""What the loaders of backends share, at the bottom of the imports: the one reading of on/off
environment flags (SNGM_NO_JIT, SNGM_PREBUILT, SNGM_VERBOSE_BUILD, TRITON_INTERPRET), and
BackendUnavailable (backends.py re-exports it; native.py raises it without importing backends.py).

Flags: ``1``/``true``/``yes``/``on`` and ``0``/``false``/``no``/``off``, any case, as triton reads
its own (so TRITON_INTERPRET means here what it means to triton)."""

import os
from typing import Optional

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def flag(name: str, default: Optional[bool] = None) -> Optional[bool]:
    """True or False when ``name`` is set to one of the words above, else ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return default


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what would fix it."""
