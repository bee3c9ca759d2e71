"""Group ``pack``: grouping tokens by (image, cluster), and per-cluster means.

``pack_clusters`` against SeTok's per-cluster loop and a sort + bincount
version; ``segment_mean`` against a per-segment loop and ``index_add_``.
Both are memory-bound: the floor counts bytes only (labels read, perm and
offsets written; features read, means written).

``python -m benchmarks.bench_pack`` prints ``h200_model_pack``: an ESTIMATE
(bytes and lane operations, never measured) of the one-launch Triton
``pack_clusters`` on an H200, with its O(B * B * N) label re-reads.
"""

from __future__ import annotations

import pytest
import torch

import setok_kernels as sk

from . import baselines as bl
from .bench_attention import H200_BYTES_PER_S, LAUNCH_S
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


H200_SM_L2_BYTES_PER_S = 64 * 1.98e9  # one SM's share of L2: 64 B a clock (assumed)
H200_SM_LANE_OPS = 128 * 1.98e9  # one SM's int lane instructions per second (4 x 32 lanes)


def h200_model_pack(B: int, N: int, M: int) -> dict:
    """ESTIMATED time of triton ``pack_clusters`` (``triton_merge._pack_clusters_kernel``, B programs)
    on an H200: ``max(all bytes / 4.3 TB/s, the longest program's bytes / one SM's L2 share, its lane
    ops / one SM) + 5 us`` a launch. Every program reads the B counts and all B * N labels (int64; the
    counts it gathers per label are L1 hits, not counted), its own labels twice, writes its perm
    entries and M offsets, and histograms its own labels twice (``pack_histogram_ops`` lane ops a
    label). Program 0 reads all labels as a histogram per image instead (for ``max_seqlen``), unless
    that costs more than a fill launch (``pack_atomic_max``: then a zero fill and an atomic max)."""
    from setok_kernels import triton_merge as TM

    hist = TM.pack_histogram_ops(M)
    atomic = TM.pack_atomic_max(B, N, M)
    per_program = B * 8 + B * N * 8 + 2 * N * 8 + N * 8 + M * 4 + 4
    nbytes = B * per_program + 8
    # the longest program: its scan of all labels (a histogram per image in program 0, else ~6 ops a
    # label), its own counts and placement (histograms, a gather, the BLOCK_T-wide rank compare)
    ops = B * N * (6 if atomic else hist) + N * (2 * hist + 2 * TM._PACK_BLOCK_T + 16)
    times = {"DRAM": nbytes / H200_BYTES_PER_S, "one program's L2": per_program / H200_SM_L2_BYTES_PER_S,
             "one program's lanes": ops / H200_SM_LANE_OPS}
    bound = max(times, key=times.get)
    launches = 2 if atomic else 1
    return dict(bytes=nbytes, rereads=B * B * N * 8, program_bytes=per_program, lane_ops=ops, times=times,
                bound=bound, launches=launches, time_s=times[bound] + launches * LAUNCH_S, estimate=True)


def _print_model() -> None:
    for name, B, N, M, _ in CUDA_CASES:
        m = h200_model_pack(B, N, M)
        parts = ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in m["times"].items())
        print(f"pack_clusters {name[: name.rindex('-C')]} triton ({m['launches']} launch{'es' if m['launches'] > 1 else ''}): ESTIMATE "
              f"{m['time_s'] * 1e6:.1f} us on an H200 ({m['bound']} bound + {m['launches'] * LAUNCH_S * 1e6:.0f} us "
              f"of launches), not measured; {m['bytes'] / 1e6:.2f} MB moved ({m['rereads'] / 1e6:.2f} MB of label "
              f"re-reads), {parts}")


if __name__ == "__main__":
    _print_model()
