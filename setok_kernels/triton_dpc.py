"""Triton kernels of the DPC-kNN family: density, delta, centres, assignment.

Images whose B x N x N distance matrix fits a memory budget take the Gram
path instead (``dpc_gram.py``: the matrix once, then row passes over it, with
this module's distance tile and EXACT launches). Here no kernel writes an N x N
matrix (except ``pairwise_distance``, the debugging op whose output is that
matrix). Every pass streams column tiles of scaled
squared distances ``d2 = (|a_i|^2 + |a_j|^2 - 2 a_i.a_j) / C`` computed with
``tl.dot`` (fp32 accumulation), clamped at 0 and set to exactly 0 on the
diagonal, on centred and scaled features ``a = (x - mean) / s``:

- ``mean``: each image's real-token mean (masked tokens excluded), so the
  norm trick's cancellation error, ~eps32 * (|a_i|^2 + |a_j|^2) / C, is
  relative to the features' spread, not to where they sit: ``x + c`` (a
  constant or per-channel offset) clusters as ``x`` does.
- ``s``: a per-image power of two with ``|x| / s < 2`` (``reference.image_scale``),
  so float32 squared distances neither overflow (|x| ~ 1e19) nor underflow
  (~1e-20). Orderings (k nearest, nearest denser, nearest centre) do not
  depend on s; values are scaled back exactly: ``d = s * sqrt(d2)``, and the
  density ``exp(-(mean d2 * s) * s)`` is 0 (or 1) where the true value rounds
  to it. No finite input yields NaN.

Passes:
- ``_channel_stats_kernel``: per image and channel, the real tokens' sum
  (float64: no overflow) and largest |x|; the mean and s follow in a few
  (B, C) tensor ops. ``_sq_norms_kernel``: |a_i|^2 in fp32. Both once per call.
- pass 1, ``_knn_density_kernel``: each row block keeps its k smallest d2 in
  registers (a K_PAD-wide list, K_PAD = next power of two >= k, at least 2;
  the slots past the image's k hold -inf) and swaps in a column tile's
  smallest values while they beat the list's largest: min/max reductions
  only, no sort network. k <= 128 (``MAX_K``): above that the list no longer
  fits in registers, so ``check`` declines (auto falls back to another
  backend; a forced call raises BackendUnavailableError saying so).
- pass 2, ``_delta_kernel``: nearest denser real token (smallest index on
  ties; with ``tie_break="index"`` equal densities count the lower index as
  denser) and each row's largest distance rmax; ``_parent_distance_kernel``
  then recomputes the distance to that parent from differences (B*N*C work),
  so delta is exact to float32 and a duplicate's is exactly 0. ``"column_max"`` then caps
  every delta by ``cap_i = min rmax_j`` over the tokens not denser than i
  (``reference.column_max_cap``: a batched sort + running minimum + search on
  (B, N) values); ``"global_max"`` gives tokens without a denser one the
  image's largest rmax.
- centres, ``_select_centers_kernel``: one program per image ranks the scores
  without sorting: a 32-step bisection on order-preserving integer keys finds
  the cut-off score, a prefix sum breaks ties at the cut-off by index and
  places the centres in ascending order (``num_centers``: the top n, no
  threshold; ``center_order="score"``: a stable (B, M) sort afterwards).
  N <= 8192 (the image's scores live in one program's registers); above,
  the reference's ranking (batched torch sorts, no sync) runs instead.
- assignment, ``_assign_kernel``: distances (or, ``metric="cosine"``, cosine
  similarities of the uncentred features) to the centres, the loop bounded by
  the image's own ``num_clusters`` (read on the device); the earlier centre
  wins ties; a centre labels itself.

Certified distances (ill-conditioned images). The norm trick resolves a
squared distance only to ~``SNAP * (|a_i|^2 + |a_j|^2)`` (SNAP = 2^-19: tf32x3
products and fp32 sums), so where the centred norms dwarf the distances that
matter (a far outlier pulling the mean: mixture data plus one token at 1e6
gives 63 clusters instead of 3; groups of clusters 1e3..1e4 times their
spread apart) they drown. Each of the three passes therefore runs twice
(``_twice``), with no host sync and no N x N memory:
- the norm-trick launch writes every row and flags, in a (B, N) int8 tensor,
  the rows whose result its error bound cannot certify. The row bound is
  ``err_i = SNAP * (|a_i|^2 + max_j |a_j|^2) / C`` (``_Prepared.nmax``):
  density: ``(k - 1) * err_i > KNN_TOL * (sum of the k nearest)`` (the k - 1
  non-self values could move the mean by more than 1/16 of itself); parent:
  the runner-up denser token is within ``2 * err_i`` of the nearest (exact
  ties included); label: the runner-up centre is within ``2 * err_i`` (cosine:
  ``2 * SNAP``); a centre's own label is always certain.
- the EXACT launch (same kernel, constexpr ``EXACT``, 16 x 16 x 4 tiles on
  CUDA cores, 4 warps): each program reads its rows' flags on the device and
  exits unless one is set; otherwise it recomputes those rows against every
  column from differences (``_exact_tile``: fp32 FMAs, cosine from
  elementwise products) and overwrites only them. Well-conditioned images pay one
  near-empty launch per pass; a flagged row costs ~N * C FMAs on CUDA cores.
Rows are certified against SNAP, an estimate of tf32x3's error, not a proof
for every C (fp32 sums over C terms can exceed it in the worst case).
``pairwise_distance`` (debugging op) keeps the plain norm trick.

Nothing reads a tensor value on the host: ``dpc_cluster`` can be captured in a
CUDA graph. Masked tokens are never loaded and are excluded from every
reduction. k is clamped per image to its real-token count on the device.
Strided inputs are supported (strides are passed, nothing is copied).
Products use ``input_precision="tf32x3"`` on the centred fp32 values for
every input dtype: fp32-level products on tensor cores (plain tf32 keeps 10
mantissa bits: ~1e-3 relative, too coarse for density ties; 16-bit operands
would round the centred values). Clusters match the reference on separated
data; near-ties in density within the certified tolerance may resolve
differently (tests bound both). float64 is declined (no float64 tensor-core
path; the reference is exact).

Cost: each of the two streaming passes (density, delta) computes every
distance, 2*B*N^2*C FLOPs, as three tf32 products per product; the k-list
updates (min/max on CUDA cores), a runner-up reduction per tile and the
three near-empty EXACT launches come on top. The bytes/FLOPs model per
kernel and the H200 time it implies are in ``benchmarks/bench_dpc.py``;
measurements in ``benchmarks/RESULTS.md``. Block sizes (``_TILES``: per
architecture family, 64 x 64 tiles, 16- or 32-wide C chunks) are the ones
that compile without register spills on that family.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _arch
from ._backends import CallInfo, Impl, register
from ._triton import INTERPRETING, MISSING, device_reason, pow2, tl, triton
from ._triton import jit as _jit
from .reference import _select_centers as _reference_select
from .reference import column_max_cap, image_scale, order_centers_by_score, score_of

MAX_K = 128  # the per-row k-nearest list is held in registers
# warps of the channel-statistics kernels (this one and dpc_gram's, which must sum in the same
# order): with 4, dpc_gram's float64 mean spills 16 B on sm_90 (fp16, C = 32, masked; triton 3.9)
STATS_WARPS = 8
# one program holds an image's scores: 16384 spills under triton 3.6 (16 or 32 warps); above, torch ranks them
MAX_SELECT_N = 8192
_INF = float("inf")
# tf32x3 products carry ~2**-21 relative error and fp32 sums add more: a
# squared distance below 2**-19 (|a_i|^2 + |a_j|^2) cannot be told from 0
SNAP = tl.constexpr(2.0**-19) if tl is not None else 2.0**-19
# a row's k-nearest mean is certified when the norm trick's error bound is at most this part of it
KNN_TOL = tl.constexpr(2.0**-4) if tl is not None else 2.0**-4

# Loop bounds: triton 3.6's interpreter turns a ``range`` bound that is a
# kernel argument into int() of a one-element numpy array, which numpy >= 2.4
# refuses (triton >= 3.8 fixed it). So C, the bound of the pipelined GEMM
# loop, is a constexpr (one compile per feature width: fixed per model), and
# the loops over tokens, k and centres, which need no software pipelining,
# are ``while`` loops.


# ----------------------------------------------------------------- kernels


@_jit
def _real_tokens(
    mask_img,
    idx,
    N,
    HAS_MASK: tl.constexpr,
):
    """In range and not masked out."""
    ok = idx < N
    if HAS_MASK:
        ok = ok & (tl.load(mask_img + idx, mask=ok, other=0) != 0)
    return ok


@_jit
def _centred_chunk(x_img, shift_img, inv_s, row_off, col_off, row_ok, col_ok, stride_c, c0, C: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Channels ``[c0, c0 + BLOCK_C)`` of the centred, scaled tokens ``a = x / s - shift``, float32: the
    rows' as (BLOCK_M, BLOCK_C), the columns' transposed as (BLOCK_C, BLOCK_N). A row or column left
    out by ``row_ok`` / ``col_ok`` reads x = 0 (so holds -shift); channels past C are 0."""
    # offsets rebuilt per chunk: no 64-bit pointer tiles live across the caller's loop
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    sh = tl.load(shift_img + offs_c, mask=c_ok, other=0.0)
    a = tl.load(x_img + row_off[:, None] + offs_c[None, :] * stride_c, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    b = tl.load(x_img + col_off[None, :] + offs_c[:, None] * stride_c, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
    return a.to(tl.float32) * inv_s - sh[None, :], b.to(tl.float32) * inv_s - sh[:, None]


@_jit
def _dot_tile(
    x_img,
    shift_img,
    inv_s,
    rows,
    cols,
    row_ok,
    col_ok,
    stride_n,
    stride_c,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 dot products a_i.a_j of the centred, scaled tokens ``a = x / s - shift``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_off = rows * stride_n
    col_off = cols * stride_n
    for c0 in range(0, C, BLOCK_C):
        a, b = _centred_chunk(x_img, shift_img, inv_s, row_off, col_off, row_ok, col_ok, stride_c, c0, C, BLOCK_C)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@_jit
def _sq_dist_tile(
    x_img,
    shift_img,
    inv_s,
    rows,
    cols,
    row_ok,
    col_ok,
    nrm_r,
    nrm_c,
    stride_n,
    stride_c,
    C: tl.constexpr,
    inv_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 squared distances / C between token sets, in units of s^2.

    Norm trick (EXACT off): a value below its own error bound
    (``SNAP * (|a_i|^2 + |a_j|^2)``) is noise and becomes exactly 0: exact
    duplicates are at distance 0, as in the reference, so their densities tie
    the way the reference's do. EXACT: from differences (``_exact_tile``).
    """
    if EXACT:
        d2 = _exact_tile(x_img, inv_s, rows, cols, row_ok, col_ok, stride_n, stride_c, C,
                         BLOCK_M, BLOCK_N, BLOCK_C, False)
    else:
        acc = _dot_tile(x_img, shift_img, inv_s, rows, cols, row_ok, col_ok, stride_n, stride_c, C,
                        BLOCK_M, BLOCK_N, BLOCK_C, PRECISION)
        total = nrm_r[:, None] + nrm_c[None, :]
        d2 = total - 2.0 * acc
        d2 = tl.where((d2 <= SNAP * total) | (rows[:, None] == cols[None, :]), 0.0, d2)
    return d2 * inv_c


@_jit
def _exact_tile(
    x_img,
    inv_s,
    rows,
    cols,
    row_ok,
    col_ok,
    stride_n,
    stride_c,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 sums over channels of ``(a_i - a_j)^2`` (or ``a_i * a_j`` with DOT), ``a = x / s``.

    The certified path: elementwise fp32 FMAs on CUDA cores, no norm trick,
    so a squared distance carries ~C * eps32 of its own size, as in the
    reference (a duplicate is at exactly 0).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        a = tl.load(x_img + rows[:, None] * stride_n + offs_c[None, :] * stride_c,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32) * inv_s
        b = tl.load(x_img + cols[:, None] * stride_n + offs_c[None, :] * stride_c,
                    mask=col_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32) * inv_s
        if DOT:
            acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        else:
            diff = a[:, None, :] - b[None, :, :]
            acc += tl.sum(diff * diff, axis=2)
    return acc


@_jit
def _channel_stats_kernel(
    x_ptr,
    mask_ptr,
    sum_ptr,
    amax_ptr,
    N,
    C: tl.constexpr,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per (image, channel): sum (float64) and largest |x| over the real tokens."""
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total, amax, _ = _channel_stats(x_ptr + b * stride_b, mask_ptr + b * N, offs_c, N, C, stride_n, stride_c,
                                    HAS_MASK, BLOCK_N, BLOCK_C)
    tl.store(sum_ptr + b * C + offs_c, total, mask=offs_c < C)
    tl.store(amax_ptr + b * C + offs_c, amax, mask=offs_c < C)


@_jit
def _channel_stats(
    x_img,
    mask_img,
    offs_c,
    N,
    C: tl.constexpr,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(sum (float64), largest |x|) of channels ``offs_c`` over an image's real tokens, and their count;
    one summation order for both DPC paths (``dpc_gram``'s prologue is ``_prepare`` bit for bit)."""
    c_ok = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = 0
    n0 = 0
    while n0 < N:
        rows = n0 + tl.arange(0, BLOCK_N)
        ok = _real_tokens(mask_img, rows, N, HAS_MASK)
        ptrs = x_img + rows[:, None] * stride_n + offs_c[None, :] * stride_c
        v = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(v.to(tl.float64), axis=0)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
        count += tl.sum(ok.to(tl.int32), axis=0)
        n0 += BLOCK_N
    return total, amax, count


@_jit
def _sq_norms_kernel(
    x_ptr,
    mask_ptr,
    shift_ptr,
    inv_ptr,
    out_ptr,
    N,
    C: tl.constexpr,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = _real_tokens(mask_ptr + b * N, rows, N, HAS_MASK)
    acc = _centred_sq_norms(x_ptr + b * stride_b, shift_ptr + b * C, tl.load(inv_ptr + b), rows, ok, stride_n,
                            stride_c, C, False, BLOCK_M, BLOCK_C)
    tl.store(out_ptr + b * N + rows, acc, mask=rows < N)


@_jit
def _centred_sq_norms(
    x_img,
    centre_img,
    inv_s,
    rows,
    ok,
    stride_n,
    stride_c,
    C: tl.constexpr,
    FROM_MEAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """|a_i|^2 of ``rows``, ``a = x / s - shift``: ``centre_img`` holds the float32 shift, or (``FROM_MEAN``)
    the float64 mean, whose product with 1 / s (a power of two: exact) rounded once is the shift."""
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        if FROM_MEAN:
            sh = (tl.load(centre_img + offs_c, mask=c_ok, other=0.0) * inv_s.to(tl.float64)).to(tl.float32)
        else:
            sh = tl.load(centre_img + offs_c, mask=c_ok, other=0.0)
        ptrs = x_img + rows[:, None] * stride_n + offs_c[None, :] * stride_c
        # channels past C: 0 * inv_s - 0
        v = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32) * inv_s - sh[None, :]
        acc += tl.sum(v * v, axis=1)
    return acc


@_jit
def _merge_smallest(
    knn,
    d2,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """Swap the tile's smallest values into each row's k-list while they beat its largest.

    ``knn`` holds a row's k current candidates (slots past k are -inf: never
    the largest, never replaced). Each step moves, for every row it improves,
    the tile's smallest remaining value over the list's largest; a row that
    does not improve never will (its tile minimum only grows), so the loop
    ends after at most min(k, BLOCK_N) steps, usually far fewer. Only plain
    min/max reductions: no sort network.
    """
    slots = tl.arange(0, K_PAD)
    cols = tl.arange(0, BLOCK_N)
    worst = tl.max(knn, axis=1)
    t_min = tl.min(d2, axis=1)
    while tl.max((t_min < worst).to(tl.int32)) > 0:
        improve = t_min < worst
        slot = tl.min(tl.where(knn == worst[:, None], slots[None, :], K_PAD), axis=1)
        knn = tl.where(improve[:, None] & (slots[None, :] == slot[:, None]), t_min[:, None], knn)
        col = tl.min(tl.where(d2 == t_min[:, None], cols[None, :], BLOCK_N), axis=1)
        d2 = tl.where(improve[:, None] & (cols[None, :] == col[:, None]), float("inf"), d2)
        worst = tl.max(knn, axis=1)
        t_min = tl.min(d2, axis=1)
    return knn


@_jit
def _rows_to_redo(
    unsure_ptr,
    rows,
    row_ok,
    N,
    EXACT: tl.constexpr,
):
    """EXACT launch: the rows the norm-trick launch could not certify, and the column bound (0: none here)."""
    if EXACT:
        todo = row_ok & (tl.load(unsure_ptr + rows, mask=rows < N, other=0) != 0)
        n_end = tl.where(tl.max(todo.to(tl.int32), axis=0) > 0, N, 0)
    else:
        todo = row_ok
        n_end = N
    return todo, n_end


@_jit
def _knn_density_kernel(
    x_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    shift_ptr,
    scale_ptr,
    inv_ptr,
    k_ptr,
    out_ptr,
    unsure_ptr,
    N,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    x_img = x_ptr + b * stride_b
    mask_img = mask_ptr + b * N
    shift_img = shift_ptr + b * C
    inv_s = tl.load(inv_ptr + b)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    todo, n_end = _rows_to_redo(unsure_ptr + b * N, rows, row_ok, N, EXACT)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    k = tl.where(n_end > 0, tl.load(k_ptr + b), 0)
    in_list = tl.arange(0, K_PAD)[None, :] < k
    knn = tl.where(in_list, float("inf"), -float("inf")) + tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    n0 = 0
    while n0 < n_end:
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
        d2 = _sq_dist_tile(x_img, shift_img, inv_s, rows, cols, row_ok, col_ok, nrm_r, nrm_c, stride_n, stride_c,
                           C, inv_c, BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, EXACT)
        knn = _merge_smallest(knn, tl.where(col_ok[None, :], d2, float("inf")), BLOCK_N, K_PAD)
        n0 += BLOCK_N
    # sum in ascending order: a function of the k values alone, not of the
    # order they entered the list, so tokens with equal neighbourhoods (e.g.
    # duplicates) get bit-identical densities and stay tied, as in the reference
    slots = tl.arange(0, K_PAD)
    rest = tl.where(in_list, knn, float("inf"))
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    taken = 0
    while taken < k:
        smallest = tl.min(rest, axis=1)
        total += smallest
        first = tl.min(tl.where(rest == smallest[:, None], slots[None, :], K_PAD), axis=1)
        rest = tl.where(slots[None, :] == first[:, None], float("inf"), rest)
        taken += 1
    # back to true units: (mean * s) * s is 0 for 0 and overflows to inf (density 0), never inf * 0
    s = tl.load(scale_ptr + b)
    density = tl.exp(-((total / tl.maximum(k, 1).to(tl.float32)) * s) * s)
    out = b * N + rows
    if EXACT:
        tl.store(out_ptr + out, density, mask=todo)
    else:
        tl.store(out_ptr + out, tl.where(row_ok, density, 0.0), mask=rows < N)
        # the list's k - 1 non-self values each carry at most the row's error bound: certified
        # when that moves their mean by at most KNN_TOL of itself
        err = SNAP * (nrm_r + tl.load(nmax_ptr + b)) * inv_c
        unsure = row_ok & ((k - 1).to(tl.float32) * err > KNN_TOL * total)
        tl.store(unsure_ptr + out, unsure.to(tl.int8), mask=rows < N)


@_jit
def _delta_kernel(
    x_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    shift_ptr,
    scale_ptr,
    inv_ptr,
    dens_ptr,
    parent_ptr,
    far_ptr,
    unsure_ptr,
    N,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    TIE_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    x_img = x_ptr + b * stride_b
    mask_img = mask_ptr + b * N
    shift_img = shift_ptr + b * C
    inv_s = tl.load(inv_ptr + b)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    todo, n_end = _rows_to_redo(unsure_ptr + b * N, rows, row_ok, N, EXACT)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    dens_r = tl.load(dens_ptr + b * N + rows, mask=rows < N, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)  # the runner-up denser token's d2
    best_j = tl.full((BLOCK_M,), -1, tl.int32)
    far = tl.zeros((BLOCK_M,), dtype=tl.float32)  # d2 >= 0: 0 is neutral for the max
    n0 = 0
    while n0 < n_end:
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
        dens_c = tl.load(dens_ptr + b * N + cols, mask=cols < N, other=0.0)
        d2 = _sq_dist_tile(x_img, shift_img, inv_s, rows, cols, row_ok, col_ok, nrm_r, nrm_c, stride_n, stride_c,
                           C, inv_c, BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, EXACT)
        far = tl.maximum(far, tl.max(tl.where(col_ok[None, :], d2, 0.0), axis=1))
        denser = dens_c[None, :] > dens_r[:, None]
        if TIE_INDEX:  # equal density: the lower index is the denser
            denser = denser | ((dens_c[None, :] == dens_r[:, None]) & (cols[None, :] < rows[:, None]))
        denser = denser & col_ok[None, :]
        cand = tl.where(denser, d2, float("inf"))
        t_min = tl.min(cand, axis=1)
        t_arg = tl.min(tl.where(denser & (cand == t_min[:, None]), cols[None, :], N), axis=1)
        t_second = tl.min(tl.where(cols[None, :] == t_arg[:, None], float("inf"), cand), axis=1)
        # strict <: an earlier tile (smaller index) keeps a tie
        better = (t_arg < N) & ((t_min < best) | (best_j < 0))
        second = tl.where(better, tl.minimum(best, t_second), tl.minimum(second, t_min))
        best = tl.where(better, t_min, best)
        best_j = tl.where(better, t_arg, best_j)
        n0 += BLOCK_N
    s = tl.load(scale_ptr + b)
    out = b * N + rows
    has = row_ok & (best_j >= 0)
    parent = tl.where(has, best_j, -1).to(tl.int64)
    if EXACT:
        tl.store(parent_ptr + out, parent, mask=todo)
        tl.store(far_ptr + out, tl.sqrt(far) * s, mask=todo)
    else:
        tl.store(parent_ptr + out, parent, mask=rows < N)
        tl.store(far_ptr + out, tl.sqrt(far) * s, mask=rows < N)
        # the parent is certified when no other denser token can be as near within the error bounds
        err = SNAP * (nrm_r + tl.load(nmax_ptr + b)) * inv_c
        unsure = has & (second <= best + 2.0 * err)
        tl.store(unsure_ptr + out, unsure.to(tl.int8), mask=rows < N)


@_jit
def _parent_distance_kernel(
    x_ptr,
    parent_ptr,
    inv_ptr,
    scale_ptr,
    out_ptr,
    N,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Exact distance to the parent, from differences (inf without one): a duplicate is at exactly 0."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    par = tl.load(parent_ptr + b * N + rows, mask=rows < N, other=-1)
    d = _parent_distance(x_ptr + b * stride_b, par, rows, N, tl.load(inv_ptr + b), tl.load(scale_ptr + b),
                         stride_n, stride_c, C, inv_c, BLOCK_M, BLOCK_C)
    tl.store(out_ptr + b * N + rows, d, mask=rows < N)


@_jit
def _parent_distance(
    x_img,
    par,
    rows,
    N,
    inv_s,
    scale,
    stride_n,
    stride_c,
    C: tl.constexpr,
    inv_c,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Distances of ``rows`` to their parents ``par`` (< 0: none, inf) from differences."""
    has = par >= 0
    par = tl.minimum(tl.maximum(par, 0), N - 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = has[:, None] & (offs_c < C)[None, :]
        a = tl.load(x_img + rows[:, None] * stride_n + offs_c[None, :] * stride_c, mask=ok, other=0.0)
        p = tl.load(x_img + par[:, None] * stride_n + offs_c[None, :] * stride_c, mask=ok, other=0.0)
        diff = a.to(tl.float32) * inv_s - p.to(tl.float32) * inv_s
        acc += tl.sum(diff * diff, axis=1)
    return tl.where(has, tl.sqrt(acc * inv_c) * scale, float("inf"))


@_jit
def _assign_kernel(
    x_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    shift_ptr,
    inv_ptr,
    centers_ptr,
    num_ptr,
    labels_ptr,
    unsure_ptr,
    N,
    C: tl.constexpr,
    M,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    x_img = x_ptr + b * stride_b
    shift_img = shift_ptr + b * C
    inv_s = tl.load(inv_ptr + b)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_ptr + b * N, rows, N, HAS_MASK)
    todo, n_end = _rows_to_redo(unsure_ptr + b * N, rows, row_ok, N, EXACT)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    if COSINE:  # a zero vector: similarity 0 to every centre
        inv_r = tl.where(nrm_r > 0, 1.0 / tl.sqrt(nrm_r), 0.0)
    num = tl.minimum(tl.maximum(tl.load(num_ptr + b), 0), M).to(tl.int32)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)  # the runner-up centre's cost
    best_s = tl.zeros((BLOCK_M,), dtype=tl.int32)
    own = tl.full((BLOCK_M,), -1, tl.int32)  # the row's own slot when it is a centre
    s_end = tl.where(n_end > 0, num, 0)
    s0 = 0
    while s0 < s_end:  # only this image's centres
        slots = s0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < num
        # bad indices (validation off) are clamped: never read out of bounds
        cols = tl.load(centers_ptr + b * M + slots, mask=slot_ok, other=0)
        cols = tl.minimum(tl.maximum(cols, 0), N - 1).to(tl.int32)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=slot_ok, other=0.0)
        if COSINE:  # nearest = largest similarity: minimise its negative
            if EXACT:
                dots = _exact_tile(x_img, inv_s, rows, cols, row_ok, slot_ok, stride_n, stride_c, C,
                                   BLOCK_M, BLOCK_N, BLOCK_C, True)
            else:
                dots = _dot_tile(x_img, shift_img, inv_s, rows, cols, row_ok, slot_ok, stride_n, stride_c, C,
                                 BLOCK_M, BLOCK_N, BLOCK_C, PRECISION)
            inv_n = tl.where(nrm_c > 0, 1.0 / tl.sqrt(nrm_c), 0.0)
            cost = -(dots * inv_r[:, None] * inv_n[None, :])
        else:
            cost = _sq_dist_tile(x_img, shift_img, inv_s, rows, cols, row_ok, slot_ok, nrm_r, nrm_c, stride_n,
                                 stride_c, C, inv_c, BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, EXACT)
        cand = tl.where(slot_ok[None, :], cost, float("inf"))
        t_min = tl.min(cand, axis=1)
        t_arg = tl.min(tl.where(slot_ok[None, :] & (cand == t_min[:, None]), slots[None, :], M), axis=1)
        t_second = tl.min(tl.where(slots[None, :] == t_arg[:, None], float("inf"), cand), axis=1)
        better = (t_arg < M) & (t_min < best)
        second = tl.where(better, tl.minimum(best, t_second), tl.minimum(second, t_min))
        best = tl.where(better, t_min, best)
        best_s = tl.where(better, t_arg, best_s)
        is_self = slot_ok[None, :] & (cols[None, :] == rows[:, None])
        own = tl.maximum(own, tl.max(tl.where(is_self, slots[None, :], -1), axis=1))
        s0 += BLOCK_N
    label = tl.where(own >= 0, own, best_s)
    label = tl.where(row_ok & (num > 0), label, -1).to(tl.int64)
    out = b * N + rows
    if EXACT:
        tl.store(labels_ptr + out, label, mask=todo)
    else:
        tl.store(labels_ptr + out, label, mask=rows < N)
        # certified when the runner-up centre cannot be as near within the error bounds
        # (cosine: the dot's error relative to |a| |b|)
        if COSINE:
            err = SNAP + tl.zeros((BLOCK_M,), dtype=tl.float32)
        else:
            err = SNAP * (nrm_r + tl.load(nmax_ptr + b)) * inv_c
        unsure = row_ok & (own < 0) & (best < float("inf")) & (second <= best + 2.0 * err)
        tl.store(unsure_ptr + out, unsure.to(tl.int8), mask=rows < N)


@_jit
def _pairwise_distance_kernel(
    x_ptr,
    nrm_ptr,
    mask_ptr,
    shift_ptr,
    scale_ptr,
    inv_ptr,
    out_ptr,
    N,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    mask_img = mask_ptr + b * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
    d2 = _sq_dist_tile(x_ptr + b * stride_b, shift_ptr + b * C, tl.load(inv_ptr + b), rows, cols, row_ok, col_ok,
                       nrm_r, nrm_c, stride_n, stride_c, C, inv_c, BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, False)
    d = tl.where(row_ok[:, None] & col_ok[None, :], tl.sqrt(d2) * tl.load(scale_ptr + b), float("inf"))
    ptrs = out_ptr + b * N * N + rows[:, None] * N + cols[None, :]
    tl.store(ptrs, d, mask=(rows < N)[:, None] & (cols < N)[None, :])


@_jit
def _select_centers_kernel(
    score_ptr,
    mask_ptr,
    centers_ptr,
    num_ptr,
    N,
    M,
    threshold,
    min_clusters,
    num_centers,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    valid = _real_tokens(mask_ptr + b * N, idx, N, HAS_MASK)
    score = tl.load(score_ptr + b * N + idx, mask=idx < N, other=0.0)
    # fp32 -> int32 with the same order (negatives: flip the magnitude bits)
    bits = tl.where(score == 0.0, 0, score.to(tl.int32, bitcast=True))  # -0.0 ties +0.0
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    above = valid & (score > threshold)
    # num_centers > 0: exactly the top num_centers (== M), no threshold
    use_threshold = (tl.sum(above.to(tl.int32), axis=0) > 0) & (num_centers == 0)
    candidate = tl.where(use_threshold, above, valid)
    limit = tl.where(use_threshold | (num_centers > 0), M, tl.minimum(min_clusters, M))
    # largest cut-off t with at least `limit` candidates keyed >= t (or the
    # smallest key when there are fewer): a bisection over the int32 key range
    # (the bounds are int64 scalars so that lo + hi cannot overflow; the keys stay int32: registers)
    lo = tl.full((), -(2**31), tl.int64)
    hi = tl.full((), 2**31 - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) // 2
        count = tl.sum((candidate & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
        ok = count >= limit
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    cut = lo.to(tl.int32)
    strictly = candidate & (key > cut)
    at_cut = candidate & (key == cut)
    room = limit - tl.sum(strictly.to(tl.int32), axis=0)
    # ties at the cut-off: lower index first
    chosen = strictly | (at_cut & (tl.cumsum(at_cut.to(tl.int32), axis=0) <= room))
    num = tl.sum(chosen.to(tl.int32), axis=0)
    pos = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(centers_ptr + b * M + pos, idx.to(tl.int64), mask=chosen)
    s0 = 0
    while s0 < M:
        slots = s0 + idx
        tl.store(centers_ptr + b * M + slots, tl.full((BLOCK,), -1, tl.int64), mask=(slots >= num) & (slots < M))
        s0 += BLOCK
    tl.store(num_ptr + b, num.to(tl.int64))


# ----------------------------------------------------------------- host side


# Launch configs per architecture family (``_arch.family``: 90 = sm_90's wgmma, 80 =
# mma.sync, every other GPU). Fixed choices, not tuned on hardware; each compiles with
# no register spill under triton 3.6 and 3.9 for every (kernel, dtype, mask, C, k-list
# width) the dispatcher launches (the compile proof, `python -m setok_kernels.info
# --compile sm_80 sm_90`). Keys: (input element bytes, k-list wider than 64).
# - norm-trick passes: 64 x 64 distance tiles, 8 warps, C in 32-wide chunks of
#   16-bit input (16-wide of fp32: the same 64 bytes a row per stage). A k-list of
#   K_PAD = 128 shares the registers with the tile: 32 rows, and then 32-wide chunks
#   (16-wide ones spill 4-24 B there on both families, a ptxas register-allocation
#   artefact at 128 registers).
#   sm_90: 32-wide fp32 chunks spill 20 B under triton 3.6 (C = 100, masked).
#   sm_80: the mma.sync operand fragments of 32-wide chunks spill 24-264 B in every
#   pass (8 warps, 3 or 2 stages; 4 warps spill more): 16-wide chunks, 2 stages
#   (3 spill 28 B in the 16-bit assignment under triton 3.6).
_TILES = {
    90: {
        (2, False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=3),
        (4, False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=16, num_warps=8, num_stages=3),
        (2, True): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=3),
        (4, True): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=3),
    },
    80: {
        (2, False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=16, num_warps=8, num_stages=2),
        (4, False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=16, num_warps=8, num_stages=2),
        (2, True): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=3),
        (4, True): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=3),
    },
}
# - the certified (EXACT) launch: 16 x 16 x 4 difference tiles on CUDA cores, one warp
#   (most programs exit at once). With 2 or 4 warps, or 32-row/32-column/8-channel
#   tiles, ptxas spills 4-20 B (at 56-96 registers) in some configs on one family or
#   triton version or another; one warp spills in none (at most 168 registers).
_EXACT_TILES = {family: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=4, num_warps=1, num_stages=1) for family in (80, 90)}
# The interpreter (CPU tensors) runs sm_90's 16-bit tiles whatever the dtype: the test
# suite's cost depends on them, and warps and stages mean nothing there.
_INTERPRETER_TILES = _TILES[90]


def _config(device: Optional[torch.device] = None, dtype: torch.dtype = torch.float16, k_pad: int = 0) -> dict:
    """The norm-trick launch's tiles for features of ``dtype`` on ``device`` (None: sm_90), with a k-list of ``k_pad``."""
    if INTERPRETING:
        tile = _INTERPRETER_TILES[2, k_pad > 64]
    else:
        family = 90 if device is None else _arch.family(device)
        tile = _TILES[family][4 if dtype.itemsize >= 4 else 2, k_pad > 64]
    return dict(tile, PRECISION="tf32x3")


def _exact_config(device: Optional[torch.device] = None) -> dict:
    """The certified (EXACT) launch's tiles on ``device`` (None: sm_90); most of its programs exit at once."""
    family = 90 if device is None else _arch.family(device)
    return dict(_EXACT_TILES[family], PRECISION="tf32x3")


def _twice(kernel, B: int, N: int, args: tuple, exact_only: bool = False, **kw) -> None:
    """The norm-trick launch (writes every row, flags in ``unsure`` the rows it cannot certify), then
    the EXACT launch, whose programs redo the flagged rows of their block (read on the device) or exit.
    ``exact_only``: the caller (``dpc_gram``) has written the rows and flags itself."""
    x = args[0]
    configs = ((False, _config(x.device, x.dtype, kw.get("K_PAD", 0))), (True, _exact_config(x.device)))
    for exact, cfg in configs[exact_only:]:
        kernel[_grid(N, B, cfg["BLOCK_M"])](*args, EXACT=exact, **kw, **cfg)


def _mask_arg(x: torch.Tensor, mask: Optional[torch.Tensor]):
    """(pointer tensor, HAS_MASK); without a mask any pointer does (never read)."""
    if mask is None:
        return x, False
    return mask.contiguous().view(torch.uint8), True


class _Prepared(NamedTuple):
    """What every pass of one call shares: per-token |a|^2 and per-image centring and scale."""

    norms: torch.Tensor  # (B, N) fp32 |a_i|^2
    mask_t: torch.Tensor
    has_mask: bool
    shift: torch.Tensor  # (B, C) fp32 mean / s (zeros when not centred)
    scale: torch.Tensor  # (B,) fp32 s
    inv: torch.Tensor  # (B,) fp32 1 / s
    nmax: torch.Tensor  # (B,) fp32 largest |a_i|^2 of a real token: the norm trick's error scale


def _prepare(x, mask, centre=True):
    B, N, C = x.shape
    mask_t, has_mask = _mask_arg(x, mask)
    block_c = min(64, pow2(C))
    csum = torch.empty(B, C, dtype=torch.float64, device=x.device)
    camax = torch.empty(B, C, dtype=torch.float32, device=x.device)
    _channel_stats_kernel[(triton.cdiv(C, block_c), B)](
        x, mask_t, csum, camax, N, C, *x.stride(), HAS_MASK=has_mask, BLOCK_N=32, BLOCK_C=block_c,
        num_warps=STATS_WARPS,
    )
    scale, inv = image_scale(camax.amax(1))
    if centre:
        count = mask.sum(1) if mask is not None else torch.full((B,), N, device=x.device)
        shift = (csum / count.clamp(min=1)[:, None] * inv.double()[:, None]).float()
    else:
        shift = torch.zeros(B, C, dtype=torch.float32, device=x.device)
    norms = torch.empty(B, N, dtype=torch.float32, device=x.device)
    _sq_norms_kernel[(triton.cdiv(N, 32), B)](
        x, mask_t, shift, inv, norms, N, C, *x.stride(), HAS_MASK=has_mask, BLOCK_M=32, BLOCK_C=block_c
    )
    nmax = (norms if mask is None else norms.masked_fill(~mask, 0)).amax(1)
    return _Prepared(norms, mask_t, has_mask, shift, scale, inv, nmax)


def _grid(N: int, B: int, block_m: int):
    return (triton.cdiv(N, block_m), B)


def _knn_density_prepared(x, k, mask, p: _Prepared):
    B, N, C = x.shape
    real = mask.sum(1) if mask is not None else torch.full((B,), N, device=x.device)
    k_img = real.clamp(max=k).to(torch.int32)  # k per image, on the device
    density = torch.empty(B, N, dtype=torch.float32, device=x.device)
    unsure = torch.empty(B, N, dtype=torch.int8, device=x.device)
    args = (x, p.norms, p.nmax, p.mask_t, p.shift, p.scale, p.inv, k_img, density, unsure, N, C, 1.0 / C, *x.stride())
    _twice(_knn_density_kernel, B, N, args, HAS_MASK=p.has_mask, K_PAD=pow2(k, 2))
    return density


def _density_delta_prepared(x, density, mask, densest_delta, tie_break, p: _Prepared):
    B, N, C = x.shape
    delta = torch.empty(B, N, dtype=torch.float32, device=x.device)
    parent = torch.empty(B, N, dtype=torch.int64, device=x.device)
    far = torch.empty(B, N, dtype=torch.float32, device=x.device)
    unsure = torch.empty(B, N, dtype=torch.int8, device=x.device)
    dens = density.to(torch.float32).contiguous()
    args = (x, p.norms, p.nmax, p.mask_t, p.shift, p.scale, p.inv, dens, parent, far, unsure, N, C, 1.0 / C,
            *x.stride())
    _twice(_delta_kernel, B, N, args, HAS_MASK=p.has_mask, TIE_INDEX=tie_break == "index")
    # the parent was chosen on norm-trick distances; its distance is recomputed exactly
    _parent_distance_kernel[_grid(N, B, 32)](
        x, parent, p.inv, p.scale, delta, N, C, 1.0 / C, *x.stride(),
        BLOCK_M=32, BLOCK_C=min(64, pow2(C)),
    )
    valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
    if densest_delta == "column_max":
        delta = torch.minimum(delta, column_max_cap(far, dens, valid, tie_break))
    else:
        top = far.masked_fill(~valid, -_INF).amax(1)
        delta = torch.where(parent < 0, top[:, None], delta)
    return torch.where(valid, delta, 0), parent


def _assign_prepared(x, centers, num_clusters, metric, p: _Prepared):
    B, N, C = x.shape
    M = centers.shape[1]
    labels = torch.empty(B, N, dtype=torch.int64, device=x.device)
    unsure = torch.empty(B, N, dtype=torch.int8, device=x.device)
    args = (x, p.norms, p.nmax, p.mask_t, p.shift, p.inv, centers.contiguous(), num_clusters.contiguous(), labels,
            unsure, N, C, M, 1.0 / C, *x.stride())
    _twice(_assign_kernel, B, N, args, HAS_MASK=p.has_mask, COSINE=metric == "cosine")
    return labels


def _select_centers(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order):
    B, N = score.shape
    if N > MAX_SELECT_N:
        return _reference_select(score.float(), mask, threshold, min_clusters, max_clusters, num_centers, center_order)
    M = max_clusters
    mask_t, has_mask = _mask_arg(score, mask)
    centers = torch.empty(B, M, dtype=torch.int64, device=score.device)
    num = torch.empty(B, dtype=torch.int64, device=score.device)
    block = pow2(N, 16)
    score32 = score.to(torch.float32).contiguous()
    _select_centers_kernel[(B,)](
        score32, mask_t, centers, num, N, M, float(threshold), min_clusters, num_centers,
        HAS_MASK=has_mask, BLOCK=block, num_warps=4 if block <= 4096 else 16,
    )
    if center_order == "score":
        centers = order_centers_by_score(centers, num, score32)
    return centers, num


# fns with the backend signatures of ops.py; small images take the Gram path (dpc_gram.py)


def _gram():
    from . import dpc_gram  # imports this module

    return dpc_gram


def _use_gram(x) -> bool:
    return _gram().use_gram(x)


def _pairwise_distance(x, mask):
    B, N, C = x.shape
    p = _prepare(x, mask)
    cfg = _config(x.device, x.dtype)
    out = torch.empty(B, N, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), B)
    _pairwise_distance_kernel[grid](
        x, p.norms, p.mask_t, p.shift, p.scale, p.inv, out, N, C, 1.0 / C, *x.stride(), HAS_MASK=p.has_mask, **cfg
    )
    return out


def _knn_density(x, k, mask):
    if _use_gram(x):
        return _gram().knn_density(x, k, mask)
    return _knn_density_prepared(x, k, mask, _prepare(x, mask))


def _density_delta(x, density, mask, densest_delta, tie_break):
    if _use_gram(x):
        return _gram().density_delta(x, density, mask, densest_delta, tie_break)
    return _density_delta_prepared(x, density, mask, densest_delta, tie_break, _prepare(x, mask))


def _assign_to_centers(x, centers, num_clusters, mask, metric):
    # cosine similarity is not translation invariant: uncentred (scaled) features
    return _assign_prepared(x, centers, num_clusters, metric, _prepare(x, mask, centre=metric != "cosine"))


def _dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order,
                 tie_break):
    if _use_gram(x):
        return _gram().dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers,
                                   center_order, tie_break)
    p = _prepare(x, mask)  # shared by the three passes
    density = _knn_density_prepared(x, k, mask, p)
    delta, parent = _density_delta_prepared(x, density, mask, densest_delta, tie_break, p)
    score = score_of(density, delta)
    centers, num = _select_centers(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order)
    labels = _assign_prepared(x, centers, num, "euclidean", p)
    return labels, num, centers, score, density, delta, parent


# ----------------------------------------------------------------- registration


def _available() -> Optional[str]:
    return MISSING


def _check_device_dtype(call: CallInfo) -> Optional[str]:
    if call.dtype == torch.float64:
        return "float64: tl.dot has no float64 tensor-core path; the reference computes float64 exactly"
    return device_reason(call)


def _check_k(call: CallInfo) -> Optional[str]:
    k = call.extra.get("k", 1)
    if k > MAX_K:
        return f"k = {k} > {MAX_K}: the k-nearest list lives in registers"
    return _check_device_dtype(call)




def _register() -> None:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    table = {
        "pairwise_distance": (_pairwise_distance, _check_device_dtype),
        "knn_density": (_knn_density, _check_k),
        "density_delta": (_density_delta, _check_device_dtype),
        "select_centers": (_select_centers, _check_device_dtype),
        "assign_to_centers": (_assign_to_centers, _check_device_dtype),
        "dpc_cluster": (_dpc_cluster, _check_k),
    }
    for op, (fn, check) in table.items():
        register(
            Impl(
                op=op, name="triton", fn=fn, devices=("cuda", "cpu"), dtypes=dtypes,
                auto_devices=("cuda",), supports_grad=False, available=_available, check=check,
            )
        )


_register()
