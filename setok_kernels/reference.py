"""Pure-PyTorch reference of every setok op.

These functions define the semantics (SPEC.md), are the CPU fallback, and are
the oracle every kernel is tested against. They are exact: distances are
computed from differences (``torch.cdist`` without the matmul shortcut), so a
token's distance to itself and to its duplicates is exactly 0 and ties stay
ties. Each image is first divided by a power of two (``image_scale``: exact),
so huge or tiny features give finite float32 distances. The clustering
streams over row blocks: it never holds an N x N matrix for an image, and it
never reads a tensor value back to the host; nor do packing, segment means
and merging. Attention reads its segment lengths once, to group segments by
padded length (``_attention_buckets``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _validation as V
from ._segments import acc_dtype, clamped_offsets, row_segments

# The public API, declared once: setok_kernels.functional defines a validating
# function under each of these names, and the package exports them.
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
    "merge_clusters",
    "MergeResult",
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


def _valid(mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask


def _row_blocks(B: int, N: int, cols: int):
    rows = max(1, _BLOCK_ELEMENTS // max(1, B * cols))
    for r0 in range(0, N, rows):
        yield r0, min(N, r0 + rows)


def _dist(xa: torch.Tensor, xb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact scaled distance ``||a - b|| / sqrt(C)``, (B, Ra, Rb), of rows given divided by ``s`` (B,)."""
    d = torch.cdist(xa, xb, compute_mode="donot_use_mm_for_euclid_dist")
    return d / math.sqrt(xa.shape[-1]) * s[:, None, None]


def image_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, 1 / s)`` per image from its largest real |x| (B,): a power of two with ``|x| / s < 2``.

    Distances are computed on ``x / s`` and multiplied back by ``s``. Scaling
    by a power of two is exact, so results are bit-identical to unscaled ones
    wherever those neither overflow nor underflow, and stay finite where they
    would (float32 squared distances overflow from |x| ~ 1e19 and underflow
    below ~1e-19). ``s`` and ``1 / s`` are normal numbers of ``amax``'s dtype;
    an image holding NaN or Inf (or only zeros) gets ``s = 1``.
    """
    fi = torch.finfo(amax.dtype)
    lo, hi = math.frexp(fi.tiny)[1], math.frexp(fi.max)[1]  # float32: -125, 128
    e = torch.frexp(amax).exponent.clamp(lo + 1, hi - 1) - 1
    e = torch.where(torch.isfinite(amax) & (amax > 0), e, 0)
    one = torch.ones_like(amax)
    return torch.ldexp(one, e), torch.ldexp(one, -e)


def _scaled(x, valid):
    """``(x / s, s)`` in the accumulation dtype (see :func:`image_scale`)."""
    amax = torch.where(valid[..., None], x.abs(), 0).amax((1, 2)).to(acc_dtype(x.dtype))
    s, inv = image_scale(amax)
    return x.to(s.dtype) * inv[:, None, None], s


def column_max_cap(
    rmax: torch.Tensor, density: torch.Tensor, valid: torch.Tensor, tie_break: str = "none"
) -> torch.Tensor:
    """``cap_i = min of rmax_j over the real j not denser than i`` (SPEC, ``"column_max"``), (B, N).

    Per image: sort by density, take a running minimum of ``rmax`` in that
    order, and read it at the last token whose density is <= density_i, so
    tokens of equal density share one cap. With ``tie_break="index"`` the
    order is total (equal density: the higher index is the less dense) and
    each token reads its own position. Batched sort + scan + searchsorted:
    no N x N memory, no host read. Masked tokens carry ``rmax = +inf``.
    """
    B, N = rmax.shape
    key = density.masked_fill(~valid, math.inf)
    r = rmax.masked_fill(~valid, math.inf)
    if tie_break == "index":
        # stable sort of the reversed axis: equal densities in descending index
        order = (N - 1) - torch.sort(key.flip(1), dim=1, stable=True).indices
        pos = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=rmax.device).expand(B, N))
    else:
        sorted_key, order = torch.sort(key, dim=1, stable=True)
        pos = (torch.searchsorted(sorted_key, key.contiguous(), right=True) - 1).clamp(0, N - 1)
    running = torch.gather(r, 1, order).cummin(1).values
    return torch.gather(running, 1, pos)


def _denser(dens_cols: torch.Tensor, dens_rows: torch.Tensor, r0: int, tie_break: str) -> torch.Tensor:
    """(B, rows, N): column j counts as denser than row i (with ``"index"``, ties go to the lower index)."""
    denser = dens_cols[:, None, :] > dens_rows[:, :, None]
    if tie_break == "index":
        rows = torch.arange(r0, r0 + dens_rows.shape[1], device=dens_cols.device)
        cols = torch.arange(dens_cols.shape[1], device=dens_cols.device)
        denser |= (dens_cols[:, None, :] == dens_rows[:, :, None]) & (cols[None, :] < rows[:, None])[None]
    return denser


def score_of(density: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``density * delta``; 0 where the density underflowed to 0 (even if delta overflowed to inf)."""
    return torch.where(density == 0, 0, density * delta)


# ------------------------------------------------------------------ distances


def _pairwise_distance(x, mask):
    valid = _valid(mask, x)
    xs, s = _scaled(x, valid)
    d = _dist(xs, xs, s)
    if mask is not None:
        pair = mask[:, :, None] & mask[:, None, :]
        d = d.masked_fill(~pair, math.inf)
    return d


def _knn_density(x, k, mask):
    B, N, _ = x.shape
    valid = _valid(mask, x)
    xs, s = _scaled(x, valid)
    # validation off: k is clamped per image to its real-token count
    k_img = valid.sum(1).clamp(max=k)
    take = torch.arange(k, device=x.device)[None, None, :] < k_img[:, None, None]
    density = torch.empty(B, N, dtype=xs.dtype, device=x.device)
    for r0, r1 in _row_blocks(B, N, N):
        d = _dist(xs[:, r0:r1], xs, s)
        d2 = (d * d).masked_fill(~valid[:, None, :], math.inf)
        nearest = d2.topk(k, dim=-1, largest=False, sorted=True).values
        total = torch.where(take, nearest, 0).sum(-1)
        density[:, r0:r1] = torch.exp(-total / k_img.clamp(min=1)[:, None])
    return torch.where(valid, density, 0)


def _density_delta(x, density, mask, densest_delta, tie_break):
    B, N, _ = x.shape
    valid = _valid(mask, x)
    xs, s = _scaled(x, valid)
    dens = density.to(xs.dtype)
    delta = torch.empty(B, N, dtype=xs.dtype, device=x.device)
    parent = torch.empty(B, N, dtype=torch.int64, device=x.device)
    row_max = torch.empty(B, N, dtype=xs.dtype, device=x.device)
    for r0, r1 in _row_blocks(B, N, N):
        d = _dist(xs[:, r0:r1], xs, s)
        row_max[:, r0:r1] = d.masked_fill(~valid[:, None, :], -math.inf).amax(-1)
        denser = _denser(dens, dens[:, r0:r1], r0, tie_break) & valid[:, None, :]
        # torch.min returns the first (smallest) index among equal minima
        best, idx = d.masked_fill(~denser, math.inf).min(-1)
        delta[:, r0:r1] = best  # +inf where no token is denser
        parent[:, r0:r1] = torch.where(denser.any(-1), idx, -1)
    if densest_delta == "column_max":
        # D(i, j) = rmax_j for every j not denser than i: caps every token
        delta = torch.minimum(delta, column_max_cap(row_max, dens, valid, tie_break))
    else:
        top = row_max.masked_fill(~valid, -math.inf).amax(1)
        delta = torch.where(parent < 0, top[:, None], delta)
    delta = torch.where(valid, delta, 0)
    parent = torch.where(valid, parent, -1)
    return delta, parent


# ------------------------------------------------------------ centres, labels


def order_centers_by_score(centers: torch.Tensor, num_clusters: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Centres in ascending index (-1 padded) -> by descending score, ties by index (a stable sort)."""
    M = centers.shape[1]
    live = torch.arange(M, device=centers.device)[None, :] < num_clusters[:, None]
    key = torch.gather(score, 1, centers.clamp(min=0)).masked_fill(~live, -math.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # padding stays last
    return torch.gather(centers, 1, order)


def _select_centers(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order):
    """Centres per image with tensor ops only (no host sync).

    The candidates are the tokens above the threshold, else every real token
    (always every real token with ``num_centers``); ranking them by (score
    desc, index asc) makes "cap at max_clusters", "fallback to the top
    min_clusters" and "exactly the top num_centers" all rank cut-offs.
    ``num_clusters <= max_clusters`` always.
    """
    B, N = score.shape
    valid = _valid(mask, score)
    M = max_clusters
    arange = torch.arange(N, device=score.device).expand(B, N)
    if num_centers:
        candidate, limit = valid, M
    else:
        above = valid & (score > threshold)
        use_threshold = above.any(1, keepdim=True)
        candidate = torch.where(use_threshold, above, valid)
        limit = torch.where(use_threshold, M, min(min_clusters, M))
    # rank the candidates only (a NaN score ranks first, as in a descending sort,
    # but never takes a slot it is not a candidate for), then the others
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    others_last = torch.sort((~torch.gather(candidate, 1, order)).to(torch.int8), dim=1, stable=True).indices
    order = torch.gather(order, 1, others_last)
    rank = torch.empty_like(order).scatter_(1, order, arange)
    chosen = candidate & (rank < limit)
    num = chosen.sum(1)
    pos = torch.sort(torch.where(chosen, arange, N), dim=1).values
    if M > N:
        pos = torch.nn.functional.pad(pos, (0, M - N), value=N)
    centers = pos[:, :M]
    centers = torch.where(centers == N, -1, centers)
    if center_order == "score":
        centers = order_centers_by_score(centers, num, score)
    return centers, num


def _assign_to_centers(x, centers, num_clusters, mask, metric):
    B, N, _ = x.shape
    M = centers.shape[1]
    valid = _valid(mask, x)
    xs, s = _scaled(x, valid)
    slot_ok = torch.arange(M, device=x.device)[None, :] < num_clusters[:, None]
    safe = torch.where(slot_ok, centers, 0).clamp(0, N - 1)
    cx = torch.gather(xs, 1, safe[:, :, None].expand(B, M, xs.shape[2]))
    if metric == "cosine":
        norm = xs.norm(dim=-1)
        inv = torch.where(norm > 0, 1 / torch.where(norm > 0, norm, 1), 0)  # a zero vector: similarity 0
        inv_c = torch.gather(inv, 1, safe)
    labels = torch.empty(B, N, dtype=torch.int64, device=x.device)
    for r0, r1 in _row_blocks(B, N, M * (xs.shape[2] if metric == "cosine" else 1)):
        # first extremum: the earlier centre on ties
        if metric == "cosine":
            # one elementwise reduction per pair, not a GEMM whose blocking
            # rounds columns differently: a centre that is a power-of-two
            # multiple of an earlier one then ties exactly, and loses
            dot = (xs[:, r0:r1, None, :] * cx[:, None, :, :]).sum(-1)
            sim = dot * inv[:, r0:r1, None] * inv_c[:, None, :]
            labels[:, r0:r1] = sim.masked_fill(~slot_ok[:, None, :], -math.inf).argmax(-1)
        else:
            d = _dist(xs[:, r0:r1], cx, s).masked_fill(~slot_ok[:, None, :], math.inf)
            labels[:, r0:r1] = d.argmin(-1)
    labels = torch.where(valid & (num_clusters[:, None] > 0), labels, -1)
    # a centre labels itself, even when an earlier centre is its duplicate
    target = torch.where(slot_ok, safe, N)
    own = torch.arange(M, device=x.device).expand(B, M)
    padded = torch.nn.functional.pad(labels, (0, 1))
    padded.scatter_(1, target, own)
    return padded[:, :N].contiguous()


def _dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order,
                 tie_break):
    density = _knn_density(x, k, mask)
    delta, parent = _density_delta(x, density, mask, densest_delta, tie_break)
    score = score_of(density, delta)
    centers, num = _select_centers(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order)
    labels = _assign_to_centers(x, centers, num, mask, "euclidean")
    return ClusterResult(labels, num, centers, score, density, delta, parent)


# ------------------------------------------------------------ ragged packing


def _pack_clusters(labels, num_clusters, max_clusters):
    B, N = labels.shape
    M = max_clusters
    dev = labels.device
    num = num_clusters.clamp(0, M)
    # packed: 0 <= label < num[b]; any other label (validation off) is unlabelled, as in the native kernels
    packed = (labels >= 0) & (labels < num[:, None])
    key = torch.where(packed, torch.arange(B, device=dev)[:, None] * M + labels, B * M).flatten()
    sorted_key, perm = torch.sort(key, stable=True)
    # segment lengths by binary search on the sorted keys (deterministic, no atomics)
    bounds = torch.searchsorted(sorted_key, torch.arange(B * M + 1, device=dev))
    lengths = (bounds[1:] - bounds[:-1]).view(B, M)
    live = torch.arange(M, device=dev)[None, :] < num[:, None]
    # real segments first (image order kept), empty trailing segments after
    order = torch.sort((~live).flatten().to(torch.int8), stable=True).indices
    seg = lengths.flatten()[order]
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    cu_seqlens = torch.cat([zero, seg.cumsum(0)]).to(torch.int32)
    cu_clusters = torch.cat([zero, num.cumsum(0)]).to(torch.int32)
    max_seqlen = lengths.max() if lengths.numel() else torch.zeros((), dtype=torch.int64, device=dev)
    return Packing(perm, cu_seqlens, cu_clusters, max_seqlen)


def _segment_sums(x, cu_seqlens, weight, eps):
    """Per segment ``sum(w x)`` and ``sum(w) + eps`` in the accumulation dtype (w = 1 without weight)."""
    acc = acc_dtype(x.dtype)
    offsets = clamped_offsets(cu_seqlens, x.shape[0])
    xf = x.to(acc)
    if weight is None:
        total = torch.segment_reduce(xf, "sum", offsets=offsets, axis=0, unsafe=True, initial=0)
        denom = (offsets[1:] - offsets[:-1]).to(acc)
    else:
        w = weight.to(acc)
        total = torch.segment_reduce(xf * w[:, None], "sum", offsets=offsets, axis=0, unsafe=True, initial=0)
        denom = torch.segment_reduce(w, "sum", offsets=offsets, axis=0, unsafe=True, initial=0)
    return total, denom + eps


def _safe_div(total, denom):
    """``(total / denom, 1 / denom)`` row-wise, both 0 where ``denom == 0`` (an empty segment or cluster)."""
    nonzero = denom != 0
    safe = torch.where(nonzero, denom, 1)
    return torch.where(nonzero[..., None], total / safe[..., None], 0), torch.where(nonzero, 1 / safe, 0)


def _segment_mean(x, cu_seqlens, weight=None, eps=0.0):
    total, denom = _segment_sums(x, cu_seqlens, weight, eps)
    return _safe_div(total, denom)[0].to(x.dtype)


def _segment_mean_weighted_backward(grad, x, cu_seqlens, weight, eps):
    """``(grad_x, grad_weight)`` of ``out_s = sum(w x) / (sum(w) + eps)``:
    ``d out_s / d x_t = w_t / D_s`` and ``d out_s / d w_t = (x_t - out_s) / D_s``."""
    acc = acc_dtype(x.dtype)
    T = x.shape[0]
    total, denom = _segment_sums(x, cu_seqlens, weight, eps)
    mean, inv = _safe_div(total, denom)
    w = torch.ones(T, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    w_dtype = x.dtype if weight is None else weight.dtype
    if grad.shape[0] == 0 or T == 0:
        return torch.zeros_like(x), torch.zeros(T, dtype=w_dtype, device=x.device)
    seg, _, inside = row_segments(clamped_offsets(cu_seqlens, T), T)
    g = torch.where(inside[:, None], (grad.to(acc) * inv[:, None])[seg], 0)
    grad_x = g * w[:, None]
    grad_w = (g * (x.to(acc) - mean[seg])).sum(-1)
    return grad_x.to(x.dtype), grad_w.to(w_dtype)


def _segment_mean_backward(grad, cu_seqlens, T):
    acc = acc_dtype(grad.dtype)
    offsets = clamped_offsets(cu_seqlens, T)
    count = (offsets[1:] - offsets[:-1]).clamp(min=1).to(acc)
    scaled = grad.to(acc) / count[:, None]
    if grad.shape[0] == 0:
        return torch.zeros(T, grad.shape[1], dtype=grad.dtype, device=grad.device)
    seg, _, inside = row_segments(offsets, T)
    return torch.where(inside[:, None], scaled[seg], 0).to(grad.dtype)


# ------------------------------------------------------------ merging clusters


class MergeResult(NamedTuple):
    tokens: torch.Tensor  # (B, M, C) x.dtype: merged token of each cluster, 0 in empty slots
    key_mask: torch.Tensor  # (B, M) bool: slot < num_clusters
    counts: torch.Tensor  # (B, M) int64: members, the centre included
    weight_sum: torch.Tensor  # (B, M) float32 (float64 for float64 x): sum of member weights, without eps


def _merge_parts(x, labels, num_clusters, M, weight, eps, centers, center_weight):
    """What the forward and backward share, all (B, M) or (B, N) and sync-free.

    A token is a member of slot ``labels`` when ``0 <= label < min(num_clusters, M)``.
    With ``center_weight`` the centre of each slot is kept apart: the sums run
    over the *other* members, and the centre's count and weight are added back.
    """
    B, N, C = x.shape
    dev = x.device
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    w = torch.ones(B, N, dtype=acc, device=dev) if weight is None else weight.to(acc)
    live = torch.arange(M, device=dev)[None, :] < num_clusters.clamp(0, M)[:, None]
    labels = labels.long()
    member = (labels >= 0) & (labels < num_clusters.clamp(0, M)[:, None])
    safe_label = torch.where(member, labels, 0)
    blend = center_weight is not None
    if blend:
        centre = torch.where(live, centers.long(), -1)
        safe_centre = centre.clamp(0, N - 1)
        is_centre = member & (torch.gather(centre, 1, safe_label) == torch.arange(N, device=dev))
        other = member & ~is_centre
    else:
        other = member
    # stable sort by flat slot + segment sums: deterministic on every device, no atomics
    slot = torch.where(other, torch.arange(B, device=dev)[:, None] * M + safe_label, B * M).flatten()
    sorted_slot, perm = torch.sort(slot, stable=True)
    bounds = torch.searchsorted(sorted_slot, torch.arange(B * M + 1, device=dev))
    wf = w.flatten()[perm]
    sums = torch.segment_reduce(xf.flatten(0, 1)[perm] * wf[:, None], "sum", offsets=bounds, axis=0, unsafe=True,
                                initial=0).view(B, M, C)
    wsum = torch.segment_reduce(wf, "sum", offsets=bounds, axis=0, unsafe=True, initial=0).view(B, M)
    counts = (bounds[1:] - bounds[:-1]).view(B, M)
    mean, inv = _safe_div(sums, wsum + eps)
    parts = dict(xf=xf, w=w, live=live, member=member, other=other, label=safe_label, mean=mean, inv=inv,
                 counts=counts, wsum=wsum)
    if blend:
        a = center_weight.to(acc)
        xc = torch.gather(xf, 1, safe_centre[:, :, None].expand(B, M, C))
        own = torch.zeros(B, M + 1, dtype=acc, device=dev)
        own_slot = torch.where(is_centre, safe_label, M)
        own_w = own.scatter_add(1, own_slot, w)[:, :M]  # at most one centre token per slot
        own_n = torch.zeros(B, M + 1, dtype=torch.int64, device=dev).scatter_add(1, own_slot, is_centre.long())[:, :M]
        parts.update(a=a, xc=xc, centre=centre, safe_centre=safe_centre, has_others=counts > 0,
                     counts=counts + own_n, wsum=wsum + own_w)
    return parts


def _merge_clusters(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight):
    p = _merge_parts(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight)
    tokens = p["mean"]
    if center_weight is not None:
        a = p["a"][..., None]
        tokens = torch.where(p["has_others"][..., None], a * p["xc"] + (1 - a) * tokens, p["xc"])
    live = p["live"]
    tokens = torch.where(live[..., None], tokens, 0).to(x.dtype)
    counts = torch.where(live, p["counts"], 0)
    return MergeResult(tokens, live, counts, torch.where(live, p["wsum"], 0))


def _merge_clusters_backward(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers,
                             center_weight):
    """``(grad_x, grad_weight (B, N), grad_center_weight (B, M))``.

    A non-centre member j of slot s contributes ``c_s * w_j * x_j`` to the
    token with ``c_s = (1 - a_s) / D_s`` (``1 / D_s`` without blending), so
    ``grad_x_j = c_s w_j g_s`` and ``grad_w_j = c_s g_s . (x_j - mean_s) + gws_s``;
    the centre gets ``a_s g_s`` (``g_s`` when it has no other member).
    """
    B, N, C = x.shape
    M = grad_tokens.shape[1]
    p = _merge_parts(x, labels, num_clusters, M, weight, eps, centers, center_weight)
    acc = p["xf"].dtype
    live = p["live"]
    g = torch.where(live[..., None], grad_tokens.to(acc), 0)
    gws = torch.where(live, grad_weight_sum.to(acc), 0)
    coef = p["inv"]
    if center_weight is not None:
        coef = coef * (1 - p["a"])
    lab = p["label"]
    g_tok = torch.gather(g * coef[..., None], 1, lab[:, :, None].expand(B, N, C))
    mean_tok = torch.gather(p["mean"], 1, lab[:, :, None].expand(B, N, C))
    other = p["other"]
    grad_x = torch.where(other[..., None], g_tok * p["w"][..., None], 0)
    grad_w = torch.where(other, (g_tok * (p["xf"] - mean_tok)).sum(-1), 0)
    grad_w = grad_w + torch.where(p["member"], torch.gather(gws, 1, lab), 0)
    grad_a = torch.zeros(B, M, dtype=acc, device=x.device)
    if center_weight is not None:
        has = p["has_others"]
        scale = torch.where(has, p["a"], 1)
        to_centre = torch.where(live[..., None], scale[..., None] * g, 0)
        grad_x = grad_x.scatter_add(1, p["safe_centre"][:, :, None].expand(B, M, C), to_centre)
        grad_a = torch.where(has & live, (g * (p["xc"] - p["mean"])).sum(-1), 0)
        cw_dtype = center_weight.dtype
    else:
        cw_dtype = acc
    w_dtype = x.dtype if weight is None else weight.dtype
    return grad_x.to(x.dtype), grad_w.to(w_dtype), grad_a.to(cw_dtype)


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
    # the one host read: each group's padded widths are tensor shapes, its size a slice bound
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
    lse = torch.full((Tq + 1, H), -math.inf, dtype=acc, device=q.device)
    # offsets clamped to the buffers: bad offsets (validation off on CUDA) never index out of bounds
    cu_q, cu_k = clamped_offsets(cu_q, Tq), clamped_offsets(cu_k, k.shape[0])
    lq, lk, groups = _attention_buckets(cu_q, cu_k)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    for segs, wq, wk in groups:
        qi, q_real = _padded_rows(cu_q[segs], lq[segs], wq)
        ki, k_real = _padded_rows(cu_k[segs], lk[segs], wk)
        s = torch.einsum("gqhd,gkhd->ghqk", q[qi], k[ki]) * scale
        s = s.masked_fill(~k_real[:, None, None, :], -math.inf)
        o = torch.einsum("ghqk,gkhd->gqhd", torch.softmax(s, -1), v[ki])
        dst = torch.where(q_real, qi, Tq)
        out.index_put_((dst,), o)
        lse.index_put_((dst,), torch.logsumexp(s, -1).transpose(1, 2))
    return out[:Tq].to(dtype), lse[:Tq].t().contiguous()


def _varlen_attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """Gradients from the saved log-sum-exp: P = exp(S - lse), dS = P * (dP - rowsum(dO * O) + dlse)
    (``d lse_i / d s_ij = P_ij``; ``dlse`` None when the lse was not used).

    Every real query and key row lies in one segment, so each gradient row is
    written once (padded positions go to a scratch row): no accumulation.
    """
    Tq, Tk = q.shape[0], k.shape[0]
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    dq = torch.zeros((Tq + 1,) + q.shape[1:], dtype=acc, device=q.device)
    dk = torch.zeros((Tk + 1,) + k.shape[1:], dtype=acc, device=q.device)
    dv = torch.zeros((Tk + 1,) + v.shape[1:], dtype=acc, device=q.device)
    cu_q, cu_k = clamped_offsets(cu_q, Tq), clamped_offsets(cu_k, Tk)
    lq, lk, groups = _attention_buckets(cu_q, cu_k)
    q, k, v, dout = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    delta = (dout * out.to(acc)).sum(-1)  # (Tq, H)
    if dlse is not None:
        delta = delta - dlse.t().to(acc)
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
    idx = starts[:, None] + slot[None, :]
    # offsets outside x (validation off) give empty slots, never another row twice
    key_mask = (slot[None, :] < count[:, None]) & (idx >= 0) & (idx < x.shape[0])
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
    # rows of empty slots, and of slots outside [0, num_rows) (validation off), all land
    # in one scratch row past the end (no host sync)
    target = torch.where(key_mask & (idx >= 0) & (idx < num_rows), idx, num_rows).flatten()
    out = padded.new_zeros((num_rows + 1,) + tuple(padded.shape[2:]))
    return out.index_put((target,), padded.flatten(0, 1))[:num_rows]


# ------------------------------------------------------------ public reference API


def pairwise_distance(x, mask=None):
    V.check_pairwise_distance(x, mask)
    return _pairwise_distance(x, mask)


def knn_density(x, k, mask=None):
    V.check_knn_density(x, k, mask)
    return _knn_density(x, k, mask)


def density_delta(x, density, mask=None, densest_delta="column_max", tie_break="none"):
    V.check_density_delta(x, density, mask, densest_delta, tie_break)
    return _density_delta(x, density, mask, densest_delta, tie_break)


def select_centers(score, threshold=0.5, min_clusters=8, max_clusters=None, mask=None, num_centers=None,
                   center_order="index"):
    B, N = V.scores(score)
    M = V.cluster_bound(N, max_clusters, num_centers, B)
    V.check_select_centers(score, threshold, min_clusters, M, mask, num_centers or 0, center_order)
    return _select_centers(score, mask, threshold, min_clusters, M, num_centers or 0, center_order)


def assign_to_centers(x, centers, num_clusters, mask=None, metric="euclidean"):
    V.check_assign_to_centers(x, centers, num_clusters, mask, metric)
    return _assign_to_centers(x, centers, num_clusters, mask, metric)


def dpc_cluster(x, k=5, threshold=0.5, min_clusters=8, max_clusters=None, mask=None, densest_delta="column_max",
                num_centers=None, center_order="index", tie_break="none"):
    B, N, _ = V.features(x)
    M = V.cluster_bound(N, max_clusters, num_centers, B)
    args = (x, k, threshold, min_clusters, M, mask, densest_delta, num_centers or 0, center_order, tie_break)
    V.check_dpc_cluster(*args)
    return _dpc_cluster(*args)


def pack_clusters(labels, num_clusters, max_clusters=None):
    B, N = V.cluster_labels(labels)
    return _pack_clusters(labels, num_clusters, V.cluster_bound(N, max_clusters, None, B))


def segment_mean(x, cu_seqlens, *, weight=None, eps=0.0):
    """Differentiable reference ``sum(w x) / (sum(w) + eps)`` per segment (plain autograd)."""
    offsets = clamped_offsets(cu_seqlens, x.shape[0])
    acc = acc_dtype(x.dtype)
    w = torch.ones(x.shape[0], dtype=acc, device=x.device) if weight is None else weight.to(acc)
    seg, _, inside = row_segments(offsets, x.shape[0])
    S = offsets.numel() - 1
    slot = torch.where(inside, seg, S)
    total = x.new_zeros(S + 1, x.shape[1], dtype=acc).index_add(0, slot, x.to(acc) * w[:, None])[:S]
    denom = w.new_zeros(S + 1).index_add(0, slot, w)[:S] + eps
    return _safe_div(total, denom)[0].to(x.dtype)


def merge_clusters(x, labels, num_clusters, max_clusters=None, *, weight=None, eps=0.0, centers=None,
                   center_weight=None):
    """Differentiable reference of :func:`setok_kernels.merge_clusters` (plain autograd)."""
    B, N, _ = V.features(x)
    M = V.cluster_bound(N, max_clusters, None, B)
    acc = acc_dtype(x.dtype)
    if isinstance(center_weight, (int, float)):
        center_weight = torch.full((B, M), float(center_weight), dtype=acc, device=x.device)
    return _merge_clusters(x, labels, num_clusters, M, weight, eps, centers, center_weight)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, scale=None):
    """Differentiable reference attention (plain autograd over the bucketed math)."""
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # the bucketed math needs no max length (it fills the backends' common signature): the static
    # bounds stand in, as in setok_kernels.varlen_attention, without reading the offsets
    max_q = q.shape[0] if max_seqlen_q is None else max_seqlen_q
    max_k = k.shape[0] if max_seqlen_k is None else max_seqlen_k
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
        "segment_mean_weighted_backward": (_segment_mean_weighted_backward, everything),
        "merge_clusters": (_merge_clusters, everything),
        "merge_clusters_backward": (_merge_clusters_backward, everything),
        "varlen_attention": (_varlen_attention, everything),
        "varlen_attention_backward": (_varlen_attention_backward, everything),
    }
    for op, (fn, dtypes) in table.items():
        register(Impl(op=op, name="reference", fn=fn, devices=None, dtypes=dtypes))


_register()
