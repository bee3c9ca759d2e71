"""Group ``tokenizer``: SeTok tokenizer forward, end to end (eval, no grad).

``setok_model.SeTokTokenizer`` (batched, packed, no host sync) against the
reference's way (``tests/_official_loop.official_tokenize``: one image and
one cluster at a time), both from the same reference-layout weights.

``python -m benchmarks.bench_tokenizer`` runs the two in turn (interleaved) and
prints their ratio, outside pytest.

Work counted for the floor (dominant terms): the two DPC passes over all
token pairs, and the encoders' linear layers on every token (the inter-cluster
encoder and the attention scores, on far fewer rows, are left out).
"""

from __future__ import annotations

import time

import pytest
import torch

from .conftest import pool_size

# (id, B, N, dim, heads, mlp, k, min_clusters)
CUDA_CASES = [("B32-N729-C1152", 32, 729, 1152, 2, 4096, 64, 64)]
# the CPU goal of issue 6: B=4, N=576, dim 256, reference clustering defaults
CPU_CASES = [("B4-N576-C256", 4, 576, 256, 2, 256, 64, 64), ("B4-N576-C256-k16", 4, 576, 256, 2, 256, 16, 8)]
LAYERS = 2  # inner and inter depth, as in the reference


def _workload(case, device, dtype):
    """Reference-layout weights on the device and a pool of feature batches."""
    name, B, N, dim, heads, mlp, k, min_clusters = case
    try:
        from tests._official_loop import random_official_state_dict
    except ImportError as exc:
        pytest.skip(f"the reference loop is not importable: {exc}")
    weights = random_official_state_dict(dim, mlp, LAYERS, LAYERS, dtype=torch.float32)
    weights = {key: w.to(device, dtype) if key != "position_embedding.inv_freq" else w for key, w in weights.items()}
    gen = torch.Generator().manual_seed(N)
    elt = torch.finfo(dtype).bits // 8
    pool = [(torch.randn(B, N, dim, generator=gen).to(device, dtype),) for _ in range(pool_size(B * N * dim * elt))]
    shape = dict(B=B, N=N, dim=dim, heads=heads, mlp=mlp, k=k, dtype=str(dtype)[6:])
    return weights, pool, shape, B * N * dim * elt


def _encoder_flops(B, N, dim, mlp):
    """Two DPC distance passes over all pairs, and the encoders' linear layers on every token."""
    return 4 * B * N * N * dim + 2 * B * N * (LAYERS * 4 * dim * dim + 2 * dim * mlp)


def _tokenizer(weights, case, device):
    from setok_model import SeTokTokenizer

    name, B, N, dim, heads, mlp, k, min_clusters = case
    return SeTokTokenizer.from_official_state_dict(weights, num_heads=heads, k=k, min_clusters=min_clusters).to(device)


@pytest.mark.parametrize("impl", ["setok", "official_loop"])
def test_tokenizer_forward(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "tokenizer"
    name, B, N, dim, heads, mlp, k, min_clusters = case
    weights, pool, shape, nbytes = _workload(case, device, dtype)
    if impl == "setok":
        model = _tokenizer(weights, case, device).eval()

        @torch.no_grad()
        def fn(x):
            return model(x)
    else:
        from tests._official_loop import official_tokenize

        def fn(x):
            return official_tokenize(weights, x, heads, k=k, min_clusters=min_clusters)

    measure(fn, pool, impl=impl, case=name, role="setok" if impl == "setok" else "baseline",
            flops=_encoder_flops(B, N, dim, mlp), bytes=nbytes, shape=shape)


def test_tokenizer_forward_backward(measure, benchmark, device, dtype, case):
    """Training step cost: forward + backward through the encoders (the clustering has no gradient)."""
    benchmark.group = "tokenizer-train"
    name, B, N, dim, heads, mlp, k, min_clusters = case
    weights, pool, shape, nbytes = _workload(case, device, dtype)
    model = _tokenizer(weights, case, device).train()

    def fn(x):
        out = model(x.requires_grad_())
        out.tokens.float().square().mean().backward()
        return out

    # the backward costs about twice the encoders' forward; the clustering runs once
    flops = _encoder_flops(B, N, dim, mlp) + 2 * 2 * B * N * (LAYERS * 4 * dim * dim + 2 * dim * mlp)
    measure(fn, pool, impl="setok", case=name, role="setok", flops=flops, bytes=nbytes, shape=shape)


def interleaved_ratios(cases, repeats: int, clock=time.perf_counter) -> None:
    """setok's tokenizer against the reference loop on the CPU, run in turn on the same
    inputs ``repeats`` times; prints the medians, their ratio (> 1: setok faster) and that
    of the best rounds."""
    import statistics

    from tests._official_loop import official_tokenize

    device, dtype = torch.device("cpu"), torch.float32
    for case in cases:
        name, B, N, dim, heads, mlp, k, min_clusters = case
        weights, pool, _, _ = _workload(case, device, dtype)
        model = _tokenizer(weights, case, device).eval()
        fns = {"setok": lambda x: model(x), "official_loop": lambda x: official_tokenize(weights, x, heads, k=k, min_clusters=min_clusters)}
        seconds = {n: [] for n in fns}
        with torch.no_grad():
            for f in fns.values():
                f(pool[0][0])  # warm-up
            names = list(fns)
            for i in range(repeats):
                x = pool[i % len(pool)][0]
                for n in names[i % 2:] + names[: i % 2]:  # alternate which runs first
                    start = clock()
                    fns[n](x)
                    seconds[n].append(clock() - start)
        med = {n: statistics.median(t) for n, t in seconds.items()}
        best = {n: min(t) for n, t in seconds.items()}
        clusters = model(pool[0][0]).num_clusters.tolist()
        print(f"{name} ({repeats} rounds, clusters per image {clusters}): setok {med['setok'] * 1e3:.2f} ms, "
              f"official loop {med['official_loop'] * 1e3:.2f} ms; setok {med['official_loop'] / med['setok']:.2f}x "
              f"(best rounds {best['official_loop'] / best['setok']:.2f}x)", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="interleaved CPU ratios of the tokenizer forward against the reference loop")
    parser.add_argument("--cases", default="", help="comma-separated case ids (default: all CPU cases)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [c for c in CPU_CASES if not args.cases or c[0] in args.cases.split(",")]
    interleaved_ratios(chosen, args.repeats, time.process_time if args.cpu_time else time.perf_counter)
