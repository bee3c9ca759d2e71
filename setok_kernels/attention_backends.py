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
flash-attention kernel (forward and backward, both with lse) over the
reference's length buckets (measured, benchmarks/RESULTS.md, B=4, N=576 in
power-law segments: 3.02 ms vs the reference's 4.78 ms at H=4, D=32; 4.47 ms vs
6.23 ms at H=2, D=128); the Triton interpreter must be forced.

Every backend returns the setok lse convention: ``(H, Tq)`` float32, natural
log, ``-inf`` (and output 0) for a row without keys or outside every segment.
None of them has an lse-based backward entry point that is stable across
versions, so their backward Impls reuse the Triton backward kernels (the
reference math where Triton is missing): the same gradients from the same
``(out, lse)``.
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


def lse_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """Gradients from ``(out, lse)`` in the setok convention: the Triton kernels on
    CUDA, else the reference. Shared by the backends below."""
    fn = _triton_backward() if q.is_cuda else None
    fn = fn or reference._varlen_attention_backward
    return fn(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)


def _trivial(q, k, cu_q):
    """Output of a call with nothing to attend, or None."""
    if q.shape[0] == 0 or k.shape[0] == 0 or cu_q.numel() < 2:
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
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
    lse = lse.float()
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
    return (fwd, bwd) if fwd is not None and bwd is not None else None


def _torch_available() -> Optional[str]:
    if _cpu_flash() is None and not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CPU flash-attention kernel and no CUDA device"
    return None


def _torch_check(call: CallInfo) -> Optional[str]:
    if call.device.type == "cpu":
        return None if _cpu_flash() is not None else f"torch {torch.__version__} has no CPU flash-attention kernel"
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


def _cpu_groups(q, k, cu_q, cu_k, scale_dtype):
    """The reference's power-of-two length buckets, with each group's padded row
    indices and an additive key mask (-inf on padded keys)."""
    lq, lk, groups = reference._attention_buckets(cu_q, cu_k)
    cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
    for segs, wq, wk in groups:
        qi, q_real = reference._padded_rows(cu_q[segs], lq[segs], wq)
        ki, k_real = reference._padded_rows(cu_k[segs], lk[segs], wk)
        bias = torch.zeros(k_real.shape, dtype=scale_dtype, device=q.device).masked_fill(~k_real, -math.inf)
        yield qi, q_real, ki, k_real, bias[:, None, None, :]


def _heads_first(x, rows):
    return x[rows].transpose(1, 2)  # (G, w, H, D) -> (G, H, w, D)


def _cpu_forward(q, k, v, cu_q, cu_k, scale):
    """torch's fused CPU flash kernel, one call per length bucket (a host read of the lengths)."""
    fwd, _ = _cpu_flash()
    Tq, H, D = q.shape
    out = q.new_zeros(Tq + 1, H, D)  # row Tq: scratch for padded positions
    lse = torch.full((Tq + 1, H), -math.inf, dtype=torch.float32, device=q.device)
    for qi, q_real, ki, _, bias in _cpu_groups(q, k, cu_q, cu_k, q.dtype):
        o, l = fwd(_heads_first(q, qi), _heads_first(k, ki), _heads_first(v, ki), 0.0, False, attn_mask=bias, scale=scale)
        dst = (torch.where(q_real, qi, Tq),)
        out.index_put_(dst, o.transpose(1, 2))
        lse.index_put_(dst, l.transpose(1, 2).float())
    return out[:Tq], lse[:Tq].t().contiguous()


def _cpu_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale):
    """The fused CPU kernel's backward per bucket; padded query rows carry no gradient."""
    _, bwd = _cpu_flash()
    Tq, Tk = q.shape[0], k.shape[0]
    dq, dk, dv = q.new_zeros(Tq + 1, *q.shape[1:]), k.new_zeros(Tk + 1, *k.shape[1:]), v.new_zeros(Tk + 1, *v.shape[1:])
    lse_rows = lse.t()
    for qi, q_real, ki, k_real, bias in _cpu_groups(q, k, cu_q, cu_k, q.dtype):
        g = _heads_first(dout, qi) * q_real[:, None, :, None]
        lse_g = lse_rows[qi].transpose(1, 2).contiguous()
        gq, gk, gv = bwd(g, _heads_first(q, qi), _heads_first(k, ki), _heads_first(v, ki), _heads_first(out, qi),
                         lse_g, 0.0, False, attn_mask=bias, scale=scale)
        dq.index_put_((torch.where(q_real, qi, Tq),), gq.transpose(1, 2))
        k_dst = (torch.where(k_real, ki, Tk),)
        dk.index_put_(k_dst, gk.transpose(1, 2))
        dv.index_put_(k_dst, gv.transpose(1, 2))
    return dq[:Tq], dk[:Tk], dv[:Tk]


def torch_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """CPU: the fused kernel's own backward; CUDA: the shared lse-based backward."""
    if q.device.type == "cpu" and q.shape[0] > 0 and k.shape[0] > 0 and cu_q.numel() >= 2:
        return _cpu_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale)
    return lse_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)


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
        ("torch", torch_forward, torch_backward, 20, ("cuda", "cpu"), all_dtypes, _torch_available, _torch_check),
        ("xformers", xformers_forward, lse_backward, 40, ("cuda",), all_dtypes, _xformers_available, _head_dim_multiple_of_8),
    )
    for name, forward, backward, priority, devices, dtypes, available, check in table:
        for op, fn in (("varlen_attention", forward), ("varlen_attention_backward", backward)):
            register(Impl(op=op, name=name, fn=fn, priority=priority, devices=devices, dtypes=dtypes, available=available, check=check))


_register()
