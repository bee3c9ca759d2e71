"""The drop-in for the TCFormer family (SPEC.md): merge_clusters, weighted
segment_mean, setok_kernels.compat and the Chat-UniVi merge.

The oracles below are float64 re-implementations of the peers' algorithms
written from their description (per image, one token at a time where that
is clearer), with the random density noise replaced by its deterministic
form: of equal densities the lower index is denser, of equal scores the
lower index ranks first. Shapes are the peers' own (576 tokens, 64 / 32 / 16
clusters) with a narrower C to stay quick.
"""

import math

import pytest
import torch

import setok_kernels as sk
from setok_kernels import compat

from ._data import assert_close_to_truth, assert_rtol, clustered, first_members, offsets, random_labels

OPS = torch.ops.setok
MERGE_BACKENDS = ("reference", "native", "triton")  # triton: the interpreter on CPU
COMPILED = ("native", "triton")
SEGMENT_BACKENDS = ("reference", "native")


# ---------------------------------------------------------------- oracles


def peer_cluster(x, cluster_num, k, mask=None):
    """(labels (B, N), centres (B, n) in score order, scores (B, N)) of TCFormer's DPC-kNN."""
    B, N, C = x.shape
    labels = torch.full((B, N), -1, dtype=torch.int64)
    centers = torch.full((B, cluster_num), -1, dtype=torch.int64)
    scores = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        real = torch.arange(N) if mask is None else mask[b].nonzero().flatten()
        n = real.numel()
        xr = x[b, real].double()
        d = torch.cdist(xr, xr, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(C)
        density = torch.exp(-(d.topk(min(k, n), largest=False).values ** 2).mean(-1))
        i = torch.arange(n)
        same = density[None, :] == density[:, None]
        denser = (density[None, :] > density[:, None]) | (same & (i[None, :] < i[:, None]))
        # the densest token's delta is the image's largest distance
        delta = torch.where(denser, d, d.max()).min(-1).values
        score = density * delta
        top = torch.tensor(sorted(range(n), key=lambda j: (-score[j].item(), j))[:cluster_num])
        lab = d[top].argmin(0)  # the first minimum: the higher-scored centre
        lab[top] = torch.arange(top.numel())
        labels[b, real] = lab
        centers[b, : top.numel()] = real[top]
        scores[b, real] = score
    return labels, centers, scores


def peer_merge(x, labels, cluster_num, weight=None, eps=1e-6):
    """(tokens, per-token share w / (sum(w) + eps)) of the peers' weighted-mean merge."""
    B, N, C = x.shape
    w = torch.ones(B, N, dtype=torch.float64) if weight is None else weight.double()
    tokens = torch.zeros(B, cluster_num, C, dtype=torch.float64)
    share = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        for m in range(cluster_num):
            members = labels[b] == m
            if members.any():
                share[b, members] = w[b, members] / (w[b, members].sum() + eps)
                tokens[b, m] = (x[b, members].double() * share[b, members, None]).sum(0)
    return tokens, share


def blend_oracle(x, labels, num, centers, a, weight=None, eps=0.0):
    """``a * x[centre] + (1 - a) * weighted mean of the other members``; a member-less centre gives itself."""
    B, N, C = x.shape
    M = centers.shape[1]
    w = torch.ones(B, N, dtype=torch.float64) if weight is None else weight.double()
    out = torch.zeros(B, M, C, dtype=torch.float64)
    for b in range(B):
        for m in range(int(num[b])):
            c = int(centers[b, m])
            others = (labels[b] == m) & (torch.arange(N) != c)
            if not others.any():
                out[b, m] = x[b, c]
                continue
            mean = (x[b, others] * w[b, others, None]).sum(0) / (w[b, others].sum() + eps)
            out[b, m] = a[b, m] * x[b, c] + (1 - a[b, m]) * mean
    return out


def features(B=2, N=576, C=64):
    """The peers' shapes: 24 blobs, so centres stand well apart from the noise (float64)."""
    return clustered(B, N, C, groups=24, scale=3.0, noise=1.0, dtype=torch.float64)


# ---------------------------------------------------------------- clustering as the peers do


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_dpc_cluster_matches_peer_at_chat_univi_shape(backend):
    x = features()
    want_labels, want_centers, want_score = peer_cluster(x, 64, 5)
    r = sk.dpc_cluster(x, 5, densest_delta="global_max", num_centers=64, center_order="score", tie_break="index",
                       backend=backend)
    assert torch.equal(r.centers, want_centers)
    assert torch.equal(r.labels, want_labels)
    assert torch.equal(r.num_clusters, torch.full((2,), 64))
    torch.testing.assert_close(r.score, want_score, rtol=1e-12, atol=1e-12)


def test_duplicate_tokens_never_crowd_out_centres():
    # repeated frames: 576 tokens, only 96 distinct; each copy of a dense token has a
    # large delta unless ties in density are broken, and would take centre slots
    x = features(N=96).repeat(1, 6, 1)
    labels, n = compat.cluster_dpc_knn({"x": x}, 32, k=5)
    want_labels, want_centers, _ = peer_cluster(x, 32, 5)
    assert n == 32 and torch.equal(labels, want_labels)
    r = sk.dpc_cluster(x, 5, densest_delta="global_max", num_centers=32, center_order="score", tie_break="index")
    assert torch.equal(r.centers, want_centers)
    for b in range(2):
        assert torch.unique(x[b, r.centers[b]], dim=0).shape[0] == 32  # no centre copies another


def test_cluster_dpc_knn_padded_tokens_are_in_no_cluster():
    x = features(N=200)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[0, 150:] = False
    mask[1, ::7] = False
    labels, _ = compat.cluster_dpc_knn({"x": x}, 16, k=5, token_mask=mask.long())
    want, _, _ = peer_cluster(x, 16, 5, mask)
    assert torch.equal(labels, want)
    assert (labels[~mask] == -1).all()
    # on the real tokens: exactly the image with its padding removed
    alone, _ = compat.cluster_dpc_knn({"x": x[1:, mask[1]]}, 16, k=5)
    assert torch.equal(labels[1, mask[1]], alone[0])


def test_fastvid_style_cosine_assignment_and_centre_blend():
    # FastVID / HoliTom on LLaVA-OneVision frames (14 x 14 = 196 tokens): DPC anchors,
    # every token to its most cosine-similar anchor, each anchor blended with its members
    x = features(B=4, N=196)
    r = sk.dpc_cluster(x, 5, densest_delta="global_max", num_centers=30, center_order="score", tie_break="index")
    labels = sk.assign_to_centers(x, r.centers, r.num_clusters, metric="cosine")
    unit = x / x.norm(dim=-1, keepdim=True)
    want = torch.stack([(unit[b] @ unit[b, r.centers[b]].T).argmax(-1) for b in range(4)])  # ties: earlier anchor
    want.scatter_(1, r.centers, torch.arange(30).expand(4, 30))
    assert torch.equal(labels, want)
    sizes = torch.stack([torch.bincount(labels[b], minlength=30) for b in range(4)])
    a = sizes.double() / (sizes + 1)  # a size-dependent share for the anchor
    got = sk.merge_clusters(x, labels, r.num_clusters, 30, centers=r.centers, center_weight=a)
    torch.testing.assert_close(got.tokens, blend_oracle(x, labels, r.num_clusters, r.centers, a), rtol=0, atol=1e-9)
    assert torch.equal(got.counts, sizes)


# ---------------------------------------------------------------- merge_tokens as the peers do


def token_dict(x, N_init=None):
    B, N, _ = x.shape
    N_init = N_init or N
    g = torch.Generator().manual_seed(1)
    return {
        "x": x,
        "token_num": N,
        "idx_token": torch.randint(0, N, (B, N_init), generator=g),
        "agg_weight": torch.rand(B, N_init, 1, generator=g, dtype=x.dtype),
        "map_size": [24, 24],
        "init_grid_size": [48, 48],
    }


@pytest.mark.parametrize("weighted", [False, True])
def test_merge_tokens_matches_peer(weighted):
    x = features()
    d = token_dict(x, N_init=48 * 48)
    idx_cluster, n = compat.cluster_dpc_knn(d, 64, k=5)
    weight = torch.rand(2, 576, 1, dtype=torch.float64) + 0.1 if weighted else None
    out = compat.merge_tokens(d, idx_cluster, n, weight)
    tokens, share = peer_merge(x, idx_cluster, 64, None if weight is None else weight[..., 0])
    torch.testing.assert_close(out["x"], tokens, rtol=0, atol=1e-9)
    assert out["token_num"] == 64
    assert torch.equal(out["idx_token"], torch.gather(idx_cluster, 1, d["idx_token"]))
    want_agg = d["agg_weight"] * torch.gather(share, 1, d["idx_token"])[..., None]
    torch.testing.assert_close(out["agg_weight"], want_agg, rtol=0, atol=1e-12)
    assert out["map_size"] == [24, 24] and out["init_grid_size"] == [48, 48]


def test_merge_tokens_gradients_like_the_peers():
    x = torch.randn(2, 30, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, 30, 1, dtype=torch.float64) + 0.1).requires_grad_()
    d = token_dict(x)
    idx_cluster, n = compat.cluster_dpc_knn({"x": x.detach()}, 6, k=3)

    def ours(x, w):
        out = compat.merge_tokens(dict(d, x=x), idx_cluster, n, w)
        return out["x"], out["agg_weight"]

    def peers(x, w):  # the peers' index_add formulation, differentiated by autograd
        flat = idx_cluster + torch.arange(2)[:, None] * n
        total = torch.zeros(2 * n, 1, dtype=x.dtype).index_add(0, flat.flatten(), w.reshape(-1, 1)) + 1e-6
        norm = w / total[flat]
        merged = torch.zeros(2 * n, 4, dtype=x.dtype).index_add(0, flat.flatten(), (x * norm).reshape(-1, 4))
        agg = d["agg_weight"] * torch.gather(norm[..., 0], 1, d["idx_token"])[..., None]
        return merged.view(2, n, 4), agg

    assert torch.autograd.gradcheck(ours, (x, w))
    go = (torch.randn(2, n, 4, dtype=torch.float64), torch.randn(2, 30, 1, dtype=torch.float64))
    g_ours = torch.autograd.grad(ours(x, w), (x, w), go)
    g_peer = torch.autograd.grad(peers(x, w), (x, w), go)
    for a, b in zip(g_ours, g_peer):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_merge_tokens_padding_and_chat_univi_mask():
    x = features(N=40)
    mask = torch.ones(2, 40)
    mask[1, 5:] = 0  # 5 real tokens, 8 clusters asked: 3 cluster numbers stay empty
    d = dict(token_dict(x), mask=mask)
    idx_cluster, n = compat.cluster_dpc_knn(d, 8, k=3, token_mask=mask)
    out = compat.merge_tokens(d, idx_cluster, n)
    assert out["mask"].dtype == mask.dtype
    assert torch.equal(out["mask"][1], torch.tensor([1.0] * 5 + [0.0] * 3))
    assert (out["x"][1, 5:] == 0).all()
    padded = idx_cluster[1] == -1
    assert padded.sum() == 35
    # a padded token holds no initial cell's weight and maps it to -1
    cells = padded[d["idx_token"][1]]
    assert (out["idx_token"][1][cells] == -1).all() and (out["agg_weight"][1][cells] == 0).all()


# ---------------------------------------------------------------- Chat-UniVi's three-level merge


def peer_chat_univi(x, cluster_nums=(64, 32, 16), ks=(5, 3, 3)):
    levels = []
    for n, k in zip(cluster_nums, ks):
        labels, _, _ = peer_cluster(x, n, k)
        x, _ = peer_merge(x, labels, n)
        levels.append(x)
    return torch.cat(levels, 1)


def test_chat_univi_merge_matches_peer():
    from setok_model import ChatUniViMerge

    x = features()
    out = ChatUniViMerge()(x)
    assert out.tokens.shape == (2, 112, 64) and out.key_mask.all()
    torch.testing.assert_close(out.tokens, peer_chat_univi(x), rtol=0, atol=1e-9)


def test_chat_univi_merge_ragged_batch():
    from setok_model import ChatUniViMerge

    x = features(B=3, N=100, C=16)
    mask = torch.ones(3, 100, dtype=torch.bool)
    mask[1, 40:] = False  # 40 real tokens: 40 -> 32 -> 16 clusters
    mask[2] = False  # no real token: nothing comes out
    out = ChatUniViMerge()(x, mask)
    assert out.key_mask.sum(1).tolist() == [112, 88, 0]
    assert (out.tokens[~out.key_mask] == 0).all()
    for b in range(2):
        alone = ChatUniViMerge()(x[b : b + 1, mask[b]])
        torch.testing.assert_close(out.tokens[b][out.key_mask[b]], alone.tokens[0][alone.key_mask[0]], rtol=0, atol=1e-12)


def test_chat_univi_merge_on_a_hugging_face_vision_tower():
    transformers = pytest.importorskip("transformers")
    from setok_model import ChatUniViMerge

    # CLIP ViT-L/14-336's geometry (24 x 24 = 576 patches) at a toy width, built from a config
    config = transformers.CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    tower = transformers.CLIPVisionModel(config).double().eval()
    pixels = torch.randn(2, 3, 336, 336, dtype=torch.float64, requires_grad=True)
    # LLaVA / Chat-UniVi features: the penultimate layer's patch tokens (CLS dropped)
    patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert patches.shape == (2, 576, 32)
    merge = ChatUniViMerge()
    out = merge(patches)
    assert out.tokens.shape == (2, 112, 32) and out.key_mask.all()
    torch.testing.assert_close(out.tokens, peer_chat_univi(patches.detach()), rtol=0, atol=1e-9)
    out.tokens.sum().backward()  # differentiable back to the pixels
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


# ---------------------------------------------------------------- merge_clusters


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_clusters_weighted_mean(backend):
    B, N, C, M = 3, 40, 6, 8
    x = torch.randn(B, N, C, dtype=torch.float64)
    num = torch.tensor([8, 5, 0])
    labels = random_labels(B, N, M, num)
    w = torch.rand(B, N, dtype=torch.float64)
    r = sk.merge_clusters(x, labels, num, M, weight=w, eps=1e-3, backend=backend)
    want = torch.zeros(B, M, C, dtype=torch.float64)
    for b in range(B):
        for m in range(int(num[b])):
            sel = labels[b] == m
            want[b, m] = (x[b, sel] * w[b, sel, None]).sum(0) / (w[b, sel].sum() + 1e-3)
            assert r.counts[b, m] == sel.sum()
            torch.testing.assert_close(r.weight_sum[b, m], w[b, sel].sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.tokens, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(r.key_mask, torch.arange(M)[None, :] < num[:, None])
    assert (r.counts[~r.key_mask] == 0).all() and (r.tokens[~r.key_mask] == 0).all()


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_clusters_equals_pack_segment_mean_pad(backend):
    x = torch.randn(2, 50, 5)
    r = sk.dpc_cluster(x, 4, max_clusters=12)
    p = sk.pack_clusters(r.labels, r.num_clusters, 12)
    pooled = sk.segment_mean(x.flatten(0, 1)[p.perm], p.cu_seqlens)
    want, want_mask = sk.pad_segments(pooled, p.cu_clusters, 12)
    got = sk.merge_clusters(x, r.labels, r.num_clusters, 12, backend=backend)
    assert torch.equal(got.key_mask, want_mask)
    torch.testing.assert_close(got.tokens, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("tensor_weight", [False, True])
def test_merge_clusters_centre_blend(backend, tensor_weight):
    B, N, C = 2, 60, 4
    x = torch.randn(B, N, C, dtype=torch.float64)
    r = sk.dpc_cluster(x, 4, num_centers=10, densest_delta="global_max", center_order="score", tie_break="index")
    labels = r.labels.clone()
    # give image 1's centre 3 no other member: it must come out as itself
    labels[1][(labels[1] == 3) & (torch.arange(N) != r.centers[1, 3])] = 4
    w = torch.rand(B, N, dtype=torch.float64) + 0.5
    # FastVID-style: the centre's share shrinks with the cluster's size
    a = 1 / (1 + torch.stack([torch.bincount(labels[b], minlength=10) for b in range(B)]).double())
    cw = a if tensor_weight else 0.3
    got = sk.merge_clusters(x, labels, r.num_clusters, 10, weight=w, eps=1e-6, centers=r.centers, center_weight=cw,
                            backend=backend)
    a_full = a if tensor_weight else torch.full((B, 10), 0.3, dtype=torch.float64)
    want = blend_oracle(x, labels, r.num_clusters, r.centers, a_full, w, 1e-6)
    torch.testing.assert_close(got.tokens, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.tokens[1, 3], x[1, r.centers[1, 3]])
    plain = sk.merge_clusters(x, labels, r.num_clusters, 10, weight=w, backend=backend)
    assert torch.equal(got.counts, plain.counts)  # the centre is counted
    torch.testing.assert_close(got.weight_sum, plain.weight_sum, rtol=1e-14, atol=0)


# gradcheck calls the op hundreds of times: too slow in Triton's interpreter, whose
# backward is compared with the reference's in test_merge_clusters_backward_matches_reference
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_merge_clusters_gradients(backend):
    B, N, C, M = 2, 12, 3, 4
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(B, N, dtype=torch.float64) + 0.2).requires_grad_()
    a = torch.rand(B, M, dtype=torch.float64, requires_grad=True)
    num = torch.tensor([4, 3])
    labels = random_labels(B, N, M, num, seed=3)
    centers = first_members(labels, M)

    def floats(r):
        return r.tokens, r.weight_sum

    assert torch.autograd.gradcheck(lambda x, w: floats(sk.merge_clusters(x, labels, num, M, weight=w, eps=0.1,
                                                                          backend=backend)), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, a: floats(sk.merge_clusters(
        x, labels, num, M, weight=w, eps=1e-6, centers=centers, center_weight=a, backend=backend)), (x, w, a))
    assert torch.autograd.gradcheck(lambda x: sk.merge_clusters(x, labels, num, M, backend=backend).tokens, (x,))


@pytest.mark.parametrize("backend", COMPILED)
def test_merge_clusters_backward_matches_reference(backend):
    x, labels, num, w, centers, a = (t.double() if t.is_floating_point() else t for t in _merge_case(torch.float64, 24, 40))
    g, gws = torch.randn(3, 9, 40, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    for args in ((None, 0.0, None, None), (w, 1e-6, None, None), (w, 1e-6, centers, a), (None, 0.5, centers, a)):
        want = OPS.merge_clusters_backward(g, gws, x, labels, num, *args, "reference")
        got = OPS.merge_clusters_backward(g, gws, x, labels, num, *args, backend)
        for r, t in zip(want, got):
            torch.testing.assert_close(t, r, rtol=1e-12, atol=1e-12)


def test_merge_clusters_native_matches_reference_bitwise_forward():
    x = torch.randn(3, 70, 300)  # more than one channel chunk
    num = torch.tensor([9, 2, 5])
    labels = random_labels(3, 70, 9, num)
    w = torch.rand(3, 70)
    for kw in ({}, {"weight": w, "eps": 1e-6}):
        ref = sk.merge_clusters(x, labels, num, 9, backend="reference", **kw)
        nat = sk.merge_clusters(x, labels, num, 9, backend="native", **kw)
        for a, b in zip(ref, nat):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_clusters_low_precision(dtype, backend):
    x = torch.randn(2, 30, 8).to(dtype)
    num = torch.tensor([5, 4])
    labels = random_labels(2, 30, 5, num)
    w = torch.rand(2, 30)
    r = sk.merge_clusters(x, labels, num, 5, weight=w, backend=backend)
    want = sk.merge_clusters(x.double(), labels, num, 5, weight=w.double(), backend="reference")
    assert r.tokens.dtype == dtype and r.weight_sum.dtype == torch.float32
    # float32 accumulation: only the output's own rounding is left
    assert_rtol(r.tokens, want.tokens, dtype)
    assert_rtol(r.weight_sum, want.weight_sum, torch.float32)
    if backend != "reference":  # and no farther from float64 than the reference in this dtype
        ref = sk.merge_clusters(x, labels, num, 5, weight=w, backend="reference")
        assert_close_to_truth(r.tokens, ref.tokens, want.tokens, dtype, name="tokens")
        assert_close_to_truth(r.weight_sum, ref.weight_sum, want.weight_sum, torch.float32, name="weight_sum")


def test_merge_clusters_checks():
    x = torch.randn(2, 10, 3)
    labels = torch.zeros(2, 10, dtype=torch.int64)
    num = torch.ones(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="centers and center_weight go together"):
        sk.merge_clusters(x, labels, num, 4, center_weight=0.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        sk.merge_clusters(x, labels, num, 4, weight=torch.ones(2, 9))
    with pytest.raises(ValueError, match="eps"):
        sk.merge_clusters(x, labels, num, 4, eps=-1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        sk.merge_clusters(x, labels + 1, num, 4)
    with pytest.raises(ValueError, match="centers must be distinct"):
        sk.merge_clusters(x, labels, num + 1, 4, centers=torch.tensor([[0, 0, 1, 2], [3, 4, 3, 3]]), center_weight=0.5)


def test_merge_clusters_compile():
    """(opcheck of merge_clusters and the weighted segment_mean on every backend: tests/test_opcheck.py)"""
    x = torch.randn(2, 23, 5, requires_grad=True)
    w = torch.rand(2, 23, requires_grad=True)

    def pipeline(x, w):
        c = sk.dpc_cluster(x.detach(), 3, num_centers=6, densest_delta="global_max", center_order="score",
                           tie_break="index", backend="reference")
        m = sk.merge_clusters(x, c.labels, c.num_clusters, 6, weight=w, eps=1e-6, centers=c.centers,
                              center_weight=0.25)
        return m.tokens, m.key_mask, m.counts, m.weight_sum

    eager = pipeline(x, w)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(x, w)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# ---------------------------------------------------------------- weighted segment_mean


@pytest.mark.parametrize("backend", SEGMENT_BACKENDS)
def test_segment_mean_weight_and_eps(backend):
    cu = offsets([3, 0, 6, 5])
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)  # rows 14, 15 in no segment
    w = (torch.rand(16, dtype=torch.float64) + 0.1).requires_grad_()
    got = sk.segment_mean(x, cu, weight=w, eps=1e-3, backend=backend)
    for s in range(4):
        lo, hi = int(cu[s]), int(cu[s + 1])
        want = (x[lo:hi] * w[lo:hi, None]).sum(0) / (w[lo:hi].sum() + 1e-3)
        torch.testing.assert_close(got[s], want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: sk.segment_mean(x, cu, weight=w, eps=1e-3, backend=backend), (x, w))
    assert torch.autograd.gradcheck(lambda x: sk.segment_mean(x, cu, eps=0.5, backend=backend), (x,))
    # the empty segment: 0 with or without eps
    assert (sk.segment_mean(x, cu, weight=w, backend=backend)[1] == 0).all()


def test_segment_mean_weighted_native_matches_reference():
    cu = offsets([5, 0, 35, 24], dtype=torch.int64)
    x, w = torch.randn(64, 33), torch.rand(64)
    for kw in ({"weight": w}, {"weight": w, "eps": 1e-6}, {"eps": 2.0}):
        assert torch.equal(sk.segment_mean(x, cu, backend="native", **kw), sk.segment_mean(x, cu, backend="reference", **kw))


# ---------------------------------------------------------------- CUDA kernels (run only with a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _merge_case(dtype, N=70, C=300):
    B, M = 3, 9
    x = torch.randn(B, N, C).to(dtype)
    num = torch.tensor([9, 2, 0])
    labels = random_labels(B, N, M, num)
    return x, labels, num, torch.rand(B, N), first_members(labels, M), torch.rand(B, M)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_merge_clusters_forward_backward(dtype):
    x, labels, num, w, centers, a = _merge_case(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for kw in ({}, {"weight": w, "eps": 1e-6}, {"weight": w, "centers": centers, "center_weight": a}):
        dev = {k: v.cuda() for k, v in kw.items() if isinstance(v, torch.Tensor)}
        dev.update({k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)})
        xr, xc = x.clone().requires_grad_(), x.cuda().requires_grad_()
        ref = sk.merge_clusters(xr, labels, num, 9, backend="reference", **kw)
        got = sk.merge_clusters(xc, labels.cuda(), num.cuda(), 9, backend="native", **dev)
        again = sk.merge_clusters(xc, labels.cuda(), num.cuda(), 9, backend="native", **dev)
        for r, g, g2 in zip(ref, got, again):
            assert torch.equal(g, g2)  # deterministic
            torch.testing.assert_close(g.cpu().to(r.dtype), r, **tol)
        go = torch.randn(3, 9, 300).to(dtype)
        (gx_ref,) = torch.autograd.grad(ref.tokens, xr, go)
        (gx,) = torch.autograd.grad(got.tokens, xc, go.cuda())
        torch.testing.assert_close(gx.cpu(), gx_ref, **tol)


@cuda
def test_cuda_merge_clusters_weight_gradients():
    x, labels, num, w, centers, a = (t.double() if t.is_floating_point() else t for t in _merge_case(torch.float64))
    ws, as_ = w.cuda().requires_grad_(), a.cuda().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, a: sk.merge_clusters(x.cuda(), labels.cuda(), num.cuda(), 9, weight=w, eps=1e-6,
                                       centers=centers.cuda(), center_weight=a, backend="native")[::3], (ws, as_))


@cuda
def test_cuda_weighted_segment_mean():
    cu = offsets([5, 0, 35, 24])
    x = torch.randn(70, 33, dtype=torch.float64, requires_grad=True)
    w = torch.rand(70, dtype=torch.float64, requires_grad=True)
    got = sk.segment_mean(x.cuda(), cu.cuda(), weight=w.cuda(), eps=1e-3, backend="native")
    torch.testing.assert_close(got.cpu(), sk.segment_mean(x, cu, weight=w, eps=1e-3, backend="reference"))
    xc, wc = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: sk.segment_mean(a, cu.cuda(), weight=b, eps=1e-3, backend="native"),
                                    (xc, wc))
