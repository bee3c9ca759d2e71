"""What setok is measured against: the ways to compute the same thing without it.

Clustering (DPC-kNN, SPEC.md semantics, no mask, ``densest_delta="column_max"``):
- ``dpc_per_image``: SeTok's way, one image at a time on the full N x N
  distance matrix, centres found with host reads (``nonzero``, a branch);
- ``dpc_batched``: the batched PyTorch way, ``cdist`` + ``topk`` on
  (B, N, N) and delta as a masked min over (B, N, N), no host read;
- ``dpc_keops``: the same with KeOps lazy reductions (no N x N in memory),
  when pykeops is installed.
Each returns ``(labels (B, N), num_clusters (B,))``.

Attention (non-causal, inside each segment of the packed ``(T, H, D)``):
per-segment SDPA loop, padded SDPA with a key mask, SDPA on nested (jagged)
tensors, and flash-attn / xformers called directly.

Packing: SeTok's per-cluster loop and a sort-based PyTorch version;
segment means by loop and by ``index_add_``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------ clustering


def _rank_select(score: torch.Tensor, threshold: float, min_clusters: int):
    """Centres (B, N) ascending, padded with N, and their count: the tokens above
    the threshold, else the ``min_clusters`` of highest score."""
    B, N = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    above = (score > threshold).sum(1)
    num = torch.where(above > 0, above, min(min_clusters, N))
    chosen = torch.zeros_like(score, dtype=torch.bool)
    chosen.scatter_(1, order, torch.arange(N, device=score.device).expand(B, N) < num[:, None])
    centers = torch.where(chosen, torch.arange(N, device=score.device), N).sort(1).values
    return centers, num


def dpc_batched(x: torch.Tensor, k: int, threshold: float, min_clusters: int):
    B, N, C = x.shape
    xf = x.float()
    d = torch.cdist(xf, xf) / math.sqrt(C)  # (B, N, N)
    density = torch.exp(-(d.topk(k, dim=-1, largest=False).values ** 2).mean(-1))
    denser = density[:, None, :] > density[:, :, None]  # (B, N, N)
    delta = torch.where(denser, d, math.inf).amin(-1)
    top = d.amax(1).amin(1)  # min over tokens of the column max
    delta = torch.where(denser.any(-1), delta, top[:, None])
    centers, num = _rank_select(density * delta, threshold, min_clusters)
    live = torch.arange(N, device=x.device)[None, :] < num[:, None]
    safe = centers.clamp(max=N - 1)
    to_centers = torch.gather(d, 2, safe[:, None, :].expand(B, N, N))
    labels = to_centers.masked_fill(~live[:, None, :], math.inf).argmin(-1)
    # a centre labels itself; padded slots land on a scratch column
    labels = F.pad(labels, (0, 1)).scatter_(1, torch.where(live, centers, N), torch.arange(N, device=x.device).expand(B, N))
    return labels[:, :N], num


def dpc_per_image(x: torch.Tensor, k: int, threshold: float, min_clusters: int):
    B, N, C = x.shape
    labels, nums = [], []
    for img in x.float():
        d = torch.cdist(img, img) / math.sqrt(C)
        density = torch.exp(-(d.topk(k, dim=-1, largest=False).values ** 2).mean(-1))
        denser = density[None, :] > density[:, None]
        delta = torch.where(denser, d, math.inf).amin(-1)
        delta = torch.where(denser.any(-1), delta, d.amax(0).amin())
        score = density * delta
        centers = (score > threshold).nonzero().flatten()  # host read
        if centers.numel() == 0:  # host read
            centers = score.topk(min(min_clusters, N)).indices.sort().values
        lab = d[:, centers].argmin(-1)
        lab[centers] = torch.arange(centers.numel(), device=x.device)
        labels.append(lab)
        nums.append(centers.numel())
    return torch.stack(labels), torch.tensor(nums)


def keops_available() -> Optional[str]:
    """None when pykeops can be used, else why not."""
    import importlib.util

    return None if importlib.util.find_spec("pykeops") else "pykeops is not installed"


def dpc_keops(x: torch.Tensor, k: int, threshold: float, min_clusters: int):
    from pykeops.torch import LazyTensor

    B, N, C = x.shape
    xf = x.float().contiguous()
    xi, xj = LazyTensor(xf[:, :, None, :]), LazyTensor(xf[:, None, :, :])
    d2 = ((xi - xj) ** 2).sum(-1) / C  # squared scaled distance, lazy (B, N, N)
    density = torch.exp(-d2.Kmin(k, dim=2).mean(-1))  # (B, N)
    di, dj = LazyTensor(density[:, :, None, None]), LazyTensor(density[:, None, :, None])
    # j not denser than i (density_i - density_j >= 0): pushed past every real distance
    delta2 = (d2 + (di - dj).step() * 1e30).min(dim=2).squeeze(-1)
    top = d2.max(dim=2).squeeze(-1).amin(1).sqrt()  # symmetric: row max = column max
    delta = torch.where(delta2 < 1e29, delta2.clamp(min=0).sqrt(), top[:, None])
    centers, num = _rank_select(density * delta, threshold, min_clusters)
    live = torch.arange(N, device=x.device)[None, :] < num[:, None]
    cx = torch.gather(xf, 1, centers.clamp(max=N - 1)[:, :, None].expand(B, N, C))
    ci = LazyTensor(cx[:, None, :, :])
    dead = LazyTensor((~live).float()[:, None, :, None])
    labels = (((xi - ci) ** 2).sum(-1) + dead * 1e30).argmin(dim=2).squeeze(-1).long()
    labels = F.pad(labels, (0, 1)).scatter_(1, torch.where(live, centers, N), torch.arange(N, device=x.device).expand(B, N))
    return labels[:, :N], num


# ------------------------------------------------------------------ attention


def attention_per_segment(q, k, v, bounds: list[tuple[int, int]], scale: float):
    """One SDPA call per segment; ``bounds`` are host (start, end) pairs."""
    out = torch.zeros_like(q)
    for s, e in bounds:
        seg = lambda t: t[s:e].transpose(0, 1)[None]  # (1, H, L, D)
        out[s:e] = F.scaled_dot_product_attention(seg(q), seg(k), seg(v), scale=scale)[0].transpose(0, 1)
    return out


def padding_index(cu_seqlens: torch.Tensor, max_len: int):
    """(S, L) row index into the packed tensor and its validity mask."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    slot = torch.arange(max_len, device=cu_seqlens.device)
    valid = slot[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + slot[None, :], 0), valid


def attention_padded(q, k, v, index: torch.Tensor, valid: torch.Tensor, scale: float):
    """Pad every segment to the longest, one batched SDPA with a key mask, unpad."""
    pad = lambda t: t[index].permute(0, 2, 1, 3)  # (S, H, L, D)
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], scale=scale)
    out = torch.empty_like(q)
    out[index[valid]] = o.permute(0, 2, 1, 3)[valid]
    return out


def attention_nested(q, k, v, offsets: torch.Tensor, scale: float):
    """SDPA on jagged nested tensors (PyTorch's own varlen path)."""
    nest = lambda t: torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)  # (S, H, j, D)
    o = F.scaled_dot_product_attention(nest(q), nest(k), nest(v), scale=scale)
    return o.transpose(1, 2).values()


def attention_flash_attn(q, k, v, cu_seqlens, max_len: int, scale: float):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale)


def xformers_bias(lengths: list[int]):
    from xformers.ops import fmha

    return fmha.attn_bias.BlockDiagonalMask.from_seqlens(lengths)


def attention_xformers(q, k, v, bias, scale: float):
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


# ------------------------------------------------------------------ packing


def pack_per_cluster(labels: torch.Tensor, num_clusters: list[int]):
    """SeTok's way: for each image and cluster, the token indices of that cluster."""
    B, N = labels.shape
    pieces, lengths = [], []
    for b in range(B):
        for c in range(num_clusters[b]):
            idx = (labels[b] == c).nonzero().flatten() + b * N
            pieces.append(idx)
            lengths.append(idx.numel())
    return torch.cat(pieces), lengths


def pack_sorted(labels: torch.Tensor, num_clusters: torch.Tensor, max_clusters: int):
    """Stable sort on (image, cluster) keys, segment lengths by bincount."""
    B, N = labels.shape
    key = (torch.arange(B, device=labels.device)[:, None] * max_clusters + labels).flatten()
    perm = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=B * max_clusters)
    live = (torch.arange(max_clusters, device=labels.device)[None, :] < num_clusters[:, None]).flatten()
    cu = F.pad(counts[live].cumsum(0), (1, 0)).to(torch.int32)
    return perm, cu


def segment_mean_loop(x: torch.Tensor, bounds: list[tuple[int, int]]):
    return torch.stack([x[s:e].mean(0) for s, e in bounds])


def segment_mean_index_add(x: torch.Tensor, segment_ids: torch.Tensor, counts: torch.Tensor):
    total = torch.zeros(counts.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    total.index_add_(0, segment_ids, x.float())
    return (total / counts.clamp(min=1)[:, None]).to(x.dtype)
