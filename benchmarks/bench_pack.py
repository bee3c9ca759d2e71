"""Group ``pack``: grouping tokens by (image, cluster), and per-cluster means.

``pack_clusters`` against SeTok's per-cluster loop and a sort + bincount
version; ``segment_mean`` against a per-segment loop and ``index_add_``.
Both are memory-bound: the floor counts bytes only (labels read, perm and
offsets written; features read, means written).
"""

from __future__ import annotations

import pytest
import torch

import setok_kernels as sk

from . import baselines as bl
from .conftest import pool_size

# (id, B, N, M, C)
CUDA_CASES = [("B32-N729-M64-C1152", 32, 729, 64, 1152)]
CPU_CASES = [("B4-N576-M32-C1152", 4, 576, 32, 1152)]
SETOK = ("native", "triton", "reference")


def _labels(device, B, N, M, count):
    """Random cluster labels in [0, M) with every cluster used (so num_clusters = M)."""
    gen = torch.Generator().manual_seed(B * N + M)
    pool = []
    for _ in range(count):
        labels = torch.randint(0, M, (B, N), generator=gen)
        labels[:, :M] = torch.arange(M)
        pool.append((labels.to(device), torch.full((B,), M, device=device)))
    return pool


def _skip_triton_on_cpu(impl, device):
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")


@pytest.mark.parametrize("impl", SETOK + ("per_cluster_loop", "torch_sort"))
def test_pack_clusters(measure, benchmark, device, case, impl):
    benchmark.group = "pack"
    _skip_triton_on_cpu(impl, device)
    name, B, N, M, _ = case
    pool = _labels(device, B, N, M, pool_size(B * N * 8))
    if impl in SETOK:
        def fn(labels, num):
            return sk.pack_clusters(labels, num, M, backend=impl, validate=False)
    elif impl == "per_cluster_loop":
        def fn(labels, num):
            return bl.pack_per_cluster(labels, [M] * B)
    else:
        def fn(labels, num):
            return bl.pack_sorted(labels, num, M)
    nbytes = B * N * 8 * 2 + (B * M + 1) * 4  # labels in, perm out, offsets out
    measure(fn, pool, impl=impl, case=f"pack_clusters {name}", role="setok" if impl in SETOK else "baseline",
            bytes=nbytes, shape=dict(B=B, N=N, M=M))


@pytest.mark.parametrize("impl", SETOK + ("per_segment_loop", "index_add"))
def test_segment_mean(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "pack"
    _skip_triton_on_cpu(impl, device)
    name, B, N, M, C = case
    labels, num = _labels(device, B, N, M, 1)[0]
    packing = sk.pack_clusters(labels, num, M)
    cu = packing.cu_seqlens[: B * M + 1]  # every cluster is used: no empty trailing segments
    T, elt = B * N, torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(C)
    pool = [(torch.randn(T, C, generator=gen).to(device, dtype),) for _ in range(pool_size(T * C * elt))]
    if impl in SETOK:
        def fn(x):
            return sk.segment_mean(x, cu, backend=impl, validate=False)
    elif impl == "per_segment_loop":
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

        def fn(x):
            return bl.segment_mean_loop(x, bounds)
    else:
        counts = (cu[1:] - cu[:-1]).long()
        segment_ids = torch.repeat_interleave(torch.arange(B * M, device=device), counts)

        def fn(x):
            return bl.segment_mean_index_add(x, segment_ids, counts)
    nbytes = (T + B * M) * C * elt
    measure(fn, pool, impl=impl, case=f"segment_mean {name}", role="setok" if impl in SETOK else "baseline",
            bytes=nbytes, shape=dict(T=T, S=B * M, C=C, dtype=str(dtype)[6:]))
