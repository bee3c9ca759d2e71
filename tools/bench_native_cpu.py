"""Native CPU clustering vs the batched PyTorch way, side by side in one run.

The baseline materialises the B x N x N distances with torch.cdist (GEMM
path) and takes topk on them; for dpc_cluster it also derives delta, the
centres and the labels from that one matrix. Timings are the minimum over
interleaved repetitions. Usage: python tools/bench_native_cpu.py [reps]
"""

import math
import sys
import time

import torch

import setok_kernels as sk
from setok_kernels.reference import _select_centers

B, N, C, K = 8, 576, 1152, 64


def batched_knn(x):
    d = torch.cdist(x, x) / math.sqrt(C)
    return torch.exp(-(d * d).topk(K, dim=-1, largest=False).values.mean(-1))


def batched_dpc(x):
    d = torch.cdist(x, x) / math.sqrt(C)
    density = torch.exp(-(d * d).topk(K, dim=-1, largest=False).values.mean(-1))
    denser = density[:, None, :] > density[:, :, None]
    delta = d.masked_fill(~denser, math.inf).amin(-1)
    delta = torch.where(denser.any(-1), delta, d.amax(-1).amin(-1, keepdim=True))
    centers, _ = _select_centers(density * delta, None, 0.5, 64, N)
    to_centers = torch.gather(d, 2, centers.clamp(min=0)[:, None, :].expand(B, N, N))
    return to_centers.masked_fill(centers[:, None, :] < 0, math.inf).argmin(-1)


def main(reps: int) -> None:
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    cases = {
        "knn_density  batched cdist+topk": lambda: batched_knn(x),
        "knn_density  native": lambda: sk.knn_density(x, K, backend="native"),
        "dpc_cluster  batched torch": lambda: batched_dpc(x),
        "dpc_cluster  native": lambda: sk.dpc_cluster(x, k=K, min_clusters=64, backend="native"),
    }
    best = dict.fromkeys(cases, math.inf)
    for fn in cases.values():
        fn()
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"B={B} N={N} C={C} k={K} float32, {torch.get_num_threads()} threads, min of {reps} interleaved runs")
    for name, t in best.items():
        print(f"  {name:34s} {t * 1e3:7.1f} ms")
    v = list(best.values())
    print(f"  native speed-up: knn_density {v[0] / v[1]:.2f}x, dpc_cluster {v[2] / v[3]:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
