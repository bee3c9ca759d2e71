"""Triton ``merge_clusters`` and its backward (the ``triton`` backend of those ops).

Same kernels as the native CUDA ones (csrc/cuda/bookkeeping.cu), tiled:

- ``_merge_slots_kernel``, one program per (slot, channel tile): walks the
  image's labels in tiles of ``BLOCK_N`` tokens and sums its members' ``w x``
  (the forward writes the merged token; the backward's first pass writes the
  accumulation-precision mean of the non-centre members, the per-slot
  coefficient ``c_l`` and each centre's slot);
- ``_merge_tokens_backward_kernel``, one program per token: its gradient as
  a non-centre member and as a centre (see ``reference._merge_clusters_backward``).

Every output element is written by one program, in a fixed order: no
atomics, deterministic, no host sync. On CPU tensors it runs in Triton's
interpreter (``TRITON_INTERPRET=1``), for tests.
"""

from __future__ import annotations


import torch

from ._backends import Impl, register
from .reference import acc_dtype
from ._triton import MISSING, device_reason, tl, triton
from ._triton import jit as _jit

_BLOCK_N = 32
_BLOCK_C = 128


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


def _register() -> None:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for op, fn in (("merge_clusters", _merge_clusters), ("merge_clusters_backward", _merge_clusters_backward)):
        register(
            Impl(
                op=op, name="triton", fn=fn, devices=("cuda", "cpu"), dtypes=dtypes,
                auto_devices=("cuda",), available=lambda: MISSING, check=device_reason,
            )
        )


_register()
