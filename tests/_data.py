"""Shared test data and the one tolerance rule.

Builders draw from their own ``torch.Generator`` (seeded by argument), so a
test's data never depends on test order or on the global seed, and they draw
in float64 and cast last, so the same call gives the same values at every
dtype. (:func:`attention_inputs` alone draws from the global generator, which
tests/conftest.py seeds before every test.) Names follow docs/NAMES.md.

Features ``x (B, N, C)``:

- :func:`mixture`: Gaussian blobs of very unequal sizes, tokens shuffled;
- :func:`clustered`: ``groups`` well-separated blobs, each token in a random one;
- :func:`with_copies`, :func:`with_duplicates`: exact copies of tokens (equal
  densities, distance 0: ties that are real ties);
- :func:`small_integers`: integer coordinates, so every distance is exact;
- :func:`on_grid`: values on a power-of-two grid, so ``x + c`` is exact;
- :func:`cap_case`, :func:`lone_token_cap_case`: SeTok's column-max cap decides the centres.

Masks ``mask (B, N)`` (True = real token): :func:`scattered_mask`,
:func:`prefix_mask` (an all-padded row, a one-real-token row), :func:`mask_at`.

Offsets (``cu_seqlens``: int32, ``S + 1`` entries): :func:`offsets`, with
:data:`RAGGED` (an empty segment and several of length 1), and
:func:`attention_inputs` for ``varlen_attention``.

Labels: :func:`random_labels`, :func:`first_members`.

Tolerances: :data:`TOLERANCE` and :func:`assert_close_to_truth` (below).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ features


def mixture(B, N, C, sizes=(0.6, 0.25, 0.1, 0.05), spread=0.05, seed=0, dtype=torch.float32):
    """Gaussian blobs of the given relative sizes (very unequal by default), tokens shuffled."""
    g = _gen(seed)
    x = torch.empty(B, N, C, dtype=F64)
    for b in range(B):
        means = torch.randn(len(sizes), C, generator=g, dtype=F64) * 3
        counts = [max(1, int(s * N)) for s in sizes]
        counts[0] += N - sum(counts)
        pts = torch.cat([c + spread * torch.randn(max(n, 0), C, generator=g, dtype=F64)
                         for c, n in zip(means, counts)])
        x[b] = pts[:N][torch.randperm(N, generator=g)]
    return x.to(dtype)


def clustered(B, N, C, groups=6, scale=4.0, noise=0.3, seed=0, dtype=torch.float32):
    """``groups`` blob centres (spread ``scale``), each token in a random one plus ``noise``.

    With ``noise`` well below ``scale`` the groups are far apart: no near-ties,
    so clustering decisions are unambiguous.
    """
    g = _gen(seed)
    means = torch.randn(B, groups, C, generator=g, dtype=F64) * scale
    which = torch.randint(0, groups, (B, N), generator=g)
    x = torch.gather(means, 1, which[..., None].expand(B, N, C))
    return (x + noise * torch.randn(B, N, C, generator=g, dtype=F64)).to(dtype)


def with_copies(x, seed=2):
    """``x`` with its last third replaced by exact copies of tokens of its first third (repeated frames)."""
    g = _gen(seed)
    N = x.shape[1]
    src = torch.randint(0, N // 3, (N // 3,), generator=g)
    x = x.clone()
    x[:, N - N // 3 :] = x[:, src]
    return x


def with_duplicates(base, seed=3):
    """``base`` plus exact duplicates of its tokens 0..6 and 3..4, all shuffled."""
    x = torch.cat([base, base[:, :7], base[:, 3:5]], 1)
    return x[:, torch.randperm(x.shape[1], generator=_gen(seed))]


def small_integers(B, N, C, low=-2, high=3, seed=3, dtype=torch.float32):
    """Integer coordinates in ``[low, high)``: every distance is exact, so equal distances tie exactly."""
    return torch.randint(low, high, (B, N, C), generator=_gen(seed)).to(dtype)


def on_grid(x, bits=10, bound=15.0):
    """``x`` clamped to ``[-bound, bound]`` and rounded to multiples of ``2**-bits``: ``x + c`` is
    then exact in float32 while ``|x + c| < 2**(24 - bits)``."""
    step = 2.0**bits
    return (x.clamp(-bound, bound) * step).round() / step


def cap_case():
    """A big blob, two small far blobs and one sparse token between them, ``(1, 35, 2)`` float64.

    The sparse token's farthest token is nearer than the small blobs' peaks
    are to a denser token, so its rmax caps every delta: SeTok's column-max
    cap decides the centres (at threshold 4.6 with k = 4, min_clusters = 2).
    """
    g = _gen(0)

    def blob(n, at):
        return torch.randn(n, 2, generator=g, dtype=F64) * 0.3 + torch.tensor(at, dtype=F64)

    x = torch.cat([blob(20, [0.0, 0.0]), blob(6, [8.0, 0.0]), blob(8, [0.0, 8.0]),
                   torch.tensor([[3.0, 3.0]], dtype=F64)])
    return x[torch.randperm(35, generator=g)][None]


def lone_token_cap_case():
    """Three blobs and one lone token, ``(1, 23, 2)`` float64: another geometry where the cap picks the centres.

    Blob D (0, 30) is far from the densest blob A (0, 0), so its peak's nearest
    denser token is ~30 away; the lone token at (3, 15) is less dense than D
    and has no token farther than ~16, so it caps D's delta at ~16 and the
    second centre becomes blob B's peak instead of D's.
    """
    g = _gen(0)

    def blob(n, centre, s):
        return torch.tensor(centre, dtype=F64) + s * torch.randn(n, 2, generator=g, dtype=F64)

    x = torch.cat([blob(10, (0.0, 0.0), 0.1), blob(6, (10.0, 0.0), 0.3), blob(6, (0.0, 30.0), 1.2),
                   blob(1, (3.0, 15.0), 0.0)])
    return x[torch.randperm(x.shape[0], generator=g)][None]


def strided(t):
    """The same values through a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


# ------------------------------------------------------------------ masks


def scattered_mask(B, N, keep=0.6, seed=1):
    """About ``keep`` of the tokens real, at random; every row keeps at least one real token."""
    m = torch.rand(B, N, generator=_gen(seed)) < keep
    m[:, 0] |= ~m.any(1)
    return m


def prefix_mask(lengths: Sequence[int], N: int):
    """Row b: its first ``lengths[b]`` tokens real. 0 gives an all-padded row, 1 a one-real-token row."""
    return torch.arange(N)[None, :] < torch.tensor(list(lengths))[:, None]


def mask_at(N: int, real: Sequence[Sequence[int]]):
    """Row b real exactly at the indices ``real[b]`` (one index: a one-real-token row; none: all padded)."""
    mask = torch.zeros(len(real), N, dtype=torch.bool)
    for b, idx in enumerate(real):
        mask[b, list(idx)] = True
    return mask


# ------------------------------------------------------------------ offsets


RAGGED = (3, 1, 0, 7, 2, 1, 5)
"""Segment lengths: many short segments, one empty, several of length 1."""


def offsets(lengths: Sequence[int], start=0, dtype=torch.int32, device="cpu"):
    """``cu_seqlens``: ``[start, start + l0, start + l0 + l1, ...]`` (``start > 0``: rows before the first segment)."""
    return torch.tensor([start, *lengths], dtype=dtype).cumsum(0, dtype=dtype).to(device)


def attention_inputs(lens_q, lens_k, H, D, lead=0, trail=0, device="cpu"):
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k)`` float32 for segments of the given lengths; ``lead``
    query rows before the first segment and ``trail`` after the last belong to none."""
    cu_q = offsets(lens_q, lead, device=device)
    cu_k = offsets(lens_k, 0, device=device)
    Tq, Tk = lead + sum(lens_q) + trail, sum(lens_k)
    q, k, v = (torch.randn(T, H, D).to(device) for T in (Tq, Tk, Tk))
    return q, k, v, cu_q, cu_k


# ------------------------------------------------------------------ labels


def random_labels(B, N, M, num_clusters, seed=0):
    """Labels in ``[-1, num_clusters[b])``, every cluster with a member (token m is in cluster m)."""
    g = _gen(seed)
    labels = torch.randint(-1, M, (B, N), generator=g)
    labels = torch.where(labels < num_clusters[:, None], labels, -1)
    first = torch.arange(N)[None, :] < num_clusters[:, None]
    return torch.where(first, torch.arange(N)[None, :], labels)


def first_members(labels, M):
    """``centers (B, M)``: each cluster's first member (-1 for a cluster without one)."""
    B, N = labels.shape
    hit = labels[:, None, :] == torch.arange(M)[None, :, None]  # (B, M, N)
    first = torch.where(hit, torch.arange(N), N).amin(-1)
    return torch.where(first < N, first, -1)


# ------------------------------------------------------------------ tolerances


class Tolerance(NamedTuple):
    factor: float  # times the reference's own error (the same computation in this dtype) against float64
    floor: float  # plus this, relative to the float64 values' magnitude (at least 1): two rounding steps
    rtol: float  # one rounding step: a direct comparison (see below), relative and absolute


TOLERANCE = {
    torch.float64: Tolerance(3, 8 * torch.finfo(torch.float64).eps, 1e-12),  # CPU only
    torch.float32: Tolerance(3, 2e-6, 1e-6),
    torch.float16: Tolerance(3, 2e-3, 1e-3),
    torch.bfloat16: Tolerance(3, 1.6e-2, 8e-3),
}
"""Per dtype, how close a result must be: flash-attention's rule.

A kernel's error against a float64 evaluation may be at most ``factor`` times
the reference's error in the same dtype, plus ``floor`` relative to the
values' magnitude (:func:`assert_close_to_truth`; a test may add a derived
bound of its own, such as the Triton DPC kernels' norm-trick bound). Where
the reference's own error is no yardstick, ``rtol`` (:func:`assert_rtol`):
the reference itself against float64 (float32 accumulation leaves one
rounding of the output), float64 results (their reference error is a few
units in the last place), and two implementations of one computation in
one dtype (the hypothesis fuzz in test_hostile.py)."""


def max_error(a, b) -> float:
    """Largest ``|a - b|`` over the entries where ``b`` is finite; ``a`` must be non-finite exactly where ``b`` is."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite pattern differs"
    return (a - b)[finite].abs().max().item() if finite.any() else 0.0


def magnitude(t) -> float:
    """``max(1, max |t|)`` over the finite entries."""
    t = t.detach().cpu().double()
    t = t[torch.isfinite(t)]
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def bound(ref, truth, dtype: torch.dtype, extra: float = 0.0) -> float:
    """The error :data:`TOLERANCE` allows a kernel whose reference in ``dtype`` gave ``ref``."""
    tol = TOLERANCE[dtype]
    return tol.factor * max_error(ref, truth) + tol.floor * magnitude(truth) + extra


def assert_close_to_truth(got, ref, truth, dtype: Optional[torch.dtype] = None, extra: float = 0.0, name: str = ""):
    """``got`` within :func:`bound` of the float64 ``truth`` (``dtype``: the computation's, default ``ref``'s)."""
    limit = bound(ref, truth, dtype or ref.dtype, extra)
    err = max_error(got, truth)
    assert err <= limit, f"{name}: error {err:.3g} > {limit:.3g} (reference error {max_error(ref, truth):.3g})"


def assert_rtol(got, truth, dtype: Optional[torch.dtype] = None, msg: Optional[str] = None):
    """``got`` within ``rtol`` of ``truth``, relatively and absolutely (``dtype``: the computation's,
    default ``got``'s)."""
    tol = TOLERANCE[dtype or got.dtype].rtol
    torch.testing.assert_close(got.double(), truth.double(), rtol=tol, atol=tol, msg=msg)

