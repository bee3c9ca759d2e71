"""Triton varlen attention for many short ragged segments, head dims up to 2048.

Tiling: packed tiles with an in-tile block-diagonal mask
---------------------------------------------------------
SeTok attends inside clusters of a few to a few hundred tokens. A kernel that
gives every segment its own 64-128-row q tile (flash-attn's varlen grid:
``segments x cdiv(max_seqlen, BLOCK)``) spends a whole tile on a 3-token
cluster. Here a program owns ``BLOCK_M`` *consecutive packed rows* whatever
segments they belong to. Each row looks up its segment by binary search on
``cu_seqlens`` (on device, in the kernel), which gives its key range
``[kb, ke)``; the program walks the union of its rows' key ranges in
``BLOCK_N`` blocks and masks every (row, key) pair outside the row's own range,
so one tile serves many short segments (a block-diagonal mask) and a long
segment is tiled as usual. The grid is ``(cdiv(Tq, BLOCK_M), H)``: sized from
shapes only, with no host sync, no per-call table, and no dependence on
``max_seqlen_*`` (a loose static bound costs nothing). We chose this over a
flattened (segment, q-block) table, which still pads each short segment to a
tile, and over length buckets, which read lengths on the host. The cost: a
tile that straddles two long segments walks both key ranges; and in
cross-attention, segments with keys but no queries that lie between a tile's
first and last segment are walked (masked) too.

Large head dims: chunked D, accumulators in an fp32 workspace
---------------------------------------------------------------
A (BLOCK_M, 2048) fp32 accumulator does not fit in registers. Scores are
accumulated over ``BLOCK_D`` chunks of the head dim (``q_c @ k_c^T``), then
``P @ v_c`` is formed per chunk. The running sum of the chunks of earlier key
blocks lives in global memory (the fp32 output when the input is fp32, else an
fp32 workspace), rescaled on the fly: the first key block of a tile writes it
without reading, the last writes the normalised output directly. For short
segments a tile usually has one or two key blocks, so the workspace is rarely
touched and q, k, v are read about once. The backward uses the same scheme for
dq (one kernel over q tiles) and dk, dv (one kernel over key tiles, which walks
the union of its keys' query ranges), with no atomics: deterministic.

Conventions (ops.py): ``lse (H, Tq)`` float32, natural log, ``-inf`` for a row
without keys (output 0, zero gradients). Inputs fp16, bf16, fp32; fp32
accumulation; fp32 matmuls in IEEE precision (no TF32).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._backends import CallInfo, Impl, register

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # triton is optional: register with the reason instead
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

__all__ = ["attention_forward", "attention_backward", "block_sizes"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


NUM_WARPS = 8


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D); tl.dot needs every dim >= 16. Speed is
    unmeasured on GPU; chosen so that ptxas (sm_90, Triton 3.9, NUM_WARPS=8)
    reports no register spills in the forward and dq kernels and at most
    56 bytes (fp32) / 384 bytes (16-bit) in the dk/dv kernel. A 128-wide
    head-dim chunk spills kilobytes."""
    block_d = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(head_dim)))
    return 32, 64, block_d


if triton is not None:
    _LOG2E_T = tl.constexpr(_LOG2E)

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """fp32-accumulating a @ b. Triton's CPU interpreter multiplies bfloat16
        operands wrongly (3.9), so there they are widened first: the products of
        bf16 values are exact in fp32, as on tensor cores."""
        if PRECISION == "bf16-interpreter":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _segment_of(cu_ptr, rows, S, search_steps):
        """Per row, the s in [0, S] with cu[s] <= row < cu[s + 1] (S past the end), by binary search."""
        lo = tl.zeros_like(rows)
        hi = tl.zeros_like(rows) + S
        for _ in range(search_steps):
            active = lo < hi
            mid = (lo + hi) // 2
            upper = tl.load(cu_ptr + mid + 1, mask=active, other=0).to(tl.int32)
            right = active & (upper <= rows)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        return lo

    @triton.jit
    def _partner_range(cu_own, cu_other, rows, n_own, n_other, S, search_steps):
        """For each row of one side (q or k), the row range ``[begin, end)`` of the
        other side in its segment; empty for rows outside every segment. Clamped
        to the tensors, so malformed offsets (validation off) stay in bounds."""
        seg = _segment_of(cu_own, rows, S, search_steps)
        inside = (rows < n_own) & (seg < S)
        seg = tl.where(inside, seg, 0)
        inside = inside & (tl.load(cu_own + seg, mask=inside, other=0).to(tl.int32) <= rows)
        begin = tl.load(cu_other + seg, mask=inside, other=0).to(tl.int32)
        end = tl.load(cu_other + seg + 1, mask=inside, other=0).to(tl.int32)
        begin = tl.minimum(tl.maximum(begin, 0), n_other)
        end = tl.minimum(tl.maximum(end, begin), n_other)
        return tl.where(inside, begin, 0), tl.where(inside, end, 0)

    @triton.jit
    def _tile_span(begin, end, n_other, BLOCK: tl.constexpr):
        """Start and block count of the union of the rows' partner ranges."""
        lo = tl.min(tl.where(end > begin, begin, n_other), axis=0)
        hi = tl.max(end, axis=0)
        return lo, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK)

    @triton.jit
    def _accumulate(part, carry, ws_ptrs, out_ptrs, mask, block, n_blocks, out_scale):
        """Adds the running sum of earlier blocks (fp32 workspace, times ``carry``) to
        this block's ``part``; the last block writes ``out_scale * sum`` as output."""
        if block > 0:
            part += carry * tl.load(ws_ptrs, mask=mask, other=0.0)
        if block == n_blocks - 1:
            tl.store(out_ptrs, (part * out_scale).to(out_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptrs, part, mask=mask)

    @triton.jit
    def _zero_rows(ptr, rows, stride_t, D, BLOCK_D: tl.constexpr):
        dims = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            zero = tl.zeros((rows.shape[0], BLOCK_D), dtype=ptr.dtype.element_ty)
            tl.store(ptr + rows[:, None].to(tl.int64) * stride_t + d[None, :], zero, mask=(rows[:, None] >= 0) & (d[None, :] < D))

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Out, Ws, Lse, CuQ, CuK,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_wt, stride_wh,
        Tq, Tk, S, D, search_steps, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        kb, ke = _partner_range(CuQ, CuK, rows, Tq, Tk, S, search_steps)
        k_lo, n_blocks = _tile_span(kb, ke, Tk, BLOCK_N)

        rows64 = rows.to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        q_rows = Q + rows64 * stride_qt + h * stride_qh
        o_rows = Out + rows64 * stride_ot + h * stride_oh
        w_rows = Ws + rows64 * stride_wt + h * stride_wh
        # running max and sum in base 2 (scores pre-multiplied by log2(e))
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        for blk in range(0, n_blocks):
            cols = k_lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < Tk
            cols64 = cols.to(tl.int64)
            k_rows = K + cols64 * stride_kt + h * stride_kh
            v_rows = V + cols64 * stride_vt + h * stride_vh
            s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d[None, :] < D
                qc = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                kc = tl.load(k_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                s += _dot(qc, tl.trans(kc), PRECISION)
            own = (cols[None, :] >= kb[:, None]) & (cols[None, :] < ke[:, None])
            s = tl.where(own, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
            carry = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l = l * carry + tl.sum(p, axis=1)
            m = m_new
            inv_l = 1.0 / tl.where(l > 0, l, 1.0)  # rows without keys have a zero sum
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d[None, :] < D
                vc = tl.load(v_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                part = _dot(p.to(vc.dtype), vc, PRECISION)
                _accumulate(part, carry[:, None], w_rows[:, None] + d[None, :], o_rows[:, None] + d[None, :], row_ok[:, None] & d_ok, blk, n_blocks, inv_l[:, None])
        if n_blocks == 0:
            _zero_rows(Out + h * stride_oh, tl.where(row_ok, rows, -1), stride_ot, D, BLOCK_D)
        lse = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) / _LOG2E_T, float("-inf"))
        tl.store(Lse + h * Tq + rows, lse, mask=row_ok)

    @triton.jit
    def _bwd_preprocess_kernel(
        Out, DOut, Delta, stride_ot, stride_oh, stride_dt, stride_dh, Tq, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] (fp32)."""
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_M,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            mask = (rows[:, None] < Tq) & (d[None, :] < D)
            o = tl.load(Out + rows64[:, None] * stride_ot + h * stride_oh + d[None, :], mask=mask, other=0.0)
            do = tl.load(DOut + rows64[:, None] * stride_dt + h * stride_dh + d[None, :], mask=mask, other=0.0)
            acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(Delta + h * Tq + rows, acc, mask=rows < Tq)

    @triton.jit
    def _row_stats(Lse, Delta, h, rows, Tq):
        """Per query row: lse in base 2 (0 for rows without keys: they match no key) and delta."""
        ok = rows < Tq
        lse = tl.load(Lse + h * Tq + rows, mask=ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E_T)
        delta = tl.load(Delta + h * Tq + rows, mask=ok, other=0.0)
        return lse2, delta

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DOut, DQ, Ws, Lse, Delta, CuQ, CuK,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_gt, stride_gh, stride_wt, stride_wh,
        Tq, Tk, S, D, search_steps, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        kb, ke = _partner_range(CuQ, CuK, rows, Tq, Tk, S, search_steps)
        k_lo, n_blocks = _tile_span(kb, ke, Tk, BLOCK_N)
        lse2, delta = _row_stats(Lse, Delta, h, rows, Tq)

        rows64 = rows.to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        q_rows = Q + rows64 * stride_qt + h * stride_qh
        do_rows = DOut + rows64 * stride_dt + h * stride_dh
        g_rows = DQ + rows64 * stride_gt + h * stride_gh
        w_rows = Ws + rows64 * stride_wt + h * stride_wh
        for blk in range(0, n_blocks):
            cols = k_lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < Tk
            cols64 = cols.to(tl.int64)
            k_rows = K + cols64 * stride_kt + h * stride_kh
            v_rows = V + cols64 * stride_vt + h * stride_vh
            s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d[None, :] < D
                qc = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                doc = tl.load(do_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                kc = tl.load(k_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                vc = tl.load(v_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                s += _dot(qc, tl.trans(kc), PRECISION)
                dp += _dot(doc, tl.trans(vc), PRECISION)
            own = (cols[None, :] >= kb[:, None]) & (cols[None, :] < ke[:, None])
            p = tl.where(own, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            ds = p * (dp - delta[:, None]) * scale
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d[None, :] < D
                kc = tl.load(k_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                part = _dot(ds.to(kc.dtype), kc, PRECISION)
                _accumulate(part, 1.0, w_rows[:, None] + d[None, :], g_rows[:, None] + d[None, :], row_ok[:, None] & d_ok, blk, n_blocks, 1.0)
        if n_blocks == 0:
            _zero_rows(DQ + h * stride_gh, tl.where(row_ok, rows, -1), stride_gt, D, BLOCK_D)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DOut, DK, DV, WsK, WsV, Lse, Delta, CuQ, CuK,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_gkt, stride_gkh, stride_gvt, stride_gvh, stride_wt, stride_wh,
        Tq, Tk, S, D, search_steps, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One program per BLOCK_N keys: walks the union of their segments' query rows."""
        h = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        qb, qe = _partner_range(CuK, CuQ, cols, Tk, Tq, S, search_steps)
        q_lo, n_blocks = _tile_span(qb, qe, Tq, BLOCK_M)

        cols64 = cols.to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        k_rows = K + cols64 * stride_kt + h * stride_kh
        v_rows = V + cols64 * stride_vt + h * stride_vh
        gk_rows = DK + cols64 * stride_gkt + h * stride_gkh
        gv_rows = DV + cols64 * stride_gvt + h * stride_gvh
        wk_rows = WsK + cols64 * stride_wt + h * stride_wh
        wv_rows = WsV + cols64 * stride_wt + h * stride_wh
        for blk in range(0, n_blocks):
            rows = q_lo + blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < Tq
            rows64 = rows.to(tl.int64)
            q_rows = Q + rows64 * stride_qt + h * stride_qh
            do_rows = DOut + rows64 * stride_dt + h * stride_dh
            lse2, delta = _row_stats(Lse, Delta, h, rows, Tq)
            # transposed scores: (keys, queries)
            st = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            dpt = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d[None, :] < D
                qc = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                doc = tl.load(do_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                kc = tl.load(k_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                vc = tl.load(v_rows[:, None] + d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                st += _dot(kc, tl.trans(qc), PRECISION)
                dpt += _dot(vc, tl.trans(doc), PRECISION)
            own = (rows[None, :] >= qb[:, None]) & (rows[None, :] < qe[:, None])
            pt = tl.where(own, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :]) * scale
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d[None, :] < D
                qc = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                doc = tl.load(do_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                mask = col_ok[:, None] & d_ok
                dv_part = _dot(pt.to(doc.dtype), doc, PRECISION)
                _accumulate(dv_part, 1.0, wv_rows[:, None] + d[None, :], gv_rows[:, None] + d[None, :], mask, blk, n_blocks, 1.0)
                dk_part = _dot(dst.to(qc.dtype), qc, PRECISION)
                _accumulate(dk_part, 1.0, wk_rows[:, None] + d[None, :], gk_rows[:, None] + d[None, :], mask, blk, n_blocks, 1.0)
        if n_blocks == 0:
            keep = tl.where(col_ok, cols, -1)
            _zero_rows(DK + h * stride_gkh, keep, stride_gkt, D, BLOCK_D)
            _zero_rows(DV + h * stride_gvh, keep, stride_gvt, D, BLOCK_D)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _workspace(out: torch.Tensor) -> torch.Tensor:
    """fp32 running sums of earlier key/query blocks: the output itself when it is fp32."""
    return out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and _interpreting():
        return "bf16-interpreter"
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """``(out (Tq, H, D), lse (H, Tq) float32)``; ``max_q``/``max_k`` are not needed (see module doc)."""
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    Tq, H, D = q.shape
    Tk, S = k.shape[0], cu_q.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty(H, Tq, dtype=torch.float32, device=q.device)
    if Tq == 0 or H == 0:
        return out, lse
    if S <= 0 or Tk == 0:
        return out.zero_(), lse.fill_(-math.inf)
    ws = _workspace(out)
    BM, BN, BD = block_sizes(D, q.dtype)
    _fwd_kernel[(triton.cdiv(Tq, BM), H)](
        q, k, v, out, ws, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), ws.stride(0), ws.stride(1),
        Tq, Tk, S, D, S.bit_length(), scale * _LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PRECISION=_precision(q.dtype), num_warps=NUM_WARPS,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """``(dq, dk, dv)`` from the saved ``lse``: ``dS = P * (dP - rowsum(dO * O))``."""
    dout, q, k, v, out = (_unit_stride(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    Tq, H, D = q.shape
    Tk, S = k.shape[0], cu_q.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if H == 0 or D == 0:
        return dq, dk, dv
    if S <= 0 or Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    BM, BN, BD = block_sizes(D, q.dtype)
    precision = _precision(q.dtype)
    steps = S.bit_length()
    delta = torch.empty(H, Tq, dtype=torch.float32, device=q.device)
    _bwd_preprocess_kernel[(triton.cdiv(Tq, BM), H)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), Tq, D, BLOCK_M=BM, BLOCK_D=BD
    )
    ws_q = _workspace(dq)
    _bwd_dq_kernel[(triton.cdiv(Tq, BM), H)](
        q, k, v, dout, dq, ws_q, lse, delta, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1), ws_q.stride(0), ws_q.stride(1),
        Tq, Tk, S, D, steps, scale * _LOG2E, scale,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PRECISION=precision, num_warps=NUM_WARPS,
    )
    # the fp32 workspaces of dk and dv share one layout, so one stride pair serves both
    ws_k = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    ws_v = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    _bwd_dkdv_kernel[(triton.cdiv(Tk, BN), H)](
        q, k, v, dout, dk, dv, ws_k, ws_v, lse, delta, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), ws_k.stride(0), ws_k.stride(1),
        Tq, Tk, S, D, steps, scale * _LOG2E, scale,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PRECISION=precision, num_warps=NUM_WARPS,
    )
    return dq, dk, dv


# ------------------------------------------------------------------ registration


def _check(call: CallInfo) -> Optional[str]:
    if call.device.type == "cpu" and not _interpreting():
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    return None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _priority(call: CallInfo) -> int:
    """Auto order on CUDA (unmeasured on GPU, see attention_backends): first for
    head dims above flash-attn's 256 and for fp32; after flash-attn and torch's
    flash kernel for 16-bit inputs with D <= 256."""
    D = call.extra.get("head_dim", 0)
    return 5 if D > 256 or call.dtype == torch.float32 else 30


for _op, _fn in (("varlen_attention", attention_forward), ("varlen_attention_backward", attention_backward)):
    register(
        Impl(
            op=_op,
            name="triton",
            fn=_fn,
            priority=30,
            priority_for_call=_priority,
            devices=("cuda", "cpu"),
            dtypes=_DTYPES,
            auto_devices=("cuda",),
            available=lambda: _IMPORT_ERROR,
            check=_check,
        )
    )
