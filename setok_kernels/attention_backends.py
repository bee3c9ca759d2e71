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
into shared tiles). On CPU, auto picks the reference; the Triton interpreter
must be forced.

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


def _torch_available() -> Optional[str]:
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is built without CUDA (its varlen kernels are CUDA-only)"
    return _cuda_available()


def torch_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """torch's flash kernel (``varlen_attn``) for fp16/bf16 with head_dim <= 256,
    else its memory-efficient kernel, which takes varlen offsets too but lays
    lse out as ``(S, H, max_seqlen_q)``: pass the true ``max_seqlen_q``."""
    trivial = _trivial(q, k, cu_q)
    if trivial is not None:
        return trivial
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
        # name, forward, priority, dtypes, available, check
        ("flash_attn", flash_attn_forward, 10, _HALF, _flash_available, _flash_check),
        ("torch", torch_forward, 20, all_dtypes, _torch_available, _head_dim_multiple_of_8),
        ("xformers", xformers_forward, 40, all_dtypes, _xformers_available, _head_dim_multiple_of_8),
    )
    for name, forward, priority, dtypes, available, check in table:
        for op, fn in (("varlen_attention", forward), ("varlen_attention_backward", lse_backward)):
            register(
                Impl(op=op, name=name, fn=fn, priority=priority, devices=("cuda",), dtypes=dtypes, available=available, check=check)
            )


_register()
