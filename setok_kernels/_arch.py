"""The architecture family a Triton launch targets, which selects its launch config tables.

Launch configs differ per architecture: on sm_90 a 16-bit (or tf32) ``tl.dot``
with 64-row tiles compiles to wgmma, whose accumulators and operands press
registers differently from the mma.sync that sm_80 (and every other
architecture Triton supports without wgmma) gets, so a config that fits
sm_90's 255 registers per thread can spill on sm_80. The tables are keyed by
:func:`family`: 90 for compute capability 9.x, 80 for every other CUDA
device (mma.sync-style register pressure, the conservative choice; only sm_80
and sm_90 are compiled by the proof). CPU tensors (Triton's interpreter) take
the sm_90 tables.

The compile proof (``python -m setok_kernels.info --compile``) records the
launches the dispatcher makes for each target inside :func:`target`, so the
configs it compiles are the ones a GPU of that family launches: one source of
truth.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

FAMILIES = (80, 90)
_forced: Optional[int] = None


def family(device: torch.device) -> int:
    """90 for a compute capability 9.x device, 80 for any other CUDA device, 90 off CUDA."""
    if _forced is not None:
        return _forced
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


@contextlib.contextmanager
def target(arch: int) -> Iterator[None]:
    """Every :func:`family` query answers ``arch``'s family meanwhile (the compile proof records under it)."""
    global _forced
    old, _forced = _forced, (90 if arch // 10 == 9 else 80)
    try:
        yield
    finally:
        _forced = old
