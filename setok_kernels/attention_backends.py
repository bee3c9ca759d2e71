"""Third-party varlen attention kernels behind ``setok.varlen_attention``.

Each backend declares what it supports and says why it declines a call;
flash-attn and xformers are imported only when asked whether they are
available or when called, never at module load.

Auto order on CUDA (lower first). UNMEASURED ON GPU: an expectation from the
kernels' designs, to be replaced by benchmark numbers::

    regime                         order
    fp16/bf16, head_dim <= 256     flash_attn, torch (flash), triton, xformers, reference
    fp16/bf16, head_dim > 256      triton, torch (memory-efficient), xformers, reference
    fp32, any head_dim             triton, torch (memory-efficient), xformers, reference

(flash-attn's and torch's flash kernels are the fastest for the head dims they
have; beyond 256, or in fp32, only the chunked Triton kernel and the
memory-efficient kernels remain, and the Triton kernel packs short segments
into shared tiles). On CPU, auto picks "torch": torch's fused CPU
flash-attention kernel (forward and backward, both with lse; float64 too),
called once per padded length bucket of short segments and once per segment
for the others, the split measured per bucket (``_CPU_SEGMENT_CALL_MIN_ELEMENTS``);
the Triton interpreter must be forced.

Every backend returns the setok lse convention: ``(H, Tq)`` in the
accumulation dtype (float32; float64 for float64 inputs), natural log,
``-inf`` (and output 0) for a row without keys or outside every segment.
None of them has an lse-based backward entry point that is stable across
versions, so their backward Impls reuse the Triton backward kernels (the
reference math where Triton is missing): the same gradients from the same
``(out, lse)``, the gradient of the returned lse included.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch

from . import reference
from ._backends import CallInfo, Impl, register

_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


# ------------------------------------------------------------------ shared helpers


def _triton_backward():
    from . import triton_attention

    return None if triton_attention.triton is None else triton_attention.attention_backward


def lse_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """Gradients from ``(out, lse)`` in the setok convention: the Triton kernels on
    CUDA, else the reference. Shared by the backends below."""
    fn = _triton_backward() if q.is_cuda else None
    fn = fn or reference._varlen_attention_backward
    return fn(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)


def _trivial(q, k, cu_q):
    """Output of a call with nothing to attend, or None."""
    if q.shape[0] == 0 or k.shape[0] == 0 or cu_q.numel() < 2:
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=reference.acc_dtype(q.dtype), device=q.device)
        return torch.zeros_like(q), lse
    return None


def _row_segments(cu_q: torch.Tensor, Tq: int):
    """Per packed q row: its segment, its position in it, and whether it lies in one."""
    cu = cu_q.to(torch.int64)
    rows = torch.arange(Tq, device=cu.device)
    seg = torch.searchsorted(cu[1:], rows, right=True).clamp(max=cu.numel() - 2)
    inside = (rows >= cu[0]) & (rows < cu[-1])
    return seg, rows - cu[seg], inside


def _per_segment_lse(lse: torch.Tensor, cu_q: torch.Tensor, Tq: int) -> torch.Tensor:
    """``(S, H, L)`` lse padded per segment (memory-efficient kernels) -> ``(H, Tq)``."""
    seg, pos, _ = _row_segments(cu_q, Tq)
    return lse[seg, :, pos.clamp(0, max(lse.shape[-1] - 1, 0))].transpose(0, 1)


def _to_setok_convention(out, lse, cu_q):
    """Kernels leave rows outside every segment unwritten and mark rows without
    keys with lse +inf (flash) or -inf: make both output 0 and lse -inf."""
    lse = lse.to(reference.acc_dtype(out.dtype))
    _, _, inside = _row_segments(cu_q, out.shape[0])
    keyless = ~inside[None, :] | torch.isinf(lse)
    lse = lse.masked_fill(keyless, -math.inf)
    out = out.masked_fill(keyless.transpose(0, 1)[:, :, None], 0)
    return out, lse.contiguous()


def _int32(cu):
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)


def _head_dim_multiple_of_8(call: CallInfo) -> Optional[str]:
    D = call.extra.get("head_dim", 0)
    return None if D % 8 == 0 else f"head_dim {D} is not a multiple of 8 (kernel alignment)"


def _cuda_available() -> Optional[str]:
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    return None


# ------------------------------------------------------------------ flash-attn


def _flash_available() -> Optional[str]:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as exc:
        return f"flash-attn is not importable ({type(exc).__name__}: {exc})"
    return _cuda_available()


def _flash_check(call: CallInfo) -> Optional[str]:
    D = call.extra.get("head_dim", 0)
    if D > _FLASH_MAX_HEAD_DIM:
        return f"head_dim {D} > {_FLASH_MAX_HEAD_DIM} (flash-attn's largest)"
    return _head_dim_multiple_of_8(call)


def flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """``flash_attn_varlen_func``; its lse is ``(H, Tq)`` (older releases: per padded segment)."""
    from flash_attn import flash_attn_varlen_func

    trivial = _trivial(q, k, cu_q)
    if trivial is not None:
        return trivial
    cu_q32, cu_k32 = _int32(cu_q), _int32(cu_k)
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q32, cu_k32, max(max_q, 1), max(max_k, 1),
        dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    if lse.dim() == 3:
        lse = _per_segment_lse(lse, cu_q, q.shape[0])
    return _to_setok_convention(out, lse, cu_q)


# ------------------------------------------------------------------ torch


def _torch_varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` when it exists and takes ``scale`` and ``return_aux``."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn, AuxRequest) if "scale" in params and "return_aux" in params else None


def _cpu_flash():
    """torch's fused CPU attention kernel and its backward (both return / take lse)."""
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    # the overloads themselves: the packets' overload resolution costs microseconds per call
    return (fwd.default, bwd.default) if fwd is not None and bwd is not None else None


def _torch_available() -> Optional[str]:
    if _cpu_flash() is None and not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CPU flash-attention kernel and no CUDA device"
    return None


def _torch_check(call: CallInfo) -> Optional[str]:
    if call.device.type == "cpu":
        return None if _cpu_flash() is not None else f"torch {torch.__version__} has no CPU flash-attention kernel"
    if call.dtype == torch.float64:
        return "float64 runs on the CPU only (torch's CUDA attention kernels take 16-bit and float32)"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    return _head_dim_multiple_of_8(call)


def torch_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """torch's flash kernel (``varlen_attn``) for fp16/bf16 with head_dim <= 256,
    else its memory-efficient kernel, which takes varlen offsets too but lays
    lse out as ``(S, H, max_seqlen_q)``: pass the true ``max_seqlen_q``."""
    trivial = _trivial(q, k, cu_q)
    if trivial is not None:
        return trivial
    if q.device.type == "cpu":
        return _cpu_forward(q, k, v, cu_q, cu_k, scale)
    cu_q32, cu_k32 = _int32(cu_q), _int32(cu_k)
    flash = _torch_varlen_attn()
    Tq, H, D = q.shape
    if flash is not None and q.dtype in _HALF and D <= _FLASH_MAX_HEAD_DIM:
        varlen_attn, AuxRequest = flash
        out, lse = varlen_attn(q, k, v, cu_q32, cu_k32, max(max_q, 1), max(max_k, 1), return_aux=AuxRequest(lse=True), scale=scale)
        if lse.shape != (H, Tq):  # documented as (Tq, H) in some releases
            lse = lse.transpose(0, 1)
    else:
        out, lse = torch.ops.aten._efficient_attention_forward(
            q[None], k[None], v[None], None, cu_q32, cu_k32, max(max_q, 1), max(max_k, 1), 0.0, 0, True, scale=scale
        )[:2]
        out, lse = out[0], _per_segment_lse(lse, cu_q, Tq)
    return _to_setok_convention(out, lse, cu_q)


# Strategy per length bucket on the CPU, measured (thread CPU time, one thread,
# float32, torch 2.13; G segments of equal length L, G * L = 1024): one fused
# call per bucket costs 3.9 / 14.5 / 33 / 54 / 108 us per segment at D = 128
# and L = 1 / 4 / 8 / 16 / 32, one fused call per segment 27 / 31 / 36 / 40 /
# 59 us (D = 32, L = 1 / 4 / 16 / 32 / 48: bucket 1.7 / 6.8 / 20 / 42 / 70,
# segment 26 / 33 / 36 / 45 / 61). A bucket gathers its rows, applies an
# additive key mask and scatters the output; a segment call pays ~25 us of
# dispatch and reads views. Break-even is at a padded width W with W * D about
# 1024 (D = 128: W = 8; D = 32: W = 32) at large G; with fewer than 8 segments
# the bucket's set-up (about ten small ops) outweighs what it saves.
_CPU_SEGMENT_CALL_MIN_ELEMENTS = 1024
_CPU_BUCKET_MIN_SEGMENTS = 8


def _bucket_width(n: int) -> int:
    """``reference._bucket_width`` on a host int."""
    p = 1 << max(n - 1, 0).bit_length()
    return p if p <= 16 else -(-n // (p // 4)) * (p // 4)


def _cpu_plan(q, cu_q, cu_k):
    """The reference's length buckets, split by the rule above: ``(padded, single)``,
    padded groups ``(qi, q_real, ki, k_real, bias)`` (row indices padded to the
    bucket's widths and an additive key mask, -inf on padded keys) and single
    segments as host ``(q_begin, q_end, k_begin, k_end)``. Segments without
    queries or keys are in neither (their rows stay 0). Planned on host lists:
    with tens of segments, tensor ops would cost more than the plan."""
    min_rows = _CPU_SEGMENT_CALL_MIN_ELEMENTS / q.shape[-1]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    single, groups = [], {}
    for s, (a, b, c, d) in enumerate(zip(cq, cq[1:], ck, ck[1:])):
        if b <= a or d <= c:
            continue
        if max(b - a, d - c) >= min_rows:  # a bucket's width is at least the length
            single.append((a, b, c, d))
            continue
        wq, wk = _bucket_width(b - a), _bucket_width(d - c)
        if max(wq, wk) >= min_rows:
            single.append((a, b, c, d))
        else:
            groups.setdefault((wq, wk), []).append(s)
    padded = []
    for (wq, wk), segs in groups.items():
        if len(segs) < _CPU_BUCKET_MIN_SEGMENTS:
            single += [(cq[s], cq[s + 1], ck[s], ck[s + 1]) for s in segs]
            continue
        if not padded:
            cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
            lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        segs = torch.tensor(segs, device=cu_q.device)
        qi, q_real = reference._padded_rows(cu_q[segs], lq[segs], wq)
        ki, k_real = reference._padded_rows(cu_k[segs], lk[segs], wk)
        bias = torch.zeros(k_real.shape, dtype=q.dtype, device=q.device).masked_fill(~k_real, -math.inf)
        padded.append((qi, q_real, ki, k_real, bias[:, None, None, :]))
    return padded, sorted(single)


def _filled_outside(buf, ranges, value):
    """``buf`` (rows along dim 0) set to ``value`` outside the sorted, disjoint row
    ``ranges`` (which the caller writes): no fill of rows about to be overwritten."""
    prev = 0
    for a, b in ranges:
        if a > prev:
            buf[prev:a] = value
        prev = b
    buf[prev:] = value
    return buf


def _heads_first(x, rows):
    return x[rows].transpose(1, 2)  # (G, w, H, D) -> (G, H, w, D)


def _heads_view(x):
    """(T, H, D) -> (1, H, T, D), a view (a segment is then one narrow()); the fused
    kernel reads rows with a unit last stride."""
    return (x if x.stride(-1) == 1 else x.contiguous()).transpose(0, 1)[None]


def _cpu_forward(q, k, v, cu_q, cu_k, scale):
    """torch's fused CPU flash kernel per length bucket or per segment (a host read of the lengths)."""
    fwd, _ = _cpu_flash()
    Tq, H, D = q.shape
    padded, single = _cpu_plan(q, cu_q, cu_k)
    rows = [(a, b) for a, b, _, _ in single]
    out = _filled_outside(q.new_empty(Tq + 1, H, D), rows, 0)  # row Tq: scratch for padded positions
    lse = torch.empty((H, Tq + 1), dtype=reference.acc_dtype(q.dtype), device=q.device)
    _filled_outside(lse.t(), rows, -math.inf)
    for qi, q_real, ki, _, bias in padded:
        o, l = fwd(_heads_first(q, qi), _heads_first(k, ki), _heads_first(v, ki), 0.0, False, attn_mask=bias, scale=scale)
        dst = torch.where(q_real, qi, Tq)
        out.index_put_((dst,), o.transpose(1, 2))
        lse[:, dst] = l.transpose(0, 1).to(lse.dtype)
    # Python calls per segment are a visible share of a ~30 us segment call: views made once
    qh, kh, vh, oh, lh = _heads_view(q), _heads_view(k), _heads_view(v), _heads_view(out), lse[None]
    for a, b, c, d in single:
        # written at once: holding every segment's output until the end is slower (allocator)
        o, l = fwd(qh.narrow(2, a, b - a), kh.narrow(2, c, d - c), vh.narrow(2, c, d - c), 0.0, False, scale=scale)
        oh[:, :, a:b] = o
        lh[:, :, a:b] = l
    return out[:Tq], lse[:, :Tq].contiguous()


def _with_lse_gradient(dout, dlse, q, k, v, out):
    """Inputs on which the fused backward (``dS = P * (dP - rowsum(dO * O))``) also
    applies the lse gradient (``+ P * dlse``): one more head-dim column, 0 in q and
    k (scores unchanged), 1 in v with ``dlse`` in dO (``dP += dlse``), 0 in O
    (rowsum unchanged). The extra gradient columns are dropped."""
    def widen(t, col):
        return torch.cat([t, col.to(t.dtype).expand(*t.shape[:-1], 1)], -1)

    zero, one = q.new_zeros(()), q.new_ones(())
    return widen(dout, dlse.t()[..., None]), widen(q, zero), widen(k, zero), widen(v, one), widen(out, zero)


def _cpu_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, scale):
    """The fused CPU kernel's backward with the forward's plan; padded query rows carry no gradient."""
    _, bwd = _cpu_flash()
    D = q.shape[-1]
    padded, single = _cpu_plan(q, cu_q, cu_k)
    if dlse is not None:
        dout, q, k, v, out = _with_lse_gradient(dout, dlse, q, k, v, out)
    Tq, Tk = q.shape[0], k.shape[0]
    q_rows, k_rows = [(a, b) for a, b, _, _ in single], [(c, d) for _, _, c, d in single]
    dq = _filled_outside(q.new_empty(Tq + 1, *q.shape[1:]), q_rows, 0)
    dk = _filled_outside(k.new_empty(Tk + 1, *k.shape[1:]), k_rows, 0)
    dv = _filled_outside(v.new_empty(Tk + 1, *v.shape[1:]), k_rows, 0)
    lse_rows = lse.t()
    for qi, q_real, ki, k_real, bias in padded:
        g = _heads_first(dout, qi) * q_real[:, None, :, None]
        lse_g = lse_rows[qi].transpose(1, 2).contiguous()
        gq, gk, gv = bwd(g, _heads_first(q, qi), _heads_first(k, ki), _heads_first(v, ki), _heads_first(out, qi),
                         lse_g, 0.0, False, attn_mask=bias, scale=scale)
        dq.index_put_((torch.where(q_real, qi, Tq),), gq.transpose(1, 2))
        k_dst = (torch.where(k_real, ki, Tk),)
        dk.index_put_(k_dst, gk.transpose(1, 2))
        dv.index_put_(k_dst, gv.transpose(1, 2))
    views = [_heads_view(t) for t in (dout, q, k, v, out, dq, dk, dv)]
    gh, qh, kh, vh, oh, dqh, dkh, dvh = views
    lh = lse[None]
    for a, b, c, d in single:
        gq, gk, gv = bwd(gh.narrow(2, a, b - a), qh.narrow(2, a, b - a), kh.narrow(2, c, d - c), vh.narrow(2, c, d - c),
                         oh.narrow(2, a, b - a), lh[:, :, a:b].contiguous(), 0.0, False, scale=scale)
        dqh[:, :, a:b], dkh[:, :, c:d], dvh[:, :, c:d] = gq, gk, gv
    return dq[:Tq, :, :D], dk[:Tk, :, :D], dv[:Tk, :, :D]


def torch_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """CPU: the fused kernel's own backward; CUDA: the shared lse-based backward."""
    if q.device.type == "cpu" and q.shape[0] > 0 and k.shape[0] > 0 and cu_q.numel() >= 2:
        return _cpu_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, scale)
    return lse_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)


# ------------------------------------------------------------------ xformers


def _xformers_available() -> Optional[str]:
    try:
        from xformers.ops import fmha  # noqa: F401
    except Exception as exc:
        return f"xformers is not importable ({type(exc).__name__}: {exc})"
    return _cuda_available()


def xformers_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """xformers' memory-efficient attention with a ``BlockDiagonalMask``.

    The mask is built from Python lists of lengths: this backend READS
    ``cu_seqlens`` ON THE HOST (a sync; not CUDA-graph capturable). Segments
    with no queries or no keys are left out of the mask (their rows get 0).
    """
    from xformers.ops import fmha

    trivial = _trivial(q, k, cu_q)
    if trivial is not None:
        return trivial
    lq = (cu_q[1:] - cu_q[:-1]).tolist()
    lk = (cu_k[1:] - cu_k[:-1]).tolist()
    starts_q, starts_k = cu_q[:-1].tolist(), cu_k[:-1].tolist()
    live = [s for s in range(len(lq)) if lq[s] > 0 and lk[s] > 0]
    Tq, H, D = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((H, Tq), -math.inf, dtype=torch.float32, device=q.device)
    if not live:
        return out, lse
    rows_q = torch.cat([torch.arange(starts_q[s], starts_q[s] + lq[s]) for s in live]).to(q.device)
    rows_k = torch.cat([torch.arange(starts_k[s], starts_k[s] + lk[s]) for s in live]).to(q.device)
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([lq[s] for s in live], [lk[s] for s in live])
    o, l = fmha.memory_efficient_attention_forward_requires_grad(
        q[rows_q][None], k[rows_k][None], v[rows_k][None], attn_bias=bias, scale=scale
    )
    out[rows_q] = o[0]
    lse[:, rows_q] = l.reshape(H, -1)[:, : rows_q.numel()].float()
    return out, lse


# ------------------------------------------------------------------ registration


def _register() -> None:
    all_dtypes = _HALF + (torch.float32,)
    table = (
        # name, forward, backward, priority, devices, dtypes, available, check
        ("flash_attn", flash_attn_forward, lse_backward, 10, ("cuda",), _HALF, _flash_available, _flash_check),
        ("torch", torch_forward, torch_backward, 20, ("cuda", "cpu"), all_dtypes + (torch.float64,), _torch_available, _torch_check),
        ("xformers", xformers_forward, lse_backward, 40, ("cuda",), all_dtypes, _xformers_available, _head_dim_multiple_of_8),
    )
    for name, forward, backward, priority, devices, dtypes, available, check in table:
        for op, fn in (("varlen_attention", forward), ("varlen_attention_backward", backward)):
            register(Impl(op=op, name=name, fn=fn, priority=priority, devices=devices, dtypes=dtypes, available=available, check=check))


_register()
