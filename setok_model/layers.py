"""Building blocks that run on packed, ragged sequences.

Every layer takes rows ``x (T, dim)`` packed segment after segment and the
int32 offsets ``cu_seqlens``; attention stays inside each segment through
``setok_kernels.varlen_attention``, so no layer ever loops over images or
clusters. Rows past ``cu_seqlens[-1]`` are computed but belong to no segment:
callers ignore them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import setok_kernels

from . import _checks

__all__ = [
    "PositionalEncoding2D",
    "VarlenAttention",
    "VarlenCrossAttention",
    "Mlp",
    "SharedNormEncoder",
    "PreNormEncoder",
    "build_encoder",
]


class PositionalEncoding2D(nn.Module):
    """The reference's 2-D sinusoidal embedding (OFFICIAL.md), added to ``(B, h*w, C)``.

    ``inv_freq`` is a persistent buffer so that reference state dicts load
    into it. The table is computed in float32 (float64 for float64 input).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        ch = math.ceil(channels / 4) * 2
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, ch, 2).float() / ch))

    def embedding(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(h*w, C)``: row ``a*w + b`` is ``concat(ex(a), ey(b))[:C]`` with interleaved sin/cos."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        inv = self.inv_freq.to(device=device, dtype=acc)

        def interleaved(n: int) -> Tensor:
            angle = torch.arange(n, device=device, dtype=acc)[:, None] * inv[None, :]
            return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)

        ex, ey = interleaved(h), interleaved(w)
        table = torch.cat([ex[:, None, :].expand(h, w, -1), ey[None, :, :].expand(h, w, -1)], dim=-1)
        return table.reshape(h * w, -1)[:, : self.channels].to(dtype)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid
        return x + self.embedding(h, w, x.dtype, x.device)


class VarlenAttention(nn.Module):
    """Multi-head self-attention inside each segment: fused ``qkv`` and ``proj`` (the reference's names)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        _checks.heads(dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # attention-probability dropout has no varlen kernel: dropout acts on the output
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None) -> Tensor:
        T, dim = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, dim // self.num_heads).unbind(1)
        out = setok_kernels.varlen_attention(q, k, v, cu_seqlens, None, max_seqlen, max_seqlen)
        return self.drop(self.proj(out.reshape(T, dim)))


class VarlenCrossAttention(nn.Module):
    """Segment i of the queries attends to segment i of the keys (e.g. a grid of queries per image)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        _checks.heads(dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: Optional[int] = None,
        max_seqlen_k: Optional[int] = None,
    ) -> Tensor:
        T, dim = x.shape
        H = self.num_heads
        q = self.q(x).view(T, H, dim // H)
        k, v = self.kv(context).view(context.shape[0], 2, H, dim // H).unbind(1)
        out = setok_kernels.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return self.drop(self.proj(out.reshape(T, dim)))


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> fc2`` (the reference's names)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.hidden(x)))

    def hidden(self, x: Tensor) -> Tensor:
        """What ``fc2`` reads: ``drop(gelu(fc1(x)))``."""
        return self.drop(F.gelu(self.fc1(x)))


def _residual(branch: Tensor, x: Tensor) -> Tensor:
    """``x + branch``, added in place into the branch's fresh output when that keeps
    the dtype (under autocast the branch may be 16-bit, the stream not): a new
    (T, dim) buffer per residual cost about 4% of the tokenizer's CPU forward
    (B=4, N=576, dim 256)."""
    return branch.add_(x) if branch.dtype == x.dtype else x + branch


class _Checkpointed(nn.Module):
    """Runs each residual step under activation checkpointing when ``gradient_checkpointing`` is set."""

    gradient_checkpointing = False

    def _step(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class SharedNormEncoder(_Checkpointed):
    """The reference's "Block": ``depth`` attention layers sharing ONE ``norm1``, then ONE MLP.

    ``x = x + attn_i(norm1(x))`` for each layer, then ``x = x + mlp(norm2(x))``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, depth: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.ModuleList(VarlenAttention(dim, num_heads, dropout) for _ in range(depth))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout)

    def forward(
        self, x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None, segment_means: bool = False
    ) -> Tensor:
        """``(T, dim)`` rows; ``segment_means=True``: their means per segment ``(S, dim)``
        (``setok_kernels.segment_mean``), with the MLP's ``fc2`` on the means
        rather than on every row (a linear layer commutes with a mean): the
        tokenizer's inner encoder then runs fc2 on 32 rows instead of 2304
        (B=4, N=576, k=16). Not while dropout after fc2 is active (per row)."""
        for attn in self.attn:
            x = _residual(self._step(self._attend, attn, x, cu_seqlens, max_seqlen), x)
        if not segment_means:
            return _residual(self._step(self._feed_forward, x), x)
        if self.training and self.mlp.drop.p > 0:
            return setok_kernels.segment_mean(_residual(self._step(self._feed_forward, x), x), cu_seqlens)
        hidden = setok_kernels.segment_mean(self._step(self._hidden, x), cu_seqlens)
        means = _residual(self.mlp.fc2(hidden), setok_kernels.segment_mean(x, cu_seqlens))
        # an empty segment's mean is 0, not fc2's bias
        return means.masked_fill_((cu_seqlens[1:] == cu_seqlens[:-1])[:, None], 0)

    def _attend(self, attn: VarlenAttention, x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int]) -> Tensor:
        return attn(self.norm1(x), cu_seqlens, max_seqlen)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))

    def _hidden(self, x: Tensor) -> Tensor:
        return self.mlp.hidden(self.norm2(x))


class PreNormLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VarlenAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None) -> Tensor:
        x = _residual(self.attn(self.norm1(x), cu_seqlens, max_seqlen), x)
        return _residual(self.mlp(self.norm2(x)), x)


class PreNormEncoder(_Checkpointed):
    """A standard pre-norm transformer: ``depth`` (attention, MLP) layers and a final LayerNorm."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, depth: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(PreNormLayer(dim, num_heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None, segment_means: bool = False
    ) -> Tensor:
        """``(T, dim)`` rows, or with ``segment_means=True`` their means per segment."""
        for layer in self.layers:
            x = self._step(layer, x, cu_seqlens, max_seqlen)
        x = self.norm(x)
        return setok_kernels.segment_mean(x, cu_seqlens) if segment_means else x


def build_encoder(block: str, dim: int, num_heads: int, mlp_dim: int, depth: int, dropout: float) -> nn.Module:
    if block == "shared_norm":
        return SharedNormEncoder(dim, num_heads, mlp_dim, depth, dropout)
    if block == "pre_norm":
        return PreNormEncoder(dim, num_heads, mlp_dim, depth, dropout)
    raise ValueError(f"block must be 'shared_norm' or 'pre_norm', got {block!r}")
