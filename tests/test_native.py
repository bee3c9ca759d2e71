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

if not _native.build_info()["loaded"]:
    if os.environ.get("SETOK_SKIP_BUILD") == "1":
        pytest.skip("native library not built (SETOK_SKIP_BUILD=1)", allow_module_level=True)
    pytest.fail(f"native library unavailable: {_native.build_info()['reason']}", pytrace=False)

DISCRETE = ("labels", "num_clusters", "centers", "parent")
FLOATS = ("score", "density", "delta")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def separated(B, N, C, groups=6, dtype=torch.float32, seed=0):
    """Tight, far-apart groups: no near-ties, so decisions are unambiguous."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, groups, C, generator=g) * 4
    which = torch.randint(groups, (B, N), generator=g)
    x = torch.gather(centres, 1, which[..., None].expand(B, N, C)) + 0.3 * torch.randn(B, N, C, generator=g)
    return x.to(dtype)


def scattered_mask(B, N, keep=0.6, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=g) < keep
    mask[:, 0] = True
    return mask


def dpc(x, backend, **kw):
    kw.setdefault("k", 5)
    return sk.dpc_cluster(x, backend=backend, **kw)


def assert_matches_reference(x, **kw):
    nat, ref = dpc(x, "native", **kw), dpc(x, "reference", **kw)
    for f in DISCRETE:
        assert torch.equal(getattr(nat, f), getattr(ref, f)), f
    # float outputs: no farther from a float64 evaluation than the reference is
    truth = dpc(x.double(), "reference", **kw)
    for f in FLOATS:
        n, r, t = getattr(nat, f), getattr(ref, f), getattr(truth, f)
        assert n.dtype == r.dtype, f
        ref_err = (r.double() - t).abs().max().item()
        eps = torch.finfo(n.dtype).eps * max(1.0, t.abs().max().item())
        assert (n.double() - t).abs().max().item() <= 4 * ref_err + 8 * eps, f
    return nat


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_dpc_cluster_matches_reference(dtype, masked):
    x = separated(3, 67, 24, dtype=dtype)
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
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (2, 40, 4), generator=g).float()
    x[:, 20:30] = x[:, :10]  # exact duplicates
    out = assert_matches_reference(x, k=3, threshold=0.2, min_clusters=3)
    # duplicates: exactly equal densities, distance 0 between them
    assert torch.equal(out.density[:, 20:30], out.density[:, :10])
    assert_matches_reference(x.double(), k=3, threshold=0.2, min_clusters=3)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (1, 17, 1), (5, 9, 130)])
def test_odd_shapes_and_k1(shape):
    x = separated(*shape, groups=2)
    assert_matches_reference(x, k=1, min_clusters=2)
    assert_matches_reference(x, k=shape[1], min_clusters=1)


def test_one_real_token():
    x = separated(3, 12, 6)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 5] = mask[1, 0] = mask[2, 11] = True
    out = assert_matches_reference(x, k=1, mask=mask)
    assert out.num_clusters.tolist() == [1, 1, 1]
    assert out.centers[:, 0].tolist() == [5, 0, 11]


def test_validation_off_clamps_k_and_empty_image():
    x = separated(3, 20, 8)
    mask = scattered_mask(3, 20, 0.2)
    mask[1] = False
    nat = dpc(x, "native", k=6, mask=mask, validate=False)
    ref = dpc(x, "reference", k=6, mask=mask, validate=False)
    for f in nat._fields:
        assert torch.allclose(getattr(nat, f).double(), getattr(ref, f).double(), rtol=1e-5, atol=1e-6), f
    assert nat.num_clusters[1] == 0 and (nat.labels[1] == -1).all()


@pytest.mark.parametrize("threshold,min_clusters,max_clusters", [(1e9, 5, None), (-1.0, 8, 7), (1e9, 9, 4), (0.5, 3, 2)])
def test_fallback_and_cap(threshold, min_clusters, max_clusters):
    x = separated(2, 50, 12)
    out = assert_matches_reference(x, threshold=threshold, min_clusters=min_clusters, max_clusters=max_clusters)
    assert out.centers.shape == (2, max_clusters or 50)


def test_streaming_blocks_match_whole_matrix_path():
    # N^2 above the block budget: the image is processed in row blocks
    x = separated(1, 2100, 6, groups=9)
    assert_matches_reference(x, k=8, min_clusters=9)


def test_component_ops_match_reference():
    x = separated(2, 60, 10, dtype=torch.float64)
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
    x = separated(4, 37, 6)
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
    cu = torch.tensor([0, 3, 3, 10, 11, 11], dtype=index_dtype)  # empty segments included
    x = torch.randn(13, 9, dtype=dtype)  # rows 11, 12 lie in no segment
    nat = sk.segment_mean(x, cu, backend="native")
    torch.testing.assert_close(nat, sk.segment_mean(x, cu, backend="reference"), rtol=0, atol=0)
    grad = torch.randn(5, 9, dtype=dtype)
    g_n = torch.ops.setok.native_segment_mean_backward(grad, cu, 13)
    torch.testing.assert_close(g_n, R._segment_mean_backward(grad, cu, 13), rtol=0, atol=0)


def test_segment_mean_gradcheck():
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sk.segment_mean(t, cu, backend="native"), (x,))


def test_deterministic_and_thread_count_independent():
    x = torch.randn(4, 300, 16)
    big = torch.randn(1, 700, 16)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append([dpc(t, "native", k=6) for t in (x, big)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for f in a._fields:
                assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_nan_in_one_image_leaves_the_others_alone():
    x = separated(3, 30, 8)
    clean = dpc(x, "native")
    x[1, 4, 2] = float("nan")
    x[2, 7] = float("inf")
    dirty = dpc(x, "native")
    for f in clean._fields:
        assert torch.equal(getattr(clean, f)[0], getattr(dirty, f)[0]), f
    assert ((dirty.labels[1:] >= -1) & (dirty.labels[1:] < 30)).all()


def test_masked_garbage_is_ignored():
    x = separated(2, 40, 8)
    mask = scattered_mask(2, 40)
    noisy = x.clone()
    noisy[~mask] = float("nan")
    a, b = dpc(x, "native", mask=mask), dpc(noisy, "native", mask=mask)
    for f in a._fields:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_native_ops():
    ops = torch.ops.setok
    x = separated(2, 12, 4)
    mask = scattered_mask(2, 12)
    dens = ops.native_knn_density(x, 3, mask)
    _opcheck(ops.native_knn_density, (x, 3, mask))
    _opcheck(ops.native_density_delta, (x, dens, mask, True))
    _opcheck(ops.native_select_centers, (dens, mask, 0.5, 2, 5))
    centers, num = ops.native_select_centers(dens, None, 0.5, 2, 5)
    _opcheck(ops.native_assign_to_centers, (x, centers, num, None))
    _opcheck(ops.native_dpc_cluster, (x, 3, 0.5, 2, 5, mask, False))
    labels = ops.native_dpc_cluster(x, 3, 0.5, 2, 5, None, True)[0]
    _opcheck(ops.native_pack_clusters, (labels, num, 5))
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    _opcheck(ops.native_segment_mean, (torch.randn(10, 3), cu))
    _opcheck(ops.native_segment_mean_backward, (torch.randn(3, 3), cu, 10))


def test_auto_picks_native_on_cpu_and_build_info():
    from setok_kernels.ops import resolve

    assert resolve("dpc_cluster", "auto", torch.empty(1, 4, 2), k=2, M=4).name == "native"
    info = _native.build_info()
    assert info["built_for_torch"] == torch.__version__.split("+")[0]
    assert "cpu" in info["ops"]["dpc_cluster"] and "cpu" in info["ops"]["pack_clusters"]


# ------------------------------------------------------------------ CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_select_centers(dtype):
    g = torch.Generator().manual_seed(5)
    score = (torch.rand(6, 700, generator=g) * 4).round() / 4  # many ties
    score = score.to(dtype)
    mask = scattered_mask(6, 700)
    for args in [(0.5, 8, 5), (0.5, 8, None), (10.0, 8, None), (10.0, 900, 300), (-1.0, 2, 3)]:
        ref = sk.select_centers(score, *args, mask=mask, backend="reference")
        for _ in range(2):
            nat = sk.select_centers(score.cuda(), *args, mask=mask.cuda(), backend="native")
            assert all(torch.equal(a.cpu(), b) for a, b in zip(nat, ref)), args


@cuda
def test_cuda_pack_clusters_and_segment_mean():
    x = separated(5, 300, 8)
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
