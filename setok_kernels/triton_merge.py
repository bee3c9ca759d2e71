"""Triton ``merge_clusters`` and its backward, and ``pack_clusters`` (the ``triton`` backend of those ops).

Same kernels as the native CUDA ones (csrc/cuda/bookkeeping.cu), tiled:

- ``_merge_slots_kernel``, one program per (slot, channel tile): walks the
  image's labels in tiles of ``BLOCK_N`` tokens and sums its members' ``w x``
  (the forward writes the merged token; the backward's first pass writes the
  accumulation-precision mean of the non-centre members, the per-slot
  coefficient ``c_l`` and each centre's slot);
- ``_merge_tokens_backward_kernel``, one program per token: its gradient as
  a non-centre member and as a centre (see ``reference._merge_clusters_backward``).

``pack_clusters`` is one launch (plus a fill where ``max_seqlen`` takes the
atomic path, below), ``_pack_clusters_kernel``, one program per image b (the reference, ``reference._pack_clusters``, is ~8 torch launches;
the native CUDA one a sort, scans and a max). Program b

- sums the clamped ``num_clusters`` of all images: ``cu_clusters[b + 1]`` and
  its live segments' first slot;
- counts the packed tokens of every image before b (its token offset) and of
  all images (where the empty segments' offsets and the unpacked tail start)
  by re-reading all B * N labels: O(B * B * N) label reads over the grid,
  mostly L2 hits (the labels are read from DRAM about once). The backend
  declines B * B * N > ``PACK_SCAN_LIMIT`` (2^26) and M > ``PACK_MAX_M``
  (1024: per-label counters live in registers); the dispatcher falls back;
- counts its own labels (``tl.histogram`` over M_PAD = next power of two of
  M bins), scans them into its live ``cu_seqlens`` entries, writes its empty
  segments' entries (the packed total), then places each token: a packed one
  at offset + segment start + its stable rank in its cluster (the cluster's
  count in earlier token blocks, ``tl.gather``-ed, plus equal labels at lower
  indices in its block: a BLOCK_T x BLOCK_T compare), an unpacked one at the
  tail, after the packed total and every unpacked token before it.

``max_seqlen`` (the longest segment of all images) is computed by program 0
alone, deterministically and in the same launch: its pass over all B * N
labels (where the others just count) is a histogram per image, also giving
the packed total, at ``pack_histogram_ops(M)`` lane operations per label
(Triton's histogram counts with warp ballots: ~(M_PAD / 32) * log2(M_PAD)),
20 at M = 64: ~2 us of one SM at B = 32, N = 729, about the others' scan
(~1.6 us of one SM's L2 share). Where that pass would cost more than
``PACK_MAX_LANE_OPS`` (2^20, ~4 us: more than a launch), e.g. M = N = 729
(~400 a label), ``ATOMIC_MAX`` instead: max_seqlen is zero-filled (one fill
launch) and each program ``atomic_max``-es its own longest segment into it,
the same maximum in any order. Every program histogramming every image would
cost B times the lane work. Cost model: ``benchmarks/bench_pack.py``
``h200_model_pack`` (an estimate, ``python -m benchmarks.bench_pack``).

Every other output element is written by one program, in a fixed order:
deterministic, no host sync (CUDA-graph capturable). On CPU tensors it runs
in Triton's interpreter (``TRITON_INTERPRET=1``), for tests.
"""

from __future__ import annotations


from typing import Optional

import torch

from ._backends import CallInfo, Impl, register
from .reference import acc_dtype
from ._triton import MISSING, device_reason, pow2, tl, triton
from ._triton import jit as _jit

_BLOCK_N = 32
_BLOCK_C = 128
# pack_clusters: the size rule (see the module docstring) and its blocks
PACK_SCAN_LIMIT = 1 << 26  # B * B * N: label reads of the whole grid
PACK_MAX_M = 1024  # per-label counters of one image, in registers
_PACK_BLOCK_T = 64  # tokens of the own image per step (a 64 x 64 rank compare)
_PACK_BLOCK_F = 512  # labels per step of the all-images scans (1024 spills 4 B, int64 labels)
# program 0's max_seqlen pass over at most this many lane operations (about 4 us of one SM): above,
# each program atomic_max-es its own longest segment into a zero-filled max_seqlen (a fill launch)
PACK_MAX_LANE_OPS = 1 << 20


def _slot_warps(x: torch.Tensor) -> int:
    """Warps of ``_merge_slots_kernel``: a float64 (32 x 128) member tile spills 4 B with 4 (sm_90,
    triton 3.9; 168 registers); 8 halve it (no spill on sm_80 or sm_90, triton 3.6 or 3.9)."""
    return 8 if x.dtype == torch.float64 else 4


@_jit
def _both(
    a,
    b,
):
    """``a & b`` as booleans: Triton's interpreter turns a bool tensor & a bool scalar into integers."""
    return (a & b) != 0


@_jit
def _merge_slots_kernel(
    x_ptr,
    labels_ptr,
    num_ptr,
    w_ptr,
    centers_ptr,
    blend_ptr,
    eps_ptr,
    tokens_ptr,
    counts_ptr,
    wsum_ptr,
    mean_ptr,
    coef_ptr,
    others_ptr,
    centre_slot_ptr,
    N,
    M,
    C,
    HAS_W: tl.constexpr,
    BLEND: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    b = q // M
    slot = q % M
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    nb = tl.minimum(tl.maximum(tl.load(num_ptr + b), 0), M)
    live = slot < nb
    centre = -1
    if BLEND:
        centre = tl.load(centers_ptr + q)
    total = tl.zeros((BLOCK_C,), dtype=ACC)
    zero = tl.sum(tl.zeros((BLOCK_N,), dtype=ACC), axis=0)
    wsum, own_w = zero, zero
    count = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.int64), axis=0)
    own_n = count
    n0 = 0
    while n0 < N:
        rows = n0 + tl.arange(0, BLOCK_N)
        lab = tl.load(labels_ptr + b * N + rows, mask=rows < N, other=-1)
        member = _both(lab == slot, live)
        if HAS_W:
            w = tl.load(w_ptr + b * N + rows, mask=member, other=0.0).to(ACC)
        else:
            w = tl.where(member, 1.0, 0.0).to(ACC)
        other = member
        if BLEND:
            is_centre = member & (rows == centre)
            other = member & (rows != centre)
            own_w += tl.sum(tl.where(is_centre, w, 0.0), axis=0)
            own_n += tl.sum(is_centre.to(tl.int64), axis=0)
            w = tl.where(other, w, 0.0)
        ptrs = x_ptr + (b * N + rows)[:, None] * C + offs_c[None, :]
        v = tl.load(ptrs, mask=other[:, None] & c_ok[None, :], other=0.0).to(ACC)
        total += tl.sum(v * w[:, None], axis=0)
        wsum += tl.sum(w, axis=0)
        count += tl.sum(other.to(tl.int64), axis=0)
        n0 += BLOCK_N
    denom = wsum + tl.load(eps_ptr)  # eps in the accumulation dtype (a float argument would be float32)
    nonzero = denom != 0
    avg = tl.where(nonzero, total / tl.where(nonzero, denom, 1.0), 0.0)
    first = tl.program_id(1) == 0
    if STATS:
        tl.store(mean_ptr + q * C + offs_c, avg, mask=_both(c_ok, live))
        inv = tl.where(nonzero, 1.0 / tl.where(nonzero, denom, 1.0), 0.0)
        if BLEND:
            inv = inv * (1 - tl.load(blend_ptr + q).to(ACC))
            safe = tl.minimum(tl.maximum(centre, 0), N - 1)
            tl.store(centre_slot_ptr + b * N + safe, slot, mask=_both(first, live))
        tl.store(coef_ptr + q, inv, mask=_both(first, live))
        tl.store(others_ptr + q, count, mask=_both(first, live))
    else:
        value = avg
        if BLEND:
            safe = tl.minimum(tl.maximum(centre, 0), N - 1)
            xc = tl.load(x_ptr + (b * N + safe) * C + offs_c, mask=c_ok, other=0.0).to(ACC)
            a = tl.load(blend_ptr + q).to(ACC)
            value = tl.where(count > 0, a * xc + (1 - a) * avg, xc)
        tl.store(tokens_ptr + q * C + offs_c, value.to(tokens_ptr.dtype.element_ty), mask=_both(c_ok, live))
        tl.store(counts_ptr + q, count + own_n, mask=_both(first, live))
        tl.store(wsum_ptr + q, wsum + own_w, mask=_both(first, live))


@_jit
def _merge_tokens_backward_kernel(
    grad_ptr,
    gws_ptr,
    x_ptr,
    labels_ptr,
    num_ptr,
    w_ptr,
    centers_ptr,
    blend_ptr,
    mean_ptr,
    coef_ptr,
    others_ptr,
    centre_slot_ptr,
    grad_x_ptr,
    grad_w_ptr,
    grad_a_ptr,
    N,
    M,
    C,
    HAS_W: tl.constexpr,
    BLEND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    b = t // N
    j = t % N
    nb = tl.minimum(tl.maximum(tl.load(num_ptr + b), 0), M)
    lab = tl.load(labels_ptr + t)
    member = _both(lab >= 0, lab < nb)
    slot = tl.where(member, lab, 0)
    as_other = member
    as_centre = _both(member, lab < 0)  # False without a blend
    ks = slot
    if BLEND:
        as_other = _both(member, tl.load(centers_ptr + b * M + slot) != j)
        k = tl.load(centre_slot_ptr + t)
        as_centre = _both(k >= 0, k < nb)
        ks = tl.where(as_centre, k, 0)
    wj = 1.0
    if HAS_W:
        wj = tl.load(w_ptr + t).to(ACC)
    coef = tl.load(coef_ptr + b * M + slot)
    scale = 0.0
    has_others = False
    if BLEND:
        has_others = tl.load(others_ptr + b * M + ks) > 0
        scale = tl.where(as_centre, tl.where(has_others, tl.load(blend_ptr + b * M + ks).to(ACC), 1.0), 0.0)
    dot = tl.zeros((BLOCK_C,), dtype=ACC)
    dot_centre = tl.zeros((BLOCK_C,), dtype=ACC)
    c0 = 0
    while c0 < C:  # not range(C): triton 3.6's interpreter hands C over as a numpy array
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        xv = tl.load(x_ptr + t * C + offs_c, mask=c_ok, other=0.0).to(ACC)
        g = tl.load(grad_ptr + (b * M + slot) * C + offs_c, mask=_both(c_ok, as_other), other=0.0) * coef
        mean = tl.load(mean_ptr + (b * M + slot) * C + offs_c, mask=_both(c_ok, as_other), other=0.0)
        gx = g * wj
        dot += g * (xv - mean)
        if BLEND:
            gc = tl.load(grad_ptr + (b * M + ks) * C + offs_c, mask=_both(c_ok, as_centre), other=0.0)
            mc = tl.load(mean_ptr + (b * M + ks) * C + offs_c, mask=_both(c_ok, as_centre), other=0.0)
            gx += scale * gc
            dot_centre += gc * (xv - mc)
        tl.store(grad_x_ptr + t * C + offs_c, gx.to(grad_x_ptr.dtype.element_ty), mask=c_ok)
        c0 += BLOCK_C
    gws = tl.load(gws_ptr + b * M + slot)
    gw = tl.where(member, gws + tl.where(as_other, tl.sum(dot, axis=0), 0.0), 0.0)
    tl.store(grad_w_ptr + t, gw)
    if BLEND:
        tl.store(grad_a_ptr + b * M + ks, tl.sum(dot_centre, axis=0), mask=_both(as_centre, has_others))


@_jit
def _clamp_num(
    num_ptr,
    idx,
    M,
    mask,
):
    """``clamp(num_clusters[idx], 0, M)`` as int64 (0 where masked)."""
    n = tl.load(num_ptr + idx, mask=mask, other=0).to(tl.int64)
    return tl.minimum(tl.maximum(n, 0), M)


@_jit
def _pack_clusters_kernel(
    labels_ptr,
    num_ptr,
    perm_ptr,
    cu_seqlens_ptr,
    cu_clusters_ptr,
    max_seqlen_ptr,
    B,
    N,
    M,
    M_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ATOMIC_MAX: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    zero = b * 0
    first = b == 0
    tl.store(cu_seqlens_ptr, 0, mask=first)
    tl.store(cu_clusters_ptr, 0, mask=first)
    # max_seqlen: program 0 counts every image, and so the packed total (deterministic and one launch,
    # see the module docstring), unless ATOMIC_MAX. A loop bound, not a branch around the loops, and
    # first: ptxas spilled the branch's predicate across the later loops
    longest = tl.sum(tl.zeros((M_PAD,), dtype=tl.int32), axis=0)
    packed_all = zero
    images = tl.where(first & (not ATOMIC_MAX), B, 0)
    if not ATOMIC_MAX:  # constexpr, not a 0-trip loop: triton 3.6's coalescing pass crashes on loads it proves dead
        i = 0
        while i < images:
            n_i = _clamp_num(num_ptr, i, M, True)
            hist = tl.zeros((M_PAD,), dtype=tl.int32)
            t0 = 0
            while t0 < N:
                t = t0 + tl.arange(0, BLOCK_T)
                lab = tl.load(labels_ptr + i * N + t, mask=t < N, other=-1).to(tl.int64)
                packed = (lab >= 0) & (lab < n_i)
                hist += tl.histogram(tl.where(packed, lab, 0).to(tl.int32), M_PAD, mask=packed)
                t0 += BLOCK_T
            longest = tl.maximum(longest, tl.max(hist, axis=0))
            packed_all += tl.sum(hist, axis=0)
            i += 1
        tl.store(max_seqlen_ptr, longest.to(tl.int64), mask=first)
    nb = _clamp_num(num_ptr, b, M, True)
    # live segments of the images before b, and of all images
    live_before, live_total = zero, zero
    i0 = 0
    while i0 < B:
        ii = i0 + tl.arange(0, BLOCK_F)
        n_i = _clamp_num(num_ptr, ii, M, ii < B)
        live_before += tl.sum(tl.where(ii < b, n_i, 0), axis=0)
        live_total += tl.sum(n_i, axis=0)
        i0 += BLOCK_F
    tl.store(cu_clusters_ptr + b + 1, (live_before + nb).to(tl.int32))
    # packed tokens of the images before b, and of all images: every label once more (but in program 0,
    # which has none before it and has counted them all, unless ATOMIC_MAX)
    packed_before, packed_total = zero, packed_all
    BN = B * N - images * N
    f0 = 0
    while f0 < BN:
        f = f0 + tl.arange(0, BLOCK_F)
        ok = f < BN
        img = f // N
        lab = tl.load(labels_ptr + f, mask=ok, other=-1).to(tl.int64)
        packed = (lab >= 0) & (lab < _clamp_num(num_ptr, img, M, ok))
        packed_before += tl.sum(tl.where(packed & (img < b), 1, 0), axis=0)
        packed_total += tl.sum(packed.to(tl.int64), axis=0)
        f0 += BLOCK_F
    # this image's segment lengths
    row = labels_ptr + b * N
    counts = tl.zeros((M_PAD,), dtype=tl.int32)
    t0 = 0
    while t0 < N:
        t = t0 + tl.arange(0, BLOCK_T)
        lab = tl.load(row + t, mask=t < N, other=-1).to(tl.int64)
        packed = (lab >= 0) & (lab < nb)
        counts += tl.histogram(tl.where(packed, lab, 0).to(tl.int32), M_PAD, mask=packed)
        t0 += BLOCK_T
    ends = tl.cumsum(counts, 0)
    if ATOMIC_MAX:  # into a zero-filled max_seqlen: the same maximum in any order
        tl.atomic_max(max_seqlen_ptr, tl.max(counts, axis=0).to(tl.int64))
    m = tl.arange(0, M_PAD)
    # live segments first (image order), then every image's empty trailing ones (length 0)
    tl.store(cu_seqlens_ptr + 1 + live_before + m, (packed_before + ends).to(tl.int32), mask=m < nb)
    dead = live_total + (b * M - live_before) + (m - nb)
    tl.store(cu_seqlens_ptr + 1 + dead, tl.zeros((M_PAD,), dtype=tl.int32) + packed_total.to(tl.int32),
             mask=(m >= nb) & (m < M))
    # each token's place: the cluster's start + tokens of its cluster already placed
    start = ends - counts
    unpacked_seen = b * N - packed_before  # unpacked tokens of the images before b
    t0 = 0
    while t0 < N:
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < N
        lab = tl.load(row + t, mask=ok, other=-1).to(tl.int64)
        packed = (lab >= 0) & (lab < nb)
        slot = tl.where(packed, lab, 0).to(tl.int32)
        # stable: equal labels at lower indices in this block come first
        earlier = (slot[:, None] == slot[None, :]) & packed[None, :] & (t[None, :] < t[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        at_packed = packed_before + tl.gather(start, slot, 0) + rank
        unpacked = (ok & ~packed).to(tl.int32)
        at_unpacked = packed_total + unpacked_seen + tl.cumsum(unpacked, 0) - unpacked
        tl.store(perm_ptr + tl.where(packed, at_packed, at_unpacked), b * N + t, mask=ok)
        start += tl.histogram(slot, M_PAD, mask=packed)
        unpacked_seen += tl.sum(unpacked, axis=0)
        t0 += BLOCK_T


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _prepare(x, labels, num_clusters, weight, centers, center_weight):
    acc = acc_dtype(x.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    c = None if centers is None else centers.long().contiguous()
    a = None if center_weight is None else center_weight.to(acc).contiguous()
    return x.contiguous(), labels.long().contiguous(), num_clusters.long().contiguous(), w, c, a


def _merge_clusters(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight):
    x, labels, num, w, c, a = _prepare(x, labels, num_clusters, weight, centers, center_weight)
    B, N, C = x.shape
    M = max_clusters
    acc = acc_dtype(x.dtype)
    tokens = torch.zeros(B, M, C, dtype=x.dtype, device=x.device)
    counts = torch.zeros(B, M, dtype=torch.int64, device=x.device)
    weight_sum = torch.zeros(B, M, dtype=acc, device=x.device)
    key_mask = torch.arange(M, device=x.device)[None, :] < num.clamp(0, M)[:, None]
    if B * M and C:
        _merge_slots_kernel[(B * M, triton.cdiv(C, _BLOCK_C))](
            x, labels, num, w, c, a, torch.full((1,), eps, dtype=acc, device=x.device), tokens, counts, weight_sum, None, None, None, None, N, M, C,
            HAS_W=w is not None, BLEND=a is not None, STATS=False, ACC=_acc(x), BLOCK_N=_BLOCK_N, BLOCK_C=_BLOCK_C,
            num_warps=_slot_warps(x),
        )
    return tokens, key_mask, counts, weight_sum


def _merge_clusters_backward(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers,
                             center_weight):
    x, labels, num, w, c, a = _prepare(x, labels, num_clusters, weight, centers, center_weight)
    B, N, C = x.shape
    M = grad_tokens.shape[1]
    acc = acc_dtype(x.dtype)
    dev = x.device
    grad = grad_tokens.to(acc).contiguous()
    gws = grad_weight_sum.to(acc).contiguous()
    mean = torch.zeros(B, M, C, dtype=acc, device=dev)
    coef = torch.zeros(B, M, dtype=acc, device=dev)
    others = torch.zeros(B, M, dtype=torch.int64, device=dev)
    centre_slot = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    grad_x = torch.empty_like(x)
    grad_w = torch.empty(B, N, dtype=acc, device=dev)
    grad_a = torch.zeros(B, M, dtype=acc, device=dev)
    if B * N and C:
        flags = dict(HAS_W=w is not None, BLEND=a is not None, ACC=_acc(x), BLOCK_C=_BLOCK_C)
        _merge_slots_kernel[(B * M, triton.cdiv(C, _BLOCK_C))](
            x, labels, num, w, c, a, torch.full((1,), eps, dtype=acc, device=dev), None, None, None, mean, coef, others, centre_slot, N, M, C,
            STATS=True, BLOCK_N=_BLOCK_N, num_warps=_slot_warps(x), **flags,
        )
        _merge_tokens_backward_kernel[(B * N,)](
            grad, gws, x, labels, num, w, c, a, mean, coef, others, centre_slot, grad_x, grad_w, grad_a, N, M, C,
            **flags,
        )
    w_dtype = x.dtype if weight is None else weight.dtype
    a_dtype = acc if center_weight is None else center_weight.dtype
    return grad_x, grad_w.to(w_dtype), grad_a.to(a_dtype)


def pack_histogram_ops(M: int) -> int:
    """Lane operations per label of ``tl.histogram`` over ``pow2(M, 16)`` bins (warp ballots: log2(bins)
    masks per bin a lane owns), plus the load and compares."""
    bins = pow2(M, 16)
    return max(bins // 32, 1) * (bins.bit_length() + 1) + 4


def pack_atomic_max(B: int, N: int, M: int) -> bool:
    """Whether ``max_seqlen`` takes the atomic path: program 0's pass would cost more than a fill launch."""
    return B * N * pack_histogram_ops(M) > PACK_MAX_LANE_OPS


def _pack_clusters(labels, num_clusters, max_clusters):
    labels, num = labels.contiguous(), num_clusters.contiguous()
    B, N = labels.shape
    M = max_clusters
    dev = labels.device
    perm = torch.empty(B * N, dtype=torch.int64, device=dev)
    cu_seqlens = torch.empty(B * M + 1, dtype=torch.int32, device=dev)
    cu_clusters = torch.empty(B + 1, dtype=torch.int32, device=dev)
    atomic = pack_atomic_max(B, N, M)
    max_seqlen = (torch.zeros if atomic or B == 0 else torch.empty)((), dtype=torch.int64, device=dev)
    if B == 0:  # no program to write them: the empty batch's one offset and its max are 0
        return perm, cu_seqlens.zero_(), cu_clusters.zero_(), max_seqlen
    _pack_clusters_kernel[(B,)](
        labels, num, perm, cu_seqlens, cu_clusters, max_seqlen, B, N, M,
        M_PAD=pow2(M, 16), BLOCK_T=_PACK_BLOCK_T, BLOCK_F=_PACK_BLOCK_F, ATOMIC_MAX=atomic, num_warps=8,
    )
    return perm, cu_seqlens, cu_clusters, max_seqlen


def _pack_check(call: CallInfo) -> Optional[str]:
    """The size rule of ``_pack_clusters_kernel`` (module docstring), after the device."""
    reason = device_reason(call)
    if reason:
        return reason
    B, N, M = (call.extra.get(key, 0) for key in ("B", "N", "M"))
    if M > PACK_MAX_M:
        return f"max_clusters = {M} is over {PACK_MAX_M}: one program holds an image's per-cluster counters in registers"
    if B * B * N > PACK_SCAN_LIMIT:
        return (f"B * B * N = {B * B * N} is over {PACK_SCAN_LIMIT}: each of the B programs re-reads all B * N labels "
                "for its offsets")
    return None


def _register() -> None:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for op, fn in (("merge_clusters", _merge_clusters), ("merge_clusters_backward", _merge_clusters_backward)):
        register(
            Impl(
                op=op, name="triton", fn=fn, devices=("cuda", "cpu"), dtypes=dtypes,
                auto_devices=("cuda",), available=lambda: MISSING, check=device_reason,
            )
        )
    register(
        Impl(
            op="pack_clusters", name="triton", fn=_pack_clusters, devices=("cuda", "cpu"),
            dtypes=(torch.int64, torch.int32), auto_devices=("cuda",), available=lambda: MISSING, check=_pack_check,
        )
    )


_register()
