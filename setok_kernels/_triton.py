"""Triton, when installed: the one import, interpreter switch and block-size
helper that the kernel modules (triton_dpc, dpc_gram, triton_merge,
triton_attention) share.

Without triton every Triton backend registers with :data:`MISSING` as the
reason it declines, and ``jit`` leaves the kernel functions undecorated (they
are never launched).
"""

from __future__ import annotations

import os
from typing import Optional

from ._backends import CallInfo

try:
    import triton
    import triton.language as tl
except Exception as exc:  # triton is optional; a broken install is a reason, not an import error
    triton = tl = None
    MISSING: Optional[str] = f"triton cannot be imported ({type(exc).__name__}: {exc})"

    def jit(fn):
        return fn

else:
    MISSING = None
    jit = triton.jit

# Triton decides when a kernel is decorated (module import) whether it runs in its
# interpreter, reading this variable as a boolean; the modules read it once, here, alike.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): a block size that covers n."""
    return 1 << (max(n, minimum) - 1).bit_length()


def device_reason(call: CallInfo) -> Optional[str]:
    """Why a Triton kernel cannot take this call's device, or None."""
    if call.device.type == "cpu" and not INTERPRETING:
        return "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing setok_kernels"
    return None
