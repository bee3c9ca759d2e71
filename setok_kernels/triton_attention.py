"""Triton varlen attention for many short ragged segments, head dims up to 2048.

Tiling: packed tiles with an in-tile block-diagonal mask
---------------------------------------------------------
SeTok attends inside clusters of a few to a few hundred tokens. A kernel that
gives every segment its own 64-128-row q tile (flash-attn's varlen grid:
``segments x cdiv(max_seqlen, BLOCK)``) spends a whole tile on a 3-token
cluster. Here a program *owns* ``BLOCK_M`` consecutive packed rows whatever
segments they belong to. Each row looks up its segment by binary search on
``cu_seqlens`` (on device, in the kernel), which gives its key range
``[kb, ke)``; the program *walks* the union of its rows' key ranges in
``BLOCK_N`` blocks starting at the first key of that union (not at a multiple
of ``BLOCK_N``), and masks every (row, key) pair outside the row's own range,
so one tile serves many short segments (a block-diagonal mask) and a long
segment is tiled as usual. The grid is ``(cdiv(Tq, BLOCK_M), H)``: sized from
shapes only, with no host sync, no per-call table, and no dependence on
``max_seqlen_*``. The backward's dk/dv kernel is the transpose: it owns
``BLOCK_N`` keys and walks their queries in ``BLOCK_M`` blocks.

Own and walk sizes are chosen apart: the walk block is at least the own block
plus about two short segments, so that in the tokenizer's regime (segments of
1-64 tokens) a tile's partners fit in ONE walk block. Then S, P, dP and dS
live in registers for the whole tile, every output row is written once, and
nothing goes through global memory but q, k, v, dO in and O, dq, dk, dv out.

Head dims: resident accumulators up to BLOCK_D, chunked beyond
--------------------------------------------------------------
When the head dim fits one ``BLOCK_D`` chunk (in 16-bit: up to 128 in the
forward, 64 in the backward on sm_90, as far as registers go without spilling), the
output accumulator (and dq, or dk and dv) stays in registers across walk
blocks: flash-attention proper. A (64, 2048) fp32 accumulator fits nowhere on
chip, so for larger head dims scores are accumulated over ``BLOCK_D`` chunks
(``q_c @ k_c^T``) and ``P @ v_c`` is formed per chunk. With one walk block the
chunk is final and stored at once. Only a tile that walks several blocks (a
segment longer than the walk block) keeps the running sum of earlier blocks in
a workspace: the fp32 output itself, or rows of a workspace that belong to
that program alone, ordered by a CTA barrier after each block (its threads
read back what other threads of the same program wrote). No workspace is
shared between programs and nothing is accumulated atomically: deterministic.
Head dims that are not a multiple of 16 are zero-padded to one first (a copy):
unaligned rows spill registers in every configuration.

The walk is a ``while`` loop because its trip count is computed in the kernel:
triton 3.6's interpreter holds such scalars as one-element arrays, which it
cannot pass to ``range()`` under numpy >= 2.4 (every loop bounded by an
argument is bounded by a constexpr for the same reason). On the GPU this gives
up software pipelining across walk blocks only; the head-dim chunk loops are
``for`` loops and pipelined, and short-segment tiles walk one block.

Backward: ``delta = rowsum(dO * O) - dlse`` is computed once per row by a
preprocessing kernel (dlse is the gradient of the returned lse:
``d lse_i / d s_ij = P_ij``, so ``dS = P * (dP - delta)`` covers both). Then
one kernel writes dq (q tiles) and one writes dk, dv (key tiles).

Non-finite inputs stay in their segment (SPEC: NaN or Inf in one image must
not change the others' results). A packed tile's dots sum over rows of
several segments, and a foreign pair's zero weight does not mask a
non-finite value: ``0 * NaN`` is NaN. So each operand whose rows are a dot's
summed axis (v for O; k for dq; q, dO and delta for dk and dv) has its
non-finite values zeroed as it is loaded, the weights (P, dS) of the pairs
that own such a row are made NaN instead, and scores and dP are masked after
their products: a few elementwise ops per tile, no extra pass over memory.
Other segments' results are bit-identical to a run without the non-finite
values. The poisoned segment's results are not all finite, but their pattern
is not the reference's: NaN rather than Inf, over the whole head dim of a row
(a ``BLOCK_D`` chunk of it for v on the chunked path) rather than one
dimension; the lse stays finite where the reference's does.

Precision: ``lse (H, Tq)``, every statistic and accumulator in float32 for
16-bit and float32 inputs and in float64 for float64 (CPU interpreter only);
natural log, ``-inf`` for a row without keys (output 0, zero gradients).
float32 matmuls run in IEEE precision unless the caller opts into TF32 the way
torch does (``torch.backends.cuda.matmul.allow_tf32 = True``, e.g. via
``torch.set_float32_matmul_precision("high")``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _arch
from ._backends import CallInfo, Impl, register
from ._triton import INTERPRETING, MISSING, device_reason, pow2, tl, triton
from ._segments import acc_dtype


__all__ = ["attention_forward", "attention_backward", "configs", "gpu_configs", "INTERPRETER_CONFIG"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ------------------------------------------------------------------ launch configurations
# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per architecture family
# (``_arch.family``), kernel and (dtype class, head-dim bucket: D <= 64, 128, 256,
# larger); triton.autotune picks among them on the GPU, keyed on the head dim, the
# matmul precision and the dtypes. Every entry compiles with no register spill on its
# family under triton 3.6 and 3.9 (the compile proof, `python -m setok_kernels.info
# --compile sm_80 sm_90`); sm_90's 16-bit ones with HGMMA. Max registers per thread
# (sm_90, triton 3.9) in the comments. The reasons:
# - BLOCK_M (query rows per tile) is 64 or 128 in 16-bit on sm_90: wgmma works on
#   64-row warpgroup tiles, and a 32-row tile compiles to mma.sync.
# - the walk block (BLOCK_N in fwd/dq, BLOCK_M in dk/dv) is twice the own block
#   where registers allow: own rows + about two short segments fit in one walk
#   block, so tiles of short segments never touch a workspace (module doc).
# - BLOCK_D = the whole (padded) head dim where the accumulators then fit in
#   registers (sm_90: forward up to 128, dq and dk/dv up to 64 in 16-bit); beyond,
#   32/64/128-wide chunks.
# - fp32 runs IEEE FMA dots (no tensor cores, so no 64-row constraint) whose
#   operands live in registers: 16-32-wide chunks.
# sm_90, dropped because they spill: a resident 256-wide forward (64x64x256: 20-56 B),
# the 64x128 forward with 128-wide chunks at D >= 512 (80-152 B), the 128x128 dq at
# D = 64 (8 B under triton 3.6), 128-row dk/dv walks at D <= 32 (12-72 B) and the
# 4-warp 64x64x32 dk/dv (44 B).
_F16_FWD = {
    64: [(128, 128, 64, 8, 2), (64, 64, 64, 4, 2)],  # 224, 168
    128: [(64, 64, 128, 4, 2)],  # 254
    256: [(64, 128, 128, 8, 2), (64, 128, 64, 8, 2)],  # 246, 230
    512: [(64, 128, 64, 8, 2)],  # 230
}
_F16_DQ = {
    64: [(64, 64, 64, 4, 2)],  # 180
    128: [(64, 128, 64, 8, 2), (64, 64, 64, 4, 2)],  # 234, 238
    256: [(64, 128, 64, 8, 2), (64, 64, 128, 8, 2)],  # 247, 245
    512: [(64, 128, 64, 8, 2), (64, 64, 64, 8, 2)],  # 245, 191
}
# dk/dv: BLOCK_N keys own, BLOCK_M query rows walked; two accumulators.
_F16_DKDV = {
    64: [(64, 64, 32, 8, 2)],  # 207
    128: [(128, 64, 32, 8, 2)],  # 254
    256: [(128, 64, 32, 8, 2), (64, 64, 64, 8, 2)],  # 250, 255
    512: [(128, 64, 32, 8, 2), (64, 64, 64, 8, 2)],  # 250, 255
}
_F32_FWD = [(32, 64, 32, 4, 2), (64, 64, 32, 8, 2)]  # 168-255, 177-184
_F32_DQ = [(64, 64, 16, 8, 2)]  # 213-255
_F32_DKDV = [(64, 64, 16, 8, 2)]  # 211-255


def _table(f16: dict, f32: list, f32_small: Optional[list] = None) -> dict:
    table = {**{("16", b): c for b, c in f16.items()}, **{("32", b): f32 for b in f16}}
    if f32_small is not None:
        table[("32", 64)] = f32_small
    return table


# sm_80 (mma.sync: every warp holds its operand fragments in registers) spills in
# most sm_90 entries (68-1272 B at 255 registers). Kept: 64-row own blocks with
# 32-wide (dq) or 16-wide (dk/dv) chunks, 4 warps for 64x64 tiles, 8 for wider ones;
# measured spill-free under triton 3.9 and 3.6 (max registers, triton 3.9).
_F16_FWD_80 = {
    64: [(64, 64, 32, 8, 2)],  # 192 (64x64x64 with 4 or 8 warps: 12-16 B under triton 3.6)
    128: [(64, 64, 64, 8, 2), (64, 128, 64, 8, 2)],  # 226, 255
    256: [(64, 64, 64, 8, 2), (64, 128, 32, 8, 2)],  # 226, 255
    512: [(64, 64, 64, 8, 2), (64, 128, 32, 8, 2)],  # 221, 255
}
_F16_DQ_80 = {
    64: [(64, 64, 32, 4, 2)],  # 239
    128: [(64, 128, 32, 8, 2), (64, 64, 32, 4, 2)],  # 245, 254
    256: [(64, 128, 32, 8, 2), (64, 64, 64, 8, 2)],  # 244, 255
    512: [(64, 128, 32, 8, 2), (64, 64, 64, 8, 2)],  # 239, 255
}
# dk/dv: 16-wide chunks; a 128-row walk spills 248-296 B where D = 16 is resident, so D <= 64 walks 64
_F16_DKDV_80 = {b: [(128, 64, 16, 8, 2), (64, 64, 16, 8, 2)] for b in (128, 256, 512)}  # 210, 222
_F16_DKDV_80[64] = [(64, 64, 16, 8, 2)]  # 224
_TABLES = {
    90: {
        "fwd": _table(_F16_FWD, _F32_FWD, _F32_FWD[:1]),
        "dq": _table(_F16_DQ, _F32_DQ),
        # fp32 64x64 dk/dv spills 8 B at D = 16 under triton 3.6: 32x32 tiles there
        "dkdv": _table(_F16_DKDV, _F32_DKDV, [(32, 32, 16, 4, 2)]),
    },
    80: {
        # fp32: the 32x64 forward spills 8 B at D = 16, the 64x64 one 16-20 B at D = 32-64
        # (triton 3.6): 32x32 tiles up to D = 64 (168)
        "fwd": _table(_F16_FWD_80, _F32_FWD[1:], [(32, 32, 16, 4, 2)]),
        "dq": _table(_F16_DQ_80, _F32_DQ),
        "dkdv": _table(_F16_DKDV_80, _F32_DKDV),
    },
}
# Head dims that are not a multiple of 16 are zero-padded to one before launch
# (attention_forward): unaligned rows get no vectorised loads and spill hundreds
# of bytes in every config above (D = 72, sm_90), even with 32-wide chunks.
_HEAD_DIM_ALIGN = 16
# The interpreter runs one fixed config (autotuning there would time numpy):
# 64-wide chunks, so head dims <= 64 take the resident path and larger ones the
# chunked path, and segments over 64 tokens the multi-block path.
INTERPRETER_CONFIG = (64, 64, 64, 1, 1)


def _head_dim_bucket(head_dim: int) -> int:
    return min(512, max(64, 1 << (head_dim - 1).bit_length()))


def gpu_configs(kernel: str, head_dim: int, dtype: torch.dtype, family: int = 90) -> list[tuple[int, int, int, int, int]]:
    """What the autotuner tries on a GPU of ``family`` (``_arch.family``: 90 or 80) for
    ``kernel`` ("fwd", "dq", "dkdv"), this head dim and dtype, the design's first choice first."""
    table = _TABLES[family][kernel][("32" if dtype in (torch.float32, torch.float64) else "16", _head_dim_bucket(head_dim))]
    return list(dict.fromkeys((bm, bn, min(bd, _pow2(head_dim)), w, s) for bm, bn, bd, w, s in table))


def configs(kernel: str, head_dim: int, dtype: torch.dtype, family: int = 90) -> list[tuple[int, int, int, int, int]]:
    """The launch configurations ``kernel`` may take here: the fixed one in the interpreter."""
    if INTERPRETING:
        bm, bn, bd, w, s = INTERPRETER_CONFIG
        return [(bm, bn, min(bd, _pow2(head_dim)), w, s)]
    return gpu_configs(kernel, head_dim, dtype, family)


def _pow2(n: int) -> int:
    return pow2(n, 16)  # tl.dot needs every dim >= 16


if triton is not None:
    _LOG2E_T = tl.constexpr(_LOG2E)

    @triton.jit
    def _dot(
        a,
        b,
        PRECISION: tl.constexpr,
    ):
        """Accumulating a @ b (fp32 for 16-bit and fp32 operands, fp64 for fp64).
        Triton's CPU interpreter multiplies bfloat16 operands wrongly (3.9), so
        there they are widened first: products of bf16 values are exact in fp32,
        as on tensor cores."""
        if PRECISION == "bf16-interpreter":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _chunk(
        row_ptrs,
        ok,
        d0,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Columns ``[d0, d0 + BLOCK_D)`` of the rows at ``row_ptrs`` (0 outside)."""
        d = d0 + tl.arange(0, BLOCK_D)
        return tl.load(row_ptrs[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)

    @triton.jit
    def _put(
        row_ptrs,
        ok,
        d0,
        value,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(row_ptrs[:, None] + d[None, :], value.to(row_ptrs.dtype.element_ty), mask=ok[:, None] & (d[None, :] < HEAD_DIM))

    @triton.jit
    def _finite_rows(
        x,
    ):
        """``x`` with its non-finite values zeroed, and per row 1 where it had one.
        For a dot operand whose rows are the axis the dot sums over: they pair
        with other segments' rows at weight 0, and ``0 * NaN`` is NaN. The flag
        makes the weights of the row's own pairs NaN instead."""
        finite = tl.abs(x) < float("inf")
        return tl.where(finite, x, 0.0), tl.max(tl.where(finite, 0, 1), axis=1)

    @triton.jit
    def _nan_if(
        flag,
    ):
        """NaN where ``flag`` (of _finite_rows) is set, else 0: added to a weight."""
        return tl.where(flag > 0, float("nan"), 0.0)

    @triton.jit
    def _segment_of(
        cu_ptr,
        rows,
        S,
        SEARCH_STEPS: tl.constexpr,
    ):
        """Per row, the s in [0, S] with cu[s] <= row < cu[s + 1] (S past the end), by
        binary search. The bound is a constexpr: a loop bounded by a kernel argument
        breaks triton 3.6's interpreter with numpy >= 2.4."""
        lo = tl.zeros_like(rows)
        hi = tl.zeros_like(rows) + S
        for _ in range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            upper = tl.load(cu_ptr + mid + 1, mask=active, other=0).to(tl.int32)
            right = active & (upper <= rows)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        return lo

    @triton.jit
    def _partner_range(
        cu_own,
        cu_other,
        rows,
        n_own,
        n_other,
        S,
        SEARCH_STEPS: tl.constexpr,
    ):
        """For each row of one side (q or k), the row range ``[begin, end)`` of the
        other side in its segment; empty for rows outside every segment. Clamped
        to the tensors, so malformed offsets (validation off) stay in bounds."""
        seg = _segment_of(cu_own, rows, S, SEARCH_STEPS)
        inside = (rows < n_own) & (seg < S)
        seg = tl.where(inside, seg, 0)
        inside = inside & (tl.load(cu_own + seg, mask=inside, other=0).to(tl.int32) <= rows)
        begin = tl.load(cu_other + seg, mask=inside, other=0).to(tl.int32)
        end = tl.load(cu_other + seg + 1, mask=inside, other=0).to(tl.int32)
        begin = tl.minimum(tl.maximum(begin, 0), n_other)
        end = tl.minimum(tl.maximum(end, begin), n_other)
        return tl.where(inside, begin, 0), tl.where(inside, end, 0)

    @triton.jit
    def _tile_span(
        begin,
        end,
        n_other,
        BLOCK: tl.constexpr,
    ):
        """Start and block count of the union of the rows' partner ranges."""
        lo = tl.min(tl.where(end > begin, begin, n_other), axis=0)
        hi = tl.max(end, axis=0)
        return lo, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK)

    @triton.jit
    def _accumulate(
        part,
        carry,
        ws_ptrs,
        ok,
        out_ptrs,
        d0,
        block,
        n_blocks,
        out_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Chunked head dims: adds the running sum of earlier walk blocks (workspace
        rows of this program, times ``carry``) to this block's ``part``; the last
        block writes ``out_scale * sum`` as output, the others the workspace."""
        if block > 0:
            part += carry * _chunk(ws_ptrs, ok, d0, HEAD_DIM, BLOCK_D)
        if block == n_blocks - 1:
            _put(out_ptrs, ok, d0, part * out_scale, HEAD_DIM, BLOCK_D)
        else:
            _put(ws_ptrs, ok, d0, part, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _products(
        a_rows,
        a_ok,
        b_rows,
        b_ok,
        c_rows,
        c_ok,
        e_rows,
        e_ok,
        TWO: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """``a @ b^T`` (and ``c @ e^T`` when TWO) over the head dim, chunk by chunk, and
        the _finite_rows flags of b's (and e's) rows."""
        x = tl.zeros((a_rows.shape[0], b_rows.shape[0]), ACC)
        y = tl.zeros((c_rows.shape[0], e_rows.shape[0]), ACC)
        b_bad = tl.zeros((b_rows.shape[0],), tl.int32)
        e_bad = tl.zeros((e_rows.shape[0],), tl.int32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            b = _chunk(b_rows, b_ok, d0, HEAD_DIM, BLOCK_D)
            x += _dot(_chunk(a_rows, a_ok, d0, HEAD_DIM, BLOCK_D), tl.trans(b), PRECISION)
            b_bad = tl.maximum(b_bad, _finite_rows(b)[1])
            if TWO:
                e = _chunk(e_rows, e_ok, d0, HEAD_DIM, BLOCK_D)
                y += _dot(_chunk(c_rows, c_ok, d0, HEAD_DIM, BLOCK_D), tl.trans(e), PRECISION)
                e_bad = tl.maximum(e_bad, _finite_rows(e)[1])
        return x, y, b_bad, e_bad

    @triton.jit
    def _fwd_kernel(
        Q,
        K,
        V,
        Out,
        Ws,
        Lse,
        CuQ,
        CuK,
        Scales,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        stride_wt,
        stride_wh,
        Tq,
        Tk,
        S,
        HEAD_DIM: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
        ACC: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        kb, ke = _partner_range(CuQ, CuK, rows, Tq, Tk, S, SEARCH_STEPS)
        k_lo, n_blocks = _tile_span(kb, ke, Tk, BLOCK_N)
        qk_scale = tl.load(Scales)  # scale * log2(e), in the accumulation dtype

        rows64 = rows.to(tl.int64)
        q_rows = Q + rows64 * stride_qt + h * stride_qh
        o_rows = Out + rows64 * stride_ot + h * stride_oh
        w_rows = Ws + rows64 * stride_wt + h * stride_wh
        # running max and sum in base 2 (scores pre-multiplied by log2(e))
        m = tl.full((BLOCK_M,), float("-inf"), ACC)
        l = tl.zeros((BLOCK_M,), ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        if HEAD_DIM <= BLOCK_D:
            q = _chunk(q_rows, row_ok, 0, HEAD_DIM, BLOCK_D)
        blk = 0
        while blk < n_blocks:  # not range(): see the module doc
            cols = k_lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < Tk
            cols64 = cols.to(tl.int64)
            k_rows = K + cols64 * stride_kt + h * stride_kh
            v_rows = V + cols64 * stride_vt + h * stride_vh
            if HEAD_DIM <= BLOCK_D:
                s = _dot(q, tl.trans(_chunk(k_rows, col_ok, 0, HEAD_DIM, BLOCK_D)), PRECISION)
            else:
                s, _, _, _ = _products(q_rows, row_ok, k_rows, col_ok, q_rows, row_ok, k_rows, col_ok, False, HEAD_DIM, BLOCK_D, ACC, PRECISION)
            own = (cols[None, :] >= kb[:, None]) & (cols[None, :] < ke[:, None])
            s = tl.where(own, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
            carry = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l = l * carry + tl.sum(p, axis=1)
            m = m_new
            if HEAD_DIM <= BLOCK_D:
                vc, v_bad = _finite_rows(_chunk(v_rows, col_ok, 0, HEAD_DIM, BLOCK_D))
                p = tl.where(own & (v_bad[None, :] > 0), float("nan"), p)
                acc = acc * carry[:, None] + _dot(p.to(vc.dtype), vc, PRECISION)
            else:
                inv_l = 1.0 / tl.where(l == 0, 1.0, l)  # rows without keys have a zero sum
                for d0 in range(0, HEAD_DIM, BLOCK_D):
                    vc, v_bad = _finite_rows(_chunk(v_rows, col_ok, d0, HEAD_DIM, BLOCK_D))
                    part = _dot(tl.where(own & (v_bad[None, :] > 0), float("nan"), p).to(vc.dtype), vc, PRECISION)
                    _accumulate(part, carry[:, None], w_rows, row_ok, o_rows, d0, blk, n_blocks, inv_l[:, None], HEAD_DIM, BLOCK_D)
                tl.debug_barrier()  # the next block reads back this block's workspace rows
            blk += 1
        if HEAD_DIM <= BLOCK_D:
            _put(o_rows, row_ok, 0, acc / tl.where(l == 0, 1.0, l)[:, None], HEAD_DIM, BLOCK_D)
        elif n_blocks == 0:
            for d0 in range(0, HEAD_DIM, BLOCK_D):
                _put(o_rows, row_ok, d0, tl.zeros((BLOCK_M, BLOCK_D), ACC), HEAD_DIM, BLOCK_D)
        # a NaN sum (a non-finite score of the row's own segment) gives NaN, not -inf
        lse = tl.where(l == 0, float("-inf"), (m + tl.log2(tl.where(l == 0, 1.0, l))) / _LOG2E_T)
        tl.store(Lse + h * Tq + rows, lse, mask=row_ok)

    @triton.jit
    def _bwd_preprocess_kernel(
        Out,
        DOut,
        DLse,
        Delta,
        stride_ot,
        stride_oh,
        stride_dt,
        stride_dh,
        Tq,
        HEAD_DIM: tl.constexpr,
        HAS_DLSE: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] - dlse[h, i]: the one per-row
        term of dS = P * (dP - delta), lse gradient included."""
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rows < Tq
        rows64 = rows.to(tl.int64)
        o_rows = Out + rows64 * stride_ot + h * stride_oh
        do_rows = DOut + rows64 * stride_dt + h * stride_dh
        acc = tl.zeros((BLOCK_M,), ACC)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            o = _chunk(o_rows, ok, d0, HEAD_DIM, BLOCK_D).to(ACC)
            do = _chunk(do_rows, ok, d0, HEAD_DIM, BLOCK_D).to(ACC)
            acc += tl.sum(o * do, axis=1)
        if HAS_DLSE:
            acc -= tl.load(DLse + h * Tq + rows, mask=ok, other=0.0).to(ACC)
        tl.store(Delta + h * Tq + rows, acc, mask=ok)

    @triton.jit
    def _row_stats(
        Lse,
        Delta,
        h,
        rows,
        Tq,
    ):
        """Per query row: lse in base 2 (0 for rows without keys: they match no key) and delta."""
        ok = rows < Tq
        lse = tl.load(Lse + h * Tq + rows, mask=ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E_T)
        delta = tl.load(Delta + h * Tq + rows, mask=ok, other=0.0)
        return lse2, delta

    @triton.jit
    def _bwd_dq_kernel(
        Q,
        K,
        V,
        DOut,
        DQ,
        Ws,
        Lse,
        Delta,
        CuQ,
        CuK,
        Scales,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dt,
        stride_dh,
        stride_gt,
        stride_gh,
        stride_wt,
        stride_wh,
        Tq,
        Tk,
        S,
        HEAD_DIM: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
        ACC: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per BLOCK_M query rows: dq = scale * dS @ K over their keys."""
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        kb, ke = _partner_range(CuQ, CuK, rows, Tq, Tk, S, SEARCH_STEPS)
        k_lo, n_blocks = _tile_span(kb, ke, Tk, BLOCK_N)
        lse2, delta = _row_stats(Lse, Delta, h, rows, Tq)
        qk_scale = tl.load(Scales)
        scale = tl.load(Scales + 1)

        rows64 = rows.to(tl.int64)
        q_rows = Q + rows64 * stride_qt + h * stride_qh
        do_rows = DOut + rows64 * stride_dt + h * stride_dh
        g_rows = DQ + rows64 * stride_gt + h * stride_gh
        w_rows = Ws + rows64 * stride_wt + h * stride_wh
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        if HEAD_DIM <= BLOCK_D:
            q = _chunk(q_rows, row_ok, 0, HEAD_DIM, BLOCK_D)
            do = _chunk(do_rows, row_ok, 0, HEAD_DIM, BLOCK_D)
        blk = 0
        while blk < n_blocks:  # not range(): see the module doc
            cols = k_lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < Tk
            cols64 = cols.to(tl.int64)
            k_rows = K + cols64 * stride_kt + h * stride_kh
            v_rows = V + cols64 * stride_vt + h * stride_vh
            if HEAD_DIM <= BLOCK_D:
                kc, k_bad = _finite_rows(_chunk(k_rows, col_ok, 0, HEAD_DIM, BLOCK_D))
                s = _dot(q, tl.trans(kc), PRECISION)
                dp = _dot(do, tl.trans(_chunk(v_rows, col_ok, 0, HEAD_DIM, BLOCK_D)), PRECISION)
            else:
                s, dp, k_bad, _ = _products(q_rows, row_ok, k_rows, col_ok, do_rows, row_ok, v_rows, col_ok, True, HEAD_DIM, BLOCK_D, ACC, PRECISION)
            own = (cols[None, :] >= kb[:, None]) & (cols[None, :] < ke[:, None])
            # masked after the product: other segments' scores and dP may be non-finite
            ds = tl.where(own, tl.exp2(s * qk_scale - lse2[:, None]) * (dp - delta[:, None]) + _nan_if(k_bad)[None, :], 0.0) * scale
            if HEAD_DIM <= BLOCK_D:
                acc += _dot(ds.to(kc.dtype), kc, PRECISION)
            else:
                for d0 in range(0, HEAD_DIM, BLOCK_D):
                    kc, _ = _finite_rows(_chunk(k_rows, col_ok, d0, HEAD_DIM, BLOCK_D))
                    part = _dot(ds.to(kc.dtype), kc, PRECISION)
                    _accumulate(part, 1.0, w_rows, row_ok, g_rows, d0, blk, n_blocks, 1.0, HEAD_DIM, BLOCK_D)
                tl.debug_barrier()  # the next block reads back this block's workspace rows
            blk += 1
        if HEAD_DIM <= BLOCK_D:
            _put(g_rows, row_ok, 0, acc, HEAD_DIM, BLOCK_D)
        elif n_blocks == 0:
            for d0 in range(0, HEAD_DIM, BLOCK_D):
                _put(g_rows, row_ok, d0, tl.zeros((BLOCK_M, BLOCK_D), ACC), HEAD_DIM, BLOCK_D)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q,
        K,
        V,
        DOut,
        DK,
        DV,
        WsK,
        WsV,
        Lse,
        Delta,
        CuQ,
        CuK,
        Scales,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_dt,
        stride_dh,
        stride_gkt,
        stride_gkh,
        stride_gvt,
        stride_gvh,
        stride_wkt,
        stride_wkh,
        stride_wvt,
        stride_wvh,
        Tq,
        Tk,
        S,
        HEAD_DIM: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
        ACC: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per BLOCK_N keys: dv = P^T @ dO, dk = scale * dS^T @ Q over
        the query rows of their segments (transposed tiles: keys x queries)."""
        h = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        qb, qe = _partner_range(CuK, CuQ, cols, Tk, Tq, S, SEARCH_STEPS)
        q_lo, n_blocks = _tile_span(qb, qe, Tq, BLOCK_M)
        qk_scale = tl.load(Scales)
        scale = tl.load(Scales + 1)

        cols64 = cols.to(tl.int64)
        k_rows = K + cols64 * stride_kt + h * stride_kh
        v_rows = V + cols64 * stride_vt + h * stride_vh
        gk_rows = DK + cols64 * stride_gkt + h * stride_gkh
        gv_rows = DV + cols64 * stride_gvt + h * stride_gvh
        wk_rows = WsK + cols64 * stride_wkt + h * stride_wkh
        wv_rows = WsV + cols64 * stride_wvt + h * stride_wvh
        dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        dv = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        if HEAD_DIM <= BLOCK_D:
            k = _chunk(k_rows, col_ok, 0, HEAD_DIM, BLOCK_D)
            v = _chunk(v_rows, col_ok, 0, HEAD_DIM, BLOCK_D)
        blk = 0
        while blk < n_blocks:  # not range(): see the module doc
            rows = q_lo + blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < Tq
            rows64 = rows.to(tl.int64)
            q_rows = Q + rows64 * stride_qt + h * stride_qh
            do_rows = DOut + rows64 * stride_dt + h * stride_dh
            lse2, delta = _row_stats(Lse, Delta, h, rows, Tq)
            # the walked query rows are the dots' shared axis (see _finite_rows): q, dO
            # and delta (non-finite with O) are zeroed there and flag their rows
            delta_ok = tl.abs(delta) < float("inf")
            delta = tl.where(delta_ok, delta, 0.0)
            if HEAD_DIM <= BLOCK_D:
                qc, q_bad = _finite_rows(_chunk(q_rows, row_ok, 0, HEAD_DIM, BLOCK_D))
                doc, do_bad = _finite_rows(_chunk(do_rows, row_ok, 0, HEAD_DIM, BLOCK_D))
                st = _dot(k, tl.trans(qc), PRECISION)
                dpt = _dot(v, tl.trans(doc), PRECISION)
            else:
                st, dpt, q_bad, do_bad = _products(k_rows, col_ok, q_rows, row_ok, v_rows, col_ok, do_rows, row_ok, True, HEAD_DIM, BLOCK_D, ACC, PRECISION)
            own = (rows[None, :] >= qb[:, None]) & (rows[None, :] < qe[:, None])
            pt = tl.where(own, tl.exp2(st * qk_scale - lse2[None, :]) + _nan_if(tl.maximum(tl.maximum(q_bad, do_bad), tl.where(delta_ok, 0, 1)))[None, :], 0.0)
            if HEAD_DIM <= BLOCK_D:
                dst = pt * (dpt - delta[None, :]) * scale
                dv += _dot(pt.to(doc.dtype), doc, PRECISION)
                dk += _dot(dst.to(qc.dtype), qc, PRECISION)
            else:
                # dP from the raw chunks: other segments' dO rows may be non-finite
                dst = tl.where(own, pt * (dpt - delta[None, :]), 0.0) * scale
                for d0 in range(0, HEAD_DIM, BLOCK_D):
                    qc, _ = _finite_rows(_chunk(q_rows, row_ok, d0, HEAD_DIM, BLOCK_D))
                    doc, _ = _finite_rows(_chunk(do_rows, row_ok, d0, HEAD_DIM, BLOCK_D))
                    dv_part = _dot(pt.to(doc.dtype), doc, PRECISION)
                    _accumulate(dv_part, 1.0, wv_rows, col_ok, gv_rows, d0, blk, n_blocks, 1.0, HEAD_DIM, BLOCK_D)
                    dk_part = _dot(dst.to(qc.dtype), qc, PRECISION)
                    _accumulate(dk_part, 1.0, wk_rows, col_ok, gk_rows, d0, blk, n_blocks, 1.0, HEAD_DIM, BLOCK_D)
                tl.debug_barrier()  # the next block reads back this block's workspace rows
            blk += 1
        if HEAD_DIM <= BLOCK_D:
            _put(gk_rows, col_ok, 0, dk, HEAD_DIM, BLOCK_D)
            _put(gv_rows, col_ok, 0, dv, HEAD_DIM, BLOCK_D)
        elif n_blocks == 0:
            for d0 in range(0, HEAD_DIM, BLOCK_D):
                _put(gk_rows, col_ok, d0, tl.zeros((BLOCK_N, BLOCK_D), ACC), HEAD_DIM, BLOCK_D)
                _put(gv_rows, col_ok, d0, tl.zeros((BLOCK_N, BLOCK_D), ACC), HEAD_DIM, BLOCK_D)

    def _tuned(kernel, name: str, family: int):
        """``kernel`` autotuned over ``configs(name, ..., family)``, keyed on the head dim and
        matmul precision (and, as triton does for every tensor argument, the dtypes); one
        autotuner per architecture family, so that a cached choice never crosses families."""
        every = sorted({c for table in _TABLES[family][name].values() for c in table})
        candidates = [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), num_warps=w, num_stages=s) for bm, bn, bd, w, s in every
        ]

        def prune(configs_, named_args, **kwargs):
            head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
            wanted = configs(name, head_dim, named_args["Q"].dtype, family)
            return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), num_warps=w, num_stages=s) for bm, bn, bd, w, s in wanted]

        return triton.autotune(configs=candidates, key=["HEAD_DIM", "PRECISION"], prune_configs_by=dict(early_config_prune=prune))(kernel)

    _TUNED = {
        (name, family): _tuned(kernel, name, family)
        for name, kernel in (("fwd", _fwd_kernel), ("dq", _bwd_dq_kernel), ("dkdv", _bwd_dkdv_kernel))
        for family in _arch.FAMILIES
    }


def _launch(kernel, name: str, own: str, rows: int, H: int, args, head_dim: int, dtype: torch.dtype, **constexprs):
    """The autotuned kernel of the device's architecture family on a GPU; in the interpreter the one fixed config."""
    grid = lambda meta: (triton.cdiv(rows, meta[own]), H)  # noqa: E731
    if INTERPRETING:
        bm, bn, bd, _, _ = configs(name, head_dim, dtype)[0]
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **constexprs)
    else:
        _TUNED[name, _arch.family(args[0].device)][grid](*args, **constexprs)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _aligned_head_dim(head_dim: int) -> int:
    return -(-head_dim // _HEAD_DIM_ALIGN) * _HEAD_DIM_ALIGN


def _pad_head_dim(*tensors):
    """Zero columns up to an aligned head dim: scores, outputs and gradients of the
    real columns are unchanged (the caller passes the real head dim's scale)."""
    pad = _aligned_head_dim(tensors[0].shape[-1]) - tensors[0].shape[-1]
    return tuple(torch.nn.functional.pad(t, (0, pad)) for t in tensors)


def _workspace(out: torch.Tensor, kernel: str) -> torch.Tensor:
    """Running sums of earlier walk blocks, read only on the chunked head-dim path:
    the output itself when it is in the accumulation dtype or when every config
    keeps the head dim resident. Each program uses only its own rows."""
    acc = acc_dtype(out.dtype)
    chunked = any(bd < out.shape[-1] for _, _, bd, _, _ in configs(kernel, out.shape[-1], out.dtype, _arch.family(out.device)))
    return torch.empty(out.shape, dtype=acc, device=out.device) if chunked and out.dtype != acc else out


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and INTERPRETING:
        return "bf16-interpreter"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"  # ignored for 16-bit inputs


def _common(q: torch.Tensor, S: int, scale: float) -> dict:
    acc = acc_dtype(q.dtype)
    return dict(
        scales=torch.tensor([scale * _LOG2E, scale], dtype=acc, device=q.device),
        constexprs=dict(
            HEAD_DIM=q.shape[-1],
            SEARCH_STEPS=-(-S.bit_length() // 4) * 4,  # rounded up: few compiled variants
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            PRECISION=_precision(q.dtype),
        ),
    )


def attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """``(out (Tq, H, D), lse (H, Tq))``, lse in the accumulation dtype;
    ``max_q``/``max_k`` are not needed (see module doc)."""
    D = q.shape[-1]
    if D % _HEAD_DIM_ALIGN:
        out, lse = attention_forward(*_pad_head_dim(q, k, v), cu_q, cu_k, max_q, max_k, scale)
        return out[..., :D].contiguous(), lse
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # the kernels index them densely
    Tq, H, D = q.shape
    Tk, S = k.shape[0], cu_q.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty(H, Tq, dtype=acc_dtype(q.dtype), device=q.device)
    ws = _workspace(out, "fwd")
    c = _common(q, S, scale)
    args = (
        q, k, v, out, ws, lse, cu_q, cu_k, c["scales"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), ws.stride(0), ws.stride(1), Tq, Tk, S,
    )
    _launch(_fwd_kernel, "fwd", "BLOCK_M", Tq, H, args, D, q.dtype, **c["constexprs"])
    return out, lse


def attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """``(dq, dk, dv)`` from the saved ``lse``: ``dS = P * (dP - rowsum(dO * O) + dlse)``
    (``dlse`` None: the lse was not used)."""
    D = q.shape[-1]
    if D % _HEAD_DIM_ALIGN:
        padded = _pad_head_dim(dout, q, k, v, out)
        grads = attention_backward(padded[0], dlse, *padded[1:], lse, cu_q, cu_k, max_q, max_k, scale)
        return tuple(g[..., :D].contiguous() for g in grads)
    dout, q, k, v, out = (_unit_stride(t) for t in (dout, q, k, v, out))
    lse, cu_q, cu_k = lse.contiguous(), cu_q.contiguous(), cu_k.contiguous()
    Tq, H, D = q.shape
    Tk, S = k.shape[0], cu_q.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    c = _common(q, S, scale)
    cx = c["constexprs"]
    delta = torch.empty(H, Tq, dtype=acc_dtype(q.dtype), device=q.device)
    dlse_arg = delta if dlse is None else dlse.contiguous()
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(Tq, pre_block), H)](
        out, dout, dlse_arg, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), Tq,
        HEAD_DIM=D, HAS_DLSE=dlse is not None, ACC=cx["ACC"], BLOCK_M=pre_block, BLOCK_D=min(128, _pow2(D)),
    )
    ws_q = _workspace(dq, "dq")
    args = (
        q, k, v, dout, dq, ws_q, lse, delta, cu_q, cu_k, c["scales"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1), ws_q.stride(0), ws_q.stride(1), Tq, Tk, S,
    )
    _launch(_bwd_dq_kernel, "dq", "BLOCK_M", Tq, H, args, D, q.dtype, **cx)
    ws_k, ws_v = _workspace(dk, "dkdv"), _workspace(dv, "dkdv")
    args = (
        q, k, v, dout, dk, dv, ws_k, ws_v, lse, delta, cu_q, cu_k, c["scales"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), ws_k.stride(0), ws_k.stride(1), ws_v.stride(0), ws_v.stride(1),
        Tq, Tk, S,
    )
    _launch(_bwd_dkdv_kernel, "dkdv", "BLOCK_N", Tk, H, args, D, q.dtype, **cx)
    return dq, dk, dv


# ------------------------------------------------------------------ registration


def _check(call: CallInfo) -> Optional[str]:
    if call.dtype == torch.float64 and call.device.type != "cpu":
        return "float64 runs in the Triton interpreter only (CPU tensors)"
    return device_reason(call)


for _op, _fn in (("varlen_attention", attention_forward), ("varlen_attention_backward", attention_backward)):
    register(
        Impl(
            op=_op,
            name="triton",
            fn=_fn,
            devices=("cuda", "cpu"),
            dtypes=_DTYPES,
            auto_devices=("cuda",),
            available=lambda: MISSING,
            check=_check,
        )
    )
