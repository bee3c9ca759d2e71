"""Pure-PyTorch reference of every setok op.

These functions define the semantics (SPEC.md), are the CPU fallback, and are
the oracle every kernel is tested against. They are exact: distances are
computed from differences (``torch.cdist`` without the matmul shortcut), so a
token's distance to itself and to its duplicates is exactly 0 and ties stay
ties. The clustering streams over row blocks: it never holds an N x N matrix
for an image, and it never reads a tensor value back to the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _validation as V

__all__ = [
    "ClusterResult",
    "Packing",
    "pairwise_distance",
    "knn_density",
    "density_delta",
    "select_centers",
    "assign_to_centers",
    "dpc_cluster",
    "pack_clusters",
    "segment_mean",
    "varlen_attention",
    "pad_segments",
    "unpad_segments",
]

# Elements of one (B, rows, N) distance block: bounds the streaming working set
# (float32: 16 MiB) independently of N.
_BLOCK_ELEMENTS = 1 << 22


class ClusterResult(NamedTuple):
    labels: torch.Tensor  # (B, N) int64, -1 for masked tokens
    num_clusters: torch.Tensor  # (B,) int64
    centers: torch.Tensor  # (B, M) int64, ascending, padded with -1
    score: torch.Tensor  # (B, N)
    density: torch.Tensor  # (B, N)
    delta: torch.Tensor  # (B, N)
    parent: torch.Tensor  # (B, N) int64, -1 where no denser token


class Packing(NamedTuple):
    perm: torch.Tensor  # (B*N,) int64: real tokens grouped by (image, cluster), then masked tokens
    cu_seqlens: torch.Tensor  # (B*M + 1,) int32: real segments first, then empty ones
    cu_clusters: torch.Tensor  # (B + 1,) int32
    max_seqlen: torch.Tensor  # () int64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid(mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask


def _row_blocks(B: int, N: int, cols: int):
    rows = max(1, _BLOCK_ELEMENTS // max(1, B * cols))
    for r0 in range(0, N, rows):
        yield r0, min(N, r0 + rows)


def _dist(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Exact scaled distance ``||a - b|| / sqrt(C)`` between row sets, (B, Ra, Rb)."""
    d = torch.cdist(xa, xb, compute_mode="donot_use_mm_for_euclid_dist")
    return d / math.sqrt(xa.shape[-1])


# ------------------------------------------------------------------ distances


def _pairwise_distance(x, mask):
    xf = x.to(acc_dtype(x.dtype))
    d = _dist(xf, xf)
    if mask is not None:
        pair = mask[:, :, None] & mask[:, None, :]
        d = d.masked_fill(~pair, math.inf)
    return d


def _knn_density(x, k, mask):
    B, N, _ = x.shape
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    valid = _valid(mask, x)
    # validation off: k is clamped per image to its real-token count
    k_img = valid.sum(1).clamp(max=k)
    take = torch.arange(k, device=x.device)[None, None, :] < k_img[:, None, None]
    density = torch.empty(B, N, dtype=acc, device=x.device)
    for r0, r1 in _row_blocks(B, N, N):
        d = _dist(xf[:, r0:r1], xf)
        d2 = (d * d).masked_fill(~valid[:, None, :], math.inf)
        nearest = d2.topk(k, dim=-1, largest=False, sorted=True).values
        total = torch.where(take, nearest, 0).sum(-1)
        density[:, r0:r1] = torch.exp(-total / k_img.clamp(min=1)[:, None])
    return torch.where(valid, density, 0)


def _density_delta(x, density, mask, densest_delta):
    B, N, _ = x.shape
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    dens = density.to(acc)
    valid = _valid(mask, x)
    delta = torch.empty(B, N, dtype=acc, device=x.device)
    parent = torch.empty(B, N, dtype=torch.int64, device=x.device)
    row_max = torch.empty(B, N, dtype=acc, device=x.device)
    for r0, r1 in _row_blocks(B, N, N):
        d = _dist(xf[:, r0:r1], xf)
        row_max[:, r0:r1] = d.masked_fill(~valid[:, None, :], -math.inf).amax(-1)
        denser = (dens[:, None, :] > dens[:, r0:r1, None]) & valid[:, None, :]
        # torch.min returns the first (smallest) index among equal minima
        best, idx = d.masked_fill(~denser, math.inf).min(-1)
        has = denser.any(-1)
        delta[:, r0:r1] = best
        parent[:, r0:r1] = torch.where(has, idx, -1)
    # the densest token's delta: "column_max" = min over j of max_l d(j, l)
    if densest_delta == "column_max":
        top = row_max.masked_fill(~valid, math.inf).amin(1)
    else:
        top = row_max.masked_fill(~valid, -math.inf).amax(1)
    delta = torch.where(parent < 0, top[:, None], delta)
    delta = torch.where(valid, delta, 0)
    parent = torch.where(valid, parent, -1)
    return delta, parent


# ------------------------------------------------------------ centres, labels


def _select_centers(score, mask, threshold, min_clusters, max_clusters):
    """Centres per image with tensor ops only (no host sync).

    Ranking by (score desc, index asc) puts the tokens above the threshold in
    a prefix, so "cap at max_clusters" and "fallback to the top min_clusters"
    are both rank cut-offs. ``num_clusters <= max_clusters`` always.
    """
    B, N = score.shape
    valid = _valid(mask, score)
    M = max_clusters
    key = score.masked_fill(~valid, -math.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=score.device).expand(B, N))
    above = valid & (score > threshold)
    use_threshold = above.any(1, keepdim=True)
    limit = torch.where(use_threshold, M, min(min_clusters, M))
    chosen = torch.where(use_threshold, above, valid) & (rank < limit)
    num = chosen.sum(1)
    pos = torch.where(chosen, torch.arange(N, device=score.device), N)
    pos = torch.sort(pos, dim=1).values
    if M > N:
        pos = torch.nn.functional.pad(pos, (0, M - N), value=N)
    centers = pos[:, :M]
    centers = torch.where(centers == N, -1, centers)
    return centers, num


def _assign_to_centers(x, centers, num_clusters, mask):
    B, N, _ = x.shape
    M = centers.shape[1]
    xf = x.to(acc_dtype(x.dtype))
    valid = _valid(mask, x)
    slot_ok = torch.arange(M, device=x.device)[None, :] < num_clusters[:, None]
    safe = torch.where(slot_ok, centers, 0).clamp(0, N - 1)
    cx = torch.gather(xf, 1, safe[:, :, None].expand(B, M, xf.shape[2]))
    labels = torch.empty(B, N, dtype=torch.int64, device=x.device)
    for r0, r1 in _row_blocks(B, N, M):
        d = _dist(xf[:, r0:r1], cx).masked_fill(~slot_ok[:, None, :], math.inf)
        labels[:, r0:r1] = d.argmin(-1)  # first minimum: the earlier centre
    labels = torch.where(valid & (num_clusters[:, None] > 0), labels, -1)
    # a centre labels itself, even when an earlier centre is its duplicate
    target = torch.where(slot_ok, safe, N)
    own = torch.arange(M, device=x.device).expand(B, M)
    padded = torch.nn.functional.pad(labels, (0, 1))
    padded.scatter_(1, target, own)
    return padded[:, :N].contiguous()


def _dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta):
    N = x.shape[1]
    M = max_clusters or N
    density = _knn_density(x, k, mask)
    delta, parent = _density_delta(x, density, mask, densest_delta)
    score = density * delta
    centers, num = _select_centers(score, mask, threshold, min_clusters, M)
    labels = _assign_to_centers(x, centers, num, mask)
    return ClusterResult(labels, num, centers, score, density, delta, parent)


# ------------------------------------------------------------ ragged packing


def _pack_clusters(labels, num_clusters, max_clusters):
    B, N = labels.shape
    M = max_clusters
    dev = labels.device
    key = torch.where(labels >= 0, torch.arange(B, device=dev)[:, None] * M + labels, B * M).flatten()
    sorted_key, perm = torch.sort(key, stable=True)
    # segment lengths by binary search on the sorted keys (deterministic, no atomics)
    bounds = torch.searchsorted(sorted_key, torch.arange(B * M + 1, device=dev))
    lengths = (bounds[1:] - bounds[:-1]).view(B, M)
    num = num_clusters.clamp(0, M)
    live = torch.arange(M, device=dev)[None, :] < num[:, None]
    # real segments first (image order kept), empty trailing segments after
    order = torch.sort((~live).flatten().to(torch.int8), stable=True).indices
    seg = lengths.flatten()[order]
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    cu_seqlens = torch.cat([zero, seg.cumsum(0)]).to(torch.int32)
    cu_clusters = torch.cat([zero, num.cumsum(0)]).to(torch.int32)
    max_seqlen = lengths.max() if lengths.numel() else torch.zeros((), dtype=torch.int64, device=dev)
    return Packing(perm, cu_seqlens, cu_clusters, max_seqlen)


def _segment_mean(x, cu_seqlens):
    acc = acc_dtype(x.dtype)
    offsets = cu_seqlens.to(torch.int64)
    total = torch.segment_reduce(x.to(acc), "sum", offsets=offsets, axis=0, unsafe=True, initial=0)
    count = (offsets[1:] - offsets[:-1]).clamp(min=1).to(acc)
    return (total / count[:, None]).to(x.dtype)


def _segment_ids(cu_seqlens: torch.Tensor, T: int):
    """Segment of each packed row, and whether the row lies in any segment."""
    rows = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seg = torch.searchsorted(cu_seqlens[1:], rows, right=True)
    inside = rows < cu_seqlens[-1]
    S = cu_seqlens.numel() - 1
    return seg.clamp(max=max(S - 1, 0)), inside


def _segment_mean_backward(grad, cu_seqlens, T):
    acc = acc_dtype(grad.dtype)
    offsets = cu_seqlens.to(torch.int64)
    count = (offsets[1:] - offsets[:-1]).clamp(min=1).to(acc)
    scaled = grad.to(acc) / count[:, None]
    if grad.shape[0] == 0:
        return torch.zeros(T, grad.shape[1], dtype=grad.dtype, device=grad.device)
    seg, inside = _segment_ids(offsets, T)
    return torch.where(inside[:, None], scaled[seg], 0).to(grad.dtype)


# ------------------------------------------------------------ attention


def _bucket_width(n: torch.Tensor) -> torch.Tensor:
    """Padded length of a segment of n rows: the next power of two up to 16, then
    the next multiple of a quarter of the next power of two (<= 25% padding)."""
    powers = torch.pow(2, torch.arange(62, device=n.device, dtype=torch.int64))
    n = n.clamp(min=1)
    p = powers[torch.searchsorted(powers, n)]
    step = (p // 4).clamp(min=1)
    return torch.where(p <= 16, p, (n + step - 1) // step * step)


def _attention_buckets(cu_q, cu_k):
    """Group the segments that have queries and keys by (padded q length, padded k length).

    Few widths per octave (``_bucket_width``), so a handful of groups run
    whatever the number of segments. Building the groups reads the lengths
    on the host: the reference is not a capturable path.
    """
    lq = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
    lk = (cu_k[1:] - cu_k[:-1]).to(torch.int64)
    # a segment without queries or without keys contributes nothing (output 0)
    key = torch.where((lq > 0) & (lk > 0), (_bucket_width(lq) << 31) + _bucket_width(lk), -1)
    order = torch.argsort(key, stable=True)
    values, counts = torch.unique_consecutive(key[order], return_counts=True)
    groups, start = [], 0
    for g, n in zip(values.tolist(), counts.tolist()):
        if g >= 0:
            groups.append((order[start : start + n], g >> 31, g & ((1 << 31) - 1)))
        start += n
    return lq, lk, groups


def _padded_rows(starts, lengths, width):
    """Row indices ``(G, width)`` of each segment padded to ``width``, and which are real.

    Padding repeats the segment's last row, so padded positions read finite
    data of the same segment (never another segment's NaN) and are masked.
    """
    i = torch.arange(width, device=starts.device)
    real = i[None, :] < lengths[:, None]
    rows = starts[:, None] + torch.minimum(i[None, :], lengths[:, None] - 1)
    return rows, real


def _varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    Tq, H, D = q.shape
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    # one scratch row past the end receives every padded position
    out = torch.zeros(Tq + 1, H, D, dtype=acc, device=q.device)
    lse = torch.full((Tq + 1, H), -math.inf, dtype=torch.float32, device=q.device)
    if cu_q.numel() >= 2 and Tq > 0 and k.shape[0] > 0:
        lq, lk, groups = _attention_buckets(cu_q, cu_k)
        cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        for segs, wq, wk in groups:
            qi, q_real = _padded_rows(cu_q[segs], lq[segs], wq)
            ki, k_real = _padded_rows(cu_k[segs], lk[segs], wk)
            s = torch.einsum("gqhd,gkhd->ghqk", q[qi], k[ki]) * scale
            s = s.masked_fill(~k_real[:, None, None, :], -math.inf)
            o = torch.einsum("ghqk,gkhd->gqhd", torch.softmax(s, -1), v[ki])
            dst = torch.where(q_real, qi, Tq)
            out.index_put_((dst,), o)
            lse.index_put_((dst,), torch.logsumexp(s, -1).transpose(1, 2).to(torch.float32))
    return out[:Tq].to(dtype), lse[:Tq].t().contiguous()


def _varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """Gradients from the saved log-sum-exp: P = exp(S - lse), dS = P * (dP - rowsum(dO * O)).

    Every real query and key row lies in one segment, so each gradient row is
    written once (padded positions go to a scratch row): no accumulation.
    """
    Tq, Tk = q.shape[0], k.shape[0]
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    dq = torch.zeros((Tq + 1,) + q.shape[1:], dtype=acc, device=q.device)
    dk = torch.zeros((Tk + 1,) + k.shape[1:], dtype=acc, device=q.device)
    dv = torch.zeros((Tk + 1,) + v.shape[1:], dtype=acc, device=q.device)
    if cu_q.numel() >= 2 and Tq > 0 and Tk > 0:
        lq, lk, groups = _attention_buckets(cu_q, cu_k)
        cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
        q, k, v, dout = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
        delta = (dout * out.to(acc)).sum(-1)  # (Tq, H)
        row_stats = lse.t().to(acc)  # (Tq, H)
        for segs, wq, wk in groups:
            qi, q_real = _padded_rows(cu_q[segs], lq[segs], wq)
            ki, k_real = _padded_rows(cu_k[segs], lk[segs], wk)
            qs, ks, vs, dos = q[qi], k[ki], v[ki], dout[qi]
            s = torch.einsum("gqhd,gkhd->ghqk", qs, ks) * scale
            pair = q_real[:, None, :, None] & k_real[:, None, None, :]
            p = torch.exp(s - row_stats[qi].transpose(1, 2)[..., None]).masked_fill(~pair, 0)
            dp = torch.einsum("gqhd,gkhd->ghqk", dos, vs)
            ds = p * (dp - delta[qi].transpose(1, 2)[..., None])
            dq.index_put_((torch.where(q_real, qi, Tq),), torch.einsum("ghqk,gkhd->gqhd", ds, ks) * scale)
            k_dst = (torch.where(k_real, ki, Tk),)
            dk.index_put_(k_dst, torch.einsum("ghqk,gqhd->gkhd", ds, qs) * scale)
            dv.index_put_(k_dst, torch.einsum("ghqk,gqhd->gkhd", p, dos))
    return dq[:Tq].to(dtype), dk[:Tk].to(dtype), dv[:Tk].to(dtype)


# ------------------------------------------------------------ pad / unpad


def pad_segments(x, cu_clusters, max_clusters):
    """Packed segment rows ``(S, ...)`` -> ``(B, M, ...)`` and a key mask ``(B, M)``.

    Image b's rows are ``x[cu_clusters[b]:cu_clusters[b+1]]``; differentiable in x.
    """
    B = cu_clusters.numel() - 1
    M = max_clusters
    starts = cu_clusters[:-1].to(torch.int64)
    count = (cu_clusters[1:] - cu_clusters[:-1]).to(torch.int64).clamp(0, M)
    slot = torch.arange(M, device=x.device)
    key_mask = slot[None, :] < count[:, None]
    idx = (starts[:, None] + slot[None, :]).clamp(max=max(x.shape[0] - 1, 0))
    if x.shape[0] == 0:
        return x.new_zeros(B, M, *x.shape[1:]), key_mask
    rows = x[torch.where(key_mask, idx, 0)]
    shape = (B, M) + (1,) * (x.dim() - 1)
    return torch.where(key_mask.view(shape), rows, 0), key_mask


def unpad_segments(padded, key_mask, cu_clusters, num_rows):
    """Inverse of :func:`pad_segments`: ``(B, M, ...)`` -> ``(num_rows, ...)`` packed."""
    B, M = key_mask.shape
    starts = cu_clusters[:-1].to(torch.int64)
    idx = starts[:, None] + torch.arange(M, device=padded.device)[None, :]
    # rows of empty slots all land in one scratch row past the end (no host sync)
    target = torch.where(key_mask, idx, num_rows).flatten()
    out = padded.new_zeros((num_rows + 1,) + tuple(padded.shape[2:]))
    return out.index_put((target,), padded.flatten(0, 1))[:num_rows]


# ------------------------------------------------------------ public reference API


def pairwise_distance(x, mask=None):
    B, N, _ = V.features(x)
    V.mask(mask, B, N, x)
    return _pairwise_distance(x, mask)


def knn_density(x, k, mask=None):
    B, N, _ = V.features(x)
    V.mask(mask, B, N, x)
    V.k_neighbours(k, N)
    return _knn_density(x, k, mask)


def density_delta(x, density, mask=None, densest_delta="column_max"):
    B, N, _ = V.features(x)
    V.mask(mask, B, N, x)
    V.per_token(density, B, N, x, "density", dtypes=V.FLOAT_DTYPES)
    V.densest_delta(densest_delta)
    return _density_delta(x, density, mask, densest_delta)


def select_centers(score, threshold=0.5, min_clusters=8, max_clusters=None, mask=None):
    V.tensor(score, "score")
    if score.dim() != 2:
        raise ValueError(f"score must have shape (B, N), got {tuple(score.shape)}")
    B, N = score.shape
    V.mask(mask, B, N, score, "score")
    V.threshold(threshold)
    V.positive(min_clusters, "min_clusters")
    if max_clusters is not None:
        V.positive(max_clusters, "max_clusters")
    return _select_centers(score, mask, threshold, min_clusters, max_clusters or N)


def assign_to_centers(x, centers, num_clusters, mask=None):
    B, N, _ = V.features(x)
    V.mask(mask, B, N, x)
    return _assign_to_centers(x, centers, num_clusters, mask)


def dpc_cluster(x, k=5, threshold=0.5, min_clusters=8, max_clusters=None, mask=None, densest_delta="column_max"):
    B, N, _ = V.features(x)
    V.mask(mask, B, N, x)
    V.k_neighbours(k, N)
    V.threshold(threshold)
    V.positive(min_clusters, "min_clusters")
    if max_clusters is not None:
        V.positive(max_clusters, "max_clusters")
    V.densest_delta(densest_delta)
    return _dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta)


def pack_clusters(labels, num_clusters, max_clusters=None):
    return _pack_clusters(labels, num_clusters, max_clusters or labels.shape[1])


def segment_mean(x, cu_seqlens):
    return _segment_mean(x, cu_seqlens)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, scale=None):
    """Differentiable reference attention (plain autograd over the bucketed math)."""
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if max_seqlen_q is None and cu_seqlens_q.numel() > 1 else (max_seqlen_q or 0)
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_seqlen_k is None and cu_k.numel() > 1 else (max_seqlen_k or 0)
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_k, max_q, max_k, scale)[0]


# ------------------------------------------------------------ registration


def _register() -> None:
    from ._backends import Impl, register

    everything = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ints = (torch.int64, torch.int32)
    table = {
        "pairwise_distance": (_pairwise_distance, everything),
        "knn_density": (_knn_density, everything),
        "density_delta": (_density_delta, everything),
        "select_centers": (_select_centers, everything),
        "assign_to_centers": (_assign_to_centers, everything),
        "dpc_cluster": (_dpc_cluster, everything),
        "pack_clusters": (_pack_clusters, ints),
        "segment_mean": (_segment_mean, everything),
        "segment_mean_backward": (_segment_mean_backward, everything),
        "varlen_attention": (_varlen_attention, everything),
        "varlen_attention_backward": (_varlen_attention_backward, everything),
    }
    for op, (fn, dtypes) in table.items():
        # last resort under "auto" on every device
        register(Impl(op=op, name="reference", fn=fn, priority=100, devices=None, dtypes=dtypes))


_register()
