"""Helpers on packed segments that every backend shares.

A packed tensor holds ``S`` segments back to back; ``cu_seqlens`` (``S + 1``
offsets) says where each starts. Attention calls with nothing to attend are
answered here once (``no_attention``), before any backend runs (ops.py).
"""

from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clamped_offsets(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """int64 offsets clamped into [0, T] and made non-decreasing, sync-free: offsets
    that were not validated (CUDA, validate=False) never index out of bounds."""
    return cu_seqlens.to(torch.int64).clamp(0, T).cummax(0).values


def row_segments(cu_seqlens: torch.Tensor, T: int):
    """Per packed row of ``T``: its segment, its position in it, and whether it lies in one.

    Rows outside every segment get segment 0 (a valid index when ``S == 0`` too);
    ``inside`` marks them.
    """
    cu = cu_seqlens.to(torch.int64)
    rows = torch.arange(T, device=cu.device)
    seg = torch.searchsorted(cu[1:], rows, right=True).clamp(max=max(cu.numel() - 2, 0))
    inside = (rows >= cu[0]) & (rows < cu[-1])
    return seg, rows - cu[seg], inside


def nothing_to_attend(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor) -> bool:
    """No query row, no key row or no segment: every output row is 0, every lse -inf (shapes only)."""
    return q.shape[0] == 0 or k.shape[0] == 0 or cu_seqlens_q.numel() < 2


def no_attention(q: torch.Tensor):
    """``(out, lse)`` of a call with nothing to attend, in the setok convention."""
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=acc_dtype(q.dtype), device=q.device)
    return torch.zeros_like(q), lse
