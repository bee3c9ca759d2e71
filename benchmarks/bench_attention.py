"""Group ``attention``: ragged self-attention inside clusters (forward).

Segments are clusters: each image's N tokens split into about M clusters of
uneven sizes (random cut points), packed image after image. setok's
``varlen_attention`` backends against a per-segment SDPA loop, padded SDPA
with a key mask, SDPA on nested (jagged) tensors, and flash-attn / xformers
called directly when installed.

Work counted for the floor: ``4 H D sum(L^2)`` FLOPs (QK^T and PV) and
reading q, k, v and writing the output once.

Every case also records a cost model of setok's Triton kernels on an H200
(``h200_model``, below): per kernel, the HBM bytes and tensor-core FLOPs its
tiles execute at this shape (masked pairs included), and the time they imply.
``python -m benchmarks.bench_attention`` prints it for the benchmark shapes
without running anything; ``--ratios`` instead times, on the CPU, the torch
backend against the per-segment SDPA loop and padded SDPA run in turn
(interleaved), forward and forward + backward, and prints the ratios.
"""

from __future__ import annotations

import time

import pytest
import torch

import setok_kernels as sk
from setok_kernels.triton_attention import gpu_configs

from . import baselines as bl
from .conftest import pool_size

# (id, B, N, M, H, D): SeTok's tokenizer is hidden 4096 / 2 heads (D = 2048)
# in the reference configuration; D = 128 is the usual head size.
CUDA_CASES = [("B32-N729-H2-D2048", 32, 729, 64, 2, 2048), ("B32-N729-H16-D128", 32, 729, 64, 16, 128)]
CPU_CASES = [
    ("B4-N576-H2-D128", 4, 576, 16, 2, 128),
    ("B4-N576-H4-D32", 4, 576, 32, 4, 32),
    ("B4-N576-H2-D64", 4, 576, 16, 2, 64),
    ("B4-N576-H2-D2048", 4, 576, 16, 2, 2048),  # the reference's head size (one SDPA-loop training step: ~5 s)
]

SETOK = ("triton", "flash_attn", "torch", "xformers", "reference")
BASELINES = ("sdpa_per_segment", "sdpa_padded", "sdpa_nested", "flash_attn_direct", "xformers_direct")


def segment_lengths(B: int, N: int, M: int, gen: torch.Generator) -> list[int]:
    """Uneven cluster sizes, M per image summing to N (cut points drawn uniformly)."""
    lengths = []
    for _ in range(B):
        cuts = torch.randperm(N - 1, generator=gen)[: M - 1].add(1).sort().values.tolist()
        edges = [0, *cuts, N]
        lengths += [b - a for a, b in zip(edges, edges[1:])]
    return lengths


# ------------------------------------------------------------------ H200 cost model
# issue 14's measurements on the H200: ~4.3 TB/s device copy, ~790 TFLOP/s bf16 GEMM.
H200_BYTES_PER_S = 4.3e12
H200_FLOPS = 790e12
LAUNCH_S = 5e-6  # one kernel launch, back to back on a stream


def _walk_blocks(cu_own: torch.Tensor, cu_other: torch.Tensor, own: int, walk: int) -> torch.Tensor:
    """Per tile of ``own`` packed rows, the walk blocks it runs: the union of its
    rows' partner ranges (first row's segment to last row's) over ``walk``."""
    T = int(cu_own[-1])
    first = torch.arange(0, T, own)
    last = (first + own).clamp(max=T) - 1
    seg_first = torch.searchsorted(cu_own[1:], first, right=True)
    seg_last = torch.searchsorted(cu_own[1:], last, right=True)
    span = cu_other[seg_last + 1] - cu_other[seg_first]
    return (span + walk - 1) // walk


def h200_model(lengths_q: list[int], lengths_k: list[int], H: int, D: int, elt: int = 2) -> dict:
    """Bytes, FLOPs and implied time of each Triton kernel (first config of its table;
    ``elt``-byte inputs, bf16/fp16 by default) on an H200:
    ``time = max(bytes / 4.3 TB/s, flops / 790 TFLOP/s) + 5 us``.

    Bytes: q, k, v, dO, O and the gradients cross HBM once (neighbouring tiles'
    overlapping key spans are assumed to hit L2), plus fp32 row statistics, plus
    the fp32 workspace of tiles that walk several blocks with a chunked head dim
    (written and read once per extra block). FLOPs: the tiles' GEMMs, masked
    pairs included (exp and the softmax algebra are not counted)."""
    cu_q = torch.tensor([0, *lengths_q]).cumsum(0)
    cu_k = torch.tensor([0, *lengths_k]).cumsum(0)
    Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
    row, stat = D * elt, 4  # bytes of one row of one head, of one fp32 statistic
    kernels = {}

    def add(name, config, flops, nbytes):
        bm, bn, bd, warps, stages = config
        t = max(nbytes / H200_BYTES_PER_S, flops / H200_FLOPS) + LAUNCH_S
        bound = "memory" if nbytes / H200_BYTES_PER_S >= flops / H200_FLOPS else "compute"
        kernels[name] = dict(config=f"{bm}x{bn}x{bd} w{warps} s{stages}", bytes=int(H * nbytes), flops=int(H * flops),
                             time_s=H * (t - LAUNCH_S) + LAUNCH_S, bound=bound)

    def workspace(blocks, rows, config, accumulators):
        chunked = config[2] < D
        return chunked * accumulators * (blocks - 1).clamp(min=0).sum().item() * rows * D * 4 * 2

    cfg = gpu_configs("fwd", D, torch.bfloat16)[0]
    n = _walk_blocks(cu_q, cu_k, cfg[0], cfg[1])
    add("fwd", cfg, n.sum().item() * cfg[0] * cfg[1] * D * 2 * 2,
        (2 * Tq + 2 * Tk) * row + Tq * stat + workspace(n, cfg[0], cfg, 1))
    add("bwd_preprocess", (64, 0, min(128, D), 4, 1), 2 * Tq * D, 2 * Tq * row + Tq * stat)
    cfg = gpu_configs("dq", D, torch.bfloat16)[0]
    n = _walk_blocks(cu_q, cu_k, cfg[0], cfg[1])
    add("bwd_dq", cfg, n.sum().item() * cfg[0] * cfg[1] * D * 2 * 3,
        (3 * Tq + 2 * Tk) * row + 2 * Tq * stat + workspace(n, cfg[0], cfg, 1))
    cfg = gpu_configs("dkdv", D, torch.bfloat16)[0]
    n = _walk_blocks(cu_k, cu_q, cfg[1], cfg[0])
    add("bwd_dkdv", cfg, n.sum().item() * cfg[0] * cfg[1] * D * 2 * 4,
        (2 * Tq + 4 * Tk) * row + 2 * n.sum().item() * cfg[0] * stat + workspace(n, cfg[1], cfg, 2))
    fwd = kernels["fwd"]["time_s"]
    return dict(kernels=kernels, fwd_s=fwd, fwd_bwd_s=sum(k["time_s"] for k in kernels.values()))


def _ragged_workload(case, device, dtype, grads):
    """Segment lengths, packed length, longest segment, offsets, element size and a pool of
    (q, k, v) tensors, plus an upstream gradient when ``grads`` (q, k, v then require grad)."""
    name, B, N, M, H, D = case
    gen = torch.Generator().manual_seed(B * N + H * D)
    lengths = segment_lengths(B, N, M, gen)
    T, max_len = B * N, max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    elt = torch.finfo(dtype).bits // 8
    count = 3 + (grads > 0)
    pool = [
        tuple(torch.randn(T, H, D, generator=gen).to(device, dtype).requires_grad_(i < grads) for i in range(count))
        for _ in range(pool_size(count * T * H * D * elt))
    ]
    return lengths, T, max_len, cu, elt, pool


@pytest.mark.parametrize("impl", SETOK + BASELINES)
def test_varlen_attention(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "attention"
    name, B, N, M, H, D = case
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")
    lengths, T, max_len, cu, elt, pool = _ragged_workload(case, device, dtype, grads=0)
    scale = D**-0.5
    flops = 4 * H * D * sum(L * L for L in lengths)
    nbytes = 4 * T * H * D * elt

    if impl in SETOK:
        def fn(q, k, v):
            return sk.varlen_attention(q, k, v, cu, max_seqlen_q=max_len, max_seqlen_k=max_len, scale=scale, backend=impl)
    elif impl == "sdpa_per_segment":
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

        def fn(q, k, v):
            return bl.attention_per_segment(q, k, v, bounds, scale)
    elif impl == "sdpa_padded":
        index, valid = bl.padding_index(cu, max_len)

        def fn(q, k, v):
            return bl.attention_padded(q, k, v, index, valid, scale)
    elif impl == "sdpa_nested":
        offsets = cu.long()

        def fn(q, k, v):
            return bl.attention_nested(q, k, v, offsets, scale)
    elif impl == "flash_attn_direct":
        pytest.importorskip("flash_attn")
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or D > 256:
            pytest.skip("flash-attn runs fp16/bf16 on CUDA with head dim <= 256")

        def fn(q, k, v):
            return bl.attention_flash_attn(q, k, v, cu, max_len, scale)
    else:
        pytest.importorskip("xformers")
        if device.type != "cuda":
            pytest.skip("xformers' memory-efficient attention needs CUDA")
        bias = bl.xformers_bias(lengths)

        def fn(q, k, v):
            return bl.attention_xformers(q, k, v, bias, scale)

    if impl == "sdpa_nested":
        try:
            fn(*pool[0])
        except (RuntimeError, NotImplementedError) as exc:  # kernel coverage of jagged SDPA varies by version and device
            pytest.skip(f"SDPA on nested tensors: {str(exc).splitlines()[0]}")
    measure(fn, pool, impl=impl, case=name, role="setok" if impl in SETOK else "baseline", flops=flops, bytes=nbytes,
            shape=dict(B=B, N=N, segments=len(lengths), max_seqlen=max_len, H=H, D=D, dtype=str(dtype)[6:]),
            h200_model=h200_model(lengths, lengths, H, D))


@pytest.mark.parametrize("impl", SETOK + ("sdpa_per_segment", "flash_attn_direct"))
def test_varlen_attention_forward_backward(measure, benchmark, device, dtype, case, impl):
    """A training step's attention: forward, then the gradients of q, k, v from a given dO.
    Work: ``14 H D sum(L^2)`` FLOPs (2 GEMMs forward, 5 backward with S recomputed),
    q, k, v, O, dO, dq, dk, dv and O again across memory: ``12 T H D`` elements."""
    benchmark.group = "attention_fwd_bwd"
    name, B, N, M, H, D = case
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")
    if impl == "flash_attn_direct":
        pytest.importorskip("flash_attn")
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or D > 256:
            pytest.skip("flash-attn runs fp16/bf16 on CUDA with head dim <= 256")
    lengths, T, max_len, cu, elt, pool = _ragged_workload(case, device, dtype, grads=3)
    scale = D**-0.5
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def forward(q, k, v):
        if impl in SETOK:
            return sk.varlen_attention(q, k, v, cu, max_seqlen_q=max_len, max_seqlen_k=max_len, scale=scale, backend=impl)
        if impl == "sdpa_per_segment":
            return bl.attention_per_segment(q, k, v, bounds, scale)
        return bl.attention_flash_attn(q, k, v, cu, max_len, scale)

    def fn(q, k, v, dout):
        return torch.autograd.grad(forward(q, k, v), (q, k, v), dout)

    measure(fn, pool, impl=impl, case=name, role="setok" if impl in SETOK else "baseline",
            flops=14 * H * D * sum(L * L for L in lengths), bytes=12 * T * H * D * elt,
            shape=dict(B=B, N=N, segments=len(lengths), max_seqlen=max_len, H=H, D=D, dtype=str(dtype)[6:]),
            h200_model=h200_model(lengths, lengths, H, D))


def _print_models() -> None:
    for cases in (CUDA_CASES, CPU_CASES):
        for name, B, N, M, H, D in cases:
            lengths = segment_lengths(B, N, M, torch.Generator().manual_seed(B * N + H * D))
            model = h200_model(lengths, lengths, H, D)
            print(f"{name} ({len(lengths)} segments, bf16): forward {model['fwd_s'] * 1e3:.3f} ms, "
                  f"forward + backward {model['fwd_bwd_s'] * 1e3:.3f} ms on an H200")
            for kernel, k in model["kernels"].items():
                print(f"  {kernel:15s} {k['config']:18s} {k['bytes'] / 1e6:9.1f} MB {k['flops'] / 1e9:9.1f} GFLOP "
                      f"{k['time_s'] * 1e3:7.3f} ms ({k['bound']})")


def interleaved_ratios(cases, repeats: int, clock=time.perf_counter, backward: bool = True) -> None:
    """The torch backend against the per-segment SDPA loop and padded SDPA, forward and
    forward + backward (``backward``), on the CPU: the three run in turn on the same inputs, ``repeats``
    times; prints the medians, the ratios of medians (> 1: setok faster) and of the best
    rounds. Interleaving spreads a shared machine's load over all three alike; the order
    (a, b, c), then (a, c, b), makes each run after each other one equally often, so the
    state one leaves (caches, the allocator's free memory) falls on the others alike
    (rotating the order ran setok after the ~15x slower padded SDPA in two rounds of
    three, the per-segment loop in one)."""
    import statistics

    device, dtype = torch.device("cpu"), torch.float32
    for case in cases:
        name, B, N, M, H, D = case
        for grads in (0, 3) if backward else (0,):
            lengths, T, max_len, cu, elt, pool = _ragged_workload(case, device, dtype, grads)
            q, k, v = pool[0][:3]
            scale = D**-0.5
            bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
            index, valid = bl.padding_index(cu, max_len)
            forward = {
                "setok": lambda: sk.varlen_attention(q, k, v, cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                                                     scale=scale, backend="torch"),
                "sdpa_per_segment": lambda: bl.attention_per_segment(q, k, v, bounds, scale),
                "sdpa_padded": lambda: bl.attention_padded(q, k, v, index, valid, scale),
            }
            if grads:
                dout = pool[0][3]
                fns = {n: (lambda f: lambda: torch.autograd.grad(f(), (q, k, v), dout))(f) for n, f in forward.items()}
            else:
                fns = forward
            seconds = {n: [] for n in fns}
            for f in fns.values():
                f()  # warm-up
            names = list(fns)
            for r in range(repeats):
                for n in names if r % 2 == 0 else names[:1] + names[:0:-1]:
                    start = clock()
                    fns[n]()
                    seconds[n].append(clock() - start)
            med = {n: statistics.median(x) for n, x in seconds.items()}
            best = {n: min(x) for n, x in seconds.items()}
            print(f"{name} {'forward+backward' if grads else 'forward'} ({len(lengths)} segments, {repeats} rounds): "
                  + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in med.items())
                  + f"; setok vs per-segment {med['sdpa_per_segment'] / med['setok']:.2f}x"
                  f" (best rounds {best['sdpa_per_segment'] / best['setok']:.2f}x),"
                  f" vs padded {med['sdpa_padded'] / med['setok']:.2f}x (best {best['sdpa_padded'] / best['setok']:.2f}x)",
                  flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", action="store_true", help="interleaved CPU ratios instead of the H200 model")
    parser.add_argument("--cases", default="", help="comma-separated case ids (default: all CPU cases)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (use with --threads 1)")
    parser.add_argument("--forward-only", action="store_true", help="--ratios: the forward alone")
    args = parser.parse_args()
    if not args.ratios:
        _print_models()
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        chosen = [c for c in CPU_CASES if not args.cases or c[0] in args.cases.split(",")]
        interleaved_ratios(chosen, args.repeats, time.process_time if args.cpu_time else time.perf_counter, not args.forward_only)
