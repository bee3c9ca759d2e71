"""Triton DPC kernels (``backend="triton"``) against the exact reference.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so shapes stay small. The kernels compute distances with
the norm trick (|a|^2 + |b|^2 - 2 a.b), whose error in a scaled squared
distance is at most ~4 * eps32 * max|x|^2 (fp32 accumulation over C terms,
divided by C); the reference is built from differences and is far more
exact. Tolerances are therefore: twice the reference's own float32 error
versus float64, plus that norm-trick bound. Clusters must match exactly on
separated data; on near-tie data a Rand index >= 0.99.
"""

import math

import pytest
import torch

import setok_kernels as sk
from setok_kernels import BackendUnavailableError, _backends
from setok_kernels import triton_dpc as T

OPS = torch.ops.setok
EPS32 = torch.finfo(torch.float32).eps


def mixture(B, N, C, sizes=(0.6, 0.25, 0.1, 0.05), spread=0.05, seed=0, dtype=torch.float32):
    """Gaussian blobs of very unequal relative sizes, tokens shuffled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(B, N, C, dtype=torch.float64)
    for b in range(B):
        centres = torch.randn(len(sizes), C, generator=g, dtype=torch.float64) * 3
        counts = [max(1, int(s * N)) for s in sizes]
        counts[0] += N - sum(counts)
        pts = torch.cat([c + spread * torch.randn(max(n, 0), C, generator=g, dtype=torch.float64) for c, n in zip(centres, counts)])
        x[b] = pts[:N][torch.randperm(N, generator=g)]
    return x.to(dtype)


def scattered_mask(B, N, keep=0.6, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) < keep
    m[:, 0] |= ~m.any(1)
    return m


def norm_trick_bound(x):
    """Worst-case error of a kernel's scaled squared distance (see module docstring)."""
    return 4 * EPS32 * x.double().pow(2).sum(-1).max().item()


def triton(fn, *args, **kw):
    return fn(*args, backend="triton", **kw)


def assert_same_clusters(got, want):
    for key in ("labels", "num_clusters", "centers"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key


def rand_index(a, b):
    same_a = a[:, None] == a[None, :]
    same_b = b[:, None] == b[None, :]
    return (same_a == same_b).double().mean().item()


# ------------------------------------------------------------------ clustering


CLUSTER_CASES = {
    "odd_n_unequal": dict(x=lambda: mixture(3, 100, 40, sizes=(0.9, 0.05, 0.03, 0.02)), k=2),
    "n70_c16": dict(x=lambda: mixture(1, 70, 16), k=5),
    "n33_c3_k1": dict(x=lambda: mixture(3, 33, 3), k=1),
    "n7": dict(x=lambda: mixture(1, 7, 16, sizes=(0.6, 0.4)), k=3, min_clusters=2),
    "one_token": dict(x=lambda: torch.randn(3, 1, 16), k=1),
    "k64_setok_default": dict(x=lambda: mixture(1, 100, 16, sizes=(0.7, 0.3)), k=64, min_clusters=2),
    "k_above_64": dict(x=lambda: mixture(1, 100, 3, sizes=(0.75, 0.25)), k=70, min_clusters=2),
    "fallback": dict(x=lambda: mixture(3, 70, 16), threshold=1e9, min_clusters=6),
    "fallback_more_than_n": dict(x=lambda: mixture(1, 7, 3), threshold=1e9, min_clusters=64, k=2),
    "cap": dict(x=lambda: mixture(3, 33, 40), threshold=-1.0, max_clusters=7),
    "global_max": dict(x=lambda: mixture(3, 70, 16), densest_delta="global_max"),
    "masked": dict(x=lambda: mixture(3, 100, 16), mask=lambda: scattered_mask(3, 100)),
    "masked_global_max": dict(x=lambda: mixture(3, 70, 3), mask=lambda: scattered_mask(3, 70, 0.4), densest_delta="global_max"),
}


@pytest.mark.parametrize("case", sorted(CLUSTER_CASES))
def test_clusters_equal_reference(case):
    kw = dict(k=4, threshold=0.5, min_clusters=4)
    kw.update(CLUSTER_CASES[case])
    x = kw.pop("x")()
    if callable(kw.get("mask")):
        kw["mask"] = kw["mask"]()
    got = triton(sk.dpc_cluster, x, **kw)
    want = sk.dpc_cluster(x, **kw, backend="reference")
    assert_same_clusters(got, want)
    assert got.score.dtype == torch.float32 and got.parent.dtype == torch.int64
    mask = kw.get("mask")
    if mask is not None:
        assert (got.labels[~mask] == -1).all() and (got.density[~mask] == 0).all()
        assert (got.parent[~mask] == -1).all() and (got.delta[~mask] == 0).all()
    torch.testing.assert_close(got.score, want.score, rtol=0, atol=1e-3 + math.sqrt(norm_trick_bound(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    x = mixture(3, 70, 40, dtype=dtype)
    mask = scattered_mask(3, 70, 0.7)
    got = triton(sk.dpc_cluster, x, 5, 0.5, 4, None, mask)
    want = sk.dpc_cluster(x, 5, 0.5, 4, None, mask, backend="reference")
    assert got.density.dtype == torch.float32
    assert_same_clusters(got, want)
    # the kernels multiply the 16-bit values exactly: same error budget as fp32
    bound = norm_trick_bound(x)
    assert (got.density - want.density).abs().max() <= 2 * 1e-7 + bound


def test_near_ties_rand_index():
    """Unclustered data: centres are near-ties, yet partitions agree."""
    x = torch.randn(3, 100, 16)
    got = triton(sk.dpc_cluster, x, 5, 0.5, 4)
    want = sk.dpc_cluster(x, 5, 0.5, 4, backend="reference")
    for b in range(3):
        assert rand_index(got.labels[b], want.labels[b]) >= 0.99


def test_duplicates_and_ties():
    base = mixture(1, 20, 16)
    x = torch.cat([base, base[:, :7], base[:, 3:5]], 1)
    x = x[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))]
    got = triton(sk.dpc_cluster, x, 3, 0.0, 4)
    want = sk.dpc_cluster(x, 3, 0.0, 4, backend="reference")
    assert_same_clusters(got, want)
    # duplicates: bit-identical densities, so neither is strictly denser
    for i in range(x.shape[1]):
        for j in range(x.shape[1]):
            if torch.equal(x[0, i], x[0, j]):
                assert got.density[0, i] == got.density[0, j]
                assert got.parent[0, i] != j
    # an all-identical image: no token is denser, the first three are centres
    same = torch.full((1, 11, 3), 0.7)
    r = triton(sk.dpc_cluster, same, 4, -1.0, 4, 3)
    assert r.centers[0].tolist() == [0, 1, 2] and (r.parent == -1).all()
    assert (r.density == 1).all() and r.labels[0].tolist() == [0, 1, 2] + [0] * 8


def test_masked_tokens_are_removed_tokens():
    x = mixture(3, 70, 16)
    mask = scattered_mask(3, 70)
    r = triton(sk.dpc_cluster, x, 4, 0.5, 4, None, mask)
    for b in range(3):
        real = mask[b].nonzero().flatten()
        alone = triton(sk.dpc_cluster, x[b : b + 1, real], 4, 0.5, 4)
        assert torch.equal(r.labels[b, real], alone.labels[0])
        assert torch.equal(r.centers[b, : r.num_clusters[b]], real[alone.centers[0, : alone.num_clusters[0]]])
        torch.testing.assert_close(r.density[b, real], alone.density[0], rtol=0, atol=norm_trick_bound(x))


def test_validation_off_clamps_k_and_empty_image():
    x = mixture(3, 33, 16)
    mask = torch.zeros(3, 33, dtype=torch.bool)
    mask[0, [2, 5, 30]] = True  # 3 real tokens < k
    mask[1] = True  # image 2 has none
    got = triton(sk.dpc_cluster, x, 6, 0.5, 2, None, mask, validate=False)
    want = sk.dpc_cluster(x, 6, 0.5, 2, None, mask, backend="reference", validate=False)
    assert_same_clusters(got, want)
    assert got.num_clusters[2] == 0 and (got.labels[2] == -1).all() and (got.centers[2] == -1).all()
    torch.testing.assert_close(got.density, want.density, rtol=0, atol=norm_trick_bound(x))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_nan_image_does_not_touch_others():
    x = mixture(3, 33, 16)
    clean = triton(sk.dpc_cluster, x, 4, 0.5, 4)
    x[1, 5, 3] = float("nan")
    x[1, 9] = float("inf")
    dirty = triton(sk.dpc_cluster, x, 4, 0.5, 4)
    for a, b in zip(clean, dirty):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert ((dirty.labels[1] >= -1) & (dirty.labels[1] < dirty.num_clusters[1].clamp(min=1))).all()


def test_strided_input_equals_contiguous():
    big = mixture(3, 70, 40).transpose(0, 1)  # (70, 3, 40): a (3, 70, 40) view with odd strides
    x = big.transpose(0, 1)[:, :, ::2]
    assert not x.is_contiguous()
    for a, b in zip(triton(sk.dpc_cluster, x, 4, 0.5, 4), triton(sk.dpc_cluster, x.contiguous(), 4, 0.5, 4)):
        assert torch.equal(a, b)


def test_deterministic():
    x = mixture(2, 100, 16)
    first = triton(sk.dpc_cluster, x, 5, 0.5, 4)
    for a, b in zip(first, triton(sk.dpc_cluster, x, 5, 0.5, 4)):
        assert torch.equal(a, b)


def test_parts_compose_to_dpc_cluster():
    x = mixture(2, 70, 16)
    mask = scattered_mask(2, 70)
    r = triton(sk.dpc_cluster, x, 5, 0.5, 4, 9, mask)
    density = triton(sk.knn_density, x, 5, mask)
    delta, parent = triton(sk.density_delta, x, density, mask)
    centers, num = triton(sk.select_centers, density * delta, 0.5, 4, 9, mask)
    labels = triton(sk.assign_to_centers, x, centers, num, mask)
    for a, b in zip(r, (labels, num, centers, density * delta, density, delta, parent)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("N,C,k", [(7, 3, 1), (33, 40, 5), (100, 16, 64), (90, 3, 80)])
def test_density_within_tolerance(N, C, k):
    x = mixture(2, N, C, sizes=(0.5, 0.3, 0.2))
    mask = scattered_mask(2, N, 0.9) if N > k + 20 else None
    got = triton(sk.knn_density, x, k, mask)
    ref32 = sk.knn_density(x, k, mask, backend="reference")
    ref64 = sk.knn_density(x.double(), k, mask, backend="reference")
    ref_err = (ref32.double() - ref64).abs().max().item()
    assert (got.double() - ref64).abs().max().item() <= 2 * ref_err + norm_trick_bound(x)


@pytest.mark.parametrize("densest_delta", ["column_max", "global_max"])
def test_delta_and_parent_within_tolerance(densest_delta):
    """Same density in: parents are strictly denser, at delta within tolerance."""
    x = mixture(3, 100, 16, sizes=(0.5, 0.3, 0.2), spread=0.5)
    mask = scattered_mask(3, 100, 0.8)
    density = sk.knn_density(x.double(), 5, mask, backend="reference").float()
    density[:, 10:14] = density[:, 10:11]  # ties: not strictly denser than each other
    delta, parent = triton(sk.density_delta, x, density, mask, densest_delta)
    ref32, _ = sk.density_delta(x, density, mask, densest_delta, backend="reference")
    ref64, parent64 = sk.density_delta(x.double(), density.double(), mask, densest_delta, backend="reference")
    bound = norm_trick_bound(x)
    ref_err = (ref32.double() - ref64).abs().max().item()
    tol = 2 * ref_err + torch.minimum(torch.full_like(ref64, math.sqrt(bound)), bound / ref64.clamp(min=1e-30))
    assert ((delta.double() - ref64).abs() <= tol).all()
    assert torch.equal(parent < 0, parent64 < 0)
    assert (parent[~mask] == -1).all() and (delta[~mask] == 0).all()
    assert (parent == parent64).double().mean() >= 0.97  # the rest: distance near-ties
    has = parent >= 0
    b, i = has.nonzero(as_tuple=True)
    j = parent[has]
    assert (density[b, j] > density[b, i]).all() and mask[b, j].all()
    d = (x.double()[b, i] - x.double()[b, j]).norm(dim=-1) / math.sqrt(16)
    assert ((d - ref64[b, i]).abs() <= tol[b, i]).all()


def test_pairwise_distance():
    x = mixture(2, 70, 40)
    mask = scattered_mask(2, 70)
    d = triton(sk.pairwise_distance, x, mask)
    want = sk.pairwise_distance(x.double(), mask, backend="reference")
    pair = mask[:, :, None] & mask[:, None, :]
    assert torch.isinf(d[~pair]).all()
    assert (d[pair] >= 0).all() and (d.diagonal(dim1=1, dim2=2)[mask] == 0).all()
    bound = norm_trick_bound(x)
    tol = torch.minimum(torch.full_like(want[pair], math.sqrt(bound)), bound / want[pair].clamp(min=1e-30)) + 1e-6
    assert ((d[pair].double() - want[pair]).abs() <= tol).all()


# ------------------------------------------------------------------ centres, labels


def test_select_centers_equals_reference():
    g = torch.Generator().manual_seed(5)
    score = torch.randint(-3, 4, (3, 100), generator=g).float() / 4  # many ties
    score[0, :7] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3.0])
    mask = scattered_mask(3, 100, 0.7)
    mask[2] = False  # no real token: no centre
    for threshold, min_clusters, M in [(0.5, 8, 100), (0.5, 8, 5), (10.0, 8, 130), (10.0, 200, 100), (-10.0, 1, 3), (0.0, 3, 1)]:
        for m in (None, mask):
            got = triton(sk.select_centers, score, threshold, min_clusters, M, m)
            want = sk.select_centers(score, threshold, min_clusters, M, m, backend="reference")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threshold, min_clusters, M)


def test_assign_to_centers_equals_reference():
    x = mixture(3, 70, 16)
    x[0, 40] = x[0, 3]  # a centre duplicating an earlier centre still labels itself
    mask = scattered_mask(3, 70)
    mask[0, [3, 10, 22, 40, 69]] = True
    centers = torch.full((3, 8), -1, dtype=torch.int64)
    centers[0, :5] = torch.tensor([3, 10, 22, 40, 69])
    centers[1, :1] = mask[1].nonzero()[0]
    num = torch.tensor([5, 1, 0])
    got = triton(sk.assign_to_centers, x, centers, num, mask)
    want = sk.assign_to_centers(x, centers, num, mask, backend="reference")
    assert torch.equal(got, want)
    assert got[0, 40] == 3 and got[0, 3] == 0 and (got[2] == -1).all()


# ------------------------------------------------------------------ op layer


def test_declines_with_reasons():
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        triton(sk.knn_density, x, 3)
    impl = next(i for i in _backends.implementations("knn_density") if i.name == "triton")
    call = _backends.CallInfo(torch.device("cuda"), torch.float16, extra=dict(k=T.MAX_K + 1))
    assert "k = 129 > 128" in impl.decline_reason(call, forced=True)
    with pytest.raises(BackendUnavailableError, match="k = 129"):
        triton(sk.dpc_cluster, torch.randn(1, 130, 4), T.MAX_K + 1)
    # auto never picks the interpreter on CPU
    cpu = _backends.CallInfo(torch.device("cpu"), torch.float32, extra=dict(k=3, N=9))
    assert "automatically" in impl.decline_reason(cpu, forced=False)
    assert _backends.resolve("knn_density", "auto", cpu).name != "triton"


def test_opcheck():
    x = mixture(2, 23, 5)
    mask = scattered_mask(2, 23)
    density = OPS.knn_density(x, 3, mask, "triton")
    delta, _ = OPS.density_delta(x, density, mask, "column_max", "triton")
    centers, num = OPS.select_centers(density * delta, 0.5, 4, 23, mask, "triton")
    cases = [
        (OPS.pairwise_distance, (x, mask, "triton")),
        (OPS.knn_density, (x, 3, mask, "triton")),
        (OPS.density_delta, (x, density, mask, "global_max", "triton")),
        (OPS.select_centers, (density * delta, 0.5, 4, 6, mask, "triton")),
        (OPS.assign_to_centers, (x, centers, num, mask, "triton")),
        (OPS.dpc_cluster, (x, 3, 0.5, 4, 23, mask, "column_max", "triton")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_fullgraph():
    x = mixture(2, 33, 16)
    mask = scattered_mask(2, 33)

    def cluster(x, mask):
        return tuple(sk.dpc_cluster(x, 4, 0.5, 4, 8, mask, backend="triton"))

    eager = cluster(x, mask)
    compiled = torch.compile(cluster, fullgraph=True, backend="aot_eager")(x, mask)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture():
    x = mixture(4, 729, 64, dtype=torch.bfloat16).cuda()
    mask = scattered_mask(4, 729, 0.9).cuda()
    eager = sk.dpc_cluster(x, 16, 0.5, 8, 64, mask, backend="triton")  # compiles the kernels
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sk.dpc_cluster(static_x, 16, 0.5, 8, 64, mask, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = sk.dpc_cluster(static_x, 16, 0.5, 8, 64, mask, backend="triton")
    static_x.copy_(x.flip(0))
    graph.replay()
    want = sk.dpc_cluster(x.flip(0), 16, 0.5, 8, 64, mask, backend="triton")
    for a, b in zip(out, want):
        assert torch.equal(a, b)
    assert not torch.equal(out.density, eager.density)  # the replay saw the new input


def test_parent_ties_across_tiles_take_smallest_index():
    """Equidistant denser tokens in different column tiles: the smallest index wins."""
    x = mixture(1, 100, 16, sizes=(0.5, 0.5), spread=0.5)
    x[0, 80] = x[0, 10]  # duplicates, 64-column tiles apart
    density = torch.linspace(0.1, 0.5, 100)[None].clone()
    density[0, [10, 80]] = 1.0  # the densest pair: equal, so not denser than each other
    delta, parent = triton(sk.density_delta, x, density)
    want_delta, want_parent = sk.density_delta(x.double(), density.double(), backend="reference")
    assert (parent[0] != 80).all() and (parent[0] == 10).sum() >= 5
    assert parent[0, 10] == -1 and parent[0, 80] == -1
    assert torch.equal(parent, want_parent)
