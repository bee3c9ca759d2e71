"""The streaming reference against the naive per-image float64 oracle.

The reference defines the semantics every kernel is tested against, so it is
held to exact equality with the oracle: same centres, labels and parents,
scores to float64 rounding.
"""

import math
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import setok_kernels as sk
from setok_kernels import reference as ref

from . import _data
from ._data import assert_rtol, cap_case, mask_at, offsets, scattered_mask, with_copies, with_duplicates
from ._oracle import dpc_batch


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """This file checks the reference itself, whatever else is installed."""
    monkeypatch.setenv("SETOK_BACKEND", "reference")
    monkeypatch.setenv("SETOK_ATTN_BACKEND", "reference")


# the oracle runs in float64: so does the data here
mixture = partial(_data.mixture, dtype=torch.float64)


def check_against_oracle(x, mask=None, k=5, threshold=0.5, min_clusters=4, max_clusters=None, densest_delta="column_max",
                         **options):
    got = sk.dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, backend="reference", **options)
    want = dpc_batch(x, mask, k, threshold, min_clusters, max_clusters, densest_delta, **options)
    for key in ("labels", "centers", "num_clusters", "parent"):
        assert torch.equal(getattr(got, key), want[key]), key
    for key in ("density", "delta", "score"):
        torch.testing.assert_close(getattr(got, key), want[key], rtol=1e-12, atol=1e-14, msg=key)
    return got


CASES = {
    "mixture": dict(x=lambda: mixture(2, 70, 6)),
    "unequal_sizes": dict(x=lambda: mixture(2, 97, 5, sizes=(0.9, 0.05, 0.03, 0.02))),
    "n_below_2k": dict(x=lambda: mixture(1, 9, 4), k=5),
    "k1": dict(x=lambda: mixture(2, 33, 3), k=1),
    "random": dict(x=lambda: torch.randn(3, 37, 8, dtype=torch.float64)),
    "fallback": dict(x=lambda: torch.randn(2, 40, 8, dtype=torch.float64), threshold=1e9, min_clusters=6),
    "fallback_more_than_n": dict(x=lambda: torch.randn(1, 5, 8, dtype=torch.float64), threshold=1e9, min_clusters=64),
    "cap": dict(x=lambda: mixture(2, 50, 4), threshold=-1.0, max_clusters=7),
    "global_max": dict(x=lambda: mixture(2, 45, 4), densest_delta="global_max"),
    "one_token": dict(x=lambda: torch.randn(2, 1, 4, dtype=torch.float64), k=1),
    "two_tokens": dict(x=lambda: torch.randn(3, 2, 4, dtype=torch.float64), k=2, min_clusters=1),
    "k_equals_n": dict(x=lambda: mixture(2, 12, 3), k=12),
    "cap_decides": dict(x=lambda: cap_case(), k=4, threshold=4.6, min_clusters=2),
    "tie_break_index": dict(x=lambda: with_copies(mixture(2, 30, 4)), k=3, tie_break="index"),
    "num_centers": dict(x=lambda: mixture(2, 50, 4), num_centers=6),
    "num_centers_above_n": dict(x=lambda: mixture(2, 5, 4), k=2, num_centers=9),
    "score_order": dict(x=lambda: mixture(2, 50, 4), threshold=0.05, center_order="score"),
    "score_order_num_centers": dict(x=lambda: with_copies(mixture(2, 40, 4)), k=3, num_centers=7, center_order="score",
                                    tie_break="index", densest_delta="global_max"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_equals_oracle(case):
    kw = dict(CASES[case])
    x = kw.pop("x")()
    check_against_oracle(x, **kw)


def densest_only_score(x, r):
    """Scores without the column-max cap: delta is the distance to the parent; a token without one gets min rmax."""
    d = torch.cdist(x.double(), x.double()) / math.sqrt(x.shape[-1])
    nearest = torch.gather(d, 2, r.parent.clamp(min=0)[..., None])[..., 0]
    delta = torch.where(r.parent >= 0, nearest, d.amax(2).amin(1, keepdim=True))
    return r.density * delta


def test_cap_decides_centres():
    x = cap_case()
    r = check_against_oracle(x, k=4, threshold=4.6, min_clusters=2)
    old = densest_only_score(x, r)
    centers, num = sk.select_centers(old, 4.6, 2)
    assert (old - r.score).abs().max() > 1, "the cap changes scores"
    assert not torch.equal(centers[:, : int(num[0])], r.centers[:, : int(r.num_clusters[0])]), "and centres"
    # every token is capped by the same sparse token, the one of lowest density
    sparse = r.density[0].argmin()
    rmax = torch.cdist(x[0], x[0]).amax(1) / math.sqrt(2)
    assert (r.delta[0] <= rmax[sparse]).all() and (r.delta[0] == rmax[sparse]).sum() >= 3


def test_column_max_cap_ties_share_a_cap():
    density = torch.tensor([[0.5, 0.2, 0.5, 0.9, 0.2, 0.1]])
    rmax = torch.tensor([[0.5, 5.0, 4.0, 2.0, 6.0, 0.1]])
    valid = torch.tensor([[True, True, True, True, True, False]])  # token 5 is masked: never caps
    # 1 and 4 tie at 0.2: both see {1, 4}; 0 and 2 tie at 0.5: both see {1, 4, 0, 2}
    assert ref.column_max_cap(rmax, density, valid)[0, :5].tolist() == [0.5, 5.0, 0.5, 0.5, 5.0]
    # by index, the lower index is the denser: 4 sees {4}, 1 sees {4, 1}, 2 sees {4, 1, 2}, 0 sees {4, 1, 2, 0}
    assert ref.column_max_cap(rmax, density, valid, "index")[0, :5].tolist() == [0.5, 5.0, 4.0, 0.5, 6.0]


def test_equal_densities_share_a_cap():
    """Mirror-image blobs: equal densities across the mirror, so ties share caps and parents."""
    half = mixture(1, 15, 2, sizes=(0.7, 0.3))
    x = torch.cat([half, -half], 1)
    for tie_break in ("none", "index"):
        r = check_against_oracle(x, k=3, threshold=0.0, tie_break=tie_break)
    assert torch.equal(r.density[0, :15], r.density[0, 15:])


def test_duplicates_and_ties():
    x = with_duplicates(mixture(1, 20, 4))
    r = check_against_oracle(x, k=3, threshold=0.0)
    # duplicates have equal density: neither is "strictly denser" than the other
    assert (r.parent != -1).any()
    # an all-identical image: every distance is 0, every density 1, no token is denser
    same = torch.ones(1, 11, 3, dtype=torch.float64)
    r = check_against_oracle(same, k=4, threshold=-1.0, max_clusters=3)
    assert r.centers[0].tolist() == [0, 1, 2]
    assert (r.parent == -1).all()


@pytest.mark.parametrize("densest_delta", ["column_max", "global_max"])
def test_masked_equals_unmasked_on_real_tokens(densest_delta):
    x = mixture(3, 61, 5)
    mask = scattered_mask(3, 61)
    r = check_against_oracle(x, mask, k=4, densest_delta=densest_delta)
    assert (r.labels[~mask] == -1).all()
    assert (r.density[~mask] == 0).all()
    for b in range(3):
        real = mask[b].nonzero().flatten()
        alone = sk.dpc_cluster(x[b : b + 1, real], 4, 0.5, 4, None, densest_delta=densest_delta, backend="reference")
        assert torch.equal(r.labels[b, real], alone.labels[0])
        assert torch.equal(r.score[b, real], alone.score[0])
        c = r.centers[b, : r.num_clusters[b]]
        assert torch.equal(c, real[alone.centers[0, : alone.num_clusters[0]]])


def test_float32_matches_float64_clusters():
    x = mixture(2, 80, 16)
    r64 = sk.dpc_cluster(x, 6, 0.5, 4, backend="reference")
    r32 = sk.dpc_cluster(x.float(), 6, 0.5, 4, backend="reference")
    assert r32.score.dtype == torch.float32
    assert torch.equal(r32.labels, r64.labels)
    torch.testing.assert_close(r32.score.double(), r64.score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    x = mixture(2, 40, 8, dtype=dtype)
    r = sk.dpc_cluster(x, 5, 0.5, 4, backend="reference")
    want = sk.dpc_cluster(x.float(), 5, 0.5, 4, backend="reference")
    assert r.density.dtype == torch.float32
    for a, b in zip(r, want):
        assert torch.equal(a, b)


def test_streaming_blocks_equal_single_block(monkeypatch):
    x = mixture(2, 70, 6)
    whole = sk.dpc_cluster(x, 5, 0.5, 4, backend="reference")
    monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 70 * 2 * 3)  # three rows per block
    streamed = sk.dpc_cluster(x, 5, 0.5, 4, backend="reference")
    for a, b in zip(whole, streamed):
        assert torch.equal(a, b)


def test_parts_compose_to_dpc_cluster():
    x = mixture(2, 50, 4).float()
    mask = scattered_mask(2, 50)
    r = sk.dpc_cluster(x, 5, 0.5, 4, 9, mask)
    density = sk.knn_density(x, 5, mask)
    delta, parent = sk.density_delta(x, density, mask)
    centers, num = sk.select_centers(density * delta, 0.5, 4, 9, mask)
    labels = sk.assign_to_centers(x, centers, num, mask)
    for a, b in zip(r, (labels, num, centers, density * delta, density, delta, parent)):
        assert torch.equal(a, b)


def test_pairwise_distance():
    x = torch.randn(2, 13, 5, dtype=torch.float64)
    mask = scattered_mask(2, 13)
    d = sk.pairwise_distance(x, mask)
    want = torch.cdist(x, x) / math.sqrt(5)
    pair = mask[:, :, None] & mask[:, None, :]
    torch.testing.assert_close(d[pair], want[pair])
    assert torch.isinf(d[~pair]).all()
    assert (torch.diagonal(d, dim1=1, dim2=2)[mask] == 0).all()


# ---------------------------------------------------------------- validation off


def test_ragged_k_is_clamped_and_empty_images_get_no_cluster():
    x = mixture(3, 20, 4)
    mask = mask_at(20, [[2, 5, 11], [], range(20)])  # fewer real tokens than k; none; all
    r = sk.dpc_cluster(x, 5, 0.5, 2, mask=mask)
    assert r.num_clusters[1] == 0 and (r.labels[1] == -1).all() and (r.centers[1] == -1).all()
    want = dpc_batch(x, mask, 5, 0.5, 2)
    assert torch.equal(r.labels, want["labels"])
    torch.testing.assert_close(r.density, want["density"], rtol=1e-12, atol=0)


def test_nan_in_one_image_leaves_the_others_alone():
    x = mixture(3, 30, 4)
    clean = sk.dpc_cluster(x, 5, 0.5, 3)
    x[1, 7, 2] = float("nan")
    x[1, 9, 0] = float("inf")
    dirty = sk.dpc_cluster(x, 5, 0.5, 3)
    for a, b in zip(clean, dirty):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert ((dirty.labels[1] >= -1) & (dirty.labels[1] < x.shape[1])).all()
    with pytest.raises(ValueError, match="x holds NaN or Inf"):
        sk.dpc_cluster(x, 5, 0.5, 3, check_finite=True)


def test_deterministic():
    x = mixture(2, 64, 8).float()
    a, b = sk.dpc_cluster(x, 5), sk.dpc_cluster(x, 5)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---------------------------------------------------------------- invariants

# the compiled CPU backend obeys the same invariants (the Triton interpreter is
# too slow for property tests: tests/test_triton_dpc.py covers it)
_CPU_BACKENDS = ["reference"] + [
    i.name for i in sk._backends.implementations("dpc_cluster") if i.name == "native" and i.unavailable_reason() is None
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3),
    N=st.integers(1, 40),
    C=st.integers(1, 6),
    k=st.integers(1, 8),
    threshold=st.sampled_from([-1.0, 0.0, 0.3, 0.5, 2.0]),
    min_clusters=st.integers(1, 10),
    max_clusters=st.one_of(st.none(), st.integers(1, 12)),
    keep=st.floats(0.2, 1.0),
    duplicate=st.booleans(),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(_CPU_BACKENDS),
)
def test_clustering_invariants(B, N, C, k, threshold, min_clusters, max_clusters, keep, duplicate, seed, backend):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    if duplicate and N > 2:
        x[:, N // 2 :] = x[:, : N - N // 2].clone()
    mask = torch.rand(B, N, generator=g) < keep
    mask[:, 0] = True
    k = min(k, int(mask.sum(1).min()))
    r = sk.dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, backend=backend)
    M = max_clusters or N
    real = mask.sum(1)
    assert r.centers.shape == (B, M)
    assert ((r.num_clusters >= 1) & (r.num_clusters <= torch.clamp(real, max=M))).all()
    for b in range(B):
        n = int(r.num_clusters[b])
        c = r.centers[b, :n]
        assert (c[1:] > c[:-1]).all(), "centres ascending"
        assert (r.centers[b, n:] == -1).all()
        assert mask[b, c].all(), "centres are real tokens"
        assert torch.equal(r.labels[b, c], torch.arange(n)), "centres label themselves"
        lab = r.labels[b]
        assert ((lab[mask[b]] >= 0) & (lab[mask[b]] < n)).all(), "every real token in one cluster"
        assert (lab[~mask[b]] == -1).all()
    p = sk.pack_clusters(r.labels, r.num_clusters, max_clusters, backend=backend)
    sizes = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).long()
    assert int(sizes.sum()) == int(real.sum()), "sizes sum to the real-token count"
    assert int(p.cu_clusters[-1]) == int(r.num_clusters.sum())
    assert (sizes[: int(p.cu_clusters[-1])] >= 1).all(), "no empty real cluster"
    assert int(p.max_seqlen) == int(sizes.max())


# ---------------------------------------------------------------- packing


def test_pack_clusters_layout():
    labels = torch.tensor([[1, 0, -1, 1, 2, 0], [0, 0, 1, -1, -1, 1]])
    num = torch.tensor([3, 2])
    p = sk.pack_clusters(labels, num, max_clusters=4)
    assert p.perm.tolist() == [1, 5, 0, 3, 4, 6, 7, 8, 11, 2, 9, 10]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_clusters.dtype == torch.int32
    assert p.cu_seqlens.tolist() == [0, 2, 4, 5, 7, 9, 9, 9, 9]
    assert p.cu_clusters.tolist() == [0, 3, 5]
    assert int(p.max_seqlen) == 2 and p.max_seqlen.dim() == 0


def test_segment_mean_and_grad():
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    cu = offsets([3, 0, 1, 6, 0])  # empty and length-1 segments
    out = sk.segment_mean(x, cu)
    want = torch.stack([x[a:b].mean(0) if b > a else torch.zeros(5, dtype=x.dtype) for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(out, want)
    assert torch.autograd.gradcheck(lambda t: sk.segment_mean(t, cu), (x,))
    out.sum().backward()
    assert (x.grad[10:] == 0).all(), "rows past the last segment get no gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_segment_mean_dtypes(dtype):
    x = torch.randn(40, 7).to(dtype)
    cu = offsets([1, 8, 0, 24])
    out = sk.segment_mean(x, cu)
    want = sk.segment_mean(x.double(), cu)
    assert out.dtype == dtype
    assert_rtol(out, want, dtype)


def test_pad_unpad_roundtrip():
    cu_clusters = offsets([2, 0, 3])
    x = torch.randn(7, 3, requires_grad=True)  # rows 5, 6: empty trailing segments
    padded, key_mask = sk.pad_segments(x, cu_clusters, 4)
    assert key_mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(padded[2, :3], x[2:5])
    assert (padded[~key_mask] == 0).all()
    back = sk.unpad_segments(padded, key_mask, cu_clusters, 7)
    assert torch.equal(back[:5], x[:5]) and (back[5:] == 0).all()
    back.sum().backward()
    assert x.grad[:5].eq(1).all() and x.grad[5:].eq(0).all()


# ---------------------------------------------------------------- attention


def segment_softmax_oracle(q, k, v, cu_q, cu_k, scale):
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if b == a or d == c:
            continue
        att = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[c:d].double()) * scale
        out[a:b] = torch.einsum("hqk,khd->qhd", att.softmax(-1), v[c:d].double())
    return out


@pytest.mark.parametrize("D", [16, 96, 2048])
def test_reference_attention_self_and_cross(D):
    cu = offsets([1, 3, 0, 9])
    q, k, v = (torch.randn(13, 2, D, dtype=torch.float64) for _ in range(3))
    out = sk.varlen_attention(q, k, v, cu, backend="reference")
    torch.testing.assert_close(out, segment_softmax_oracle(q, k, v, cu, cu, D**-0.5))
    cu_k = offsets([3, 0, 6, 1])  # an empty key segment
    k2, v2 = torch.randn(10, 2, D, dtype=torch.float64), torch.randn(10, 2, D, dtype=torch.float64)
    out, lse = sk.varlen_attention(q, k2, v2, cu, cu_k, scale=0.1, backend="reference", return_lse=True)
    torch.testing.assert_close(out, segment_softmax_oracle(q, k2, v2, cu, cu_k, 0.1))
    assert (out[1:4] == 0).all() and torch.isneginf(lse[:, 1:4]).all()


def test_reference_attention_gradcheck():
    cu_q = offsets([2, 0, 5])
    cu_k = offsets([3, 1, 0])
    q = torch.randn(7, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: sk.varlen_attention(*t, cu_q, cu_k, backend="reference"), (q, k, v))
    # the differentiable pure-PyTorch reference agrees with the custom op's backward
    out = ref.varlen_attention(q, k, v, cu_q, cu_k)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    out2 = sk.varlen_attention(q, k, v, cu_q, cu_k, backend="reference")
    g2 = torch.autograd.grad(out2.sum(), (q, k, v))
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b)
