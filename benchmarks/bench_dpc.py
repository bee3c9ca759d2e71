"""Group ``dpc``: DPC-kNN clustering, setok backends against the ways without setok.

Work counted for the floor: two passes over all token pairs (density, then
delta; each ``2 C`` FLOPs per pair as a matmul would do it), the assignment
to the centres (``2 C`` per token and centre), and reading the features once.

Each DPC entry also records ``extra_info["h200_model"]``: an ESTIMATE (computed
from bytes and FLOPs, never measured) of setok's Triton kernels at the case's
shape on an H200, for the path ``dpc_cluster`` takes there: the streaming
kernels (``h200_model``) or, where the B x N x N matrix fits the budget, the
Gram path (``h200_model_gram``); ``python -m benchmarks.bench_dpc`` prints both.

Also the memory claim (``--run-memory``): peak RSS of a fresh process that
clusters one image of 16,384 tokens x 256 dims, streaming reference against
the ``cdist`` version (see ``peak_rss.py``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import setok_kernels as sk

from . import baselines as bl
from .bench_attention import H200_BYTES_PER_S, LAUNCH_S

H200_TF32_FLOPS = 395e12  # dense tf32 MMA rate used for the model (tf32x3: three MMAs per product)
H200_FP16_FLOPS = 790e12  # dense float16 MMA rate (the Gram path's float16 x3: three MMAs per product)

THRESHOLD = 0.5

# (id, B, N, C, k, min_clusters)
CUDA_CASES = [("B32-N729-C1152", 32, 729, 1152, 64, 64), ("B1-N16384-C256", 1, 16384, 256, 64, 64)]
CPU_CASES = [("B4-N576-C256", 4, 576, 256, 16, 16), ("B1-N2048-C64", 1, 2048, 64, 16, 16)]

SETOK = ("native", "triton", "reference")
BASELINES = {
    "torch_batched": bl.dpc_batched,
    "per_image_loop": bl.dpc_per_image,
    "keops": bl.dpc_keops,
}


def _inputs(device, dtype, B, N, C):
    from .conftest import pool_size

    gen = torch.Generator().manual_seed(B * N + C)
    count = pool_size(B * N * C * torch.finfo(dtype).bits // 8)
    return [(torch.randn(B, N, C, generator=gen).to(device, dtype),) for _ in range(count)]


@functools.lru_cache(maxsize=None)
def _reference_clusters(case, device, dtype) -> int:
    name, B, N, C, k, min_clusters = case
    x = _inputs(device, dtype, B, N, C)[0][0]
    return int(sk.dpc_cluster(x, k=k, threshold=THRESHOLD, min_clusters=min_clusters, backend="reference", validate=False).num_clusters.sum())


def _work(B, N, C, num_clusters, dtype):
    flops = 2 * (2 * B * N * N * C) + 2 * N * C * num_clusters
    return flops, B * N * C * torch.finfo(dtype).bits // 8


# allocations and CPU scalars: no kernel launch
_NO_LAUNCH = (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.scalar_tensor)


_GRAM_ENV = "SETOK_DPC_GRAM_BYTES"


def _glue_launches(B: int, N: int, C: int, k: int, M: int, gram_bytes: int = 0) -> int:
    """aten ops (one CUDA launch each, views and allocations excluded) that triton ``dpc_cluster`` runs
    between its Triton kernels: counted on CPU zeros, the Triton kernels skipped. ``gram_bytes``: the
    Gram path's budget (0: the streaming path)."""
    from triton.runtime.jit import JITFunction
    from torch.utils._python_dispatch import TorchDispatchMode

    from setok_kernels import triton_dpc

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket not in _NO_LAUNCH:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    saved = os.environ.get(_GRAM_ENV)
    os.environ[_GRAM_ENV] = str(gram_bytes)
    x = torch.zeros(1, N, C)  # made outside the count: the caller's input
    try:
        with Count():
            triton_dpc._dpc_cluster(x, k, THRESHOLD, min(8, M), M, None, "column_max", 0, "index", "none")
    finally:
        JITFunction.run = run
        if saved is None:
            del os.environ[_GRAM_ENV]
        else:
            os.environ[_GRAM_ENV] = saved
    return Count.n


@functools.lru_cache(maxsize=None)
def h200_model(B: int, N: int, C: int, k: int, M: int, elt: int = 2) -> dict:
    """ESTIMATED time of each Triton kernel of ``dpc_cluster`` on an H200, from its launch configuration
    (``triton_dpc._config``/``_exact_config``, ``elt``-byte features, well-conditioned images: the
    EXACT launches find no row to redo; M centres per image): ``time = max(bytes / 4.3 TB/s, FLOPs / rate)
    + 5 us``.

    Bytes: HBM traffic, x read once per kernel (the column tiles' re-reads of an image, and the parents'
    rows, are the same image's, whose programs run together: assumed to hit L2) plus the (B, N) vectors. FLOPs: tensor-core work of the padded distance tiles, tf32x3
    = 3 tf32 MMAs of 2 FLOPs per multiply-add, at 395 TFLOP/s. Not modelled: the k-list merges and
    reductions on CUDA cores, select's bisection (one program per image), occupancy and waves.
    ``glue``: the torch ops between kernels (scale, mean, cap sort/scan, ...), one launch each."""
    from setok_kernels import triton_dpc as T

    cfg, exact = T._config(), T._exact_config()
    x_bytes = B * N * C * elt

    def pad(n, block):
        return -(-n // block) * block

    def gemm(block_m, cols):  # tf32x3 FLOPs of a pass over `cols` columns
        return 3 * 2 * B * pad(N, block_m) * pad(cols, cfg["BLOCK_N"]) * C

    kernels = {}

    def add(name, config, nbytes, flops=0):
        t = max(nbytes / H200_BYTES_PER_S, flops / H200_TF32_FLOPS)
        bound = "memory" if nbytes / H200_BYTES_PER_S >= flops / H200_TF32_FLOPS else "compute"
        kernels[name] = dict(config=config, bytes=int(nbytes), flops=int(flops), time_s=t + LAUNCH_S, bound=bound)

    def tile(block_m):
        return f"{block_m}x{cfg['BLOCK_N']}x{cfg['BLOCK_C']} w{cfg['num_warps']} s{cfg['num_stages']}"

    knn_m = cfg["BLOCK_M"] // 2 if k > 64 else cfg["BLOCK_M"]  # as triton_dpc._twice
    flags = f"EXACT {exact['BLOCK_M']} rows, exits"
    add("channel_stats", "32 rows x 64 ch", x_bytes + B * C * 12)
    add("sq_norms", "32 rows x 64 ch", x_bytes + B * N * 4)
    add("knn_density", tile(knn_m) + f" K_PAD={max(2, 1 << (k - 1).bit_length())}", x_bytes + B * N * 13,
        gemm(knn_m, N))
    add("knn_density_exact", flags, B * N)
    add("delta", tile(cfg["BLOCK_M"]), x_bytes + B * N * 25, gemm(cfg["BLOCK_M"], N))
    add("delta_exact", flags, B * N)
    add("parent_distance", "32 rows x 64 ch", x_bytes + B * N * 12)
    if N <= T.MAX_SELECT_N:
        add("select_centers", f"1 program/image, BLOCK={max(16, 1 << (N - 1).bit_length())}", B * N * 5 + B * M * 8)
    add("assign", tile(cfg["BLOCK_M"]) + f", {M} centres", x_bytes + B * N * 9, gemm(cfg["BLOCK_M"], M))
    add("assign_exact", flags, B * N)
    glue = _glue_launches(B, N, C, k, M)
    kernels["glue"] = dict(config=f"{glue} torch ops", bytes=0, flops=0, time_s=glue * LAUNCH_S, bound="launch")
    return dict(kernels=kernels, total_s=sum(v["time_s"] for v in kernels.values()), estimate=True)


H200_LANE_OPS = 132 * 128 * 1.98e9  # CUDA-core lane instructions per second (SMs x fp32 lanes x clock)
GOAL_S = 0.25e-3  # issue 15: dpc_cluster at W2
# dpc_gram._kth_smallest's steps until one key is left in a row's bracket: data-dependent (at most 31);
# 12.4 on average for Gaussian features at W2 (k=64; the most of a program's 4 rows), by simulation
SELECT_STEPS = 13
# lane ops per loaded feature in the Gram tile's split (convert, scale and centre, mask, hi, hi back, lo):
# each tile splits its 2 x BLOCK x C operands; the tensor cores and the lanes are assumed to overlap
SPLIT_OPS = 7


@functools.lru_cache(maxsize=None)
def h200_model_gram(B: int, N: int, C: int, k: int, M: int, elt: int = 2) -> dict:
    """ESTIMATED time of each kernel of the Gram path (``setok_kernels/dpc_gram.py``) on an H200, as
    ``h200_model`` (same rates, 5 us a launch, well-conditioned images: the density's EXACT launch exits,
    and the near-ties launches find no flagged row; a near tie of parents or labels costs its few
    candidates' C-long differences on one program, not modelled), plus
    the CUDA-core work of the row passes, which dominates them, and of the Gram tile's float16 split:
    ``time = max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s float16, lane ops / 33.5 T/s) + 5 us``.

    Lane ops are counted per matrix entry of the padded rows (N_PAD = next power of two): density,
    the bracket (~6: a max and a min), ``SELECT_STEPS`` bisection steps of a compare and an add with the
    row reduction's share (3), the last key's min (3), then the fixed-point sum (~10: fp64 convert,
    multiply, int64 add); delta, ~12 (compares, selects, three min-reductions);
    assignment, ~6 per (centre, token); finish, ~6 per (token, token) of the (B, N) vectors."""
    from setok_kernels import dpc_gram as G
    from setok_kernels import triton_dpc as T

    cfg = T._config()
    block = cfg["BLOCK_N"]
    tiles = -(-N // block)
    upper = tiles * (tiles + 1) // 2  # tiles on and above the diagonal
    n_pad = max(16, 1 << (N - 1).bit_length())
    x_bytes = B * N * C * elt
    matrix = B * N * N * 4
    kernels = {}

    def add(name, config, nbytes, flops=0, ops=0):
        times = {"memory": nbytes / H200_BYTES_PER_S, "compute": flops / H200_FP16_FLOPS,
                 "CUDA cores": ops / H200_LANE_OPS}
        bound = max(times, key=times.get)
        kernels[name] = dict(config=config, bytes=int(nbytes), flops=int(flops), lane_ops=int(ops),
                             time_s=times[bound] + LAUNCH_S, bound=bound)

    rows = f"{G._rows(N)[1]} rows x {n_pad}"
    flags = f"EXACT {T._exact_config()['BLOCK_M']} rows, exits"
    # dpc_gram._prepare: the stats, then scale, mean, |a|^2 and nmax in one launch (no torch glue)
    add("stats", "32 rows x 64 ch, mean + amax", x_bytes + B * C * 12)
    add("norms", "32 rows x 64 ch, + scale, shift, nmax", x_bytes + B * C * 16 + B * N * 4)
    add("gram", f"{block}x{block}x{cfg['BLOCK_C']} w{cfg['num_warps']}, {upper} of {tiles * tiles} tiles, fp16x3",
        x_bytes + matrix, 3 * 2 * B * upper * block * block * C, ops=B * upper * 2 * block * C * SPLIT_OPS)
    add("density", rows + f", {SELECT_STEPS}-step select", matrix + B * N * 13,
        ops=B * N * n_pad * (6 + SELECT_STEPS * 3 + 3 + 10))
    add("density_exact", flags, B * N)
    add("delta", rows, matrix + B * N * 25, ops=B * N * n_pad * 12)
    add("delta_near_ties", "128 rows, exits", B * N)
    add("finish", "32 rows x 128, parent distance, cap, score", x_bytes + B * N * 29, ops=B * N * N * 6)
    if N <= T.MAX_SELECT_N:
        add("select_centers", f"1 program/image, BLOCK={max(16, 1 << (N - 1).bit_length())}", B * N * 5 + B * M * 8)
    add("assign", f"16 centres x 128 tokens, {M} centres", B * M * N * 4 + B * N * 13, ops=B * M * N * 6)
    add("assign_near_ties", "128 rows, exits", B * N)
    glue = _glue_launches(B, N, C, k, M, gram_bytes=matrix)
    launches_s = (len(kernels) + glue) * LAUNCH_S
    kernels["glue"] = dict(config=f"{glue} torch ops", bytes=0, flops=0, lane_ops=0, time_s=glue * LAUNCH_S,
                           bound="launch")
    total = sum(v["time_s"] for v in kernels.values())
    return dict(kernels=kernels, total_s=total, launches_s=launches_s, goal_s=GOAL_S, estimate=True)


def _model(B, N, C, k, M, elt=2) -> dict:
    """The model of the path triton ``dpc_cluster`` takes at this shape."""
    from setok_kernels.dpc_gram import use_gram

    gram = use_gram(torch.empty(B, N, C, device="meta"))
    return dict((h200_model_gram if gram else h200_model)(B, N, C, k, M, elt), path="gram" if gram else "streaming")


@pytest.mark.parametrize("impl", SETOK + tuple(BASELINES))
def test_dpc_cluster(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "dpc"
    name, B, N, C, k, min_clusters = case
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")
    if impl == "keops":
        reason = bl.keops_available()
        if reason:
            pytest.skip(reason)
        if benchmark.disabled:
            pytest.skip("KeOps compiles each formula on first use (minutes): not in smoke runs")
    pool = _inputs(device, dtype, B, N, C)
    clusters = _reference_clusters(case, device, dtype)
    flops, nbytes = _work(B, N, C, clusters, dtype)
    if impl in SETOK:
        def fn(x):
            return sk.dpc_cluster(x, k=k, threshold=THRESHOLD, min_clusters=min_clusters, backend=impl, validate=False)
        role = "setok"
    else:
        baseline = BASELINES[impl]

        def fn(x):
            return baseline(x, k, THRESHOLD, min_clusters)
        role = "baseline"
    measure(fn, pool, impl=impl, case=name, role=role, flops=flops, bytes=nbytes,
            shape=dict(B=B, N=N, C=C, k=k, min_clusters=min_clusters, dtype=str(dtype)[6:]),
            h200_model=_model(B, N, C, k, max(1, -(-clusters // B)), torch.finfo(dtype).bits // 8))


# ------------------------------------------------------------------ memory


@pytest.mark.memory
@pytest.mark.parametrize("impl", ["reference", "torch_batched"])
def test_peak_rss_16k_tokens(benchmark, impl):
    """Whole-process peak RSS clustering one image of 16,384 x 256 on the CPU."""
    benchmark.group = "dpc-memory"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(root / "benchmarks" / "peak_rss.py"), "--impl", impl, "--n", "16384", "--c", "256", "--k", "64"]

    def run():
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result, impl=impl, case="B1-N16384-C256", role="setok" if impl == "reference" else "baseline")
    if impl == "reference":
        assert result["peak_rss_bytes"] < 1 << 30, f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB >= 1 GiB"


# ------------------------------------------------------------------ the passes one by one


def _batched_distance(x):
    xf = x.float()
    return torch.cdist(xf, xf) / xf.shape[-1] ** 0.5


def _parts(x, k, min_clusters):
    """Inputs each pass needs, computed once outside the timed call."""
    density = sk.knn_density(x, k, backend="reference", validate=False)
    delta, _ = sk.density_delta(x, density, backend="reference", validate=False)
    score = density * delta
    centers, num = sk.select_centers(score, THRESHOLD, min_clusters, backend="reference")
    return density, score, centers, num


# per pass: the setok call, and the batched PyTorch way (B x N x N) a user would write
PASSES = {
    "pairwise_distance": (
        lambda x, p, k, m, b: sk.pairwise_distance(x, backend=b),
        lambda x, p, k, m: _batched_distance(x),
    ),
    "knn_density": (
        lambda x, p, k, m, b: sk.knn_density(x, k, backend=b, validate=False),
        lambda x, p, k, m: torch.exp(-(_batched_distance(x).topk(k, dim=-1, largest=False).values ** 2).mean(-1)),
    ),
    "density_delta": (
        lambda x, p, k, m, b: sk.density_delta(x, p[0], backend=b, validate=False),
        lambda x, p, k, m: torch.where(p[0][:, None, :] > p[0][:, :, None], _batched_distance(x), float("inf")).min(-1),
    ),
    "select_centers": (
        lambda x, p, k, m, b: sk.select_centers(p[1], THRESHOLD, m, backend=b),
        lambda x, p, k, m: bl._rank_select(p[1], THRESHOLD, m),
    ),
    "assign_to_centers": (
        lambda x, p, k, m, b: sk.assign_to_centers(x, p[2], p[3], backend=b, validate=False),
        lambda x, p, k, m: torch.cdist(x.float(), torch.gather(x.float(), 1, p[2].clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))).argmin(-1),
    ),
}


@pytest.mark.parametrize("impl", SETOK + ("torch_batched",))
@pytest.mark.parametrize("op", sorted(PASSES))
def test_dpc_pass(measure, benchmark, device, dtype, case, op, impl):
    benchmark.group = f"dpc-{op}"
    name, B, N, C, k, min_clusters = case
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")
    pool = _inputs(device, dtype, B, N, C)
    parts = _parts(pool[0][0], k, min_clusters)
    setok_fn, baseline_fn = PASSES[op]
    if impl in SETOK:
        try:
            setok_fn(pool[0][0], parts, k, min_clusters, impl)
        except sk.BackendUnavailableError as exc:
            pytest.skip(str(exc))

        def fn(x):
            return setok_fn(x, parts, k, min_clusters, impl)
    else:
        def fn(x):
            return baseline_fn(x, parts, k, min_clusters)
    # a pass over all pairs; assignment: tokens x centres; selection: reading the scores
    columns = {"assign_to_centers": int(parts[3].max()), "select_centers": 0}.get(op, N)
    flops = 2 * B * N * columns * C
    nbytes = B * N * 4 if op == "select_centers" else B * N * C * torch.finfo(dtype).bits // 8
    measure(fn, pool, impl=impl, case=name, role="setok" if impl in SETOK else "baseline", flops=flops,
            bytes=nbytes, shape=dict(B=B, N=N, C=C, k=k, dtype=str(dtype)[6:]))


def _print_models() -> None:
    from setok_kernels.dpc_gram import use_gram

    for name, B, N, C, k, _ in CUDA_CASES + CPU_CASES:
        M = 64  # centres assigned to (the model's assignment pass grows with them)
        models = [("streaming", h200_model(B, N, C, k, M))]
        if use_gram(torch.empty(B, N, C, device="meta")):  # the path dpc_cluster takes here
            models.append(("Gram", h200_model_gram(B, N, C, k, M)))
        for path, model in models:
            goal = f" (goal {GOAL_S * 1e3:.2f} ms)" if (B, N, C) == (32, 729, 1152) else ""
            launches = f", {model['launches_s'] * 1e3:.3f} ms of it launches" if "launches_s" in model else ""
            print(f"{name} (bf16, k={k}, {M} centres), {path} path: ESTIMATE {model['total_s'] * 1e3:.3f} ms "
                  f"on an H200{goal}{launches}, not measured")
            for kernel, v in model["kernels"].items():
                ops = f" {v['lane_ops'] / 1e9:7.2f} Gop" if "lane_ops" in v else ""
                print(f"  {kernel:18s} {v['config']:40s} {v['bytes'] / 1e6:9.2f} MB {v['flops'] / 1e9:9.1f} GFLOP"
                      f"{ops} {v['time_s'] * 1e6:8.1f} us ({v['bound']})")


if __name__ == "__main__":
    _print_models()
