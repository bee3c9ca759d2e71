"""Group ``dropin``: the TCFormer-family cluster-and-merge step, setok against the peers' own way.

One Chat-UniVi level: DPC-kNN on the patch tokens with a fixed number of
centres (the top ``cluster_num`` scores, numbered by score), then the merge
``sum(w x) / (sum(w) + 1e-6)`` per cluster. The peers (TCFormer, Chat-UniVi,
PruneVid, HoliTom, FastVID) run it as batched PyTorch on the full
(B, N, N) distance matrix: ``cdist`` + ``topk`` for the density, a masked
min for delta, ``topk`` for the centres, a gather + ``argmin`` for the
labels and ``index_add_`` for the merge (``peers_batched`` below, written
from that description). setok runs ``dpc_cluster(num_centers=...,
center_order="score", tie_break="index", densest_delta="global_max")`` and
one fused ``merge_clusters``.

Work counted for the floor as in ``bench_dpc``: two passes over all token
pairs (``2 C`` FLOPs per pair each), the assignment, reading the features.

    python -m pytest benchmarks/bench_dropin.py --bench-device cpu -q
"""

from __future__ import annotations

import math

import pytest
import torch

import setok_kernels as sk

from .conftest import pool_size

# (id, B, N, C, cluster_num, k): Chat-UniVi's first level (576 CLIP-L/336 tokens -> 64)
CUDA_CASES = [("B8-N576-C1024-n64", 8, 576, 1024, 64, 5), ("B64-N576-C1024-n64", 64, 576, 1024, 64, 5)]
CPU_CASES = [("B8-N576-C1024-n64", 8, 576, 1024, 64, 5)]
SETOK = ("native", "triton", "reference")


def peers_batched(x: torch.Tensor, cluster_num: int, k: int):
    """The peers' batched PyTorch cluster + merge, noise included: ``(labels, merged (B, n, C))``."""
    B, N, C = x.shape
    with torch.no_grad():
        xf = x.float()
        d = torch.cdist(xf, xf) / math.sqrt(C)
        density = torch.exp(-(d.topk(k, dim=-1, largest=False).values ** 2).mean(-1))
        density = density + torch.rand_like(density) * 1e-6
        denser = (density[:, None, :] > density[:, :, None]).to(xf.dtype)
        d_max = d.flatten(1).amax(-1)[:, None, None]
        delta = (d * denser + d_max * (1 - denser)).amin(-1)
        centers = (delta * density).topk(cluster_num, dim=-1).indices
        to_centers = torch.gather(d, 1, centers[:, :, None].expand(B, cluster_num, N))
        labels = to_centers.argmin(1)
        labels.scatter_(1, centers, torch.arange(cluster_num, device=x.device).expand(B, cluster_num))
    weight = x.new_ones(B * N, 1)
    flat = (labels + torch.arange(B, device=x.device)[:, None] * cluster_num).flatten()
    total = x.new_zeros(B * cluster_num, 1).index_add_(0, flat, weight) + 1e-6
    merged = x.new_zeros(B * cluster_num, C).index_add_(0, flat, x.reshape(B * N, C) * (weight / total[flat]))
    return labels, merged.view(B, cluster_num, C)


def setok_cluster_merge(x: torch.Tensor, cluster_num: int, k: int, backend: str):
    r = sk.dpc_cluster(x, k, densest_delta="global_max", num_centers=cluster_num, center_order="score",
                       tie_break="index", backend=backend, validate=False)
    m = sk.merge_clusters(x, r.labels, r.num_clusters, cluster_num, eps=1e-6, backend=backend, validate=False)
    return r.labels, m.tokens


@pytest.mark.parametrize("impl", SETOK + ("peers_batched",))
def test_cluster_and_merge(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "dropin"
    name, B, N, C, n, k = case
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")
    gen = torch.Generator().manual_seed(B * N + C)
    elt = torch.finfo(dtype).bits // 8
    pool = [(torch.randn(B, N, C, generator=gen).to(device, dtype),) for _ in range(pool_size(B * N * C * elt))]
    if impl in SETOK:
        def fn(x):
            return setok_cluster_merge(x, n, k, impl)
        role = "setok"
    else:
        def fn(x):
            return peers_batched(x, n, k)
        role = "baseline"
    flops = 2 * (2 * B * N * N * C) + 2 * B * N * C * n
    measure(fn, pool, impl=impl, case=name, role=role, flops=flops, bytes=B * N * C * elt,
            shape=dict(B=B, N=N, C=C, cluster_num=n, k=k, dtype=str(dtype)[6:]))
