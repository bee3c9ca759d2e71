"""SeTokProjector: a drop-in multimodal projector (vision features -> LLM-width visual tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import setok_kernels

from . import _checks
from .layers import Mlp
from .tokenizer import SeTokConfig, SeTokOutput, SeTokTokenizer

__all__ = ["ProjectorOutput", "SeTokProjector"]


@dataclass
class ProjectorOutput:
    """Visual tokens in the LLM's embedding space, padded and packed.

    ``embeds (B, M, W)`` with ``mask (B, M)`` (True for real tokens, padding
    zeros); ``packed (B*M, W)`` with image b's rows at
    ``cu_clusters[b]:cu_clusters[b+1]`` (rows past ``cu_clusters[-1]`` zeros).
    ``cu_seqlens`` and ``num_tokens`` are deprecated names of ``cu_clusters``
    and ``num_clusters``.
    """

    embeds: Tensor
    mask: Tensor
    packed: Tensor
    cu_clusters: Tensor
    num_clusters: Tensor
    tokenizer_output: SeTokOutput

    cu_seqlens = _checks.deprecated_field("cu_clusters", "cu_seqlens")
    num_tokens = _checks.deprecated_field("num_clusters", "num_tokens")


class SeTokProjector(nn.Module):
    """``features (B, N, C)`` from any vision tower -> SeTok tokens -> ``llm_dim``.

    Replaces LLaVA's ``mm_projector``: the projection is LLaVA's
    ``"mlp2x_gelu"`` (default) or ``"linear"``. The number of visual tokens
    per image is the number of concepts SeTok finds in it.
    """

    def __init__(self, config: SeTokConfig, llm_dim: int, projector: str = "mlp2x_gelu"):
        super().__init__()
        self.config = config
        self.llm_dim = llm_dim
        self.projector_type = projector
        self.tokenizer = SeTokTokenizer(config)
        if projector == "mlp2x_gelu":
            self.projector = Mlp(config.token_dim, llm_dim, llm_dim)
        elif projector == "linear":
            self.projector = nn.Linear(config.token_dim, llm_dim)
        else:
            raise ValueError(f"projector must be 'mlp2x_gelu' or 'linear', got {projector!r}")

    def forward(self, features: Tensor, mask: Optional[Tensor] = None, grid: Optional[tuple[int, int]] = None) -> ProjectorOutput:
        out = self.tokenizer(features, mask, grid)
        packed = self.projector(out.tokens)
        real = torch.arange(packed.shape[0], device=packed.device) < out.cu_clusters[-1]
        packed = torch.where(real[:, None], packed, torch.zeros((), dtype=packed.dtype, device=packed.device))
        embeds, key_mask = setok_kernels.pad_segments(packed, out.cu_clusters, out.max_clusters)
        return ProjectorOutput(embeds, key_mask, packed, out.cu_clusters, out.num_clusters, out)
