"""An independent, naive float64 DPC-kNN: one image at a time, the full N x N matrices.

Written from SPEC.md alone, as plainly as possible, so that it can serve as
the oracle of the streaming reference (and through it, of every kernel).
delta is built as the SeTok reference code builds it: a fill matrix
``D(i, j) = d(i, j)`` where j is denser than i, ``fill_j`` elsewhere
(j = i included), and ``delta_i = min_j D(i, j)``.
"""

import math

import torch


def dpc_one_image(x, k, threshold, min_clusters, max_clusters=None, densest_delta="column_max",
                  num_centers=None, center_order="index", tie_break="none"):
    """x: (n, C) real tokens. Returns a dict of per-token tensors and the centre list."""
    x = x.double()
    n, C = x.shape
    diff = x[:, None, :] - x[None, :, :]
    d = (diff * diff).sum(-1).sqrt() / math.sqrt(C)
    k = min(k, n)
    nearest = torch.sort(d * d, dim=1).values[:, :k]
    density = torch.exp(-nearest.mean(1))

    idx = torch.arange(n)
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    if tie_break == "index":
        denser |= (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    if densest_delta == "column_max":
        fill = d.max(0).values[None, :].expand(n, n)  # fill_j = max over l of d(l, j)
    else:
        fill = d.max().expand(n, n)
    delta = torch.where(denser, d, fill).min(1).values

    parent = torch.full((n,), -1, dtype=torch.int64)
    for i in range(n):
        best, arg = math.inf, -1
        for j in range(n):
            if denser[i, j] and d[i, j] < best:
                best, arg = float(d[i, j]), j
        parent[i] = arg
    score = density * delta

    ranked = sorted(range(n), key=lambda i: (-float(score[i]), i))
    if num_centers:
        chosen = ranked[:num_centers]
    else:
        cap = max_clusters or n
        above = [i for i in ranked if score[i] > threshold]
        chosen = above[:cap] if above else ranked[: min(min_clusters, cap)]
    centers = sorted(chosen, key=lambda i: (-float(score[i]), i)) if center_order == "score" else sorted(chosen)

    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        dist = [float(d[i, c]) for c in centers]
        labels[i] = min(range(len(centers)), key=lambda m: (dist[m], m))
    for m, c in enumerate(centers):
        labels[c] = m
    return dict(density=density, delta=delta, parent=parent, score=score, labels=labels, centers=centers)


def dpc_batch(x, mask, k, threshold, min_clusters, max_clusters=None, densest_delta="column_max",
              num_centers=None, center_order="index", tie_break="none"):
    """Apply the oracle to each image's real tokens and scatter back to (B, N)."""
    B, N, _ = x.shape
    M = num_centers or max_clusters or N
    out = dict(
        density=torch.zeros(B, N, dtype=torch.float64),
        delta=torch.zeros(B, N, dtype=torch.float64),
        score=torch.zeros(B, N, dtype=torch.float64),
        parent=torch.full((B, N), -1, dtype=torch.int64),
        labels=torch.full((B, N), -1, dtype=torch.int64),
        centers=torch.full((B, M), -1, dtype=torch.int64),
        num_clusters=torch.zeros(B, dtype=torch.int64),
    )
    for b in range(B):
        real = torch.arange(N) if mask is None else mask[b].nonzero().flatten()
        if real.numel() == 0:
            continue
        r = dpc_one_image(x[b, real], k, threshold, min_clusters, max_clusters, densest_delta,
                          num_centers, center_order, tie_break)
        for key in ("density", "delta", "score", "labels"):
            out[key][b, real] = r[key].to(out[key].dtype)
        out["parent"][b, real] = torch.where(r["parent"] >= 0, real[r["parent"].clamp(min=0)], -1)
        centers = real[torch.tensor(r["centers"], dtype=torch.int64)]
        out["centers"][b, : len(centers)] = centers
        out["num_clusters"][b] = len(centers)
    return out


def assign_one_image(x, centers, metric="euclidean"):
    """Labels of the rows of x (n, C) to the centre rows ``centers`` (list of indices), float64."""
    x = x.double()
    if metric == "cosine":
        norm = x.norm(dim=-1)
        unit = x / torch.where(norm > 0, norm, 1)[:, None]
        # nearest = largest similarity; one elementwise sum per pair (a GEMM
        # may round columns differently and split exact ties)
        score = -(unit[:, None, :] * unit[centers][None, :, :]).sum(-1)
    else:
        score = ((x[:, None, :] - x[centers][None, :, :]) ** 2).sum(-1)
    labels = torch.tensor([min(range(len(centers)), key=lambda m: (float(score[i, m]), m)) for i in range(x.shape[0])])
    for m, c in enumerate(centers):
        labels[c] = m
    return labels
