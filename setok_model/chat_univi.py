"""Chat-UniVi's training-free multi-level image token merge on the setok kernels.

Chat-UniVi feeds its LLM the patch tokens of an image (576 CLIP ViT-L/14-336
tokens) merged three times by DPC-kNN: 576 -> 64 -> 32 -> 16, each level
clustering the previous level's merged tokens, and concatenates the three
levels (112 tokens) in front of the projector. Its clustering modules have
no parameters, so the merge works on any vision tower's features without
training. :class:`ChatUniViMerge` does the same with
``setok_kernels.dpc_cluster`` + ``merge_clusters`` (batched, sync-free),
with the drop-in semantics of :mod:`setok_kernels.compat` (ties broken by
index instead of random noise; padded tokens in no cluster).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

import setok_kernels
from setok_kernels.compat import MERGE_EPS

__all__ = ["ChatUniViMerge", "ChatUniViOutput"]


class ChatUniViOutput(NamedTuple):
    tokens: Tensor  # (B, sum(cluster_nums), C): the levels concatenated, coarsest last
    key_mask: Tensor  # (B, sum(cluster_nums)) bool: False for empty clusters (images with fewer real tokens)
    levels: tuple  # one setok_kernels.MergeResult per level


class ChatUniViMerge(nn.Module):
    """Patch features ``(B, N, C)`` (+ optional ``mask (B, N)``) -> merged tokens and key mask.

    ``cluster_nums`` and ``ks`` default to Chat-UniVi's image setting (64, 32,
    16 clusters with k = 5, 3, 3). As there, a level whose k exceeds its
    cluster count uses ``min(3, max(count // 2, 1))``, every token of a level
    weighs 1, and the merge is ``sum(x) / (count + 1e-6)``; k is also
    clamped to the number of tokens it clusters. Use the output in place of
    the vision features a LLaVA projector takes: Chat-UniVi projects
    ``tokens`` with its ``mm_projector``. Differentiable in ``features``
    (the clustering itself is not).
    """

    def __init__(self, cluster_nums: Sequence[int] = (64, 32, 16), ks: Sequence[int] = (5, 3, 3)):
        super().__init__()
        if len(cluster_nums) != len(ks) or not cluster_nums:
            raise ValueError(f"cluster_nums and ks must be non-empty and of one length, got {cluster_nums} and {ks}")
        if any(n < 1 for n in cluster_nums) or any(k < 1 for k in ks):
            raise ValueError(f"cluster counts and k must be >= 1, got {cluster_nums} and {ks}")
        self.cluster_nums = tuple(int(n) for n in cluster_nums)
        self.ks = tuple(int(k) if k <= n else min(3, max(n // 2, 1)) for n, k in zip(cluster_nums, ks))

    def extra_repr(self) -> str:
        return f"cluster_nums={self.cluster_nums}, ks={self.ks}"

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> ChatUniViOutput:
        x, levels = features, []
        for n, k in zip(self.cluster_nums, self.ks):
            clusters = setok_kernels.dpc_cluster(
                x, min(k, x.shape[1]), mask=mask, densest_delta="global_max", num_centers=n, center_order="score",
                tie_break="index",
            )
            merged = setok_kernels.merge_clusters(x, clusters.labels, clusters.num_clusters, n, eps=MERGE_EPS)
            levels.append(merged)
            x, mask = merged.tokens, merged.key_mask
        tokens = torch.cat([m.tokens for m in levels], dim=1)
        key_mask = torch.cat([m.key_mask for m in levels], dim=1)
        return ChatUniViOutput(tokens, key_mask, tuple(levels))
