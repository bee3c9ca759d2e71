"""The Gram path of the Triton DPC backend (``setok_kernels/dpc_gram.py``) against the float64 oracle.

Images whose B x N x N float32 distance matrix fits ``dpc_gram.GRAM_BUDGET``
take the Gram path, so test_triton_dpc.py's small shapes run it; the class
``TestStreamingPath`` reruns those tests with the path turned off
(``SETOK_DPC_GRAM_BYTES=0``) so that the streaming kernels keep their coverage.
"""

import math

import pytest
import torch

import setok_kernels as sk
from setok_kernels import dpc_gram as G
from setok_kernels import triton_dpc as T
from setok_kernels.reference import column_max_cap

from . import test_triton_dpc as tdpc
from ._data import mask_at, mixture, on_grid, scattered_mask, with_copies
from ._oracle import dpc_batch
from .test_triton_dpc import norm_trick_bound, triton

# Triton kernels: the triton 3.6 leg (`make test-triton36`, `pytest -k triton`) runs them too
pytestmark = pytest.mark.triton

ENV = "SETOK_DPC_GRAM_BYTES"


@pytest.fixture
def gram_calls(monkeypatch):
    """Counts the Gram path's distance passes (one per call that takes the path); the default budget."""
    monkeypatch.delenv(ENV, raising=False)
    calls = []
    distances = G._distances

    def spy(x, p):
        calls.append(tuple(x.shape))
        return distances(x, p)

    monkeypatch.setattr(G, "_distances", spy)
    return calls


# ------------------------------------------------------------------ the size rule


def test_size_rule_and_budget(monkeypatch):
    def fits(B, N, C=8):
        return G.use_gram(torch.empty(B, N, C, device="meta"))

    assert fits(32, 729, 1152)  # SigLIP-384, W2: 68 MB
    assert not fits(1, 16384, 256)  # 1 GiB: streaming
    side = int(math.isqrt(G.GRAM_BUDGET // 4))
    assert fits(1, side) and not fits(1, side + 1) and not fits(2, side)
    monkeypatch.setenv(ENV, "0")
    assert not fits(1, 1)
    monkeypatch.setenv(ENV, str(1 << 40))
    assert fits(1, G.MAX_ROW) and not fits(1, G.MAX_ROW + 1)


def test_entry_points_take_the_path_by_size(device, gram_calls, monkeypatch):
    x = mixture(2, 40, 8)
    density = triton(sk.knn_density, device, x, 4)
    triton(sk.density_delta, device, x, density)
    triton(sk.dpc_cluster, device, x, 4, 0.5, 4)
    triton(sk.assign_to_centers, device, x, torch.tensor([[0, 5]] * 2), torch.tensor([2, 2]))
    assert gram_calls == [(2, 40, 8)] * 3  # assignment alone has no matrix to read
    monkeypatch.setenv(ENV, str(2 * 40 * 40 * 4 - 1))  # one byte short
    triton(sk.dpc_cluster, device, x, 4, 0.5, 4)
    assert len(gram_calls) == 3


# ------------------------------------------------------------------ against the oracle


def _ragged_one_token():
    mask = scattered_mask(3, 50)
    mask[1:] = mask_at(50, [[37], []])  # one real token; none
    return mixture(3, 50, 12), dict(mask=mask, k=3)


def _duplicates(tie_break):
    def case():
        base = mixture(1, 40, 16, sizes=(0.5, 0.3, 0.2))
        x = torch.cat([base, base[:, :9], base[:, 20:23]], 1)  # copies 40 and more tokens apart
        x = x[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))]
        return x, dict(k=3, tie_break=tie_break)
    return case


def _offset():
    x = on_grid(mixture(2, 64, 8))
    spread = float(x.std(1).mean())
    return x + round(1e3 * spread), dict(mask=scattered_mask(2, 64, 0.8))


CASES = {
    "unequal_n100": lambda: (mixture(3, 100, 40, sizes=(0.9, 0.05, 0.03, 0.02)), dict(k=2)),
    "n130_three_tiles": lambda: (mixture(2, 130, 8), dict(k=6, min_clusters=3)),
    "n33_k1": lambda: (mixture(3, 33, 3), dict(k=1)),
    "n7": lambda: (mixture(1, 7, 16, sizes=(0.6, 0.4)), dict(k=3, min_clusters=2)),
    "one_token": lambda: (torch.randn(3, 1, 16), dict(k=1)),
    "one_real_token_and_empty_image": _ragged_one_token,
    "masked": lambda: (mixture(3, 100, 16), dict(mask=scattered_mask(3, 100))),
    "k_equals_n": lambda: (mixture(2, 12, 3), dict(k=12)),
    "k70": lambda: (mixture(1, 100, 3, sizes=(0.75, 0.25)), dict(k=70, min_clusters=2)),
    "duplicates": _duplicates("none"),
    "duplicates_tie_index": _duplicates("index"),
    "copies_global_max": lambda: (with_copies(mixture(2, 64, 8)), dict(k=5, densest_delta="global_max")),
    "large_offset": _offset,
    "num_centers_score": lambda: (mixture(2, 70, 16), dict(mask=scattered_mask(2, 70), num_centers=6,
                                                          center_order="score")),
    "fallback_min_clusters": lambda: (mixture(3, 70, 16), dict(threshold=1e9, min_clusters=6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gram_path_equals_the_oracle(case, device, gram_calls):
    x, kw = CASES[case]()
    kw = dict(dict(k=4, threshold=0.5, min_clusters=4), **kw)
    mask = kw.pop("mask", None)
    got = triton(sk.dpc_cluster, device, x, mask=mask, **kw)
    assert gram_calls, "the Gram path ran"
    want = dpc_batch(x.double(), mask, **kw)
    for key in ("labels", "num_clusters", "centers"):
        assert torch.equal(getattr(got, key), want[key]), key
    # parents: the oracle's, up to distance near-ties inside a blob
    assert torch.equal(got.parent < 0, want["parent"] < 0)
    assert (got.parent == want["parent"]).double().mean() >= 0.97
    bound = norm_trick_bound(x, mask)
    assert ((got.density.double() - want["density"]).abs() <= 2e-6 + bound).all()
    tol = 1e-5 * want["delta"] + torch.minimum(torch.full_like(want["delta"], math.sqrt(bound)),
                                               bound / want["delta"].clamp(min=1e-30))
    same_parent = got.parent == want["parent"]
    assert ((got.delta.double() - want["delta"]).abs() <= tol)[same_parent].all()
    if mask is not None:
        assert (got.labels[~mask] == -1).all() and (got.density[~mask] == 0).all()
        assert (got.parent[~mask] == -1).all() and (got.delta[~mask] == 0).all() and (got.score[~mask] == 0).all()


@pytest.mark.parametrize("case", ["unequal_n100", "masked", "duplicates_tie_index", "k70"])
def test_gram_and_streaming_paths_agree(case, device, monkeypatch):
    x, kw = CASES[case]()
    gram = triton(sk.dpc_cluster, device, x, **kw)
    monkeypatch.setenv(ENV, "0")
    stream = triton(sk.dpc_cluster, device, x, **kw)
    for key in ("labels", "num_clusters", "centers"):
        assert torch.equal(getattr(gram, key), getattr(stream, key)), key
    # the two paths' products differ (float16 x3 vs tf32x3) within the certified bound: densities that
    # tie within it may order differently, and with them a parent
    assert torch.equal(gram.parent < 0, stream.parent < 0)
    assert (gram.parent == stream.parent).double().mean() >= 0.97
    bound = norm_trick_bound(x, kw.get("mask"))
    same = gram.parent == stream.parent
    torch.testing.assert_close(gram.density, stream.density, rtol=1e-5, atol=2e-6 + bound)
    for key in ("delta", "score"):
        torch.testing.assert_close(getattr(gram, key)[same], getattr(stream, key)[same], rtol=1e-5,
                                   atol=2e-6 + bound, msg=key)


def test_duplicates_tie_bit_for_bit_across_tiles(device):
    """Copies 64+ tokens apart (different matrix tiles, one of them read transposed): identical densities,
    so neither is denser than the other."""
    base = mixture(1, 70, 8)
    x = torch.cat([base, base[:, :5]], 1)  # token i and 70 + i
    r = triton(sk.dpc_cluster, device, x, 4, 0.5, 4)
    for i in range(5):
        assert r.density[0, i] == r.density[0, 70 + i]
        assert r.parent[0, i] != 70 + i and r.parent[0, 70 + i] != i


@pytest.mark.parametrize("data", ["outlier", "far_apart"])
def test_ill_conditioned_rows_are_redone_exactly(data, device, monkeypatch):
    """The Gram density pass flags the rows the norm trick cannot certify and the EXACT launch redoes
    them; parents and labels on near ties are decided in their kernels (test_dpc_gram_kernels.py)."""
    x = tdpc.far_outliers() if data == "outlier" else tdpc.far_apart_groups()
    flagged = []
    twice = T._twice

    def spy(kernel, B, N, args, exact_only=False, **kw):
        assert exact_only, "the Gram path writes its own rows and flags"
        twice(kernel, B, N, args, exact_only=exact_only, **kw)
        flagged.append(int(next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int8).sum()))

    monkeypatch.setattr(T, "_twice", spy)
    got = triton(sk.dpc_cluster, device, x, 4, 0.5, 4)
    assert len(flagged) == 1 and flagged[0] > 0
    want = dpc_batch(x.double(), None, 4, 0.5, 4)
    for key in ("labels", "num_clusters", "centers"):
        assert torch.equal(getattr(got, key), want[key]), key
    torch.testing.assert_close(got.density.double(), want["density"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got.delta.double(), want["delta"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("tie_break", ["none", "index"])
def test_cap_equals_column_max_cap(tie_break, device):
    """The finish kernel's cap, without a sort, is reference.column_max_cap bit for bit (ties, masks)."""
    g = torch.Generator().manual_seed(2)
    B, N = 3, 150
    far = torch.rand(B, N, generator=g)
    density = torch.randint(0, 6, (B, N), generator=g).float() / 5  # many ties
    valid = scattered_mask(B, N, 0.7)
    valid[2] = False
    x = torch.randn(B, N, 4, generator=g)
    parent = torch.full((B, N), -1, dtype=torch.int64)  # no parent distance: delta is the cap
    ones = torch.ones(B)
    delta, score = torch.empty(B, N), torch.empty(B, N)
    args = [t.to(device) for t in (x, ones, ones, far, density, parent, valid.view(torch.uint8), delta, score)]
    G._gram_finish_kernel[T._grid(N, B, 32)](*args, N, 4, 0.25, *x.stride(), HAS_MASK=True, COLUMN_MAX=True,
                                             TIE_INDEX=tie_break == "index", BLOCK_M=32, BLOCK_N=128, BLOCK_C=4)
    want = torch.where(valid, column_max_cap(far, density, valid, tie_break), 0)
    assert torch.equal(args[7].cpu(), want)
    assert torch.equal(args[8].cpu(), torch.where(density == 0, 0, density * want))


# ------------------------------------------------------------------ the streaming path keeps its coverage


@pytest.fixture
def streaming(monkeypatch):
    monkeypatch.setenv(ENV, "0")


@pytest.mark.usefixtures("streaming")
class TestStreamingPath:
    """test_triton_dpc.py's tests of the ops that take the Gram path, on the streaming kernels."""

    test_clusters = staticmethod(tdpc.test_clusters_equal_reference_and_oracle)
    test_half_inputs = staticmethod(tdpc.test_half_inputs)
    test_near_ties = staticmethod(tdpc.test_near_ties_rand_index)
    test_duplicates_and_ties = staticmethod(tdpc.test_duplicates_and_ties)
    test_tie_break_index = staticmethod(tdpc.test_tie_break_index_stops_copies_crowding_out_centres)
    test_num_centers = staticmethod(tdpc.test_num_centers_and_score_order)
    test_masked = staticmethod(tdpc.test_masked_tokens_are_removed_tokens)
    test_ragged = staticmethod(tdpc.test_ragged_k_is_clamped_and_empty_image)
    test_nan_image = staticmethod(tdpc.test_nan_image_does_not_touch_others)
    test_strided = staticmethod(tdpc.test_strided_input_equals_contiguous)
    test_deterministic = staticmethod(tdpc.test_deterministic)
    test_parts = staticmethod(tdpc.test_parts_compose_to_dpc_cluster)
    test_offset = staticmethod(tdpc.test_offset_does_not_change_clusters)
    test_magnitudes = staticmethod(tdpc.test_magnitudes_give_finite_scores_and_real_labels)
    test_ill_conditioned = staticmethod(tdpc.test_ill_conditioned_images_equal_the_oracle)
    test_density = staticmethod(tdpc.test_density_within_tolerance)
    test_delta = staticmethod(tdpc.test_delta_and_parent_within_tolerance)
    test_compile = staticmethod(tdpc.test_compile_fullgraph)
    test_cuda_graph = staticmethod(tdpc.test_cuda_graph_capture)
    test_parent_ties = staticmethod(tdpc.test_parent_ties_across_tiles_take_smallest_index)

    def test_streaming_kernels_ran(self, device, gram_calls, monkeypatch):
        monkeypatch.setenv(ENV, "0")  # gram_calls, set up after the class's fixture, restores the default budget
        triton(sk.dpc_cluster, device, mixture(1, 20, 4), 3, 0.5, 2)
        assert gram_calls == []
