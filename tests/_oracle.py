"""An independent, naive float64 DPC-kNN: one image at a time, the full N x N matrix.

Written from SPEC.md alone, as plainly as possible, so that it can serve as
the oracle of the streaming reference (and through it, of every kernel).
"""

import math

import torch


def dpc_one_image(x, k, threshold, min_clusters, max_clusters=None, densest_delta="column_max"):
    """x: (n, C) real tokens. Returns a dict of per-token tensors and the centre list."""
    x = x.double()
    n, C = x.shape
    diff = x[:, None, :] - x[None, :, :]
    d = (diff * diff).sum(-1).sqrt() / math.sqrt(C)
    k = min(k, n)
    nearest = torch.sort(d * d, dim=1).values[:, :k]
    density = torch.exp(-nearest.mean(1))

    delta = torch.empty(n, dtype=torch.float64)
    parent = torch.full((n,), -1, dtype=torch.int64)
    if densest_delta == "column_max":
        top = d.max(0).values.min()
    else:
        top = d.max()
    for i in range(n):
        best, arg = math.inf, -1
        for j in range(n):
            if density[j] > density[i] and d[i, j] < best:
                best, arg = float(d[i, j]), j
        if arg < 0:
            delta[i] = top
        else:
            delta[i], parent[i] = best, arg
    score = density * delta

    cap = max_clusters or n
    ranked = sorted(range(n), key=lambda i: (-float(score[i]), i))
    above = [i for i in ranked if score[i] > threshold]
    if above:
        centers = sorted(above[:cap])
    else:
        centers = sorted(ranked[: min(min_clusters, cap)])

    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        dist = [float(d[i, c]) for c in centers]
        labels[i] = min(range(len(centers)), key=lambda m: (dist[m], m))
    for m, c in enumerate(centers):
        labels[c] = m
    return dict(density=density, delta=delta, parent=parent, score=score, labels=labels, centers=centers)


def dpc_batch(x, mask, k, threshold, min_clusters, max_clusters=None, densest_delta="column_max"):
    """Apply the oracle to each image's real tokens and scatter back to (B, N)."""
    B, N, _ = x.shape
    M = max_clusters or N
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
        r = dpc_one_image(x[b, real], k, threshold, min_clusters, max_clusters, densest_delta)
        for key in ("density", "delta", "score", "labels"):
            out[key][b, real] = r[key].to(out[key].dtype)
        out["parent"][b, real] = torch.where(r["parent"] >= 0, real[r["parent"].clamp(min=0)], -1)
        centers = real[torch.tensor(r["centers"], dtype=torch.int64)]
        out["centers"][b, : len(centers)] = centers
        out["num_clusters"][b] = len(centers)
    return out
