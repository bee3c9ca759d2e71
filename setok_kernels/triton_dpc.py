"""Triton kernels of the DPC-kNN family: density, delta, centres, assignment.

No kernel writes an N x N matrix (except ``pairwise_distance``, the debugging
op whose output is that matrix). Every pass streams column tiles of scaled
squared distances ``d2 = (|x_i|^2 + |x_j|^2 - 2 x_i.x_j) / C`` computed with
``tl.dot`` on the input dtype and fp32 accumulation, clamped at 0 (cancellation
can make it slightly negative) and set to exactly 0 on the diagonal.

- ``_sq_norms_kernel``: |x_i|^2 in fp32, once per call (shared by all passes).
- pass 1, ``_knn_density_kernel``: each row block keeps its k smallest d2 in
  registers (a K_PAD-wide list, K_PAD = next power of two >= k, at least 2;
  the slots past the image's k hold -inf) and swaps in a column tile's
  smallest values while they beat the list's largest: min/max reductions
  only, no sort network. k <= 128 (``MAX_K``): above that the list no longer
  fits in registers, so ``check`` declines (auto falls back to another
  backend; a forced call raises BackendUnavailableError saying so).
- pass 2, ``_delta_kernel``: nearest strictly denser real token (smallest
  index on ties) and each row's largest distance; the ``densest_delta``
  fallback (a per-image min or max of those row maxima) is three device tensor
  ops on (B, N) values.
- centres, ``_select_centers_kernel``: one program per image ranks the scores
  without sorting: a 32-step bisection on order-preserving integer keys finds
  the cut-off score, a prefix sum breaks ties at the cut-off by index and
  places the centres in ascending order. N <= 32768 (the image's scores live
  in one program's registers); above, ``check`` declines.
- assignment, ``_assign_kernel``: distances to the centres (loop bounded by the
  image's own ``num_clusters``, read on the device), argmin with the earlier
  centre on ties; a centre labels itself.

Nothing reads a tensor value on the host: ``dpc_cluster`` can be captured in a
CUDA graph. Masked tokens are loaded as zeros and excluded from every
reduction. k is clamped per image to its real-token count on the device.
Strided inputs are supported (strides are passed, nothing is copied).
float32 inputs use ``input_precision="tf32x3"``: fp32-level products on
tensor cores (plain tf32 keeps 10 mantissa bits: ~1e-3 relative, too coarse
for density ties). The norm trick's error is ~eps32 * (|x_i|^2 + |x_j|^2) / C
in d2 (the error torch.cdist's matmul mode also has; the reference, built from
differences, does not): clusters match the reference on separated data, and
near-ties within that error may resolve differently (tests bound both).
float64 is declined (no float64 tensor-core path; the reference is exact).

Floor (COMPUTED from peak rates, NOT measured; no GPU was available): the two
full distance passes cost 2 x 2*B*N^2*C FLOPs, over the H100 SXM dense bf16
rate ~990 TFLOP/s; reading x once costs B*N*C*2 bytes over 3.35 TB/s.
- B=32, N=729, C=1152: 7.84e10 FLOP -> 79 us; x read 53.7 MB -> 16 us per
  read; assignment to M=64 centres adds 3.5 us. Compute-bound: ~83 us.
- B=1, N=16384, C=1024: 1.10e12 FLOP -> 1.11 ms; x read 33.5 MB -> 10 us;
  assignment (M=64) 2.2 us. Compute-bound: ~1.11 ms.
The k-list updates (min/max reductions on CUDA cores: up to k steps on the
first tile, few on later ones) are extra work outside this floor. Block sizes below are fixed choices for H100 (64 x 64 tiles, 64-wide C
chunks for 16-bit inputs), not tuned on hardware.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._backends import CallInfo, Impl, register

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # every Impl below reports this reason
    triton = tl = None
    _TRITON_MISSING: Optional[str] = f"triton cannot be imported ({exc})"

    def _jit(fn):  # kernels are never launched without triton
        return fn

else:
    _TRITON_MISSING = None
    _jit = triton.jit

# Triton decides at decoration time whether kernels run in its interpreter.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

MAX_K = 128  # the per-row k-nearest list is held in registers
MAX_SELECT_N = 32768  # one program holds an image's scores
_INF = float("inf")


# ----------------------------------------------------------------- kernels


@_jit
def _real_tokens(mask_img, idx, N, HAS_MASK: tl.constexpr):
    """In range and not masked out."""
    ok = idx < N
    if HAS_MASK:
        ok = ok & (tl.load(mask_img + idx, mask=ok, other=0) != 0)
    return ok


@_jit
def _sq_dist_tile(
    x_img, rows, cols, row_ok, col_ok, nrm_r, nrm_c, stride_n, stride_c, C, inv_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 scaled squared distances between token sets ``rows`` and ``cols``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_off = rows * stride_n
    col_off = cols * stride_n
    for c0 in range(0, C, BLOCK_C):
        # offsets rebuilt per chunk: no 64-bit pointer tiles live across the loop
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        a = tl.load(x_img + row_off[:, None] + offs_c[None, :] * stride_c, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(x_img + col_off[None, :] + offs_c[:, None] * stride_c, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:  # same products: bf16 x bf16 is exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    d2 = tl.maximum(nrm_r[:, None] + nrm_c[None, :] - 2.0 * acc, 0.0) * inv_c
    return tl.where(rows[:, None] == cols[None, :], 0.0, d2)


@_jit
def _sq_norms_kernel(
    x_ptr, mask_ptr, out_ptr, N, C, stride_b, stride_n, stride_c,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = _real_tokens(mask_ptr + b * N, rows, N, HAS_MASK)
    offs_c = tl.arange(0, BLOCK_C)
    ptrs = x_ptr + b * stride_b + rows[:, None] * stride_n + offs_c[None, :] * stride_c
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v = tl.load(ptrs, mask=ok[:, None] & (offs_c < C - c0)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
        ptrs += BLOCK_C * stride_c
    tl.store(out_ptr + b * N + rows, acc, mask=rows < N)


@_jit
def _merge_smallest(knn, d2, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr):
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
def _knn_density_kernel(
    x_ptr, nrm_ptr, mask_ptr, k_ptr, out_ptr, N, C, inv_c, stride_b, stride_n, stride_c,
    HAS_MASK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    x_img = x_ptr + b * stride_b
    mask_img = mask_ptr + b * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    k = tl.load(k_ptr + b)
    in_list = tl.arange(0, K_PAD)[None, :] < k
    knn = tl.where(in_list, float("inf"), -float("inf")) + tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
        d2 = _sq_dist_tile(x_img, rows, cols, row_ok, col_ok, nrm_r, nrm_c, stride_n, stride_c, C, inv_c,
                           BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, DOT_UPCAST)
        knn = _merge_smallest(knn, tl.where(col_ok[None, :], d2, float("inf")), BLOCK_N, K_PAD)
    # sum in ascending order: a function of the k values alone, not of the
    # order they entered the list, so tokens with equal neighbourhoods (e.g.
    # duplicates) get bit-identical densities and stay tied, as in the reference
    slots = tl.arange(0, K_PAD)
    rest = tl.where(in_list, knn, float("inf"))
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for _ in range(0, k):
        smallest = tl.min(rest, axis=1)
        total += smallest
        first = tl.min(tl.where(rest == smallest[:, None], slots[None, :], K_PAD), axis=1)
        rest = tl.where(slots[None, :] == first[:, None], float("inf"), rest)
    density = tl.exp(-total / tl.maximum(k, 1).to(tl.float32))
    tl.store(out_ptr + b * N + rows, tl.where(row_ok, density, 0.0), mask=rows < N)


@_jit
def _delta_kernel(
    x_ptr, nrm_ptr, mask_ptr, dens_ptr, delta_ptr, parent_ptr, far_ptr, N, C, inv_c,
    stride_b, stride_n, stride_c,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    x_img = x_ptr + b * stride_b
    mask_img = mask_ptr + b * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    dens_r = tl.load(dens_ptr + b * N + rows, mask=rows < N, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_j = tl.full((BLOCK_M,), -1, tl.int32)
    far = tl.zeros((BLOCK_M,), dtype=tl.float32)  # d2 >= 0: 0 is neutral for the max
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
        dens_c = tl.load(dens_ptr + b * N + cols, mask=cols < N, other=0.0)
        d2 = _sq_dist_tile(x_img, rows, cols, row_ok, col_ok, nrm_r, nrm_c, stride_n, stride_c, C, inv_c,
                           BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, DOT_UPCAST)
        far = tl.maximum(far, tl.max(tl.where(col_ok[None, :], d2, 0.0), axis=1))
        denser = col_ok[None, :] & (dens_c[None, :] > dens_r[:, None])
        cand = tl.where(denser, d2, float("inf"))
        t_min = tl.min(cand, axis=1)
        t_arg = tl.min(tl.where(denser & (cand == t_min[:, None]), cols[None, :], N), axis=1)
        # strict <: an earlier tile (smaller index) keeps a tie
        better = (t_arg < N) & ((t_min < best) | (best_j < 0))
        best = tl.where(better, t_min, best)
        best_j = tl.where(better, t_arg, best_j)
    out = b * N + rows
    in_range = rows < N
    has = row_ok & (best_j >= 0)
    tl.store(delta_ptr + out, tl.where(has, tl.sqrt(best), 0.0), mask=in_range)
    tl.store(parent_ptr + out, tl.where(has, best_j, -1).to(tl.int64), mask=in_range)
    tl.store(far_ptr + out, tl.sqrt(far), mask=in_range)


@_jit
def _assign_kernel(
    x_ptr, nrm_ptr, mask_ptr, centers_ptr, num_ptr, labels_ptr, N, C, M, inv_c,
    stride_b, stride_n, stride_c,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    x_img = x_ptr + b * stride_b
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = _real_tokens(mask_ptr + b * N, rows, N, HAS_MASK)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    num = tl.minimum(tl.maximum(tl.load(num_ptr + b), 0), M).to(tl.int32)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_s = tl.zeros((BLOCK_M,), dtype=tl.int32)
    own = tl.full((BLOCK_M,), -1, tl.int32)  # the row's own slot when it is a centre
    for s0 in range(0, num, BLOCK_N):  # only this image's centres
        slots = s0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < num
        # bad indices (validation off) are clamped: never read out of bounds
        cols = tl.load(centers_ptr + b * M + slots, mask=slot_ok, other=0)
        cols = tl.minimum(tl.maximum(cols, 0), N - 1).to(tl.int32)
        nrm_c = tl.load(nrm_ptr + b * N + cols, mask=slot_ok, other=0.0)
        d2 = _sq_dist_tile(x_img, rows, cols, row_ok, slot_ok, nrm_r, nrm_c, stride_n, stride_c, C, inv_c,
                           BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, DOT_UPCAST)
        cand = tl.where(slot_ok[None, :], d2, float("inf"))
        t_min = tl.min(cand, axis=1)
        t_arg = tl.min(tl.where(slot_ok[None, :] & (cand == t_min[:, None]), slots[None, :], M), axis=1)
        better = (t_arg < M) & (t_min < best)
        best = tl.where(better, t_min, best)
        best_s = tl.where(better, t_arg, best_s)
        is_self = slot_ok[None, :] & (cols[None, :] == rows[:, None])
        own = tl.maximum(own, tl.max(tl.where(is_self, slots[None, :], -1), axis=1))
    label = tl.where(own >= 0, own, best_s)
    label = tl.where(row_ok & (num > 0), label, -1)
    tl.store(labels_ptr + b * N + rows, label.to(tl.int64), mask=rows < N)


@_jit
def _pairwise_distance_kernel(
    x_ptr, nrm_ptr, mask_ptr, out_ptr, N, C, inv_c, stride_b, stride_n, stride_c,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    mask_img = mask_ptr + b * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = _real_tokens(mask_img, rows, N, HAS_MASK)
    col_ok = _real_tokens(mask_img, cols, N, HAS_MASK)
    nrm_r = tl.load(nrm_ptr + b * N + rows, mask=rows < N, other=0.0)
    nrm_c = tl.load(nrm_ptr + b * N + cols, mask=cols < N, other=0.0)
    d2 = _sq_dist_tile(x_ptr + b * stride_b, rows, cols, row_ok, col_ok, nrm_r, nrm_c, stride_n, stride_c, C,
                       inv_c, BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, DOT_UPCAST)
    d = tl.where(row_ok[:, None] & col_ok[None, :], tl.sqrt(d2), float("inf"))
    ptrs = out_ptr + b * N * N + rows[:, None] * N + cols[None, :]
    tl.store(ptrs, d, mask=(rows < N)[:, None] & (cols < N)[None, :])


@_jit
def _select_centers_kernel(
    score_ptr, mask_ptr, centers_ptr, num_ptr, N, M, threshold, min_clusters,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    valid = _real_tokens(mask_ptr + b * N, idx, N, HAS_MASK)
    score = tl.load(score_ptr + b * N + idx, mask=idx < N, other=0.0)
    # fp32 -> int32 with the same order (negatives: flip the magnitude bits)
    bits = tl.where(score == 0.0, 0, score.to(tl.int32, bitcast=True))  # -0.0 ties +0.0
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    above = valid & (score > threshold)
    use_threshold = tl.sum(above.to(tl.int32), axis=0) > 0
    candidate = tl.where(use_threshold, above, valid)
    limit = tl.where(use_threshold, M, tl.minimum(min_clusters, M))
    # largest cut-off t with at least `limit` candidates keyed >= t (or the
    # smallest key when there are fewer): a bisection over the int32 key range
    lo = tl.full((), -(2**31), tl.int64)
    hi = tl.full((), 2**31 - 1, tl.int64)
    key64 = key.to(tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) // 2
        count = tl.sum((candidate & (key64 >= mid)).to(tl.int32), axis=0)
        ok = count >= limit
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    strictly = candidate & (key64 > lo)
    at_cut = candidate & (key64 == lo)
    room = limit - tl.sum(strictly.to(tl.int32), axis=0)
    # ties at the cut-off: lower index first
    chosen = strictly | (at_cut & (tl.cumsum(at_cut.to(tl.int32), axis=0) <= room))
    num = tl.sum(chosen.to(tl.int32), axis=0)
    pos = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(centers_ptr + b * M + pos, idx.to(tl.int64), mask=chosen)
    for s0 in range(0, M, BLOCK):
        slots = s0 + idx
        tl.store(centers_ptr + b * M + slots, tl.full((BLOCK,), -1, tl.int64), mask=(slots >= num) & (slots < M))
    tl.store(num_ptr + b, num.to(tl.int64))


# ----------------------------------------------------------------- host side


def _config(dtype: torch.dtype) -> dict:
    """Fixed tiles for H100: 64 x 64 distance tiles, C chunks of 128 bytes.

    8 warps: compiled for sm_90 (no GPU), ptxas reports no register spills for
    any pass, dtype or k list (with 4 warps the fp32 passes spill).
    """
    # Triton's interpreter multiplies bf16 bit patterns as integers in tl.dot
    # (Triton 3.9): there, bf16 tiles are widened first. For 16-bit operands
    # input_precision is moot; "tf32" is the default it would get anyway.
    upcast = _INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=32, PRECISION="tf32x3", DOT_UPCAST=False, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=64, PRECISION="tf32", DOT_UPCAST=upcast, num_warps=8, num_stages=3)


def _mask_arg(x: torch.Tensor, mask: Optional[torch.Tensor]):
    """(pointer tensor, HAS_MASK); without a mask any pointer does (never read)."""
    if mask is None:
        return x, False
    return mask.contiguous().view(torch.uint8), True


def _prepare(x, mask):
    B, N, C = x.shape
    mask_t, has_mask = _mask_arg(x, mask)
    norms = torch.empty(B, N, dtype=torch.float32, device=x.device)
    block_m = 32
    block_c = min(128, triton.next_power_of_2(C))
    _sq_norms_kernel[(triton.cdiv(N, block_m), B)](
        x, mask_t, norms, N, C, *x.stride(), HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_C=block_c
    )
    return norms, mask_t, has_mask


def _launch_common(x):
    B, N, C = x.shape
    cfg = _config(x.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B)
    return cfg, grid, 1.0 / C


def _knn_density_prepared(x, k, mask, norms, mask_t, has_mask):
    B, N, C = x.shape
    cfg, grid, inv_c = _launch_common(x)
    k_pad = max(2, triton.next_power_of_2(k))
    if k_pad > 64:  # the k-list shares registers with the tile (64 rows would spill)
        cfg.update(BLOCK_M=32)
        grid = (triton.cdiv(N, 32), B)
    real = mask.sum(1) if mask is not None else torch.full((B,), N, device=x.device)
    k_img = real.clamp(max=k).to(torch.int32)  # validation off: k per image, on the device
    density = torch.empty(B, N, dtype=torch.float32, device=x.device)
    _knn_density_kernel[grid](
        x, norms, mask_t, k_img, density, N, C, inv_c, *x.stride(), HAS_MASK=has_mask, K_PAD=k_pad, **cfg
    )
    return density


def _density_delta_prepared(x, density, mask, densest_delta, norms, mask_t, has_mask):
    B, N, C = x.shape
    cfg, grid, inv_c = _launch_common(x)
    delta = torch.empty(B, N, dtype=torch.float32, device=x.device)
    parent = torch.empty(B, N, dtype=torch.int64, device=x.device)
    far = torch.empty(B, N, dtype=torch.float32, device=x.device)
    dens = density.to(torch.float32).contiguous()
    _delta_kernel[grid](x, norms, mask_t, dens, delta, parent, far, N, C, inv_c, *x.stride(), HAS_MASK=has_mask, **cfg)
    valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
    if densest_delta == "column_max":
        top = far.masked_fill(~valid, _INF).amin(1)
    else:
        top = far.masked_fill(~valid, -_INF).amax(1)
    delta = torch.where(valid & (parent < 0), top[:, None], delta)
    return delta, parent


def _assign_prepared(x, centers, num_clusters, norms, mask_t, has_mask):
    B, N, C = x.shape
    M = centers.shape[1]
    cfg, grid, inv_c = _launch_common(x)
    labels = torch.empty(B, N, dtype=torch.int64, device=x.device)
    _assign_kernel[grid](
        x, norms, mask_t, centers.contiguous(), num_clusters.contiguous(), labels, N, C, M, inv_c, *x.stride(),
        HAS_MASK=has_mask, **cfg,
    )
    return labels


def _select_centers(score, mask, threshold, min_clusters, max_clusters):
    B, N = score.shape
    M = max_clusters
    mask_t, has_mask = _mask_arg(score, mask)
    centers = torch.empty(B, M, dtype=torch.int64, device=score.device)
    num = torch.empty(B, dtype=torch.int64, device=score.device)
    block = max(16, triton.next_power_of_2(N))
    _select_centers_kernel[(B,)](
        score.to(torch.float32).contiguous(), mask_t, centers, num, N, M, float(threshold), min_clusters,
        HAS_MASK=has_mask, BLOCK=block, num_warps=4 if block <= 4096 else (16 if block <= 16384 else 32),
    )
    return centers, num


# fns with the op signatures of ops.py


def _pairwise_distance(x, mask):
    B, N, C = x.shape
    norms, mask_t, has_mask = _prepare(x, mask)
    cfg = _config(x.dtype)
    out = torch.empty(B, N, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), B)
    _pairwise_distance_kernel[grid](x, norms, mask_t, out, N, C, 1.0 / C, *x.stride(), HAS_MASK=has_mask, **cfg)
    return out


def _knn_density(x, k, mask):
    return _knn_density_prepared(x, k, mask, *_prepare(x, mask))


def _density_delta(x, density, mask, densest_delta):
    return _density_delta_prepared(x, density, mask, densest_delta, *_prepare(x, mask))


def _assign_to_centers(x, centers, num_clusters, mask):
    return _assign_prepared(x, centers, num_clusters, *_prepare(x, mask))


def _dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta):
    prepared = _prepare(x, mask)  # norms shared by the three passes
    density = _knn_density_prepared(x, k, mask, *prepared)
    delta, parent = _density_delta_prepared(x, density, mask, densest_delta, *prepared)
    score = density * delta
    centers, num = _select_centers(score, mask, threshold, min_clusters, max_clusters)
    labels = _assign_prepared(x, centers, num, *prepared)
    return labels, num, centers, score, density, delta, parent


# ----------------------------------------------------------------- registration


def _available() -> Optional[str]:
    return _TRITON_MISSING


def _check_device_dtype(call: CallInfo) -> Optional[str]:
    if call.dtype == torch.float64:
        return "float64: tl.dot has no float64 tensor-core path; the reference computes float64 exactly"
    if call.device.type == "cpu" and not _INTERPRET:
        return "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing setok_kernels"
    return None


def _check_k(call: CallInfo) -> Optional[str]:
    k = call.extra.get("k", 1)
    if k > MAX_K:
        return f"k = {k} > {MAX_K}: the k-nearest list lives in registers"
    return _check_device_dtype(call)


def _check_select(call: CallInfo) -> Optional[str]:
    N = call.extra.get("N", 1)
    if N > MAX_SELECT_N:
        return f"N = {N} > {MAX_SELECT_N}: centre selection holds an image's scores in one program"
    return _check_device_dtype(call)


def _check_cluster(call: CallInfo) -> Optional[str]:
    return _check_k(call) or _check_select(call)


def _register() -> None:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    table = {
        "pairwise_distance": (_pairwise_distance, _check_device_dtype),
        "knn_density": (_knn_density, _check_k),
        "density_delta": (_density_delta, _check_device_dtype),
        "select_centers": (_select_centers, _check_select),
        "assign_to_centers": (_assign_to_centers, _check_device_dtype),
        "dpc_cluster": (_dpc_cluster, _check_cluster),
    }
    for op, (fn, check) in table.items():
        register(
            Impl(
                op=op, name="triton", fn=fn, priority=10, devices=("cuda", "cpu"), dtypes=dtypes,
                auto_devices=("cuda",), supports_grad=False, available=_available, check=check,
            )
        )


_register()
