"""Peak RSS of clustering one image, measured in this (fresh) process.

    python benchmarks/peak_rss.py --impl reference --n 16384 --c 256 --k 64

Prints one JSON line: the whole-process peak RSS (``ru_maxrss``), the peak
before the clustering (interpreter, torch, the input), the seconds taken and
the number of clusters. Run it once per implementation: ``ru_maxrss`` only
ever grows, so one process measures one thing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def _peak_rss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # Linux reports KiB, macOS bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("reference", "native", "torch_batched"), required=True)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--c", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--min-clusters", type=int, default=64)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import baselines

    import setok_kernels as sk

    x = torch.randn(1, args.n, args.c, generator=torch.Generator().manual_seed(0))
    before = _peak_rss_bytes()
    start = time.perf_counter()
    if args.impl == "torch_batched":
        _, num = baselines.dpc_batched(x, args.k, 0.5, args.min_clusters)
    else:
        num = sk.dpc_cluster(x, k=args.k, min_clusters=args.min_clusters, backend=args.impl, validate=False).num_clusters
    seconds = time.perf_counter() - start
    print(json.dumps(dict(
        impl=args.impl, n=args.n, c=args.c, k=args.k, num_clusters=int(num[0]), seconds=round(seconds, 2),
        peak_rss_bytes=_peak_rss_bytes(), rss_before_bytes=before, torch=torch.__version__, threads=torch.get_num_threads(),
    )))


if __name__ == "__main__":
    main()
