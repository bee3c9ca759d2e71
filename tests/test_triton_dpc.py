"""Triton DPC kernels (``backend="triton"``) against the exact reference and the float64 oracle.

Every test runs the kernels on the device under test (the ``device`` fixture:
CUDA where present, else CPU tensors in Triton's interpreter, which conftest
enables), so shapes stay small. The kernels compute distances with the norm
trick on mean-centred, power-of-two-scaled features, whose error in a scaled
squared distance is at most ~4 * eps32 * max|x - mean|^2 (fp32 accumulation
over C terms, divided by C); the reference is built from differences and is
far more exact. Tolerances are therefore tests/_data.py's rule (a multiple
of the reference's own float32 error versus float64) plus that norm-trick
bound. Clusters must match
exactly on separated data; on near-tie data a Rand index >= 0.99. Rows the
norm trick cannot certify (ill-conditioned images) are redone from
differences: there the clusters, centres and parents are the oracle's.
"""

import math

import pytest
import torch

import setok_kernels as sk
from setok_kernels import BackendUnavailableError, _backends
from setok_kernels import triton_dpc as T

from ._data import (TOLERANCE, assert_close_to_truth, cap_case, mask_at, mixture, on_grid, scattered_mask, with_copies,
                    with_duplicates)
from ._oracle import assign_one_image, dpc_batch

EPS32 = torch.finfo(torch.float32).eps
FIELDS = ("labels", "num_clusters", "centers", "score", "density", "delta", "parent")


def norm_trick_bound(x, mask=None):
    """Worst-case error of a kernel's scaled squared distance (see module docstring)."""
    x = x.double()
    w = torch.ones(x.shape[:2], dtype=torch.float64) if mask is None else mask.double()
    mean = (x * w[..., None]).sum(1, keepdim=True) / w.sum(1).clamp(min=1)[:, None, None]
    return 4 * EPS32 * ((x - mean).pow(2).sum(-1) * w).max().item()


def on_cpu(r):
    if isinstance(r, tuple):
        items = [t.cpu() for t in r]
        return type(r)(*items) if hasattr(r, "_fields") else tuple(items)
    return r.cpu()


def run(backend, fn, device, *args, **kw):
    """``fn`` on the device under test (tensor arguments moved there), outputs back on the CPU."""
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return on_cpu(fn(*args, backend=backend, **kw))


def triton(fn, device, *args, **kw):
    return run("triton", fn, device, *args, **kw)


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
    "two_tokens": dict(x=lambda: torch.randn(3, 2, 5), k=2, min_clusters=1),
    "k_equals_n": dict(x=lambda: mixture(2, 12, 3), k=12),
    "k64_setok_default": dict(x=lambda: mixture(1, 100, 16, sizes=(0.7, 0.3)), k=64, min_clusters=2),
    "k_above_64": dict(x=lambda: mixture(1, 100, 3, sizes=(0.75, 0.25)), k=70, min_clusters=2),
    "fallback": dict(x=lambda: mixture(3, 70, 16), threshold=1e9, min_clusters=6),
    "fallback_more_than_n": dict(x=lambda: mixture(1, 7, 3), threshold=1e9, min_clusters=64, k=2),
    "cap": dict(x=lambda: mixture(3, 33, 40), threshold=-1.0, max_clusters=7),
    "cap_decides": dict(x=lambda: cap_case().float(), k=4, threshold=4.6, min_clusters=2),
    "global_max": dict(x=lambda: mixture(3, 70, 16), densest_delta="global_max"),
    "masked": dict(x=lambda: mixture(3, 100, 16), mask=lambda: scattered_mask(3, 100)),
    "masked_global_max": dict(x=lambda: mixture(3, 70, 3), mask=lambda: scattered_mask(3, 70, 0.4), densest_delta="global_max"),
    "tie_break_index": dict(x=lambda: with_copies(mixture(2, 60, 8)), k=3, tie_break="index"),
    "num_centers": dict(x=lambda: mixture(2, 70, 16), mask=lambda: scattered_mask(2, 70), num_centers=6),
    "num_centers_above_real": dict(x=lambda: mixture(2, 9, 4), mask=lambda: scattered_mask(2, 9, 0.5), k=2, num_centers=8),
    "score_order": dict(x=lambda: mixture(2, 70, 16), center_order="score"),
    "peers": dict(x=lambda: with_copies(mixture(2, 64, 8)), k=5, num_centers=8, center_order="score", tie_break="index",
                  densest_delta="global_max"),
}


def _case(name):
    kw = dict(k=4, threshold=0.5, min_clusters=4)
    kw.update(CLUSTER_CASES[name])
    x = kw.pop("x")()
    if callable(kw.get("mask")):
        kw["mask"] = kw["mask"]()
    return x, kw


@pytest.mark.parametrize("case", sorted(CLUSTER_CASES))
def test_clusters_equal_reference_and_oracle(case, device):
    x, kw = _case(case)
    got = triton(sk.dpc_cluster, device, x, **kw)
    want = sk.dpc_cluster(x, **kw, backend="reference")
    assert_same_clusters(got, want)
    # parents: exact up to distance near-ties inside a blob
    assert torch.equal(got.parent < 0, want.parent < 0) and (got.parent == want.parent).double().mean() >= 0.97
    assert got.score.dtype == torch.float32 and got.parent.dtype == torch.int64
    mask = kw.pop("mask", None)
    if mask is not None:
        assert (got.labels[~mask] == -1).all() and (got.density[~mask] == 0).all()
        assert (got.parent[~mask] == -1).all() and (got.delta[~mask] == 0).all()
    torch.testing.assert_close(got.score, want.score, rtol=0, atol=1e-3 + math.sqrt(norm_trick_bound(x, mask)))
    # the float64 oracle, on the float32 values: well separated, so the same clusters
    oracle = dpc_batch(x.double(), mask, **kw)
    for key in ("labels", "num_clusters", "centers"):
        assert torch.equal(getattr(got, key), oracle[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, device):
    x = mixture(3, 70, 40, dtype=dtype)
    mask = scattered_mask(3, 70, 0.7)
    got = triton(sk.dpc_cluster, device, x, 5, 0.5, 4, None, mask)
    want = sk.dpc_cluster(x, 5, 0.5, 4, None, mask, backend="reference")
    assert got.density.dtype == torch.float32
    assert_same_clusters(got, want)
    # 16-bit values are widened and centred in fp32: the fp32 error budget
    bound = norm_trick_bound(x, mask)
    assert (got.density - want.density).abs().max() <= 2 * 1e-7 + bound


def test_near_ties_rand_index(device):
    """Unclustered data: centres are near-ties, yet partitions agree."""
    x = torch.randn(3, 100, 16)
    got = triton(sk.dpc_cluster, device, x, 5, 0.5, 4)
    want = sk.dpc_cluster(x, 5, 0.5, 4, backend="reference")
    for b in range(3):
        assert rand_index(got.labels[b], want.labels[b]) >= 0.99


def test_duplicates_and_ties(device):
    x = with_duplicates(mixture(1, 20, 16))
    got = triton(sk.dpc_cluster, device, x, 3, 0.0, 4)
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
    r = triton(sk.dpc_cluster, device, same, 4, -1.0, 4, 3)
    assert r.centers[0].tolist() == [0, 1, 2] and (r.parent == -1).all()
    assert (r.density == 1).all() and r.labels[0].tolist() == [0, 1, 2] + [0] * 8


def test_tie_break_index_stops_copies_crowding_out_centres(device):
    """Repeated frames: with "none" every copy of a peak keeps a large delta and becomes a centre too."""
    x = with_copies(mixture(2, 96, 8, sizes=(0.4, 0.3, 0.2, 0.1)), seed=5)
    copies = {}
    for mode in ("none", "index"):
        got = triton(sk.dpc_cluster, device, x, 4, 0.5, 4, None, None, "global_max", 8, "score", mode)
        want = sk.dpc_cluster(x, 4, 0.5, 4, None, None, "global_max", 8, "score", mode, backend="reference")
        assert torch.equal(got.centers, want.centers)
        if mode == "index":  # with copies among the centres, a token's nearest centre is an exact tie
            assert_same_clusters(got, want)
        copies[mode] = sum(
            int(torch.equal(x[b, i], x[b, j])) for b in range(2) for i in got.centers[b] for j in got.centers[b] if i < j
        )
    assert copies["none"] > 0 and copies["index"] == 0


def test_num_centers_and_score_order(device):
    x = mixture(3, 70, 16)
    mask = scattered_mask(3, 70)
    mask[2, :5], mask[2, 5:] = True, False  # 5 real tokens < num_centers: all of them
    by_index = triton(sk.dpc_cluster, device, x, 4, 0.5, 4, None, mask, num_centers=9)
    by_score = triton(sk.dpc_cluster, device, x, 4, 0.5, 4, None, mask, num_centers=9, center_order="score")
    assert by_index.centers.shape == (3, 9)
    assert by_index.num_clusters.tolist() == [9, 9, 5] and (by_index.centers[2, 5:] == -1).all()
    assert sorted(by_index.centers[2, :5].tolist()) == list(range(5))
    for b in range(3):
        n = int(by_index.num_clusters[b])
        c_i, c_s = by_index.centers[b, :n], by_score.centers[b, :n]
        assert torch.equal(c_i, c_s.sort().values), "the same centres"
        s = by_score.score[b, c_s]
        assert (s[1:] <= s[:-1]).all(), "by descending score"
        real = mask[b]
        # the same partition, each token with the same centre, relabelled by the centres' new positions
        assert torch.equal(c_s[by_score.labels[b, real]], c_i[by_index.labels[b, real]])
        top = torch.sort(by_index.score[b].masked_fill(~real, -math.inf), descending=True, stable=True).indices[:n]
        assert torch.equal(c_s, top), "exactly the top scores"


def test_masked_tokens_are_removed_tokens(device):
    x = mixture(3, 70, 16)
    mask = scattered_mask(3, 70)
    r = triton(sk.dpc_cluster, device, x, 4, 0.5, 4, None, mask)
    for b in range(3):
        real = mask[b].nonzero().flatten()
        alone = triton(sk.dpc_cluster, device, x[b : b + 1, real], 4, 0.5, 4)
        assert torch.equal(r.labels[b, real], alone.labels[0])
        assert torch.equal(r.centers[b, : r.num_clusters[b]], real[alone.centers[0, : alone.num_clusters[0]]])
        torch.testing.assert_close(r.density[b, real], alone.density[0], rtol=0, atol=norm_trick_bound(x, mask))


def test_ragged_k_is_clamped_and_empty_image(device):
    x = mixture(3, 33, 16)
    mask = mask_at(33, [[2, 5, 30], range(33), []])  # 3 real tokens < k; image 2 has none
    got = triton(sk.dpc_cluster, device, x, 6, 0.5, 2, None, mask)
    want = sk.dpc_cluster(x, 6, 0.5, 2, None, mask, backend="reference")
    assert_same_clusters(got, want)
    assert got.num_clusters[2] == 0 and (got.labels[2] == -1).all() and (got.centers[2] == -1).all()
    torch.testing.assert_close(got.density, want.density, rtol=0, atol=norm_trick_bound(x, mask))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nan_image_does_not_touch_others(device):
    x = mixture(3, 33, 16)
    clean = triton(sk.dpc_cluster, device, x, 4, 0.5, 4)
    x[1, 5, 3] = float("nan")
    x[1, 9] = float("inf")
    dirty = triton(sk.dpc_cluster, device, x, 4, 0.5, 4)
    for a, b in zip(clean, dirty):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert ((dirty.labels[1] >= -1) & (dirty.labels[1] < dirty.num_clusters[1].clamp(min=1))).all()


def test_strided_input_equals_contiguous(device):
    big = mixture(3, 70, 40).to(device).transpose(0, 1)  # (70, 3, 40): a (3, 70, 40) view with odd strides
    x = big.transpose(0, 1)[:, :, ::2]
    assert not x.is_contiguous()
    for a, b in zip(triton(sk.dpc_cluster, device, x, 4, 0.5, 4), triton(sk.dpc_cluster, device, x.contiguous(), 4, 0.5, 4)):
        assert torch.equal(a, b)


def test_deterministic(device):
    x = mixture(2, 100, 16)
    first = triton(sk.dpc_cluster, device, x, 5, 0.5, 4)
    for a, b in zip(first, triton(sk.dpc_cluster, device, x, 5, 0.5, 4)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [dict(), dict(tie_break="index", num_centers=9, center_order="score")])
def test_parts_compose_to_dpc_cluster(options, device):
    x = mixture(2, 70, 16)
    mask = scattered_mask(2, 70)
    tie_break = options.get("tie_break", "none")
    select = dict(num_centers=options.get("num_centers"), center_order=options.get("center_order", "index"))
    r = triton(sk.dpc_cluster, device, x, 5, 0.5, 4, 9, mask, **options)
    density = triton(sk.knn_density, device, x, 5, mask)
    delta, parent = triton(sk.density_delta, device, x, density, mask, tie_break=tie_break)
    score = density * delta
    centers, num = triton(sk.select_centers, device, score, 0.5, 4, 9, mask, **select)
    labels = triton(sk.assign_to_centers, device, x, centers, num, mask)
    for a, b in zip(r, (labels, num, centers, score, density, delta, parent)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ offsets and magnitudes, every backend


def _backends_on(device, op="dpc_cluster"):
    call = _backends.CallInfo(torch.device(device), torch.float32, extra=dict(k=4, N=64))
    return [i.name for i in _backends.implementations(op) if i.decline_reason(call, forced=True) is None]


@pytest.mark.parametrize("offset", ["constant", "per_channel"])
def test_offset_does_not_change_clusters(offset, device):
    x = on_grid(mixture(2, 64, 8))
    mask = scattered_mask(2, 64, 0.8)
    spread = float(x.std(1).mean())
    c = 1e3 * spread
    shift = torch.full((8,), round(c)) if offset == "constant" else torch.randint(-round(c), round(c) + 1, (8,)).float()
    assert torch.equal((x + shift) - shift, x), "x + c is exact"
    want = dpc_batch(x.double(), mask, 4, 0.5, 4)
    for backend in _backends_on(device):
        plain = run(backend, sk.dpc_cluster, device, x, 4, 0.5, 4, None, mask)
        moved = run(backend, sk.dpc_cluster, device, x + shift, 4, 0.5, 4, None, mask)
        for key in ("labels", "num_clusters", "centers", "parent"):
            assert torch.equal(getattr(moved, key), getattr(plain, key)), (backend, key)
            assert torch.equal(getattr(moved, key), want[key]), (backend, key)
        torch.testing.assert_close(moved.score, plain.score, rtol=0, atol=1e-3 + math.sqrt(norm_trick_bound(x, mask)))


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_magnitudes_give_finite_scores_and_real_labels(scale, device):
    """Squared distances overflow (1e20) or underflow (1e-20) float32: densities are then 0 or 1
    for all, as in float64; the clustering must still be the oracle's, never NaN or constant labels."""
    x = mixture(2, 48, 8) * scale
    mask = scattered_mask(2, 48, 0.8)
    want = dpc_batch(x.double(), mask, 4, 0.5, 4)
    for backend in _backends_on(device):
        got = run(backend, sk.dpc_cluster, device, x, 4, 0.5, 4, None, mask)
        for key in ("score", "density", "delta"):
            assert torch.isfinite(getattr(got, key)).all(), (backend, key)
        for key in ("labels", "num_clusters", "centers", "parent"):
            assert torch.equal(getattr(got, key), want[key]), (backend, key)
        assert all(got.labels[b][mask[b]].unique().numel() > 1 for b in range(2)), backend
        torch.testing.assert_close(got.delta.double(), want["delta"], rtol=1e-5, atol=0, msg=backend)
        if "pairwise_distance" in [i.op for i in _backends.implementations("pairwise_distance") if i.name == backend]:
            d = run(backend, sk.pairwise_distance, device, x, mask)
            pair = mask[:, :, None] & mask[:, None, :]
            exact = (torch.cdist(x.double(), x.double()) / math.sqrt(8))[pair] / scale
            bound = norm_trick_bound(x / scale, mask)
            tol = (torch.minimum(torch.full_like(exact, math.sqrt(bound)), bound / exact.clamp(min=1e-30)) + 1e-6) * scale
            assert ((d[pair].double() - exact * scale).abs() <= tol).all(), backend


# ------------------------------------------------------------------ ill-conditioned images: the EXACT launches


def far_outliers():
    """Blobs plus, per image, one token a million away: the centred norms are the outlier's."""
    x = mixture(2, 64, 8, seed=4)
    x[0, 17] = 1e6
    x[1, 40, 2] = -1e6
    return x


def far_apart_groups():
    """Two groups of blobs 1e4 times the features' spread apart."""
    a, b = mixture(2, 32, 8, seed=1), mixture(2, 32, 8, seed=2)
    spread = float(torch.cat([a, b], 1).std(1).mean())
    x = torch.cat([a, b + 1e4 * spread], 1)
    return x[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("data,masked,dtype", [
    ("outlier", False, torch.float32), ("outlier", True, torch.float32), ("outlier", False, torch.bfloat16),
    ("far_apart", False, torch.float32), ("far_apart", True, torch.float32),
])
def test_ill_conditioned_images_equal_the_oracle(data, masked, dtype, device, monkeypatch):
    """The norm trick resolves nothing here (uncertified: 63 clusters where the oracle finds 3);
    the rows it cannot certify are redone from differences, so the clusters are the oracle's."""
    x = (far_outliers() if data == "outlier" else far_apart_groups()).to(dtype)
    mask = scattered_mask(2, 64, 0.8) if masked else None
    if data == "outlier" and masked:
        mask[0, 17] = mask[1, 40] = True
    want = dpc_batch(x.double(), mask, 4, 0.5, 4)
    ref = sk.dpc_cluster(x, 4, 0.5, 4, None, mask, backend="reference")
    flagged = []
    twice = T._twice

    def spy(kernel, B, N, args, **kw):
        twice(kernel, B, N, args, **kw)
        flagged.append(int(next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int8).sum()))

    monkeypatch.setattr(T, "_twice", spy)
    got = triton(sk.dpc_cluster, device, x, 4, 0.5, 4, None, mask)
    assert min(flagged) > 0, "every pass had rows to redo"
    for key in ("labels", "num_clusters", "centers"):
        assert torch.equal(getattr(got, key), want[key]), key
        assert torch.equal(getattr(got, key), getattr(ref, key)), key
    # an outlier's own parent: denser tokens a million away, equidistant to float32's resolution
    same = got.parent == want["parent"]
    if data == "outlier":
        same[0, 17] = same[1, 40] = True
    assert same.all()
    torch.testing.assert_close(got.density.double(), want["density"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got.delta.double(), want["delta"], rtol=1e-5, atol=0)


def test_exact_tie_of_cosine_centres_takes_the_earlier(device):
    """Centre 41 is centre 11 times 4: every token's two cosines tie (flagged, then equal bit for bit
    on the certified path), and the earlier centre wins."""
    x = torch.randn(2, 70, 12, generator=torch.Generator().manual_seed(9))
    x[:, 41] = 4 * x[:, 11]
    centers = torch.tensor([[3, 8, 11, 12, 41]] * 2)
    num = torch.tensor([5, 5])
    got = triton(sk.assign_to_centers, device, x, centers, num, None, "cosine")
    xd = x.double()
    # float64, one fixed-order sum per pair: the scaled copy's cosine is the same number
    c = xd[:, centers[0]]
    sim = (xd[:, :, None, :] * c[:, None]).sum(-1) / (xd.norm(dim=-1)[:, :, None] * c.norm(dim=-1)[:, None, :])
    want = sim.argmax(-1)
    want[:, centers[0]] = torch.arange(5)
    assert torch.equal(got, want)
    assert (got == 2).sum() > 10 and (got == 4).sum() == 2  # only centre 41 itself


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("N,C,k", [(7, 3, 1), (33, 40, 5), (100, 16, 64), (90, 3, 80)])
def test_density_within_tolerance(N, C, k, device):
    x = mixture(2, N, C, sizes=(0.5, 0.3, 0.2))
    mask = scattered_mask(2, N, 0.9) if N > k + 20 else None
    got = triton(sk.knn_density, device, x, k, mask)
    ref32 = sk.knn_density(x, k, mask, backend="reference")
    ref64 = sk.knn_density(x.double(), k, mask, backend="reference")
    assert_close_to_truth(got, ref32, ref64, extra=norm_trick_bound(x, mask), name="density")


@pytest.mark.parametrize("densest_delta", ["column_max", "global_max"])
@pytest.mark.parametrize("tie_break", ["none", "index"])
def test_delta_and_parent_within_tolerance(densest_delta, tie_break, device):
    """Same density in: parents are denser, at delta within tolerance."""
    x = mixture(3, 100, 16, sizes=(0.5, 0.3, 0.2), spread=0.5)
    mask = scattered_mask(3, 100, 0.8)
    density = sk.knn_density(x.double(), 5, mask, backend="reference").float()
    density[:, 10:14] = density[:, 10:11]  # ties: denser only by index with tie_break="index"
    delta, parent = triton(sk.density_delta, device, x, density, mask, densest_delta, tie_break)
    ref32, _ = sk.density_delta(x, density, mask, densest_delta, tie_break, backend="reference")
    ref64, parent64 = sk.density_delta(x.double(), density.double(), mask, densest_delta, tie_break, backend="reference")
    bound = norm_trick_bound(x, mask)
    ref_err = (ref32.double() - ref64).abs().max().item()
    tol = TOLERANCE[torch.float32].factor * ref_err + torch.minimum(torch.full_like(ref64, math.sqrt(bound)), bound / ref64.clamp(min=1e-30))
    assert ((delta.double() - ref64).abs() <= tol).all()
    assert torch.equal(parent < 0, parent64 < 0)
    assert (parent[~mask] == -1).all() and (delta[~mask] == 0).all()
    assert (parent == parent64).double().mean() >= 0.97  # the rest: distance near-ties
    has = parent >= 0
    b, i = has.nonzero(as_tuple=True)
    j = parent[has]
    denser = density[b, j] > density[b, i]
    if tie_break == "index":
        denser |= (density[b, j] == density[b, i]) & (j < i)
    assert denser.all() and mask[b, j].all()
    d = (x.double()[b, i] - x.double()[b, j]).norm(dim=-1) / math.sqrt(16)
    # the cap may undercut the distance to the parent, never exceed it
    assert ((ref64[b, i] - d) <= tol[b, i]).all()


def test_pairwise_distance(device):
    x = mixture(2, 70, 40)
    mask = scattered_mask(2, 70)
    d = triton(sk.pairwise_distance, device, x, mask)
    want = sk.pairwise_distance(x.double(), mask, backend="reference")
    pair = mask[:, :, None] & mask[:, None, :]
    assert torch.isinf(d[~pair]).all()
    assert (d[pair] >= 0).all() and (d.diagonal(dim1=1, dim2=2)[mask] == 0).all()
    bound = norm_trick_bound(x, mask)
    tol = torch.minimum(torch.full_like(want[pair], math.sqrt(bound)), bound / want[pair].clamp(min=1e-30)) + 1e-6
    assert ((d[pair].double() - want[pair]).abs() <= tol).all()


# ------------------------------------------------------------------ centres, labels


@pytest.mark.parametrize("center_order", ["index", "score"])
@pytest.mark.parametrize("ranking", ["kernel", "torch"])
def test_select_centers_equals_reference(center_order, ranking, device, monkeypatch):
    if ranking == "torch":  # images above MAX_SELECT_N tokens are ranked with torch sorts
        monkeypatch.setattr(T, "MAX_SELECT_N", 64)
    g = torch.Generator().manual_seed(5)
    score = torch.randint(-3, 4, (3, 100), generator=g).float() / 4  # many ties
    score[0, :7] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3.0])
    mask = scattered_mask(3, 100, 0.7)
    mask[2] = False  # no real token: no centre
    cases = [(0.5, 8, 100, None), (0.5, 8, 5, None), (10.0, 8, 130, None), (10.0, 200, 100, None), (-10.0, 1, 3, None),
             (0.0, 3, 1, None), (0.5, 8, 6, 6), (0.5, 8, 150, 150)]
    for threshold, min_clusters, M, n in cases:
        for m in (None, mask):
            args = (score, threshold, min_clusters, M, m, n, center_order)
            got = triton(sk.select_centers, device, *args)
            want = sk.select_centers(*args, backend="reference")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threshold, min_clusters, M, n)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assign_to_centers_equals_reference(metric, device):
    x = mixture(3, 70, 16)
    x[0, 40] = x[0, 3]  # a centre duplicating an earlier centre still labels itself
    x[1, 7] = 0  # a zero vector: cosine similarity 0 to every centre
    mask = scattered_mask(3, 70)
    mask[0, [3, 10, 22, 40, 69]] = True
    mask[1, 7] = True
    centers = torch.full((3, 8), -1, dtype=torch.int64)
    centers[0, :5] = torch.tensor([3, 10, 22, 40, 69])
    centers[1, :2] = mask[1].nonzero()[[0, -1], 0]
    num = torch.tensor([5, 2, 0])
    got = triton(sk.assign_to_centers, device, x, centers, num, mask, metric)
    want = sk.assign_to_centers(x, centers, num, mask, metric, backend="reference")
    assert torch.equal(got, want)
    assert got[0, 40] == 3 and got[0, 3] == 0 and (got[2] == -1).all()
    for b in range(2):
        real = mask[b].nonzero().flatten()
        c = [int((real == i).nonzero()) for i in centers[b, : num[b]]]
        assert torch.equal(got[b, real], assign_one_image(x[b, real], c, metric)), b


def test_cosine_ignores_each_tokens_scale(device):
    x = mixture(1, 40, 8)
    centers = torch.tensor([[0, 5, 17]])
    num = torch.tensor([3])
    base = triton(sk.assign_to_centers, device, x, centers, num, None, "cosine")
    scaled = x * (torch.rand(1, 40, 1) + 0.5) * 1e3  # each token by its own factor: the same directions
    assert torch.equal(triton(sk.assign_to_centers, device, scaled, centers, num, None, "cosine"), base)
    assert not torch.equal(base, triton(sk.assign_to_centers, device, scaled, centers, num))  # euclidean does not


# ------------------------------------------------------------------ op layer


def test_declines_with_reasons(device):
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        triton(sk.knn_density, device, x, 3)
    impl = next(i for i in _backends.implementations("knn_density") if i.name == "triton")
    call = _backends.CallInfo(torch.device("cuda"), torch.float16, extra=dict(k=T.MAX_K + 1))
    assert "k = 129 > 128" in impl.decline_reason(call, forced=True)
    with pytest.raises(BackendUnavailableError, match="k = 129"):
        triton(sk.dpc_cluster, device, torch.randn(1, 130, 4), T.MAX_K + 1)
    # auto never picks the interpreter on CPU
    cpu = _backends.CallInfo(torch.device("cpu"), torch.float32, extra=dict(k=3, N=9))
    assert "automatically" in impl.decline_reason(cpu, forced=False)
    assert _backends.resolve("knn_density", "auto", cpu).name != "triton"


def test_compile_fullgraph(device):
    x = mixture(2, 33, 16).to(device)
    mask = scattered_mask(2, 33).to(device)

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


def test_parent_ties_across_tiles_take_smallest_index(device):
    """Equidistant denser tokens in different column tiles: the smallest index wins."""
    x = mixture(1, 100, 16, sizes=(0.5, 0.5), spread=0.5)
    x[0, 80] = x[0, 10]  # duplicates, 64-column tiles apart
    density = torch.linspace(0.1, 0.5, 100)[None].clone()
    density[0, [10, 80]] = 1.0  # the densest pair: equal, so not denser than each other
    delta, parent = triton(sk.density_delta, device, x, density)
    want_delta, want_parent = sk.density_delta(x.double(), density.double(), backend="reference")
    assert (parent[0] != 80).all() and (parent[0] == 10).sum() >= 5
    assert parent[0, 10] == -1 and parent[0, 80] == -1
    assert torch.equal(parent, want_parent)
    # by index, 10 is the denser of the pair and 80's parent, at distance 0
    delta, parent = triton(sk.density_delta, device, x, density, None, "column_max", "index")
    assert parent[0, 10] == -1 and parent[0, 80] == 10 and delta[0, 80] == 0  # exactly: from differences
