"""Triton ``pack_clusters`` (``backend="triton"``, one launch) against the reference, bit for bit.

On the device under test (CUDA, else CPU tensors in Triton's interpreter,
which conftest enables): small shapes. Valid inputs go through the public
op; out-of-range labels and cluster counts, which the op's value checks
refuse on the CPU, go straight to both backends' implementations, which
must agree on them too (unpacked labels, clamped counts).
"""

import pytest
import torch

import setok_kernels as sk
from setok_kernels import BackendUnavailableError, _backends
from setok_kernels import reference as R
from setok_kernels._backends import CallInfo

from ._data import random_labels

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from setok_kernels import triton_merge as TM  # noqa: E402

FIELDS = ("perm", "cu_seqlens", "cu_clusters", "max_seqlen")


@pytest.fixture(params=["program0", "atomic"])
def max_path(request, monkeypatch):
    """Both ways to max_seqlen: program 0 histograms every image (small shapes), or every program
    atomic_max-es its own into a zero-filled output (what large B * N * M_PAD take)."""
    monkeypatch.setattr(TM, "PACK_MAX_LANE_OPS", 0 if request.param == "atomic" else 1 << 62)
    return request.param


def assert_same(got, want):
    for name, a, b in zip(FIELDS, got, want):
        a = a.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.dtype, b.shape)
        assert torch.equal(a, b), (name, a, b)


def unequal_labels(B, N, num, seed=0):
    """Clusters of very unequal sizes: cluster 0 takes ~90% of an image, the rest share the remainder."""
    g = torch.Generator().manual_seed(seed)
    big = torch.rand(B, N, generator=g) < 0.9
    small = (torch.rand(B, N, generator=g) * num.clamp(min=1)[:, None]).long()
    return torch.where(big | (num[:, None] == 0), torch.where(num[:, None] > 0, 0, -1), small)


def _valid(name):
    """(labels, num, M) of a named valid case: labels in [-1, num[b]), 0 <= num[b] <= M."""
    if name == "random":
        num = torch.tensor([5, 8, 3])
        return random_labels(3, 50, 8, num, seed=1), num, 8
    if name == "unequal_sizes":
        num = torch.tensor([7, 2, 7, 1])
        return unequal_labels(4, 150, num), num, 7
    if name == "num_below_m":  # trailing empty segments in every image
        num = torch.tensor([2, 0, 3])
        return random_labels(3, 20, 9, num, seed=2), num, 9
    if name == "no_packed_image":  # an image of unlabelled tokens only
        num = torch.tensor([3, 3, 2])
        labels = random_labels(3, 17, 3, num, seed=3)
        labels[1] = -1
        return labels, num, 3
    if name == "b1":
        num = torch.tensor([4])
        return random_labels(1, 40, 6, num, seed=4), num, 6
    if name == "n1":
        num = torch.tensor([1, 0, 1])
        return torch.tensor([[0], [-1], [-1]]), num, 2
    if name == "n_odd_blocks":  # N not a power of two, over several token blocks; M not a power of two
        num = torch.tensor([37, 20])
        return random_labels(2, 201, 37, num, seed=5), num, 37
    if name == "m1":
        num = torch.tensor([1, 0, 1, 1])
        return random_labels(4, 9, 1, num, seed=6), num, 1
    if name == "all_unlabelled":
        return torch.full((2, 5), -1), torch.tensor([0, 2]), 4
    if name == "m_1024":  # the largest M the backend takes
        num = torch.tensor([1024, 3])
        return random_labels(2, 1100, 1024, num, seed=7), num, 1024
    raise KeyError(name)


VALID = ("random", "unequal_sizes", "num_below_m", "no_packed_image", "b1", "n1", "n_odd_blocks", "m1",
         "all_unlabelled", "m_1024")


@pytest.mark.parametrize("name", VALID)
def test_matches_reference(device, name, max_path):
    labels, num, M = _valid(name)
    want = R._pack_clusters(labels, num, M)
    assert_same(sk.pack_clusters(labels.to(device), num.to(device), M, backend="triton"), want)


def test_int32_inputs_through_the_op(device):
    labels, num, M = _valid("unequal_sizes")
    want = R._pack_clusters(labels, num, M)
    got = torch.ops.setok.pack_clusters(labels.int().to(device), num.int().to(device), M, "triton")
    assert_same(got, want)


def test_compile_fullgraph(device, max_path):
    labels, num, M = _valid("unequal_sizes")
    labels, num = labels.to(device), num.to(device)

    def pack(labels, num):
        return tuple(sk.pack_clusters(labels, num, M, backend="triton"))

    compiled = torch.compile(pack, fullgraph=True, backend="aot_eager")
    assert_same(compiled(labels, num), R._pack_clusters(labels.cpu(), num.cpu(), M))


def test_empty_batch(device):
    labels, num = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    want = R._pack_clusters(labels, num, 3)
    assert_same(sk.pack_clusters(labels.to(device), num.to(device), 3, backend="triton"), want)


def _hostile(name):
    """(labels, num, M) outside what the value checks allow: the backends must still agree."""
    g = torch.Generator().manual_seed(len(name))
    if name == "labels_at_or_over_num":  # num < M, labels in [num, M) and >= M: unpacked
        return torch.randint(0, 12, (3, 30), generator=g), torch.tensor([4, 0, 9]), 9
    if name == "negative_labels":
        return torch.randint(-5, 4, (2, 33), generator=g), torch.tensor([4, 2]), 4
    if name == "num_negative_or_over_m":  # clamped to [0, M]
        return torch.randint(-1, 9, (4, 21), generator=g), torch.tensor([-3, 12, 5, 6]), 6
    if name == "huge_labels":
        labels = torch.randint(0, 3, (2, 10), generator=g)
        labels[0, ::3] = 2**40
        labels[1, 1::4] = -(2**40)
        return labels, torch.tensor([3, 3]), 3
    raise KeyError(name)


@pytest.mark.parametrize("name", ("labels_at_or_over_num", "negative_labels", "num_negative_or_over_m", "huge_labels"))
@pytest.mark.parametrize("dtype", (torch.int64, torch.int32))
def test_out_of_range_values_match_reference(device, name, dtype, max_path):
    labels, num, M = _hostile(name)
    if dtype == torch.int32:
        labels = labels.clamp(-(2**31), 2**31 - 1)
    labels, num = labels.to(dtype), num.to(dtype)
    want = R._pack_clusters(labels, num, M)
    assert_same(TM._pack_clusters(labels.to(device), num.to(device), M), want)


def test_max_path_follows_the_cost():
    assert not TM.pack_atomic_max(32, 729, 64)  # SeTok's shape: one launch
    assert TM.pack_atomic_max(32, 729, 729)  # M = N: 384 lane ops a label in program 0; a fill is cheaper
    assert not TM.pack_atomic_max(1, 1024, 1024)


def test_declines_above_the_size_rule():
    impl = next(i for i in _backends.implementations("pack_clusters") if i.name == "triton")

    def reason(B, N, M):
        return impl.decline_reason(CallInfo(torch.device("cuda"), torch.int64, False, dict(B=B, N=N, M=M)), forced=True)

    if impl.unavailable_reason():
        pytest.skip(impl.unavailable_reason())
    assert reason(32, 729, 64) is None
    assert reason(8192, 1, 1) is None  # B * B * N = 2^26 exactly
    assert "B * B * N = 67125249 is over 67108864" in reason(8193, 1, 1)
    assert "max_clusters = 1025 is over 1024" in reason(2, 4, 1025)
    # forced through the op: a clear error; "auto" falls back to another backend
    labels = torch.zeros(8193, 1, dtype=torch.long)
    num = torch.ones(8193, dtype=torch.long)
    with pytest.raises(BackendUnavailableError, match=r"B \* B \* N"):
        sk.pack_clusters(labels, num, 1, backend="triton")
    with pytest.raises(BackendUnavailableError, match="max_clusters = 1025"):
        sk.pack_clusters(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, dtype=torch.long), 1025, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture():
    num = torch.tensor([7, 2, 7, 1]).cuda()
    labels = unequal_labels(4, 150, num.cpu()).cuda()
    sk.pack_clusters(labels, num, 7, backend="triton")  # compiles the kernel
    static = labels.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sk.pack_clusters(static, num, 7, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = sk.pack_clusters(static, num, 7, backend="triton")
    static.copy_(labels.flip(1))
    graph.replay()
    assert_same(out, R._pack_clusters(labels.flip(1).cpu(), num.cpu(), 7))
