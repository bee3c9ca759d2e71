"""The native backend (setok_kernels._C, csrc/) against the reference.

Clustering decisions (labels, centres, parents, counts) must equal the
reference's; float outputs must be as close to a float64 evaluation as the
reference's own float32 results are. CUDA kernels run only with a GPU.
"""

import math
import os

import pytest
import torch

import setok_kernels as sk
from setok_kernels import _native
from setok_kernels import reference as R

from ._data import (assert_close_to_truth, cap_case, clustered, lone_token_cap_case, mask_at, offsets, on_grid,
                    scattered_mask, small_integers)
from ._oracle import assign_one_image, dpc_batch

if not _native.build_info()["loaded"]:
    if os.environ.get("SETOK_SKIP_BUILD") == "1":
        pytest.skip("native library not built (SETOK_SKIP_BUILD=1)", allow_module_level=True)
    pytest.fail(f"native library unavailable: {_native.build_info()['reason']}", pytrace=False)

DISCRETE = ("labels", "num_clusters", "centers", "parent")
FLOATS = ("score", "density", "delta")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dpc(x, backend, **kw):
    kw.setdefault("k", 5)
    return sk.dpc_cluster(x, backend=backend, **kw)


def assert_matches_reference(x, **kw):
    nat, ref = dpc(x, "native", **kw), dpc(x, "reference", **kw)
    for f in DISCRETE:
        assert torch.equal(getattr(nat, f), getattr(ref, f)), f
    # float outputs: as close to a float64 evaluation as the reference is (tests/_data.py's rule)
    truth = dpc(x.double(), "reference", **kw)
    for f in FLOATS:
        n, r, t = getattr(nat, f), getattr(ref, f), getattr(truth, f)
        assert n.dtype == r.dtype, f
        assert_close_to_truth(n, r, t, name=f)
    return nat


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_dpc_cluster_matches_reference(dtype, masked):
    x = clustered(3, 67, 24, dtype=dtype)
    mask = scattered_mask(3, 67) if masked else None
    out = assert_matches_reference(x, mask=mask, min_clusters=4)
    if masked:
        assert (out.labels[~mask] == -1).all() and (out.density[~mask] == 0).all()


@pytest.mark.parametrize("densest_delta", ["column_max", "global_max"])
def test_float64_random_data_is_exact(densest_delta):
    x = torch.randn(2, 45, 7, dtype=torch.float64)
    assert_matches_reference(x, k=4, densest_delta=densest_delta, mask=scattered_mask(2, 45, 0.8))


def test_duplicates_and_ties():
    # small integers, C = 4: every distance is exact, so ties are real ties
    x = small_integers(2, 40, 4)
    x[:, 20:30] = x[:, :10]  # exact duplicates
    out = assert_matches_reference(x, k=3, threshold=0.2, min_clusters=3)
    # duplicates: exactly equal densities, distance 0 between them
    assert torch.equal(out.density[:, 20:30], out.density[:, :10])
    assert_matches_reference(x.double(), k=3, threshold=0.2, min_clusters=3)


@pytest.mark.parametrize("N", [50, 100])  # row blocks / the whole matrix
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_equal_distances_below_the_sampled_cut(N, dtype):
    """Tokens on a shell around token 0, radii 1 + j * 1e-5: their distances to it
    share the top 12 significant bits the sampled cut keeps, so the k nearest are
    decided by the exact selection alone."""
    gen = torch.Generator().manual_seed(N)
    direction = torch.nn.functional.normalize(torch.randn(N - 1, 3, generator=gen, dtype=torch.float64), dim=1)
    radius = 1 + torch.randperm(N - 1, generator=gen).to(torch.float64)[:, None] * 1e-5
    x = torch.cat([torch.zeros(1, 3, dtype=torch.float64), direction * radius])[None].to(dtype)
    out = assert_matches_reference(x, k=5, min_clusters=2)
    d2 = (x[0].double() - x[0, 0].double()).square().sum(-1)  # itself included, as in the reference
    want = torch.exp(-d2.sort().values[:5].mean() / 3)
    torch.testing.assert_close(out.density[0, 0].double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (1, 17, 1), (5, 9, 130)])
def test_odd_shapes_and_k1(shape):
    x = clustered(*shape, groups=2)
    assert_matches_reference(x, k=1, min_clusters=2)
    assert_matches_reference(x, k=shape[1], min_clusters=1)


def test_one_real_token():
    x = clustered(3, 12, 6)
    mask = mask_at(12, [[5], [0], [11]])
    out = assert_matches_reference(x, k=1, mask=mask)
    assert out.num_clusters.tolist() == [1, 1, 1]
    assert out.centers[:, 0].tolist() == [5, 0, 11]


def test_validation_off_clamps_k_and_empty_image():
    x = clustered(3, 20, 8)
    mask = scattered_mask(3, 20, 0.2)
    mask[1] = False
    nat = dpc(x, "native", k=6, mask=mask, validate=False)
    ref = dpc(x, "reference", k=6, mask=mask, validate=False)
    for f in nat._fields:
        assert torch.allclose(getattr(nat, f).double(), getattr(ref, f).double(), rtol=1e-5, atol=1e-6), f
    assert nat.num_clusters[1] == 0 and (nat.labels[1] == -1).all()


@pytest.mark.parametrize("threshold,min_clusters,max_clusters", [(1e9, 5, None), (-1.0, 8, 7), (1e9, 9, 4), (0.5, 3, 2)])
def test_fallback_and_cap(threshold, min_clusters, max_clusters):
    x = clustered(2, 50, 12)
    out = assert_matches_reference(x, threshold=threshold, min_clusters=min_clusters, max_clusters=max_clusters)
    assert out.centers.shape == (2, max_clusters or 50)


def test_streaming_blocks_match_whole_matrix_path():
    # N^2 above the block budget: the image is processed in row blocks
    x = clustered(1, 2100, 6, groups=9)
    assert_matches_reference(x, k=8, min_clusters=9)


def test_component_ops_match_reference():
    x = clustered(2, 60, 10, dtype=torch.float64)
    mask = scattered_mask(2, 60)
    kw = dict(mask=mask)
    dens = sk.knn_density(x, 7, backend="native", **kw)
    torch.testing.assert_close(dens, sk.knn_density(x, 7, backend="reference", **kw), rtol=1e-12, atol=0)
    for mode in ("column_max", "global_max"):
        d_n, p_n = sk.density_delta(x, dens, densest_delta=mode, backend="native", **kw)
        d_r, p_r = sk.density_delta(x, dens, densest_delta=mode, backend="reference", **kw)
        assert torch.equal(p_n, p_r)
        torch.testing.assert_close(d_n, d_r, rtol=1e-12, atol=0)
    score = dens * d_n
    c_n, n_n = sk.select_centers(score, 0.02, 4, 10, backend="native", **kw)
    c_r, n_r = sk.select_centers(score, 0.02, 4, 10, backend="reference", **kw)
    assert torch.equal(c_n, c_r) and torch.equal(n_n, n_r)
    labels = sk.assign_to_centers(x, c_n, n_n, backend="native", **kw)
    assert torch.equal(labels, sk.assign_to_centers(x, c_r, n_r, backend="reference", **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_select_centers_ties_nan_and_dtypes(dtype):
    score = torch.tensor([[0.3, 0.9, 0.9, 0.1, 0.9, 0.2], [0.1, 0.2, 0.2, 0.2, 0.05, 0.2]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for args in [(0.5, 2, 1), (0.5, 2, None), (0.95, 3, None), (0.95, 2, 1)]:
        nat = sk.select_centers(score, *args, mask=mask, backend="native")
        ref = sk.select_centers(score, *args, mask=mask, backend="reference")
        assert all(torch.equal(a, b) for a, b in zip(nat, ref)), args


def test_pack_clusters_matches_reference():
    x = clustered(4, 37, 6)
    mask = scattered_mask(4, 37)
    out = dpc(x, "native", mask=mask, max_clusters=6, min_clusters=3)
    for labels in (out.labels, out.labels.int()):
        nat = sk.pack_clusters(labels, out.num_clusters, 6, backend="native")
        ref = sk.pack_clusters(labels, out.num_clusters, 6, backend="reference")
        for f in nat._fields:
            assert torch.equal(getattr(nat, f), getattr(ref, f)), f
    assert nat.cu_seqlens.dtype == nat.cu_clusters.dtype == torch.int32
    assert nat.cu_seqlens[-1] == mask.sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_segment_mean_forward_backward(dtype, index_dtype):
    cu = offsets([3, 0, 7, 1, 0], dtype=index_dtype)  # empty and length-1 segments
    x = torch.randn(13, 9, dtype=dtype)  # rows 11, 12 lie in no segment
    nat = sk.segment_mean(x, cu, backend="native")
    torch.testing.assert_close(nat, sk.segment_mean(x, cu, backend="reference"), rtol=0, atol=0)
    grad = torch.randn(5, 9, dtype=dtype)
    g_n = torch.ops.setok.native_segment_mean_backward(grad, cu, 13)
    torch.testing.assert_close(g_n, R._segment_mean_backward(grad, cu, 13), rtol=0, atol=0)


def test_segment_mean_gradcheck():
    cu = offsets([2, 0, 5])
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sk.segment_mean(t, cu, backend="native"), (x,))


def test_deterministic_and_thread_count_independent():
    x = torch.randn(4, 300, 16)
    big = torch.randn(1, 700, 16)
    wide = torch.randn(1, 150, 300)  # many channels: one thread reuses symmetric distances
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append([dpc(t, "native", k=6) for t in (x, big, wide)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for f in a._fields:
                assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_nan_in_one_image_leaves_the_others_alone():
    x = clustered(3, 30, 8)
    clean = dpc(x, "native")
    x[1, 4, 2] = float("nan")
    x[2, 7] = float("inf")
    dirty = dpc(x, "native")
    for f in clean._fields:
        assert torch.equal(getattr(clean, f)[0], getattr(dirty, f)[0]), f
    assert ((dirty.labels[1:] >= -1) & (dirty.labels[1:] < 30)).all()


def test_masked_garbage_is_ignored():
    x = clustered(2, 40, 8)
    mask = scattered_mask(2, 40)
    noisy = x.clone()
    noisy[~mask] = float("nan")
    a, b = dpc(x, "native", mask=mask), dpc(noisy, "native", mask=mask)
    for f in a._fields:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_native_ops_name_bad_enums():
    x = clustered(1, 8, 3)
    for args, name in [
        ((x, 3, 0.5, 2, 5, None, "colmax", 0, "index", "none"), "densest_delta"),
        ((x, 3, 0.5, 2, 5, None, "column_max", 0, "rank", "none"), "center_order"),
        ((x, 3, 0.5, 2, 5, None, "column_max", 0, "index", "random"), "tie_break"),
        ((x, 3, 0.5, 2, 5, None, "column_max", -1, "index", "none"), "num_centers"),
    ]:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.setok.native_dpc_cluster(*args)
    centers, num = torch.ops.setok.native_select_centers(x[..., 0], None, 0.5, 2, 5, 0, "index")
    with pytest.raises(RuntimeError, match="metric"):
        torch.ops.setok.native_assign_to_centers(x, centers, num, None, "manhattan")


def test_auto_picks_native_on_cpu_and_build_info():
    from setok_kernels.ops import resolve

    assert resolve("dpc_cluster", "auto", torch.empty(1, 4, 2), k=2, M=4).name == "native"
    info = _native.build_info()
    assert info["built_for_torch"] == torch.__version__.split("+")[0]
    assert "cpu" in info["ops"]["dpc_cluster"] and "cpu" in info["ops"]["pack_clusters"]
    assert info["ops"]["attention_segments (torch backend)"] == ["cpu"]


# ------------------------------------------------- SeTok's cap, offsets, magnitudes


def assert_matches_oracle(x, mask=None, **kw):
    """Native against the float64 oracle (tests/_oracle.py): decisions exactly, floats as close as the reference's."""
    kw = dict(dict(k=5, threshold=0.5, min_clusters=3), **kw)
    nat = dpc(x, "native", mask=mask, **kw)
    want = dpc_batch(x.double(), mask, **kw)
    for f in DISCRETE:
        assert torch.equal(getattr(nat, f), want[f]), f
    ref = dpc(x, "reference", mask=mask, **kw)
    for f in FLOATS:
        assert_close_to_truth(getattr(nat, f), getattr(ref, f), want[f], name=f)
    return nat


@pytest.mark.parametrize("case", [cap_case, lone_token_cap_case])
def test_column_max_cap_decides_centres(case):
    x = case()
    kw = dict(k=4, threshold=1e9, min_clusters=2)
    out = assert_matches_oracle(x, **kw)
    # the cap matters here: without it (delta = distance to the parent) a
    # score and the centres differ
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(2)
    to_parent = torch.gather(d, 2, out.parent.clamp(min=0)[..., None])[..., 0]
    uncapped = out.density * torch.where(out.parent >= 0, to_parent, out.delta)
    assert (uncapped - out.score).abs().max() > 1e-3
    centers, _ = sk.select_centers(uncapped, 1e9, 2, x.shape[1], backend="reference")
    assert not torch.equal(centers, out.centers)
    assert_matches_oracle(x.float(), **kw)
    assert_matches_oracle(x, **kw, tie_break="index")


@pytest.mark.parametrize("densest_delta", ["column_max", "global_max"])
@pytest.mark.parametrize("tie_break", ["none", "index"])
def test_delta_matches_oracle_masks_ties_tiny_images(densest_delta, tie_break):
    kw = dict(densest_delta=densest_delta, tie_break=tie_break)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 45, 7, generator=g, dtype=torch.float64)
    assert_matches_oracle(x, mask=scattered_mask(3, 45, 0.7), **kw)
    # small integers: exactly equal densities among duplicates and symmetric layouts
    ints = small_integers(2, 40, 3, seed=5, dtype=torch.float64)
    ints[:, 20:30] = ints[:, :10]
    assert_matches_oracle(ints, k=3, **kw)
    assert_matches_oracle(ints, k=3, mask=scattered_mask(2, 40, 0.5), **kw)
    for n in (1, 2):
        assert_matches_oracle(torch.randn(2, n, 4, generator=g, dtype=torch.float64), k=n, min_clusters=1, **kw)
    assert_matches_oracle(x, k=45, **kw)  # k = N


@pytest.mark.parametrize("per_channel", [False, True])
def test_offsets_do_not_change_the_clustering(per_channel):
    x = on_grid(clustered(3, 60, 16), bits=8, bound=math.inf)  # x + c exact in float32 for |x + c| < 2^16
    spread = x.std().item()
    g = torch.Generator().manual_seed(7)
    base = dpc(x, "native", min_clusters=4)
    for scale in (10.0, 1e3):
        c = scale * spread * (torch.randn(16, generator=g) if per_channel else torch.ones(16))
        shifted = x + (c * 256).round() / 256
        assert shifted.abs().max() < 2**15
        out = dpc(shifted, "native", min_clusters=4)
        # differences of the shifted features are exactly those of x: same results bit for bit
        for f in out._fields:
            assert torch.equal(getattr(out, f), getattr(base, f)), (scale, f)
    assert_matches_reference(shifted, min_clusters=4)


@pytest.mark.parametrize("exponent", [64, -100])
@pytest.mark.parametrize("tie_break", ["none", "index"])
def test_extreme_magnitudes_are_finite_and_exact(exponent, tie_break):
    # float32 squared distances overflow (|x| ~ 1e19) / underflow (|x| ~ 1e-30)
    x = clustered(2, 40, 8) * 2.0**exponent
    kw = dict(k=4, min_clusters=4, tie_break=tie_break)
    out = assert_matches_oracle(x, **kw)
    for f in FLOATS:
        assert torch.isfinite(getattr(out, f)).all(), f
    assert all(len(labels.unique()) > 1 for labels in out.labels)
    labels = sk.assign_to_centers(x, out.centers, out.num_clusters, metric="cosine", backend="native")
    assert torch.equal(labels, sk.assign_to_centers(x, out.centers, out.num_clusters, metric="cosine",
                                                    backend="reference"))


# ------------------------------------------------- drop-in options (num_centers, center_order, tie_break)


@pytest.mark.parametrize("center_order", ["index", "score"])
@pytest.mark.parametrize("tie_break", ["none", "index"])
def test_num_centers_order_and_tie_break_match_oracle(center_order, tie_break):
    x = small_integers(3, 50, 4, low=-3, high=4, seed=8, dtype=torch.float64)
    x[:, 25:40] = x[:, :15]  # duplicates: equal densities
    mask = scattered_mask(3, 50, 0.6)
    mask[2] = torch.arange(50) < 6  # 6 real tokens, fewer than num_centers
    kw = dict(k=4, num_centers=8, center_order=center_order, tie_break=tie_break)
    out = assert_matches_oracle(x, mask=mask, **kw)
    assert out.centers.shape == (3, 8) and out.num_clusters.tolist() == [8, 8, 6]
    assert_matches_oracle(x, **dict(kw, num_centers=None), threshold=0.3)
    # float32 rounds tied sums differently from float64: the reference is its oracle
    assert_matches_reference(x.float(), mask=mask, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_select_centers_num_centers_and_score_order(dtype):
    score = torch.tensor([[0.3, 0.9, 0.9, float("nan"), 0.9, 0.2], [0.1, 0.2, 0.2, 0.2, 0.05, 0.2]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    for kw in [dict(num_centers=3), dict(num_centers=1), dict(num_centers=4, center_order="score"),
               dict(threshold=0.15, min_clusters=2, center_order="score"),
               dict(threshold=5.0, min_clusters=3, center_order="score")]:
        kw = dict(dict(threshold=0.5, min_clusters=2), **kw)
        nat = sk.select_centers(score, mask=mask, backend="native", **kw)
        ref = sk.select_centers(score, mask=mask, backend="reference", **kw)
        assert all(torch.equal(a, b) for a, b in zip(nat, ref)), kw
    nat = sk.select_centers(score, num_centers=4, mask=mask, center_order="score", backend="native")
    assert nat[0].tolist() == [[3, 1, 2, 0], [1, 0, -1, -1]] and nat[1].tolist() == [4, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assign_cosine_matches_oracle(dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 70, 12, generator=g, dtype=torch.float64)
    x[:, 5] = 0  # a zero row: similarity 0 with every centre
    x = x.to(dtype)
    centers = torch.tensor([[10, 2, 40, 7, -1], [3, 8, 11, 12, 41]])
    num = torch.tensor([4, 5])
    mask = scattered_mask(2, 70, 0.8)
    mask.scatter_(1, centers.clamp(min=0), True)
    nat = sk.assign_to_centers(x, centers, num, mask=mask, metric="cosine", backend="native")
    assert torch.equal(nat, sk.assign_to_centers(x, centers, num, mask=mask, metric="cosine", backend="reference"))
    for b in range(2):
        real = mask[b].nonzero().flatten()
        cs = [int((real == c).nonzero()) for c in centers[b, : num[b]]]
        assert torch.equal(nat[b, real], assign_one_image(x[b, real], cs, "cosine"))
        assert (nat[b, ~mask[b]] == -1).all()
    # centre 41 points exactly where the earlier centre 11 does: every tie goes to 11
    x[1, 41] = 4 * x[1, 11]
    tied = sk.assign_to_centers(x, centers, num, mask=mask, metric="cosine", backend="native")
    assert (tied[1] == 4).nonzero().flatten().tolist() == [41]
    assert torch.equal(tied[1][nat[1] != 4], nat[1][nat[1] != 4])


# ------------------------------------------------------------------ CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_select_centers(dtype):
    g = torch.Generator().manual_seed(5)
    score = (torch.rand(6, 700, generator=g) * 4).round() / 4  # many ties
    score = score.to(dtype)
    mask = scattered_mask(6, 700)
    cases = [(0.5, 8, 5), (0.5, 8, None), (10.0, 8, None), (10.0, 900, 300), (-1.0, 2, 3)]
    for args, kw in [(a, {}) for a in cases] + [
        ((0.5, 8, 5), dict(center_order="score")),
        ((10.0, 8, None), dict(center_order="score")),
        ((0.5, 8, None), dict(num_centers=64)),
        ((0.5, 8, None), dict(num_centers=600, center_order="score")),  # more than some images' real tokens
    ]:
        ref = sk.select_centers(score, *args, mask=mask, backend="reference", **kw)
        for _ in range(2):
            nat = sk.select_centers(score.cuda(), *args, mask=mask.cuda(), backend="native", **kw)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(nat, ref)), (args, kw)


@cuda
def test_cuda_pack_clusters_and_segment_mean():
    x = clustered(5, 300, 8)
    mask = scattered_mask(5, 300)
    out = dpc(x, "reference", mask=mask, max_clusters=20, min_clusters=4)
    ref = sk.pack_clusters(out.labels, out.num_clusters, 20, backend="reference")
    nat = sk.pack_clusters(out.labels.cuda(), out.num_clusters.cuda(), 20, backend="native")
    for f in ref._fields:
        assert torch.equal(getattr(nat, f).cpu(), getattr(ref, f)), f
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        feats = torch.randn(5 * 300, 40, dtype=dtype)
        packed = feats[ref.perm]
        want = sk.segment_mean(packed, ref.cu_seqlens, backend="reference")
        got = sk.segment_mean(packed.cuda(), nat.cu_seqlens, backend="native")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3 if dtype.itemsize == 2 else 1e-6, atol=1e-6)
        assert torch.equal(got, sk.segment_mean(packed.cuda(), nat.cu_seqlens, backend="native"))
        grad = torch.randn_like(want)
        g_n = torch.ops.setok.native_segment_mean_backward(grad.cuda(), nat.cu_seqlens, packed.shape[0])
        torch.testing.assert_close(g_n.cpu(), R._segment_mean_backward(grad, ref.cu_seqlens, packed.shape[0]))


def test_stale_library_is_reported(monkeypatch):
    """A library built against another torch is refused with a reason (the import then warns)."""
    from setok_kernels import _native

    monkeypatch.setattr(torch, "__version__", "0.0.1+cpu")
    path, reason, facts = _native._load()
    assert path is not None and facts["torch"] != "0.0.1"
    assert reason == f"compiled library built for torch {facts['torch']}, running torch 0.0.1: rebuild it"


def test_library_for_other_schemas_is_never_loaded(monkeypatch):
    """A build for other native op schemas would abort the process on load: it is refused by its fingerprint first."""
    from setok_kernels import _native, _native_abi

    if _native._PATH is None:
        pytest.skip("no compiled library")
    assert _native_abi.embedded_fingerprint(_native._PATH) == _native_abi.fingerprint(_native._SCHEMAS)
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(_native, "_SCHEMAS", dict(_native._SCHEMAS, native_new_op="(Tensor x) -> Tensor"))
    path, reason, facts = _native._load()
    assert path == _native._PATH and not loaded and facts == {}
    assert "implements other native op schemas" in reason and "rebuild" in reason
