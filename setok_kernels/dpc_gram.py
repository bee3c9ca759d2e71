"""The Gram path of the Triton DPC backend: one B x N x N distance matrix, then row passes over it.

When to use it (``use_gram``): the matrix of scaled squared distances, B·N²
float32, fits ``GRAM_BUDGET`` (256 MiB; ``SETOK_DPC_GRAM_BYTES`` overrides it,
0 turns the path off) and N <= ``MAX_ROW`` (a program holds whole rows). The
SigLIP-384 workload (B=32, N=729) needs 68 MB; one 16,384-token image would
need 1 GiB and takes the streaming kernels of ``triton_dpc``, which never
write an N x N matrix. The streaming path computes every distance twice
(density pass, delta pass) and merges each row's k nearest with a serial
loop; here the distance GEMM runs once, on half the tiles, and everything
after it reads the matrix:

0. ``_prepare``: ``triton_dpc._prepare``'s values, bit for bit, in two
   launches (``_gram_stats_kernel``, ``_gram_norms_kernel``): its ~20 torch
   ops (scale, mean, nmax), a launch each, run inside the second.
1. ``_gram_kernel``: the tiles on and above the diagonal of each image's
   matrix, as ``triton_dpc``'s distance tile (centred, power-of-two scaled
   features, the norm trick, noise snapped to 0) but with the products in
   float16 x3 (``_split_dot_tile``): each image's features scaled by a power
   of two so the largest real norm sits just below float16's range, split
   into hi + lo float16 parts (22 bits, as tf32x3's split) and multiplied as
   lo.hi + hi.lo + hi.hi on the float16 tensor cores: tf32x3's accuracy
   (the same bound, SNAP) at twice its rate. Each tile is also stored
   transposed, the diagonal tiles mirrored: the matrix is exactly
   symmetric. Why not cuBLAS: at W2 (C=1152) one all-pairs product is 39
   GFLOP; float32 cuBLAS runs on CUDA cores (67 TFLOP/s: 585 us), and TF32
   (395 TFLOP/s: 99 us) keeps 10 mantissa bits (~2^-11 relative, and only
   while a global torch flag allows TF32), 2^8 times the error the
   certificates below assume, so most rows would be flagged and redone on
   CUDA cores. float16 x3 on 78 of the 144 padded tiles: 71 GFLOP at 790
   TFLOP/s = 90 us, at float32 accuracy.
2. ``_gram_density_kernel``: per row, the k-th smallest value by a bisection
   on the values' bits within the row's range that stops once one value is
   left (``_kth_smallest``: compares and counts, no serial merge; ~12 steps
   at W2, at most 31), then the k smallest summed in fixed point (order-free:
   duplicates' densities tie bit for bit). ``tl.topk`` (a bitonic network) would cost about as
   much on the GPU but takes ~1 s a program in Triton's interpreter (CI).
3. ``_gram_delta_kernel``: nearest denser token (smallest index on ties),
   the runner-up's distance, and rmax (the row's largest distance).
4. ``_gram_finish_kernel``: the distance to the parent from differences
   (``triton_dpc._parent_distance``), the cap of ``"column_max"`` (``cap_i =
   min rmax_j`` over the real j not denser than i: ``reference.column_max_cap``
   without a sort), or ``"global_max"``'s fill, then delta and the score.
5. ``_gram_assign_kernel``: nearest centre of each token, read from the centres'
   rows (contiguous; the matrix is symmetric).
6. ``_gram_near_ties_kernel`` after 3 and after 5: the flagged near ties (below).

Exactness is the streaming path's: each row pass certifies its rows under the
same bounds as its ``triton_dpc`` counterpart (k-nearest mean, runner-up denser
token, runner-up centre within the norm trick's error) and flags the others. A
density it cannot certify (an ill-conditioned row: the k nearest all near 0
next to the norms) is redone from differences by the streaming path's EXACT
launch (``triton_dpc._twice(..., exact_only=True)``). A parent or label it
cannot certify (a near tie) is decided by ``_gram_near_ties_kernel`` from the
exact distances to the few candidates within the bound of the nearest: a near
tie costs two or three C-long differences, where the EXACT launch redoes the
row against all N columns on one warp (at W2, 16 x 729 x 1152 FMAs on 32
lanes: ~0.2 ms on an H200 for a block with one such row, an estimate). The
distance to the parent is recomputed from differences for every row (in
``_gram_finish_kernel``). No host reads: the whole path is sync-free and
CUDA-graph capturable.

Why a bisection and not a radix (histogram) select: Triton's ``tl.histogram``
counts with warp ballots, about numBins/32 x log2(numBins) lane operations per
element (~100 for 256 bins, one 8-bit pass), more than the whole bisection
(~3 per step and element). Cost model: ``benchmarks/bench_dpc.py``'s
``h200_model_gram`` (an estimate, ``python -m benchmarks.bench_dpc``).
"""

from __future__ import annotations

import os

import torch

from . import triton_dpc as T
from ._triton import jit as _jit
from ._triton import pow2, tl, triton
from .triton_dpc import KNN_TOL, SNAP, _centred_chunk, _centred_sq_norms, _channel_stats, _parent_distance, _real_tokens

GRAM_BUDGET = 256 << 20  # bytes of the (B, N, N) float32 matrix: W2 (68 MB) with room, one image up to MAX_ROW
MAX_ROW = 8192  # a row block of the row passes lives in one program's registers
ROW_ELEMENTS = 4096  # matrix entries per program in the row passes
# channels per step of every row's parent distance (finish)
_FINISH_C = 32
# near ties: rows per program (most programs only read their flags) and channels per step; warps grow
# with the row (N / 512: a 8192-token row on 4 warps spills 128-256 B on sm_90; 4 warps spill 4 B at
# N = 512 under triton 3.6)
_TIES_ROWS = 128
_TIES_C = 128


def budget() -> int:
    value = os.environ.get("SETOK_DPC_GRAM_BYTES")
    return GRAM_BUDGET if value is None else int(value)


def use_gram(x: torch.Tensor) -> bool:
    B, N, _ = x.shape
    return N <= MAX_ROW and B * N * N * 4 <= budget()


# ----------------------------------------------------------------- kernels


@_jit
def _gram_stats_kernel(
    x_ptr,
    mask_ptr,
    mean_ptr,
    amax_ptr,
    nmax_bits_ptr,
    N,
    C: tl.constexpr,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``triton_dpc._channel_stats`` (the same sums), stored as the float64 mean over the real tokens
    (``_prepare``'s ``csum / count``: the division here, once, keeps float64 division's slow path out of
    ``_gram_norms_kernel``), and a zeroed nmax for ``_gram_norms_kernel``'s atomic max."""
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total, amax, count = _channel_stats(x_ptr + b * stride_b, mask_ptr + b * N, offs_c, N, C, stride_n, stride_c,
                                        HAS_MASK, BLOCK_N, BLOCK_C)
    tl.store(mean_ptr + b * C + offs_c, total / tl.maximum(count, 1).to(tl.float64), mask=offs_c < C)
    tl.store(amax_ptr + b * C + offs_c, amax, mask=offs_c < C)
    if tl.program_id(0) == 0:
        tl.store(nmax_bits_ptr + b, 0)


@_jit
def _gram_norms_kernel(
    x_ptr,
    mask_ptr,
    mean_ptr,
    amax_ptr,
    shift_ptr,
    scale_ptr,
    inv_ptr,
    nrm_ptr,
    nmax_bits_ptr,
    N,
    C: tl.constexpr,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``triton_dpc._prepare``'s torch ops and ``_sq_norms_kernel`` in one launch, bit for bit: every
    program derives s, 1 / s and the shift from the (B, C) stats (the first row block stores them), then
    |a_i|^2 as ``_sq_norms_kernel`` does, and nmax by an atomic max."""
    b = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) == 0
    # reference.image_scale of the largest |x|: the max of the channels' bit patterns (|x| >= 0: ordered
    # as the values; the sign bit cleared so a NaN sorts above inf), s = 2^e with |x| / s < 2, and s = 1
    # for a zero, NaN or inf maximum (torch's amax propagates NaN)
    top = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        bits = tl.load(amax_ptr + b * C + offs_c, mask=offs_c < C, other=0.0).to(tl.int32, bitcast=True)
        top = tl.maximum(top, bits & 0x7FFFFFFF)
    top = tl.max(top, axis=0)
    e = tl.minimum(tl.maximum((top >> 23) - 126, -124), 127) - 1  # frexp's exponent, clamped as image_scale
    e = tl.where((top > 0) & (top < 0x7F800000), e, 0)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_s = ((127 - e) << 23).to(tl.float32, bitcast=True)
    if first:
        tl.store(scale_ptr + b, scale)
        tl.store(inv_ptr + b, inv_s)
        for c0 in range(0, C, BLOCK_C):  # _prepare's shift: the float64 mean times 1 / s, rounded once
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mean = tl.load(mean_ptr + b * C + offs_c, mask=offs_c < C, other=0.0)
            tl.store(shift_ptr + b * C + offs_c, (mean * inv_s.to(tl.float64)).to(tl.float32), mask=offs_c < C)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = _real_tokens(mask_ptr + b * N, rows, N, HAS_MASK)
    acc = _centred_sq_norms(x_ptr + b * stride_b, mean_ptr + b * C, inv_s, rows, ok, stride_n, stride_c, C, True,
                            BLOCK_M, BLOCK_C)
    tl.store(nrm_ptr + b * N + rows, acc, mask=rows < N)
    # nmax: the largest real |a_i|^2, an integer max of bit patterns (acc >= 0; NaN above inf as in torch)
    bits = tl.where(ok, acc, 0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    tl.atomic_max(nmax_bits_ptr + b, tl.max(bits, axis=0))


@_jit
def _split_dot_tile(
    x_img,
    shift_img,
    inv_s,
    up,
    rows,
    cols,
    row_ok,
    col_ok,
    stride_n,
    stride_c,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(BLOCK, BLOCK) dot products 2^p a_i . 2^p a_j of the centred, scaled tokens ``a = x / s - shift``
    (``up`` = 2^p, see ``_gram_kernel``), as three float16 products of the split ``2^p a = hi + lo``."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    row_off = rows * stride_n
    col_off = cols * stride_n
    for c0 in range(0, C, BLOCK_C):
        a, b = _centred_chunk(x_img, shift_img, inv_s, row_off, col_off, row_ok, col_ok, stride_c, c0, C, BLOCK_C)
        # tokens that are not real are 0, not -shift: nmax does not bound them
        a = tl.where(row_ok[:, None], a * up, 0.0)
        b = tl.where(col_ok[None, :], b * up, 0.0)
        a_hi = a.to(tl.float16)
        b_hi = b.to(tl.float16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.float16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.float16)
        # the small products first; lo x lo (<= 2^-22 of |a_ic a_jc|) is left out
        acc = tl.dot(a_lo, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    return acc


@_jit
def _gram_kernel(
    x_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    shift_ptr,
    inv_ptr,
    out_ptr,
    N,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Tile (i, j), j >= i, of an image's scaled squared distances, stored at (i, j) and transposed at (j, i).

    Products: float16 x3 on 2^p a, 2^p the power of two that puts the largest real |a_i| (sqrt(nmax))
    in [2^13, 2^14): no component overflows float16 (65504). A component's split hi = fp16(a),
    lo = fp16(a - hi) keeps 22 bits, as tf32x3's does (lo x lo left out: <= 2^-22 |a_ic a_jc|), so
    the norm trick's bound is tf32x3's (SNAP); below float16's normal range (2^-14 in these units)
    the split is off by at most 2^-25, i.e. 2^-38 sqrt(nmax): with C <= 2^16 channels at most
    2^-29 nmax in a dot product, 2^-10 of SNAP's bound.
    """
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if tj >= ti:
        b = tl.program_id(2).to(tl.int64)
        mask_img = mask_ptr + b * N
        rows = ti * BLOCK + tl.arange(0, BLOCK)
        cols = tj * BLOCK + tl.arange(0, BLOCK)
        row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
        col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
        nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
        # nmax = m 2^E (m in [1, 2)): sqrt(nmax) < 2^h, h = ceil((E + 1) / 2); p = 14 - h, clamped so
        # that 2^p and 2^-2p are normal (nmax = 0: all real tokens equal, every product 0)
        e = (tl.load(nmax_ptr + b).to(tl.int32, bitcast=True) >> 23) - 127
        p = tl.minimum(tl.maximum(14 - ((e + 2) >> 1), -60), 60)
        up = ((p + 127) << 23).to(tl.float32, bitcast=True)
        down = ((127 - 2 * p) << 23).to(tl.float32, bitcast=True)
        acc = _split_dot_tile(x_ptr + b * stride_b, shift_ptr + b * C, tl.load(inv_ptr + b), up, rows, cols, row_ok,
                              col_ok, stride_n, stride_c, C, BLOCK, BLOCK_C) * down
        total = nrm_r[:, None] + nrm_c[None, :]
        d2 = total - 2.0 * acc
        # triton_dpc._sq_dist_tile's snap: values within the bound are 0 (exact duplicates tie)
        d2 = tl.where((d2 <= SNAP * total) | (rows[:, None] == cols[None, :]), 0.0, d2) * inv_c
        if tj == ti:  # the lower triangle from the upper one: exactly symmetric (the products' sums are not)
            d2 = tl.where(rows[:, None] <= cols[None, :], d2, tl.trans(d2))
        out_img = out_ptr + b * N * N
        inside = (rows < N)[:, None] & (cols < N)[None, :]
        tl.store(out_img + rows[:, None] * N + cols[None, :], d2, mask=inside)
        if tj > ti:
            tl.store(out_img + cols[:, None] * N + rows[None, :], tl.trans(d2), mask=tl.trans(inside))


@_jit
def _load_rows(
    d2_ptr,
    mask_ptr,
    b,
    rows,
    N,
    other,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
):
    """(BLOCK_M, N_PAD) matrix rows, ``other`` outside the real (row, column) pairs."""
    mask_img = mask_ptr + b * N
    cols = tl.arange(0, N_PAD)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
    d2 = tl.load(d2_ptr + b * N * N + rows[:, None] * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                 other=other)
    return d2, row_ok, col_ok, cols


@_jit
def _kth_smallest(
    keys,
    rows,
    cols,
    row_ok,
    col_ok,
    k,
    N_PAD: tl.constexpr,
):
    """Per row of ``keys`` (int32 bit patterns of the values, +inf outside the real pairs), the smallest
    key in [0, +inf] with at least k keys at or below it (+inf's key where none is finite): the k-th
    smallest value's, for values >= 0 (ordered as their keys). Compares and sums, no serial merge.

    A bisection on the keys, from a bracket, that stops once one key is left in it. The bracket: where
    every real value is finite (unsigned keys below +inf's: no NaN, no sign), the row's largest has all
    real keys (>= k) at or below it, and for k >= 2 its smallest off the diagonal has at most one (the
    diagonal) below it; elsewhere [0, +inf]; [0, 0] for rows that are not real (their outputs are
    masked). Each step's count at its pivot is kept for the end it moves (``c_hi`` = keys <= hi,
    ``c_lo`` <= keys < lo); when they differ by one, the one key in [lo, hi] is the answer, read by a
    min. A key's neighbours are ~2^13 keys apart among 729 distances within a factor of 2 (2^23 keys):
    ~12 steps instead of the ~23 to close the bracket (31 over [0, +inf]); ties still close it.
    """
    pair_ok = row_ok[:, None] & col_ok[None, :]
    top = tl.max(tl.where(pair_ok, keys.to(tl.uint32, bitcast=True), 0), axis=1)
    clean = top < 0x7F800000
    low = tl.min(tl.where(pair_ok & (cols[None, :] != rows[:, None]), keys, 0x7F800000), axis=1)
    hi = tl.where(clean, top.to(tl.int32, bitcast=True), 0x7F800000)
    lo = tl.minimum(tl.where(clean & (k >= 2), low, 0), hi)
    # without the bracket hi = +inf is not known to have k keys below it: no early stop until a step sets c_hi
    c_hi = tl.where(clean, tl.sum(col_ok.to(tl.int32), axis=0), N_PAD + 1)
    c_lo = tl.zeros_like(c_hi)
    go = (lo < hi) & (c_hi - c_lo > 1)
    while tl.max(go.to(tl.int32), axis=0) > 0:
        mid = lo + ((hi - lo) >> 1)
        count = tl.sum((keys <= mid[:, None]).to(tl.int32), axis=1)
        lower = go & (count >= k)
        upper = go & (count < k)
        hi = tl.where(lower, mid, hi)
        c_hi = tl.where(lower, count, c_hi)
        lo = tl.where(upper, mid + 1, lo)
        c_lo = tl.where(upper, count, c_lo)
        go = (lo < hi) & (c_hi - c_lo > 1)
    last = tl.min(tl.where(keys >= lo[:, None], keys, 0x7F800000), axis=1)
    return tl.where(lo < hi, last, hi)


@_jit
def _gram_density_kernel(
    d2_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    scale_ptr,
    k_ptr,
    out_ptr,
    unsure_ptr,
    N,
    K,
    inv_c,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d2, row_ok, col_ok, cols = _load_rows(d2_ptr, mask_ptr, b, rows, N, float("inf"), HAS_MASK, N_PAD)
    k = tl.minimum(tl.sum(col_ok.to(tl.int32), axis=0), K)  # k clamped to the image's real tokens
    if tl.program_id(0) == 0:  # for the EXACT launch
        tl.store(k_ptr + b, k)
    keys = d2.to(tl.int32, bitcast=True)
    hi = _kth_smallest(keys, rows, cols, row_ok, col_ok, k, N_PAD)  # the k-th smallest value t's key
    finite = hi < 0x7F800000
    t = tl.where(finite, hi, 0).to(tl.float32, bitcast=True)
    below = keys < hi[:, None]
    # the k smallest are the values below t and k - |below| copies of t. Summed in fixed point (2^-54 t
    # units, int64: < 2^62 for k <= 128): integer sums do not depend on the order, so tokens with the
    # same k nearest values (duplicates) get bit-identical densities, and the sum is exact to ~2^-47
    e = tl.maximum(tl.where(finite, hi, 0) >> 23, 1) - 127  # t < 2^(e + 1)
    unit = ((54 - e + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # 2^(54 - e)
    fixed = tl.where(below, d2, 0.0).to(tl.float64) * unit[:, None]
    count = tl.sum(below.to(tl.int32), axis=1)
    total = tl.sum(fixed.to(tl.int64), axis=1) + (k - count).to(tl.int64) * (t.to(tl.float64) * unit).to(tl.int64)
    total = tl.where(finite, (total.to(tl.float64) / unit).to(tl.float32), float("inf"))
    s = tl.load(scale_ptr + b)
    density = tl.exp(-((total / tl.maximum(k, 1).to(tl.float32)) * s) * s)
    out = b * N + rows
    tl.store(out_ptr + out, tl.where(row_ok, density, 0.0), mask=rows < N)
    # triton_dpc._knn_density_kernel's certificate
    nrm_r = tl.load(nrm_ptr + out, mask=rows < N, other=0.0)
    err = SNAP * (nrm_r + tl.load(nmax_ptr + b)) * inv_c
    unsure = row_ok & ((k - 1).to(tl.float32) * err > KNN_TOL * total)
    tl.store(unsure_ptr + out, unsure.to(tl.int8), mask=rows < N)


@_jit
def _gram_delta_kernel(
    d2_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    scale_ptr,
    dens_ptr,
    parent_ptr,
    far_ptr,
    unsure_ptr,
    N,
    inv_c,
    HAS_MASK: tl.constexpr,
    TIE_INDEX: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Nearest denser token (smallest index on ties) and rmax of a block of rows; a row whose runner-up
    is within the error bounds of the nearest (``triton_dpc._delta_kernel``'s certificate) is flagged
    for ``_gram_near_ties_kernel``."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d2, row_ok, col_ok, cols = _load_rows(d2_ptr, mask_ptr, b, rows, N, 0.0, HAS_MASK, N_PAD)
    out = b * N + rows
    dens_r = tl.load(dens_ptr + out, mask=rows < N, other=0.0)
    dens_c = tl.load(dens_ptr + b * N + cols, mask=cols < N, other=0.0)
    denser = _denser(dens_c[None, :], dens_r[:, None], cols[None, :], rows[:, None], TIE_INDEX) & col_ok[None, :]
    cand = tl.where(denser, d2, float("inf"))
    best = tl.min(cand, axis=1)
    best_j = tl.min(tl.where(denser & (cand == best[:, None]), cols[None, :], N), axis=1)
    second = tl.min(tl.where(cols[None, :] == best_j[:, None], float("inf"), cand), axis=1)
    has = row_ok & (best_j < N)
    tl.store(parent_ptr + out, tl.where(has, best_j, -1).to(tl.int64), mask=rows < N)
    far = tl.max(d2, axis=1)  # 0 outside the real pairs: d2 >= 0
    tl.store(far_ptr + out, tl.sqrt(far) * tl.load(scale_ptr + b), mask=rows < N)
    nrm_r = tl.load(nrm_ptr + out, mask=rows < N, other=0.0)
    unsure = has & (second <= best + 2.0 * SNAP * (nrm_r + tl.load(nmax_ptr + b)) * inv_c)
    tl.store(unsure_ptr + out, unsure.to(tl.int8), mask=rows < N)


@_jit
def _denser(
    dens_c,
    dens_r,
    cols,
    rows,
    TIE_INDEX: tl.constexpr,
):
    """Column j denser than row i, operands broadcast by the caller (``"index"``: equal densities, the
    lower index)."""
    denser = dens_c > dens_r
    if TIE_INDEX:
        denser = denser | ((dens_c == dens_r) & (cols < rows))
    return denser


@_jit
def _row_err(
    nrm_ptr,
    nmax_ptr,
    b,
    rows,
    N,
    inv_c,
):
    """``triton_dpc``'s bound on the norm trick's error of a row's matrix entries: SNAP (|a_i|^2 + nmax) / C."""
    nrm = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    return SNAP * (nrm + tl.load(nmax_ptr + b)) * inv_c


@_jit
def _gram_near_ties_kernel(
    d2_ptr,
    x_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    inv_ptr,
    dens_ptr,
    centers_ptr,
    num_ptr,
    unsure_ptr,
    out_ptr,
    N,
    M,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TIE_INDEX: tl.constexpr,
    N_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The flagged rows of a block (near ties the matrix cannot decide), one at a time: their parent
    (``LABELS`` off) or label (on) from exact distances to the few candidates within 2 err of the
    matrix's nearest, the only ones that can be the nearest (any other is farther than it by more than
    both errors), in ascending index or slot (the smaller keeps an exact tie). Programs without a
    flagged row exit after reading their flags."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    flags = tl.load(unsure_ptr + b * N + rows, mask=rows < N, other=0) != 0
    todo = tl.where(tl.max(flags.to(tl.int32), axis=0) > 0, BLOCK_N, 0)
    x_img = x_ptr + b * stride_b
    inv_s = tl.load(inv_ptr + b)
    err = _row_err(nrm_ptr, nmax_ptr, b, rows, N, inv_c)
    i = 0
    while i < todo:
        pick = tl.arange(0, BLOCK_N) == i
        if tl.max(tl.where(pick, flags, False).to(tl.int32), axis=0) > 0:
            r = tl.program_id(0) * BLOCK_N + i
            r_err = tl.max(tl.where(pick, err, 0.0), axis=0)
            if LABELS:  # candidates: the centres' slots, cost = the centre's matrix entry
                num = tl.minimum(tl.maximum(tl.load(num_ptr + b), 0), M).to(tl.int32)
                idx = tl.arange(0, S_PAD)
                ok = idx < num
                cents = tl.minimum(tl.maximum(tl.load(centers_ptr + b * M + idx, mask=ok, other=0), 0), N - 1)
                cost = tl.load(d2_ptr + (b * N + cents) * N + r, mask=ok, other=float("inf"))
                partner = cents
            else:  # candidates: the denser tokens
                idx = tl.arange(0, N_PAD)
                ok = _real_tokens(mask_ptr + b * N, idx, N, HAS_MASK)
                dens_c = tl.load(dens_ptr + b * N + idx, mask=idx < N, other=0.0)
                ok = ok & _denser(dens_c, tl.load(dens_ptr + b * N + r), idx, r, TIE_INDEX)
                cost = tl.load(d2_ptr + (b * N + r) * N + idx, mask=ok, other=float("inf"))
                partner = idx
            left = ok & (cost <= tl.min(cost, axis=0) + 2.0 * r_err)
            exact = float("inf")
            none = 1 << 30  # past every index and slot
            nxt = tl.min(tl.where(left, idx, none), axis=0)
            while nxt < none:
                o = tl.max(tl.where(idx == nxt, partner, 0), axis=0)
                d = _sq_diff(x_img, r, o, inv_s, stride_n, stride_c, C, BLOCK_C)
                if d < exact:
                    exact = d
                    tl.store(out_ptr + b * N + r, nxt.to(tl.int64))
                nxt = tl.min(tl.where(left & (idx > nxt), idx, none), axis=0)
        i += 1


@_jit
def _sq_diff(
    x_img,
    r,
    o,
    inv_s,
    stride_n,
    stride_c,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """|x_r / s - x_o / s|^2 from differences in float32 (a duplicate is at exactly 0)."""
    offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ok = c0 + offs < C
        a = tl.load(x_img + r * stride_n + (c0 + offs) * stride_c, mask=ok, other=0.0).to(tl.float32) * inv_s
        p = tl.load(x_img + o * stride_n + (c0 + offs) * stride_c, mask=ok, other=0.0).to(tl.float32) * inv_s
        acc += (a - p) * (a - p)
    return tl.sum(acc, axis=0)


@_jit
def _gram_finish_kernel(
    x_ptr,
    inv_ptr,
    scale_ptr,
    far_ptr,
    dens_ptr,
    parent_ptr,
    mask_ptr,
    delta_ptr,
    score_ptr,
    N,
    C: tl.constexpr,
    inv_c,
    stride_b,
    stride_n,
    stride_c,
    HAS_MASK: tl.constexpr,
    COLUMN_MAX: tl.constexpr,
    TIE_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """delta = min(exact distance to the parent, cap) (``"column_max"``) or the image's largest rmax for
    tokens without a parent (``"global_max"``); score = density * delta (0 where the density is)."""
    b = tl.program_id(1).to(tl.int64)
    mask_img = mask_ptr + b * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    out = b * N + rows
    dens_r = tl.load(dens_ptr + out, mask=rows < N, other=0.0)
    par = tl.load(parent_ptr + out, mask=rows < N, other=-1)
    delta = _parent_distance(x_ptr + b * stride_b, par, rows, N, tl.load(inv_ptr + b), tl.load(scale_ptr + b),
                             stride_n, stride_c, C, inv_c, BLOCK_M, BLOCK_C)
    if COLUMN_MAX:
        fill = tl.full((BLOCK_M,), float("inf"), tl.float32)
    else:
        fill = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    n0 = 0
    while n0 < N:  # (B, N) vectors only: N^2 / BLOCK_N compares per image
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
        far_c = tl.load(far_ptr + b * N + cols, mask=cols < N, other=0.0)
        if COLUMN_MAX:  # the smallest rmax over the real tokens not denser than the row
            dens_c = tl.load(dens_ptr + b * N + cols, mask=cols < N, other=0.0)
            denser = _denser(dens_c[None, :], dens_r[:, None], cols[None, :], rows[:, None], TIE_INDEX)
            fill = tl.minimum(fill, tl.min(tl.where(col_ok[None, :] & ~denser, far_c[None, :], float("inf")), axis=1))
        else:  # the image's largest rmax
            fill = tl.maximum(fill, tl.max(tl.where(col_ok, far_c, -float("inf")), axis=0))
        n0 += BLOCK_N
    if COLUMN_MAX:
        delta = tl.minimum(delta, fill)
    else:
        delta = tl.where(par < 0, fill, delta)
    delta = tl.where(row_ok, delta, 0.0)
    tl.store(delta_ptr + out, delta, mask=rows < N)
    tl.store(score_ptr + out, tl.where(dens_r == 0.0, 0.0, dens_r * delta), mask=rows < N)


@_jit
def _gram_assign_kernel(
    d2_ptr,
    nrm_ptr,
    nmax_ptr,
    mask_ptr,
    centers_ptr,
    num_ptr,
    labels_ptr,
    unsure_ptr,
    N,
    M,
    inv_c,
    HAS_MASK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Labels of a block of tokens: the nearest of the image's centres (earlier slot on ties), read from
    the centres' rows; a centre labels itself. A token whose runner-up centre is within the error
    bounds (``triton_dpc._assign_kernel``'s certificate) is flagged for ``_gram_near_ties_kernel``."""
    b = tl.program_id(1).to(tl.int64)
    toks = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = _real_tokens(mask_ptr + b * N, toks, N, HAS_MASK)
    num = tl.minimum(tl.maximum(tl.load(num_ptr + b), 0), M).to(tl.int32)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    second = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_s = tl.zeros((BLOCK_N,), dtype=tl.int32)
    own = tl.full((BLOCK_N,), -1, tl.int32)
    s0 = 0
    while s0 < num:
        slots = s0 + tl.arange(0, BLOCK_S)
        cents, cost = _centre_costs(d2_ptr + b * N * N, centers_ptr + b * M, slots, num, toks, N)
        t_min = tl.min(cost, axis=0)
        t_arg = tl.min(tl.where((slots < num)[:, None] & (cost == t_min[None, :]), slots[:, None], M), axis=0)
        t_second = tl.min(tl.where(slots[:, None] == t_arg[None, :], float("inf"), cost), axis=0)
        better = (t_arg < M) & (t_min < best)
        second = tl.where(better, tl.minimum(best, t_second), tl.minimum(second, t_min))
        best = tl.where(better, t_min, best)
        best_s = tl.where(better, t_arg, best_s)
        is_self = (slots < num)[:, None] & (cents[:, None] == toks[None, :])
        own = tl.maximum(own, tl.max(tl.where(is_self, slots[:, None], -1), axis=0))
        s0 += BLOCK_S
    label = tl.where(own >= 0, own, best_s)
    out = b * N + toks
    tl.store(labels_ptr + out, tl.where(tok_ok & (num > 0), label, -1).to(tl.int64), mask=toks < N)
    err = _row_err(nrm_ptr, nmax_ptr, b, toks, N, inv_c)
    unsure = tok_ok & (own < 0) & (best < float("inf")) & (second <= best + 2.0 * err)
    tl.store(unsure_ptr + out, unsure.to(tl.int8), mask=toks < N)


@_jit
def _centre_costs(
    d2_img,
    centers_img,
    slots,
    num,
    toks,
    N,
):
    """The centres of ``slots`` (< num; bad indices, validation off, clamped: never read out of bounds)
    and their matrix rows at ``toks``, inf outside."""
    slot_ok = slots < num
    cents = tl.load(centers_img + slots, mask=slot_ok, other=0)
    cents = tl.minimum(tl.maximum(cents, 0), N - 1).to(tl.int32)
    cost = tl.load(d2_img + cents[:, None] * N + toks[None, :], mask=slot_ok[:, None] & (toks < N)[None, :],
                   other=float("inf"))
    return cents, cost


# ----------------------------------------------------------------- host side


def _prepare(x, mask) -> T._Prepared:
    """``triton_dpc._prepare(x, mask)``'s values, bit for bit, in two launches and no torch ops (its
    scale and mean are ~20 small ops, a launch each)."""
    B, N, C = x.shape
    mask_t, has_mask = T._mask_arg(x, mask)
    block_c = min(64, pow2(C))
    f32 = dict(dtype=torch.float32, device=x.device)
    mean = torch.empty(B, C, dtype=torch.float64, device=x.device)
    camax = torch.empty(B, C, **f32)
    nmax = torch.empty(B, **f32)
    _gram_stats_kernel[(triton.cdiv(C, block_c), B)](
        x, mask_t, mean, camax, nmax.view(torch.int32), N, C, *x.stride(), HAS_MASK=has_mask, BLOCK_N=32,
        BLOCK_C=block_c, num_warps=T.STATS_WARPS,
    )
    shift, norms = torch.empty(B, C, **f32), torch.empty(B, N, **f32)
    scale, inv = torch.empty(B, **f32), torch.empty(B, **f32)
    _gram_norms_kernel[(triton.cdiv(N, 32), B)](
        x, mask_t, mean, camax, shift, scale, inv, norms, nmax.view(torch.int32), N, C, *x.stride(),
        HAS_MASK=has_mask, BLOCK_M=32, BLOCK_C=block_c,
    )
    return T._Prepared(norms, mask_t, has_mask, shift, scale, inv, nmax)


def _rows(N: int):
    """(N_PAD, BLOCK_M, num_warps) of the row passes: whole rows, ``ROW_ELEMENTS`` entries a program."""
    n_pad = pow2(N, 16)
    # 8 warps, at most 128 rows: with 4 warps (N_PAD <= 2048) or 256 rows (N_PAD = 16) ptxas spills
    # 4-384 B under triton 3.6 (sm_80 and sm_90); this compiles spill-free under 3.6 and 3.9
    return n_pad, min(128, max(1, ROW_ELEMENTS // n_pad)), 8


def _distances(x, p: T._Prepared) -> torch.Tensor:
    B, N, C = x.shape
    cfg = T._config(x.device, x.dtype)  # the distance tiles of the streaming passes (per architecture)
    block = cfg["BLOCK_N"]
    tiles = triton.cdiv(N, block)
    d2 = torch.empty(B, N, N, dtype=torch.float32, device=x.device)
    _gram_kernel[(tiles, tiles, B)](
        x, p.norms, p.nmax, p.mask_t, p.shift, p.inv, d2, N, C, 1.0 / C, *x.stride(), HAS_MASK=p.has_mask, BLOCK=block,
        BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return d2


def _density(x, k, p: T._Prepared, d2):
    B, N, C = x.shape
    k_img = torch.empty(B, dtype=torch.int32, device=x.device)
    k_pad = pow2(k, 2)
    density = torch.empty(B, N, dtype=torch.float32, device=x.device)
    unsure = torch.empty(B, N, dtype=torch.int8, device=x.device)
    n_pad, block_m, warps = _rows(N)
    _gram_density_kernel[(triton.cdiv(N, block_m), B)](
        d2, p.norms, p.nmax, p.mask_t, p.scale, k_img, density, unsure, N, k, 1.0 / C,
        HAS_MASK=p.has_mask, N_PAD=n_pad, BLOCK_M=block_m, num_warps=warps,
    )
    args = (x, p.norms, p.nmax, p.mask_t, p.shift, p.scale, p.inv, k_img, density, unsure, N, C, 1.0 / C, *x.stride())
    T._twice(T._knn_density_kernel, B, N, args, exact_only=True, HAS_MASK=p.has_mask, K_PAD=k_pad)
    return density


def _delta(x, density, densest_delta, tie_break, p: T._Prepared, d2):
    """(delta, parent, score)."""
    B, N, C = x.shape
    dens = density.to(torch.float32).contiguous()
    parent = torch.empty(B, N, dtype=torch.int64, device=x.device)
    far = torch.empty(B, N, dtype=torch.float32, device=x.device)
    unsure = torch.empty(B, N, dtype=torch.int8, device=x.device)
    tie_index = tie_break == "index"
    n_pad, block_m, warps = _rows(N)
    _gram_delta_kernel[(triton.cdiv(N, block_m), B)](
        d2, p.norms, p.nmax, p.mask_t, p.scale, dens, parent, far, unsure, N, 1.0 / C,
        HAS_MASK=p.has_mask, TIE_INDEX=tie_index, N_PAD=n_pad, BLOCK_M=block_m, num_warps=warps,
    )
    _near_ties(x, p, d2, unsure, parent, dens=dens, tie_index=tie_index)
    delta = torch.empty(B, N, dtype=torch.float32, device=x.device)
    score = torch.empty(B, N, dtype=torch.float32, device=x.device)
    _gram_finish_kernel[T._grid(N, B, 32)](
        x, p.inv, p.scale, far, dens, parent, p.mask_t, delta, score, N, C, 1.0 / C, *x.stride(),
        HAS_MASK=p.has_mask, COLUMN_MAX=densest_delta == "column_max", TIE_INDEX=tie_index, BLOCK_M=32,
        BLOCK_N=128, BLOCK_C=min(_FINISH_C, pow2(C)), num_warps=8,  # 4 spill 4 B on sm_90 (fp32, triton 3.6)
    )
    return delta, parent, score


def _assign(x, centers, num_clusters, p: T._Prepared, d2):
    B, N, C = x.shape
    M = centers.shape[1]
    centers, num_clusters = centers.contiguous(), num_clusters.contiguous()
    labels = torch.empty(B, N, dtype=torch.int64, device=x.device)
    unsure = torch.empty(B, N, dtype=torch.int8, device=x.device)
    _gram_assign_kernel[(triton.cdiv(N, 128), B)](
        d2, p.norms, p.nmax, p.mask_t, centers, num_clusters, labels, unsure, N, M, 1.0 / C,
        HAS_MASK=p.has_mask, BLOCK_S=16, BLOCK_N=128, num_warps=8,  # 4 warps spill 4 B on sm_80 (fp32, masked)
    )
    _near_ties(x, p, d2, unsure, labels, centers=centers, num_clusters=num_clusters)
    return labels


def _near_ties(x, p: T._Prepared, d2, unsure, out, dens=None, tie_index=False, centers=None, num_clusters=None):
    """``_gram_near_ties_kernel`` over the rows ``unsure`` flags: parents into ``out`` (``dens`` given) or
    labels (``centers`` and ``num_clusters`` given)."""
    B, N, C = x.shape
    labels = centers is not None
    M = centers.shape[1] if labels else 1
    _gram_near_ties_kernel[(triton.cdiv(N, _TIES_ROWS), B)](
        d2, x, p.norms, p.nmax, p.mask_t, p.inv, dens if dens is not None else p.norms, centers if labels else unsure,
        num_clusters if labels else unsure, unsure, out, N, M, C, 1.0 / C, *x.stride(),
        LABELS=labels, HAS_MASK=p.has_mask, TIE_INDEX=tie_index, N_PAD=pow2(N, 16), S_PAD=pow2(M, 16),
        BLOCK_N=_TIES_ROWS, BLOCK_C=min(_TIES_C, pow2(C)), num_warps=max(8, pow2(N) // 512),
    )


# fns with the signatures of triton_dpc's (ops.py's backend signatures)


def knn_density(x, k, mask):
    p = _prepare(x, mask)
    return _density(x, k, p, _distances(x, p))


def density_delta(x, density, mask, densest_delta, tie_break):
    p = _prepare(x, mask)
    delta, parent, _ = _delta(x, density, densest_delta, tie_break, p, _distances(x, p))
    return delta, parent


def dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order,
                tie_break):
    p = _prepare(x, mask)
    d2 = _distances(x, p)
    density = _density(x, k, p, d2)
    delta, parent, score = _delta(x, density, densest_delta, tie_break, p, d2)
    centers, num = T._select_centers(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order)
    labels = _assign(x, centers, num, p, d2)
    return labels, num, centers, score, density, delta, parent
