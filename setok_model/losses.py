"""Training objectives of SeTok: reconstruction, referring masks, concept-text contrast."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import setok_kernels

from . import _checks

__all__ = [
    "patchify",
    "unpatchify",
    "reconstruction_loss",
    "mask_loss",
    "pool_tokens",
    "gather_with_grad",
    "concept_contrastive_loss",
    "ConceptContrastiveLoss",
]


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, ch, H, W) -> (B, (H/p)*(W/p), p*p*ch)``, patches row-major, pixels (p, p, ch)."""
    B, ch, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    x = images.reshape(B, ch, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * ch)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`."""
    B, _, D = patches.shape
    h, w = grid
    ch = D // (patch * patch)
    x = patches.reshape(B, h, w, patch, patch, ch)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, ch, h * patch, w * patch)


def reconstruction_loss(pred: Tensor, target: Tensor, kind: str = "mse", mask: Optional[Tensor] = None) -> Tensor:
    """Mean per-patch MSE or L1 of ``(B, P, D)`` predictions; ``mask (B, P)`` keeps only some patches."""
    if kind == "mse":
        err = (pred.float() - target.float()).square().mean(-1)
    elif kind == "l1":
        err = (pred.float() - target.float()).abs().mean(-1)
    else:
        raise ValueError(f"kind must be 'mse' or 'l1', got {kind!r}")
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp(min=1)


def mask_loss(logits: Tensor, target: Tensor, key_mask: Tensor, dice_weight: float = 1.0) -> Tensor:
    """BCE + dice of ``(B, M, H, W)`` mask logits against ``target`` masks, over real tokens only."""
    logits, target = logits.float().flatten(2), target.float().flatten(2)
    real = key_mask.float()
    count = real.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)
    return ((bce + dice_weight * dice) * real).sum() / count


@_checks.renamed(cu_tokens="cu_clusters")
def pool_tokens(tokens: Tensor, cu_clusters: Tensor) -> Tensor:
    """``(B, D)``: the mean of each image's tokens (0 for an image without tokens)."""
    return setok_kernels.segment_mean(tokens, cu_clusters)


class _AllGather(torch.autograd.Function):
    """Every rank's rows, concatenated. Every rank then computes the same global loss, so
    rank r's rows get ``world_size`` times their local gradient: DDP's averaging makes it
    the full-batch gradient, with no collective inside the backward."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(), dist.get_rank()
        n = grad.shape[0] // world
        return grad[rank * n : (rank + 1) * n] * world


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, for a loss that every rank computes whole
    and DDP averages (see ``_AllGather``); ``x`` itself without a process group.
    Every rank must pass the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row cross-entropy against a target distribution."""
    return -(target * logits.log_softmax(-1)).sum(-1)


def concept_contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    concept_embeds: Optional[Tensor] = None,
    concept_mask: Optional[Tensor] = None,
    max_logit_scale: float = 100.0,
) -> Tensor:
    """GroupViT-style image-text contrast, InfoNCE both ways, plus the multi-label concept term.

    ``image_embeds (B, E)`` (e.g. :func:`pool_tokens` after a projection),
    ``text_embeds (B, E)`` one caption per image, ``logit_scale`` the log of
    the (learnable) inverse temperature. ``concept_embeds (B, K, E)`` with
    ``concept_mask (B, K)`` are each image's text concepts: an image's target
    is uniform over its concepts among all concepts of the (global) batch,
    each concept's target is its image. Under torch.distributed every rank
    computes this loss over the global batch (gathered); under DDP, which
    averages gradients, the result is the full-batch gradient.
    """
    scale = logit_scale.exp().clamp(max=max_logit_scale)
    img = gather_with_grad(F.normalize(image_embeds.float(), dim=-1))
    txt = gather_with_grad(F.normalize(text_embeds.float(), dim=-1))
    B = img.shape[0]
    target = torch.arange(B, device=img.device)
    loss = (F.cross_entropy(scale * img @ txt.T, target) + F.cross_entropy(scale * txt @ img.T, target)) / 2
    if concept_embeds is None:
        return loss

    K = concept_embeds.shape[1]
    if concept_mask is None:
        concept_mask = torch.ones(concept_embeds.shape[:2], dtype=torch.bool, device=img.device)
    con = gather_with_grad(F.normalize(concept_embeds.float(), dim=-1)).flatten(0, 1)  # (B*K, E)
    real = gather_with_grad(concept_mask.float()).flatten()
    # image -> concepts: uniform over its own real concepts; absent concepts never compete
    # (a large finite negative, not -inf: a batch without concepts stays NaN-free)
    logits = (scale * img @ con.T).masked_fill(real[None, :] == 0, -1e9)
    own = torch.block_diag(*[torch.ones(1, K, device=img.device)] * B) * real[None, :]
    has = own.sum(1)
    per_image = _soft_cross_entropy(logits, own / has[:, None].clamp(min=1))
    image_term = (per_image * (has > 0)).sum() / (has > 0).sum().clamp(min=1)
    # concept -> images: its own image
    owner = torch.arange(B, device=img.device).repeat_interleave(K)
    per_concept = F.cross_entropy(scale * con @ img.T, owner, reduction="none")
    concept_term = (per_concept * real).sum() / real.sum().clamp(min=1)
    return loss + (image_term + concept_term) / 2


class ConceptContrastiveLoss(nn.Module):
    """Holds the learnable temperature (CLIP's init, 1/0.07) of :func:`concept_contrastive_loss`."""

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_logit_scale = max_logit_scale

    def forward(self, image_embeds, text_embeds, concept_embeds=None, concept_mask=None) -> Tensor:
        return concept_contrastive_loss(image_embeds, text_embeds, self.logit_scale, concept_embeds, concept_mask, self.max_logit_scale)
