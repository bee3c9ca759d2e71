"""Native CPU clustering vs the batched PyTorch way, side by side in one run.

The baseline materialises the B x N x N distances with torch.cdist (GEMM
path) and takes topk on them; for dpc_cluster it also derives delta (with
SeTok's column-max cap), the centres and the labels from that one matrix.
Cases run interleaved; the report gives each one's median and the ratio of
medians, per workload (issue 15's CPU goals: >= 1.5x at W1, >= 1.0x at W2).
Usage: python tools/bench_native_cpu.py [reps] [W1|W2 ...]; threads as torch's
default (OMP_NUM_THREADS=1 for a single-threaded comparison).
"""

import math
import statistics
import sys
import time

import torch

import setok_kernels as sk
from setok_kernels.reference import _select_centers

# name: (B, N, C, k, min_clusters)
WORKLOADS = {
    "W1": (8, 576, 1152, 64, 64),  # SeTok at CLIP-L/336 (576 patches, 1152 channels)
    "W2": (1, 2048, 64, 64, 64),  # many tokens, few channels
}


def batched_knn(x, k):
    d = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    return torch.exp(-(d * d).topk(k, dim=-1, largest=False).values.mean(-1))


def batched_dpc(x, k, min_clusters):
    B, N, C = x.shape
    d = torch.cdist(x, x) / math.sqrt(C)
    density = torch.exp(-(d * d).topk(k, dim=-1, largest=False).values.mean(-1))
    denser = density[:, None, :] > density[:, :, None]
    nearest = d.masked_fill(~denser, math.inf).amin(-1)
    # SeTok's column-max cap: the least farthest distance among the tokens
    # not denser than i (a running minimum over tokens sorted by density)
    dens_sorted, order = density.sort(-1)
    running = torch.gather(d.amax(-1), 1, order).cummin(-1).values
    last = torch.searchsorted(dens_sorted, density, right=True) - 1
    delta = torch.minimum(nearest, torch.gather(running, 1, last))
    centers, _ = _select_centers(density * delta, None, 0.5, min_clusters, N, 0, "index")
    to_centers = torch.gather(d, 2, centers.clamp(min=0)[:, None, :].expand(B, N, N))
    return to_centers.masked_fill(centers[:, None, :] < 0, math.inf).argmin(-1)


def run(name, reps):
    B, N, C, k, m = WORKLOADS[name]
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    cases = {
        "knn_density  batched cdist+topk": lambda: batched_knn(x, k),
        "knn_density  native": lambda: sk.knn_density(x, k, backend="native"),
        "dpc_cluster  batched torch": lambda: batched_dpc(x, k, m),
        "dpc_cluster  native": lambda: sk.dpc_cluster(x, k=k, min_clusters=m, backend="native"),
    }
    times = {case: [] for case in cases}
    for fn in cases.values():
        fn()
    for _ in range(reps):
        for case, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[case].append(time.perf_counter() - t0)
    med = {case: statistics.median(t) for case, t in times.items()}
    print(f"{name}: B={B} N={N} C={C} k={k} float32, {torch.get_num_threads()} threads, "
          f"median of {reps} interleaved runs")
    for case, t in med.items():
        print(f"  {case:34s} {t * 1e3:8.2f} ms")
    v = list(med.values())
    print(f"  native speed-up: knn_density {v[0] / v[1]:.2f}x, dpc_cluster {v[2] / v[3]:.2f}x")


def main(argv):
    reps = int(argv[0]) if argv else 10
    for name in argv[1:] or list(WORKLOADS):
        run(name, reps)


if __name__ == "__main__":
    main(sys.argv[1:])
