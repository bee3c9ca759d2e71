"""Decoders from concept tokens: the detokenizer (patch targets) and the mask decoder."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import setok_kernels

from . import _checks
from .layers import Mlp, VarlenAttention, VarlenCrossAttention

__all__ = ["SeTokDetokenizer", "MaskDecoder", "cluster_masks"]


def image_offsets(B: int, n: int, device) -> Tensor:
    """``cu_seqlens`` (B+1,) int32 of B images of n rows each."""
    return torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=device)


def cluster_slots(tokens: Tensor, cu_clusters: Tensor, max_clusters: Optional[int]) -> int:
    """The static bound M; SeTokOutput packs ``B*M`` rows, so ``S // B`` by default."""
    return max_clusters if max_clusters is not None else tokens.shape[0] // max(1, cu_clusters.numel() - 1)


class _CrossLayer(nn.Module):
    """Pre-norm: cross-attention to the image's context, [self-attention within the image], MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, self_attention: bool, dropout: float):
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = VarlenCrossAttention(dim, num_heads, dropout=dropout)
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.attn = VarlenAttention(dim, num_heads, dropout) if self_attention else None
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout)

    def forward(self, x, context, cu_q, cu_k, max_q, max_k):
        x = x + self.cross(self.norm_cross(x), context, cu_q, cu_k, max_q, max_k)
        if self.attn is not None:
            x = x + self.attn(self.norm_self(x), cu_q, max_q)
        return x + self.mlp(self.norm_mlp(x))


class SeTokDetokenizer(nn.Module):
    """A learned grid of queries, one per output patch, reads each image's concept tokens.

    Every layer: the queries of image b cross-attend to image b's tokens
    (ragged, varlen cross-attention), self-attend within the image's grid, then
    an MLP. A linear head predicts ``out_dim`` values per patch (its pixels,
    e.g. ``3 * p * p``, or features). An image without tokens still decodes
    (from the queries alone).
    """

    def __init__(
        self,
        token_dim: int,
        hidden_dim: int,
        num_heads: int,
        mlp_dim: int,
        num_layers: int,
        grid: tuple[int, int],
        out_dim: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.grid = _checks.pair(grid)
        self.queries = nn.Parameter(torch.randn(grid[0] * grid[1], hidden_dim) * 0.02)
        self.token_proj = nn.Linear(token_dim, hidden_dim)
        self.context_norm = nn.LayerNorm(hidden_dim)
        self.layers = nn.ModuleList(_CrossLayer(hidden_dim, num_heads, mlp_dim, True, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, out_dim)

    @_checks.renamed(cu_tokens="cu_clusters", max_tokens="max_clusters")
    def forward(self, tokens: Tensor, cu_clusters: Tensor, max_clusters: Optional[int] = None) -> Tensor:
        """Packed ``tokens (S, D)`` with ``cu_clusters (B+1,)`` -> ``(B, h*w, out_dim)``."""
        B = _checks.packed_tokens(tokens, cu_clusters, self, self.token_proj.in_features)
        P = self.queries.shape[0]
        context = self.context_norm(self.token_proj(tokens))
        x = self.queries.repeat(B, 1)
        cu_q = image_offsets(B, P, tokens.device)
        max_k = cluster_slots(tokens, cu_clusters, max_clusters)
        for layer in self.layers:
            x = layer(x, context, cu_q, cu_clusters, P, max_k)
        return self.head(self.norm(x)).view(B, P, self.head.out_features)


@_checks.renamed(max_tokens="max_clusters")
def cluster_masks(labels: Tensor, max_clusters: int, grid: tuple[int, int]) -> Tensor:
    """``(B, M, h, w)`` float: patch n belongs to cluster (= token) m (a self-supervised mask target)."""
    B, N = labels.shape
    onehot = labels[:, None, :] == torch.arange(max_clusters, device=labels.device)[None, :, None]
    return onehot.view(B, max_clusters, *grid).float()


class MaskDecoder(nn.Module):
    """The referring mask of each concept token over its image's patches.

    Tokens attend to their image's patch features (varlen cross-attention),
    then ``logit[b, m, n] = <token m, patch n> / sqrt(dim)``; optionally
    upsampled bilinearly to the image size.
    """

    def __init__(self, token_dim: int, feature_dim: int, dim: int, num_heads: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.token_proj = nn.Linear(token_dim, dim)
        self.feature_proj = nn.Linear(feature_dim, dim)
        self.feature_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(_CrossLayer(dim, num_heads, 4 * dim, False, dropout) for _ in range(num_layers))
        self.token_head = Mlp(dim, dim)

    @_checks.renamed(cu_tokens="cu_clusters", max_tokens="max_clusters")
    def forward(
        self,
        tokens: Tensor,
        cu_clusters: Tensor,
        features: Tensor,
        grid: Optional[tuple[int, int]] = None,
        max_clusters: Optional[int] = None,
        image_size: Optional[tuple[int, int]] = None,
    ) -> tuple[Tensor, Tensor]:
        """-> ``(logits (B, M, h, w) or (B, M, H, W) with image_size, key_mask (B, M))``."""
        B, N, _ = _checks.features(features, self, self.feature_proj.in_features)
        if _checks.packed_tokens(tokens, cu_clusters, self, self.token_proj.in_features) != B:
            raise ValueError(f"cu_clusters must have B + 1 = {B + 1} offsets for the {B} images of features, got {cu_clusters.numel()}")
        grid = _checks.grid(N, grid)
        M = cluster_slots(tokens, cu_clusters, max_clusters)
        patches = self.feature_norm(self.feature_proj(features))
        x = self.token_proj(tokens)
        flat = patches.flatten(0, 1)
        cu_seqlens_k = image_offsets(B, N, features.device)
        for layer in self.layers:
            x = layer(x, flat, cu_clusters, cu_seqlens_k, M, N)
        queries, key_mask = setok_kernels.pad_segments(self.token_head(x), cu_clusters, M)
        logits = torch.einsum("bmc,bnc->bmn", queries, patches) / math.sqrt(patches.shape[-1])
        logits = logits.view(B, M, *grid)
        if image_size is not None:
            logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
        return logits, key_mask
