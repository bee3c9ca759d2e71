"""Kernels of the Gram path (``dpc_gram.py``) against what they replace: the fused prologue
(``_prepare``: two launches, no torch ops) reproduces ``triton_dpc._prepare`` bit for bit, and the
bracketed bisection (``_kth_smallest``) returns the former 31-step bisection's key, the float16 x3
products carry float32 accuracy, and near ties of parents and labels are decided by exact distances."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from setok_kernels import dpc_gram as G
from setok_kernels import triton_dpc as T
from setok_kernels.dpc_gram import _jit, _kth_smallest, _load_rows, tl, triton

from ._data import mixture, scattered_mask

# Triton kernels: the triton 3.6 leg (`make test-triton36`, `pytest -k triton`) runs them too
pytestmark = pytest.mark.triton

SNAP = float(getattr(T.SNAP, "value", T.SNAP))  # a tl.constexpr where triton is installed


def _cases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 37, 20, generator=g, dtype=torch.float64) * 3 + 5
    mask = scattered_mask(3, 37)
    mask[1] = False  # an image without a real token
    far = x.clone()
    far[0] *= 1e30  # scale near float32's top
    far[1] *= 1e-41  # subnormal amax
    far[2, 3, 4] = float("nan")
    odd = x.clone()
    odd[1] = 0  # amax 0: s = 1
    odd[2, 0, 0] = float("inf")
    wide = torch.randn(2, 20, 70, generator=g).transpose(1, 2)  # strided, C not a power of two
    return {
        "fp32": (x.float(), None),
        "fp32-mask": (x.float(), mask),
        "bf16": (mixture(2, 50, 24).bfloat16(), None),
        "fp16-mask": (x.half(), mask),
        "extreme-scales-nan": (far.float(), None),
        "zeros-inf-mask": (odd.float(), mask),
        "strided": (wide, None),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_prologue_is_triton_dpc_prepare_bit_for_bit(case, device):
    x, mask = _cases()[case]
    x = x.to(device)
    mask = None if mask is None else mask.to(device)
    want, got = T._prepare(x, mask), G._prepare(x, mask)
    assert got.has_mask == want.has_mask
    for name in ("norms", "shift", "scale", "inv", "nmax"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), name


class _Ops(TorchDispatchMode):
    """aten ops that launch work (allocations and views excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.empty, torch.ops.aten.empty_like):
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_prologue_is_two_launches_and_no_torch_op(device, monkeypatch):
    """The kernels are replaced by recorders (interpreted, they would run torch ops of their own)."""
    launched = []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(self.name)

    for name in ("_gram_stats_kernel", "_gram_norms_kernel"):
        monkeypatch.setattr(G, name, Launch(name))
    x = mixture(2, 40, 16).to(device)
    mask = scattered_mask(2, 40).to(device)
    with _Ops() as seen:
        G._prepare(x, mask)
    assert seen.ops == []
    assert launched == ["_gram_stats_kernel", "_gram_norms_kernel"]


# ------------------------------------------------------------------ the density's select


@_jit
def _select_kernel(d2_ptr, mask_ptr, k_ptr, out_ptr, N, HAS_MASK: tl.constexpr, N_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d2, row_ok, col_ok, cols = _load_rows(d2_ptr, mask_ptr, b, rows, N, float("inf"), HAS_MASK, N_PAD)
    hi = _kth_smallest(d2.to(tl.int32, bitcast=True), rows, cols, row_ok, col_ok, tl.load(k_ptr + b), N_PAD)
    tl.store(out_ptr + b * N + rows, hi, mask=rows < N)


def _kth_key_oracle(values, mask, k):
    """The smallest int32 key v in [0, +inf] with at least k real keys <= v, +inf's key if none: what the
    former 31-step bisection over [0, +inf] returned."""
    inf_key = 0x7F800000
    B, N, _ = values.shape
    keys = values.view(torch.int32).long()
    want = torch.full((B, N), 0, dtype=torch.int64)
    for b in range(B):
        cols = mask[b] if mask is not None else torch.ones(N, dtype=torch.bool)
        for i in range(N):
            row = keys[b, i][cols].sort().values
            kth = int(row[k[b] - 1]) if k[b] >= 1 else 0
            want[b, i] = 0 if kth < 0 else min(kth, inf_key) if kth <= inf_key else inf_key
    return want


@pytest.mark.parametrize("masked", [False, True])
def test_kth_smallest_is_the_kth_key(masked, device):
    """Ties, zeros, +inf and NaN entries (both signs), k from 1 to the real count; d2-like rows
    (0 on the diagonal) and arbitrary ones."""
    g = torch.Generator().manual_seed(5)
    B, N = 6, 23
    v = torch.rand(B, N, N, generator=g) * 4
    v[0] = (v[0] + v[0].T).round(decimals=1)  # many ties
    v[0].fill_diagonal_(0)
    v[1] = torch.exp2(torch.randint(-30, 30, (N, N), generator=g).float())  # a wide range of exponents
    v[2, 3, 5] = float("inf")
    v[3, 4, 1] = float("nan")
    v[3, 6, 2] = -float("nan")
    v[4, :, 7] = 0.0
    v[5] = 1.5  # all equal
    mask = scattered_mask(B, N, seed=9) if masked else None
    if masked:
        mask[5, :] = False  # an image without a real token: k = 0
    real = mask.sum(1) if masked else torch.full((B,), N)
    k = torch.minimum(torch.tensor([1, 2, 7, 23, 5, 3]), real).to(torch.int32)
    out = torch.empty(B, N, dtype=torch.int32, device=device)
    mask_t = mask.to(device).view(torch.uint8) if masked else out
    _select_kernel[(triton.cdiv(N, 4), B)](v.to(device), mask_t, k.to(device), out, N, HAS_MASK=masked, N_PAD=32,
                                             BLOCK_M=4)
    want = _kth_key_oracle(v, mask, k)
    rows = mask if masked else torch.ones(B, N, dtype=torch.bool)  # rows that are not real: no contract
    assert torch.equal(out.cpu().long()[rows], want[rows])


@pytest.mark.parametrize("k", [1, 2, 16, 40])
def test_kth_smallest_on_a_distance_matrix(k, device):
    """The Gram path's own matrix (copies: exact ties at 0 and between copies' rows), masked."""
    x = torch.cat([mixture(2, 40, 8), mixture(2, 40, 8)[:, :8]], 1).to(device)  # tokens i and 40 + i equal
    mask = scattered_mask(2, 48, keep=0.9, seed=4).to(device)
    d2 = G._distances(x, G._prepare(x, mask))
    N = x.shape[1]
    real = mask.sum(1).cpu()
    kk = torch.minimum(torch.full((2,), k), real).to(torch.int32)
    out = torch.empty(2, N, dtype=torch.int32, device=device)
    _select_kernel[(triton.cdiv(N, 4), 2)](d2, mask.view(torch.uint8), kk.to(device), out, N, HAS_MASK=True,
                                           N_PAD=64, BLOCK_M=4)
    want = _kth_key_oracle(d2.cpu(), mask.cpu(), kk)
    assert torch.equal(out.cpu().long()[mask.cpu()], want[mask.cpu()])


def _near_tie():
    """Token 0 with two neighbours, token 2 nearer than token 1 (0.81 vs 1 squared), a far outlier that
    makes the norm trick's bound (SNAP (|a_0|^2 + nmax)) wider than their gap, and a Gram matrix
    edited within that bound so that it names token 1 the nearer."""
    x = torch.zeros(1, 8, 4)
    x[0, 1, 0] = 1.0
    x[0, 2, 1] = 0.9
    for i in range(3, 7):
        x[0, i, i - 3] = 5.0 + i
    x[0, 7] = 100.0
    p = G._prepare(x, None)
    d2 = G._distances(x, p)
    err = SNAP * (p.norms[0, 0] + p.nmax[0]) / 4
    edited = 0.999 * d2[0, 0, 2]
    assert d2[0, 0, 2] - edited < 2 * err, "the edit stays within the bound the kernels certify"
    assert d2[0, 0, 2] < d2[0, 0, 1], "the matrix had it right"
    d2[0, 0, 1] = d2[0, 1, 0] = edited
    return x, p, d2


def test_near_tie_parent_is_decided_by_exact_distances(device):
    x, p, d2 = _near_tie()
    density = torch.tensor([[0.1, 0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.2]])  # 1 and 2 denser than 0
    _, parent, _ = G._delta(x, density, "column_max", "none", p, d2)
    assert parent[0, 0] == 2  # the matrix alone says 1 (and 1 also wins index ties)


def test_near_tie_label_is_decided_by_exact_distances(device):
    x, p, d2 = _near_tie()
    centers = torch.tensor([[1, 2, 7]])
    labels = G._assign(x, centers, torch.tensor([3]), p, d2)
    assert labels[0, 0] == 1  # centre 2's slot; the matrix alone says slot 0 (which also wins ties)
    assert labels[0, 1:3].tolist() == [0, 1] and labels[0, 7] == 2  # centres label themselves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_products_have_float32_accuracy(dtype, device):
    """float16 x3 distances stay within SNAP of float64's, features of very different sizes included
    (the split scale follows the largest norm; a small-norm image keeps its bits)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 70, 40, generator=g) * torch.logspace(-3, 2, 40)  # channels of 5 decades
    x[1] *= 1e-6  # an image of small values: its own split scale
    x = x.to(dtype)
    p = G._prepare(x, None)
    d2 = G._distances(x, p).double()
    a = x.double() * p.inv.double()[:, None, None] - p.shift.double()[:, None, :]
    want = torch.cdist(a, a).pow(2) / 40
    bound = SNAP * (p.norms.double()[:, :, None] + p.norms.double()[:, None, :]) / 40
    assert ((d2 - want).abs() <= bound).all()
    assert torch.equal(d2, d2.transpose(1, 2))  # exactly symmetric
