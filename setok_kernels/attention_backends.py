"""Third-party varlen attention kernels behind ``setok.varlen_attention``.

Each backend declares what it supports and says why it declines a call;
flash-attn and xformers are imported only when asked whether they are
available or when called, never at module load.

Auto order on CUDA (``_backends.AUTO_ORDER`` and ``auto_order``, with the reasons)::

    regime                         order
    fp16/bf16, head_dim <= 256     flash_attn, torch (flash), triton, xformers, reference
    fp16/bf16, head_dim > 256      triton, torch (memory-efficient), xformers, reference
    fp32, any head_dim             triton, torch (memory-efficient), xformers, reference

On CPU, auto picks "torch": torch's fused CPU flash-attention kernel (forward
and backward, both with lse; float64 too), called once per group of segments
of similar lengths (padded into one batch) or once per segment, as a measured
cost model decides (``_groups``); the Triton interpreter must be forced.

Every backend returns the setok lse convention: ``(H, Tq)`` in the
accumulation dtype (float32; float64 for float64 inputs), natural log,
``-inf`` (and output 0) for a row without keys or outside every segment.
A call with nothing to attend never reaches them (ops.py answers it).
None of them has an lse-based backward entry point that is stable across
versions, so their backward Impls reuse the Triton backward kernels (the
reference math where Triton is missing): the same gradients from the same
``(out, lse)``, the gradient of the returned lse included.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from array import array
from itertools import repeat
from typing import NamedTuple, Optional

import torch

from . import _backends
from ._backends import FLASH_MAX_HEAD_DIM, CallInfo, Impl, register
from ._segments import acc_dtype, row_segments

_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ shared helpers


def _triton_backward():
    from . import triton_attention

    return None if triton_attention.triton is None else triton_attention.attention_backward


def _reference_backward():
    return next(i.fn for i in _backends.implementations("varlen_attention_backward") if i.name == "reference")


def lse_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """Gradients from ``(out, lse)`` in the setok convention: the Triton kernels on
    CUDA, else the reference backend's. Shared by the backends below."""
    fn = _triton_backward() if q.is_cuda else None
    fn = fn or _reference_backward()
    return fn(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)


def _per_segment_lse(lse: torch.Tensor, cu_q: torch.Tensor, Tq: int) -> torch.Tensor:
    """``(S, H, L)`` lse padded per segment (memory-efficient kernels) -> ``(H, Tq)``."""
    seg, pos, _ = row_segments(cu_q, Tq)
    return lse[seg, :, pos.clamp(0, max(lse.shape[-1] - 1, 0))].transpose(0, 1)


def _to_setok_convention(out, lse, cu_q, cu_k=None):
    """Kernels leave rows outside every segment unwritten and mark rows without
    keys with lse +inf (flash), -inf, or NaN (memory-efficient, seen on an H200):
    make both output 0 and lse -inf. Rows without keys are found from the key
    lengths (``cu_k``, sync-free), and from an infinite lse."""
    lse = lse.to(acc_dtype(out.dtype))
    seg, _, inside = row_segments(cu_q, out.shape[0])
    keyless = ~inside[None, :] | torch.isinf(lse)
    if cu_k is not None:
        cu_k = cu_k.to(torch.int64)
        keyless = keyless | (cu_k[1:] == cu_k[:-1])[seg][None, :]
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
    if D > FLASH_MAX_HEAD_DIM:
        return f"head_dim {D} > {FLASH_MAX_HEAD_DIM} (flash-attn's largest)"
    return _head_dim_multiple_of_8(call)


def flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """``flash_attn_varlen_func``; its lse is ``(H, Tq)`` (older releases: per padded segment)."""
    from flash_attn import flash_attn_varlen_func

    cu_q32, cu_k32 = _int32(cu_q), _int32(cu_k)
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q32, cu_k32, max(max_q, 1), max(max_k, 1),
        dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    if lse.dim() == 3:
        lse = _per_segment_lse(lse, cu_q, q.shape[0])
    return _to_setok_convention(out, lse, cu_q, cu_k)


# ------------------------------------------------------------------ torch


def _torch_varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` when it exists and takes ``scale`` and ``return_aux``."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn, AuxRequest) if "scale" in params and "return_aux" in params else None


@functools.cache  # asked by the availability check, the call check and the body of every call
def _cpu_flash():
    """torch's fused CPU attention kernel and its backward (both return / take lse)."""
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None:
        return None
    # per call, torch's generated binding parses arguments ~4 us faster than an
    # OpOverload (and the overload than its packet); the backward has no binding
    return getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", fwd.default), bwd.default


@functools.cache
def _native_segments():
    """The loop over ``_CpuPlan.single`` compiled (``setok::native_attention_segments``:
    the same kernel calls without the interpreter per segment), or None when
    setok's library is not loaded."""
    from . import _native

    return None if _native.build_info()["reason"] else torch.ops.setok.native_attention_segments.default


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
    if q.device.type == "cpu":
        return _cpu_forward(q, k, v, cu_q, cu_k, scale)
    cu_q32, cu_k32 = _int32(cu_q), _int32(cu_k)
    flash = _torch_varlen_attn()
    Tq, H, D = q.shape
    if flash is not None and q.dtype in _HALF and D <= FLASH_MAX_HEAD_DIM:
        varlen_attn, AuxRequest = flash
        out, lse = varlen_attn(q, k, v, cu_q32, cu_k32, max(max_q, 1), max(max_k, 1), return_aux=AuxRequest(lse=True), scale=scale)
        if lse.shape != (H, Tq):  # documented as (Tq, H) in some releases
            lse = lse.transpose(0, 1)
    else:
        out, lse = torch.ops.aten._efficient_attention_forward(
            q[None], k[None], v[None], None, cu_q32, cu_k32, max(max_q, 1), max(max_k, 1), 0.0, 0, True, scale=scale
        )[:2]
        out, lse = out[0], _per_segment_lse(lse, cu_q, Tq)
    return _to_setok_convention(out, lse, cu_q, cu_k)


# ------------------------------------------------------------------ torch on the CPU
# Measured (one thread, float32, torch 2.13, median CPU time): a call of
# torch's fused CPU flash kernel costs ~20 us before any work, the work about
# 7.5e-5 us per head, head-dim column and (query, key) pair. Per segment, G
# segments of length L in one dense call / one call each:
#
#   D      L:  1     4     16    32    64    128   256
#   32   batch  0.7   1.3   3.5   7.6  23    76    261
#        each  19    20    22    31    53    99    315
#   128  batch  0.8   1.9   7.2  20    82   269    901
#        each  18    22    29    43   105   302    950
#   2048 batch  2.1  24   139   382  1215  4123  14298
#        each  21    47   174   434  1268  4457  14821
#
# Segments of similar lengths are therefore gathered (index_select), padded to
# the longest and run as one batch with an additive key mask (no measurable
# cost), padded query rows computed and dropped. Model of one call on G
# segments padded to (wq, wk), H heads of size D:
#
#   _CPU_CALL_US + H * D * G * (_CPU_US_PER_PAIR * wq * wk + _CPU_US_PER_ROW_ELEMENT * (wq + wk))
#
# (the row term, the gathers and the scatter, only when G > 1). On the segments
# sorted by work, the next one joins the open group while that adds less than
# a call of its own, else it opens the next group; a group of one is a plain
# call on views. Padding costs work quadratically: fixed-width buckets (the
# reference's, <= 25% padding per side) measured worse, the bucket (32, 48]
# padding 11 segments of 33..47 rows to 1.4x their work, 15% slower than
# their calls. Row term: at D = 2048 two segments of 4 rows cost 82 us batched,
# 63 us one by one. _CPU_CALL_US = 30, not 20: the Python and the caches left
# cold by the kernels around each call; chosen end to end (per-segment SDPA
# loop time / this backend's forward, B=4, N=576 as in bench_attention, at 20
# / 25 / 30 / 40 us: D=128 1.01 / 1.04 / 1.06 / 1.03, D=64 1.04 / 1.07 / 1.09 /
# 1.10; 64 segments of 1..16 rows at D=128 1.76 / 1.89 / 1.72 / 2.00).
# The same constants serve two threads (per-segment SDPA loop time / this
# backend's forward at D=128, D=64, two threads: 1.03, 1.13 with them; 1.01,
# 1.10 with the work costs halved, i.e. larger groups). With the segments
# called one by one looped in C++ (``_native_segments``) a call costs less
# Python; re-measured at 15 / 30 / 45 us: D=128 1.04 / 1.01 / 1.07, D=64
# 1.10 / 1.19 / 1.05, within the runs' noise, so 30 stays.
# The host reads the offsets (free on the CPU: no device to wait for); plans are
# memoized on them (``_cpu_plan``).
_CPU_CALL_US = 30.0
_CPU_US_PER_PAIR = 7.5e-5
_CPU_US_PER_ROW_ELEMENT = 1e-3
# The backward kernel on a batch is slower than on its segments one by one
# once a segment's rows hold more than ~2048 values per head (per segment,
# G = 32: D = 128, L = 16: 15 us batched, 36 one by one; L = 24: 63 and 57;
# L = 48: 264 and 146; D = 64, L = 32: 25 and 46, L = 48: 86 and 78): its
# groups stop there.
_CPU_BWD_MAX_WIDTH = 2048  # max(wq, wk) * D of a backward group


class _CpuPlan(NamedTuple):
    """Which kernel call computes each segment.

    ``q_gaps`` / ``k_gaps``: the query / key rows no call writes (outside the
    segments with queries and keys), ``(begin, end)``: 0 / -inf there.
    ``single``: ``(q_begin, q_end, k_begin, k_end)`` of the segments called one
    by one, ``single_bounds`` the same as an (S, 4) int64 tensor. ``groups``:
    ``(G, wq, wk, masked)`` per padded batch, in the order of the flat row
    indices ``q_index`` / ``k_index``: each segment's rows, then its last row
    repeated up to the group's width (padded positions read finite rows of
    their own segment). ``q_dst`` / ``k_dst``: the row each position writes,
    the scratch row ``Tq`` / ``Tk`` for padded ones. ``bias``: the additive
    key mask (0, -inf on padded keys) per key position, passed to the groups
    with a padded key (``masked``).
    """

    q_gaps: list
    k_gaps: list
    single: list
    groups: list
    single_bounds: Optional[torch.Tensor] = None
    q_index: Optional[torch.Tensor] = None
    q_dst: Optional[torch.Tensor] = None
    k_index: Optional[torch.Tensor] = None
    k_dst: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


def _live_segments(cu_q, cu_k):
    """``(a, b, c, d)`` of the segments with queries and keys, read on the host (free on
    the CPU: no device to wait for). Packed layouts with a static number of
    segments are mostly empty ones: with one offsets tensor (self-attention)
    its distinct values bound the live segments, one op."""
    if cu_k is cu_q:
        bounds = torch.unique_consecutive(cu_q).tolist()
        return [(a, b, a, b) for a, b in zip(bounds, bounds[1:])]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(a, b, c, d) for a, b, c, d in zip(cq, cq[1:], ck, ck[1:]) if b > a and d > c]


def _groups(live, heads: int, head_dim: int, backward: bool = False) -> list:
    """``live`` segments ``(a, b, c, d)`` partitioned into groups (lists) by the cost
    model above: greedy on the segments sorted by work ``(b - a) * (d - c)``.
    ``backward``: groups no wider than ``_CPU_BWD_MAX_WIDTH``."""
    pair_us = _CPU_US_PER_PAIR * heads * head_dim
    row_us = _CPU_US_PER_ROW_ELEMENT * heads * head_dim
    # the cost of one call on G segments padded to (wq, wk) is
    # _CPU_CALL_US + pair_us * G * wq * wk + row_us * G * (wq + wk) (no copies when G = 1);
    # a segment (lq, lk) joins the open group when that adds less than a call of its own
    groups, G, wq, wk = [], 0, 0, 0
    for work, lq, lk, seg in sorted(((b - a) * (d - c), b - a, d - c, (a, b, c, d)) for a, b, c, d in live):
        nq, nk = max(wq, lq), max(wk, lk)
        added = (pair_us * ((G + 1) * nq * nk - G * wq * wk - work)
                 + row_us * ((G + 1) * (nq + nk) - (G > 1) * G * (wq + wk)))
        if G and added < _CPU_CALL_US and not (backward and max(nq, nk) * head_dim > _CPU_BWD_MAX_WIDTH):
            groups[-1].append(seg)
            G, wq, wk = G + 1, nq, nk
        else:
            groups.append([seg])
            G, wq, wk = 1, lq, lk
    return groups


def _padded_index(rows: array, scratch: int):
    """Host row indices -> ``(index, dst)``: a padded position repeats the row before
    it (a real row never does); its ``dst`` is the ``scratch`` row."""
    index = torch.frombuffer(rows, dtype=torch.int64)
    padded = torch.zeros_like(index, dtype=torch.bool)
    torch.eq(index[1:], index[:-1], out=padded[1:])
    return index, index.masked_fill(padded, scratch)


def _cpu_plan(q, k, cu_q, cu_k, backward: bool = False) -> _CpuPlan:
    """The plan of a call, memoized on what it depends on (the offsets' bytes,
    shapes, dtype): a model's layers, and a training step's backward,
    call with the same offsets, and planning costs ~2 us of Python per segment
    (more with caches cold after the kernels), a tenth of a call."""
    key = (cu_q.numpy().tobytes(), None if cu_k is cu_q else cu_k.numpy().tobytes(), cu_q.dtype, cu_k.dtype,
           q.shape[0], k.shape[0], q.shape[1], q.shape[-1], q.dtype, backward)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(_live_segments(cu_q, cu_k), *key[4:])
        with _PLANS_LOCK:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = plan
    return plan


_PLANS: dict = {}  # oldest first
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 8


def _plan(live, Tq, Tk, H, D, dtype, backward) -> _CpuPlan:
    """One call per group of ``_groups``: a plain call for a group of one segment,
    else a padded batch. Row indices are built in host arrays; what derives from
    them, by a few tensor ops for all groups at once."""
    same = Tq == Tk and all(a == c and b == d for a, b, c, d in live)  # self-attention: one index for both
    single, groups = [], []
    q_rows, k_rows = array("q"), array("q")
    for segs in _groups(live, H, D, backward):
        if len(segs) == 1:
            single += segs
            continue
        wq, wk = max(b - a for a, b, _, _ in segs), max(d - c for _, _, c, d in segs)
        for a, b, c, d in segs:
            q_rows.extend(range(a, b))
            q_rows.extend(repeat(b - 1, wq - b + a))
            if not same:
                k_rows.extend(range(c, d))
                k_rows.extend(repeat(d - 1, wk - d + c))
        groups.append((len(segs), wq, wk, any(d - c < wk for _, _, c, d in segs)))
    single.sort()
    plan = _CpuPlan(_gaps([(a, b) for a, b, _, _ in live], Tq), _gaps([(c, d) for _, _, c, d in live], Tk), single,
                    groups, torch.tensor(single, dtype=torch.int64).view(-1, 4))
    if not groups:
        return plan
    q_index, q_dst = _padded_index(q_rows, Tq)
    k_index, k_dst = (q_index, q_dst) if same else _padded_index(k_rows, Tk)
    bias = torch.zeros(k_dst.shape, dtype=dtype).masked_fill_(k_dst == Tk, -math.inf)
    return plan._replace(q_index=q_index, q_dst=q_dst, k_index=k_index, k_dst=k_dst, bias=bias)


def _padded_calls(plan: _CpuPlan):
    """Per padded group: ``(G, wq, wk, q positions, k positions, bias or None)``."""
    qo = ko = 0
    for G, wq, wk, masked in plan.groups:
        qs, ks = slice(qo, qo + G * wq), slice(ko, ko + G * wk)
        yield G, wq, wk, qs, ks, plan.bias[ks].view(G, 1, 1, wk) if masked else None
        qo, ko = qs.stop, ks.stop


def _batched(x, index, G, w):
    """Rows ``index`` (G * w) of ``x (T, H, D)`` gathered as ``(G, H, w, D)``."""
    return x.index_select(0, index).view(G, w, *x.shape[1:]).transpose(1, 2)


def _gaps(ranges, total: int) -> list:
    """The rows of ``[0, total)`` outside the sorted, disjoint ``ranges``."""
    gaps, prev = [], 0
    for a, b in ranges + [(total, total)]:
        if a > prev:
            gaps.append((prev, a))
        prev = b
    return gaps


def _filled(buf, gaps, value):
    """``buf`` (rows along dim 0) set to ``value`` on the rows of ``gaps`` (only: the
    calls overwrite the others)."""
    for a, b in gaps:
        buf.narrow(0, a, b - a).fill_(value)
    return buf


def _heads_view(x):
    """(T, H, D) -> (1, H, T, D), a view (a segment is then one narrow()); the fused
    kernel reads rows with a unit last stride."""
    return (x if x.stride(-1) == 1 else x.contiguous()).transpose(0, 1)[None]


def _cpu_forward(q, k, v, cu_q, cu_k, scale):
    """torch's fused CPU flash kernel per group of segments or per segment (``_cpu_plan``)."""
    fwd, _ = _cpu_flash()
    Tq, H, D = q.shape
    plan = _cpu_plan(q, k, cu_q, cu_k)
    out = _filled(q.new_empty(Tq + 1, H, D), plan.q_gaps, 0)  # row Tq: scratch for padded positions
    lse = torch.empty((H, Tq + 1), dtype=acc_dtype(q.dtype), device=q.device)
    lse_rows = _filled(lse.t(), plan.q_gaps, -math.inf)
    # gathered group by group: temporaries of one group are reused by the next
    # (gathering all groups at once made megabytes of fresh pages per call)
    for G, wq, wk, qs, ks, bias in _padded_calls(plan):
        qi, ki = plan.q_index[qs], plan.k_index[ks]
        o, l = fwd(_batched(q, qi, G, wq), _batched(k, ki, G, wk), _batched(v, ki, G, wk), 0.0, False,
                   attn_mask=bias, scale=scale)
        dst = plan.q_dst[qs].view(G, wq)  # padded positions land on the scratch row
        out.index_put_((dst,), o.transpose(1, 2))
        lse_rows.index_put_((dst,), l.transpose(1, 2).to(lse.dtype))
    if plan.single:
        (_native_segments() or _python_segments)(q, k, v, out, lse, plan.single_bounds, scale)
    return out[:Tq], lse[:, :Tq].contiguous()


def _python_segments(q, k, v, out, lse, bounds, scale):
    """``native_attention_segments`` without the compiled library: the kernel per
    segment of ``bounds`` (S, 4), its output into ``out``'s rows, its lse into ``lse``."""
    fwd, _ = _cpu_flash()
    # Python calls per segment are a visible share of a ~20 us segment call: views made once
    qh, kh, vh, oh = _heads_view(q), _heads_view(k), _heads_view(v), _heads_view(out)
    lses, rows = [], []
    for a, b, c, d in bounds.tolist():
        # the output written at once (holding every segment's until the end is slower:
        # allocator), by narrow().copy_() (a Python slice assignment costs as much as the
        # copy); the small lse rows held and written in one copy
        o, l = fwd(qh.narrow(2, a, b - a), kh.narrow(2, c, d - c), vh.narrow(2, c, d - c), 0.0, False, scale=scale)
        oh.narrow(2, a, b - a).copy_(o)
        lses.append(l)
        rows.append(torch.arange(a, b))
    lse.index_copy_(1, torch.cat(rows), torch.cat(lses, 2)[0].to(lse.dtype))


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
    """The fused CPU kernel's backward, grouped as the forward but in narrower groups
    (``_CPU_BWD_MAX_WIDTH``); padded query rows get dO = 0, so they add nothing
    to dk and dv."""
    _, bwd = _cpu_flash()
    D = q.shape[-1]
    plan = _cpu_plan(q, k, cu_q, cu_k, backward=True)
    if dlse is not None:
        dout, q, k, v, out = _with_lse_gradient(dout, dlse, q, k, v, out)
    Tq, Tk = q.shape[0], k.shape[0]
    dq = _filled(q.new_empty(Tq + 1, *q.shape[1:]), plan.q_gaps, 0)
    dk = _filled(k.new_empty(Tk + 1, *k.shape[1:]), plan.k_gaps, 0)
    dv = _filled(v.new_empty(Tk + 1, *v.shape[1:]), plan.k_gaps, 0)
    lse_rows = lse.t()
    for G, wq, wk, qs, ks, bias in _padded_calls(plan):
        qi, ki, q_dst = plan.q_index[qs], plan.k_index[ks], plan.q_dst[qs].view(G, wq)
        g = _batched(dout, qi, G, wq).masked_fill((q_dst == Tq)[:, None, :, None], 0)
        lse_g = lse_rows.index_select(0, qi).view(G, wq, -1).transpose(1, 2).contiguous()
        gq, gk, gv = bwd(g, _batched(q, qi, G, wq), _batched(k, ki, G, wk), _batched(v, ki, G, wk),
                         _batched(out, qi, G, wq), lse_g, 0.0, False, attn_mask=bias, scale=scale)
        dq.index_put_((q_dst,), gq.transpose(1, 2))
        k_dst = (plan.k_dst[ks].view(G, wk),)
        dk.index_put_(k_dst, gk.transpose(1, 2))
        dv.index_put_(k_dst, gv.transpose(1, 2))
    views = [_heads_view(t) for t in (dout, q, k, v, out, dq, dk, dv)]
    gh, qh, kh, vh, oh, dqh, dkh, dvh = views
    lh = lse[None]
    for a, b, c, d in plan.single:
        n, m = b - a, d - c
        gq, gk, gv = bwd(gh.narrow(2, a, n), qh.narrow(2, a, n), kh.narrow(2, c, m), vh.narrow(2, c, m),
                         oh.narrow(2, a, n), lh.narrow(2, a, n).contiguous(), 0.0, False, scale=scale)
        dqh.narrow(2, a, n).copy_(gq)
        dkh.narrow(2, c, m).copy_(gk)
        dvh.narrow(2, c, m).copy_(gv)
    if dlse is None:
        return dq[:Tq], dk[:Tk], dv[:Tk]
    # the widened buffers' first D columns, contiguous as the op's fake declares
    return dq[:Tq, :, :D].contiguous(), dk[:Tk, :, :D].contiguous(), dv[:Tk, :, :D].contiguous()


def torch_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """CPU: the fused kernel's own backward; CUDA: the shared lse-based backward."""
    if q.device.type == "cpu":
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
        # name, forward, backward, devices, dtypes, available, check
        ("flash_attn", flash_attn_forward, lse_backward, ("cuda",), _HALF, _flash_available, _flash_check),
        ("torch", torch_forward, torch_backward, ("cuda", "cpu"), all_dtypes + (torch.float64,), _torch_available, _torch_check),
        ("xformers", xformers_forward, lse_backward, ("cuda",), all_dtypes, _xformers_available, _head_dim_multiple_of_8),
    )
    for name, forward, backward, devices, dtypes, available, check in table:
        for op, fn in (("varlen_attention", forward), ("varlen_attention_backward", backward)):
            register(Impl(op=op, name=name, fn=fn, devices=devices, dtypes=dtypes, available=available, check=check))


_register()
