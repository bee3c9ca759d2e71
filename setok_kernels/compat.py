"""Drop-in replacements for the DPC-kNN token clustering of TCFormer and Chat-UniVi.

Both models (and PruneVid, HoliTom, FastVID, which reuse the same core)
call two functions on a ``token_dict``::

    idx_cluster, cluster_num = cluster_dpc_knn(token_dict, cluster_num, k, token_mask)
    down_dict = merge_tokens(token_dict, idx_cluster, cluster_num, token_weight)

The functions here take the same arguments and return the same values, so
swapping the import is the whole change. A ``token_dict`` holds ``x (B, N,
C)``, ``token_num``, ``idx_token (B, N_init)`` (which token each initial
grid cell belongs to), ``agg_weight (B, N_init, 1)`` (each cell's weight in
its token) and, passed through unchanged, ``map_size`` / ``init_grid_size``
(TCFormer) or ``mask`` (Chat-UniVi).

The clustering is :func:`setok_kernels.dpc_cluster` with
``densest_delta="global_max"``, ``num_centers=cluster_num``,
``center_order="score"`` and ``tie_break="index"``; the merge is one fused
:func:`setok_kernels.merge_clusters` with the peers' ``eps = 1e-6``.
Neither reads a tensor back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .functional import dpc_cluster, merge_clusters

__all__ = ["cluster_dpc_knn", "merge_tokens", "MERGE_EPS"]

# the peers' merge denominator: sum(w) + 1e-6
MERGE_EPS = 1e-6

_KEYS = ("x", "token_num", "idx_token", "agg_weight")


def cluster_dpc_knn(token_dict: dict, cluster_num: int, k: int = 5, token_mask: Optional[Tensor] = None):
    """Cluster ``token_dict["x"] (B, N, C)`` into ``cluster_num`` clusters by DPC-kNN.

    Returns ``(idx_cluster (B, N) int64, cluster_num)`` as TCFormer and
    Chat-UniVi do: distances ``||x_i - x_j|| / sqrt(C)``; density
    ``exp(-mean d^2 over the k nearest)`` (the token itself included);
    delta the distance to the nearest denser token, the image's largest
    distance for the densest; the ``cluster_num`` highest ``density * delta``
    become centres, numbered by descending score; every token takes the
    number of its nearest centre (ties: the higher-scored centre), and each
    centre its own.

    What differs from the peers:

    - no random noise: of two tokens of equal density the lower index counts
      as denser, and of equal scores the lower index ranks first, so
      duplicate tokens (repeated frames, flat patches) never crowd out real
      centres and the result is deterministic;
    - padded tokens (``token_mask == 0``) get ``idx_cluster = -1`` and are in
      no cluster (the peers put them in the cluster of their nearest centre,
      usually 0, and merge them), and their distances never count: the
      densest token's delta is the largest distance between real tokens
      (the peers use the batch's largest distance + 1 when padding is
      present); an image with fewer real tokens than ``cluster_num`` makes
      all of them centres and leaves the remaining cluster numbers empty;
    - distances are exact (differences, not the ``cdist`` matmul shortcut),
      accumulated in float32 (float64 for float64 ``x``);
    - ``k`` larger than N raises a ``ValueError``; on a padded image it is
      clamped to the image's real-token count.
    """
    x = token_dict["x"]
    mask = None if token_mask is None else token_mask > 0
    result = dpc_cluster(
        x, k, mask=mask, densest_delta="global_max", num_centers=cluster_num, center_order="score", tie_break="index"
    )
    return result.labels, cluster_num


def merge_tokens(token_dict: dict, idx_cluster: Tensor, cluster_num: int, token_weight: Optional[Tensor] = None) -> dict:
    """Merge the tokens of each cluster into one: the weighted mean ``sum(w x) / (sum(w) + 1e-6)``.

    ``token_weight (B, N, 1)`` (or ``(B, N)``) defaults to 1. Returns the
    peers' new ``token_dict``: ``x (B, cluster_num, C)``, ``token_num =
    cluster_num``, ``idx_token`` mapped through ``idx_cluster``,
    ``agg_weight`` times each token's share ``w / (sum(w) + 1e-6)`` of its
    cluster, the other keys passed through (``mask`` becomes 1 for the
    non-empty clusters, None when the input had none). Differentiable in
    ``x`` and ``token_weight`` (also through ``agg_weight``), as in the peers.

    Differs from the peers only where ``idx_cluster`` is -1 (the padded
    tokens of :func:`cluster_dpc_knn`): such a token is in no cluster, its
    share is 0 and the initial cells it held map to -1. ``merge_tokens``
    accepts the peers' own ``idx_cluster`` as well.
    """
    x = token_dict["x"]
    idx_token = token_dict["idx_token"]
    agg_weight = token_dict["agg_weight"]
    B, N, _ = x.shape
    weight = None if token_weight is None else token_weight.reshape(B, N)
    num = torch.full((B,), cluster_num, dtype=torch.int64, device=x.device)
    merged = merge_clusters(x, idx_cluster, num, cluster_num, weight=weight, eps=MERGE_EPS)

    member = idx_cluster >= 0
    slot = idx_cluster.clamp(min=0)
    denom = torch.gather(merged.weight_sum, 1, slot) + MERGE_EPS
    w = torch.ones_like(denom) if weight is None else weight.to(denom.dtype)
    share = torch.where(member, w / denom, 0)
    idx_token = idx_token.to(idx_cluster.device)
    agg_weight_new = agg_weight * torch.gather(share, 1, idx_token).to(agg_weight.dtype).view(agg_weight.shape)

    out = {key: value for key, value in token_dict.items() if key not in _KEYS}
    out.update(
        x=merged.tokens,
        token_num=cluster_num,
        idx_token=torch.gather(idx_cluster, 1, idx_token),
        agg_weight=agg_weight_new,
    )
    if "mask" in token_dict:
        mask = token_dict["mask"]
        # a cluster number left empty (an image with fewer real tokens) is padding
        out["mask"] = None if mask is None else (merged.counts > 0).to(mask.dtype)
    return out
