"""setok.varlen_attention: Triton kernels (on the GPU where there is one, else in
the interpreter), the reference, the torch backend and the third-party
backends' declared support, against an independent float64 oracle.

Tolerances are tests/_data.py's TOLERANCE, flash-attn's rule: a backend's
error against the float64 oracle may be at most a small multiple of the
reference's own error in the same dtype (plus two rounding steps of the
dtype). float64 (CPU only) must be float64-accurate (its rtol), gradients of
the returned lse included.
"""

import math

import pytest
import torch

import setok_kernels
from setok_kernels import BackendUnavailableError, _backends, attention_backends, triton_attention
from setok_kernels._backends import CallInfo
from setok_kernels._triton import INTERPRETING

from ._data import RAGGED, TOLERANCE, assert_close_to_truth, attention_inputs, magnitude, max_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED = INTERPRETING


def oracle(q, k, v, cu_q, cu_k, scale):
    """Per segment, in float64: softmax(q k^T * scale) v and its log-sum-exp.
    Rows outside every segment, and rows of segments without keys, give 0 / -inf."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, H, D = q.shape
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    pieces, lses = [q.new_zeros(cu_q[0], H, D)], [q.new_full((H, cu_q[0]), -math.inf)]
    for s in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[s] : cu_q[s + 1]], k[cu_k[s] : cu_k[s + 1]], v[cu_k[s] : cu_k[s + 1]]
        if ks.shape[0] == 0:
            pieces.append(torch.zeros_like(qs))
            lses.append(q.new_full((H, qs.shape[0]), -math.inf))
            continue
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        pieces.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vs))
        lses.append(torch.logsumexp(scores, -1))
    tail = Tq - cu_q[-1]
    pieces.append(q.new_zeros(tail, H, D))
    lses.append(q.new_full((H, tail), -math.inf))
    return torch.cat(pieces), torch.cat(lses, 1)


def run(backend, q, k, v, cu_q, cu_k, dtype, dout, dlse=None, self_attention=False):
    """(out, lse, dq, dk, dv) through the public function, gradients from ``dout``
    (and ``dlse`` on the finite lse entries)."""
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = setok_kernels.varlen_attention(
        q, k, v, cu_q, None if self_attention else cu_k, backend=backend, return_lse=True
    )
    loss = (out * dout.to(dtype)).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * dlse.to(lse.dtype)).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def expected(case, dout, dlse, scale):
    """The oracle's (out, lse, dq, dk, dv) in float64 on the CPU."""
    q, k, v, cu_q, cu_k = case
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = oracle(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), scale)
    loss = (out64 * dout.cpu().double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse64), lse64, 0) * dlse.cpu().double()).sum()
    loss.backward()
    return out64.detach(), lse64.detach(), q64.grad, k64.grad, v64.grad


def assert_close_to_oracle(backend, case, dtype, self_attention=False, lse_grad=False):
    q, k, v, cu_q, cu_k = case
    scale = q.shape[-1] ** -0.5
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[1], q.shape[0], device=q.device) if lse_grad else None
    want = expected(case, dout, dlse, scale)
    got = run(backend, q, k, v, cu_q, cu_k, dtype, dout, dlse, self_attention)
    ref = run("reference", q, k, v, cu_q, cu_k, dtype, dout, dlse, self_attention)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, r, w in zip(("out", "lse", "dq", "dk", "dv"), got, ref, want):
        assert g.dtype == (acc if name == "lse" else dtype), name
        assert g.shape == w.shape, name
        assert g.device == q.device, name
        assert_close_to_truth(g, r, w, dtype, name=f"{backend} {name} {dtype}")
    # rows without keys and rows outside every segment: exactly 0 and -inf
    keyless = torch.isinf(want[1]).to(q.device)
    assert torch.all(got[1][keyless] == -math.inf)
    assert torch.all(got[0].transpose(0, 1)[keyless] == 0)


SHORT = list(RAGGED)  # many short segments, one empty, several of length 1
CPU_FLOAT64 = ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)]


def _float64_backend(backend):
    """float64 runs on CPU tensors (SPEC); Triton runs them only in the interpreter."""
    if backend == "triton" and not INTERPRETED:
        pytest.skip("float64 Triton runs in the interpreter only (CPU tensors)")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,H", [(16, 1), (24, 2), (64, 4), (128, 2)])
def test_triton_self_attention_short_segments(device, dtype, D, H):
    # D = 24: a head dim that is not a multiple of 16 (zero-padded to 32 for the kernels)
    case = attention_inputs(SHORT, SHORT, H, D, device=device)
    assert_close_to_oracle("triton", case, dtype, self_attention=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,H,lens", [(256, 2, [5, 1, 4]), (512, 3, [2, 3]), (2048, 2, [3, 1, 4])])
def test_triton_large_head_dims(device, dtype, D, H, lens):
    case = attention_inputs(lens, lens, H, D, device=device)
    assert_close_to_oracle("triton", case, dtype, self_attention=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cross_attention_empty_segments(device, dtype):
    # empty key segments (rows get 0), empty query segments (keys get zero grads),
    # segment lengths that differ between q and k, rows after all segments
    case = attention_inputs([2, 0, 3, 4, 0, 1], [5, 3, 0, 1, 6, 2], H=2, D=32, trail=3, device=device)
    assert_close_to_oracle("triton", case, dtype, lse_grad=True)


@pytest.mark.triton
@pytest.mark.parametrize("D,lens", [(16, [300, 2, 40]), (128, [90, 1, 75])])
def test_triton_long_segment_walks_many_blocks(device, D, lens):
    # segments longer than a walk block: resident accumulators (D = 16) and the
    # chunked head dim's per-program workspace (D = 128), in q and in k tiles
    case = attention_inputs(lens, lens, H=1, D=D, device=device)
    assert_close_to_oracle("triton", case, torch.float32, self_attention=True, lse_grad=True)


@pytest.mark.triton
def test_triton_8_heads_16bit_long_tile_walk(device):
    case = attention_inputs([70, 1, 9], [70, 1, 9], H=8, D=16, device=device)
    assert_close_to_oracle("triton", case, torch.float16, self_attention=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "D,H,lens_q,lens_k",
    [(16, 1, [1, 0, 3], [1, 0, 3]), (32, 2, [300, 4], [300, 4]), (2048, 2, [3, 5], [3, 5]), (128, 4, [2, 0, 5], [0, 4, 3])],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_reference_and_torch_match_oracle(device, backend, dtype, D, H, lens_q, lens_k):
    """The torch backend on CPU is torch's fused flash kernel per length bucket (auto's choice there)."""
    case = attention_inputs(lens_q, lens_k, H, D, trail=1, device=device)
    assert_close_to_oracle(backend, case, dtype, lse_grad=True)


@pytest.mark.parametrize("backend", CPU_FLOAT64)
@pytest.mark.parametrize(
    "D,H,lens_q,lens_k",
    [(16, 2, SHORT, SHORT), (128, 1, [2, 0, 80, 1], [3, 1, 70, 0]), (2048, 1, [3, 1], [2, 4])],
)
def test_float64_is_float64_accurate(backend, D, H, lens_q, lens_k):
    """Values, lse and gradients (lse gradient included) within float64's rtol (tests/_data.py)
    of the float64 oracle, relative to each one's magnitude: statistics and accumulators in float64."""
    _float64_backend(backend)
    case = attention_inputs(lens_q, lens_k, H, D, trail=1)
    dout, dlse = torch.randn_like(case[0]).double(), torch.randn(H, case[0].shape[0]).double()
    want = expected(case, dout, dlse, D**-0.5)
    got = run(backend, *case, torch.float64, dout, dlse)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == torch.float64, name
        assert max_error(g, w) <= TOLERANCE[torch.float64].rtol * magnitude(w), name


@pytest.mark.parametrize("backend", CPU_FLOAT64)
def test_gradcheck_float64_out_and_lse(backend):
    """gradcheck of (out, lse): the lse's gradient flows through every backward."""
    _float64_backend(backend)
    q, k, v, cu_q, cu_k = attention_inputs([3, 1, 0], [2, 0, 3], H=1, D=4, trail=1)
    inputs = tuple(t.double().requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend=backend, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0)  # keyless rows: -inf, no gradient

    assert torch.autograd.gradcheck(f, inputs)


def test_declines_float64_off_the_cpu():
    call = CallInfo(torch.device("cuda"), torch.float64, True, dict(head_dim=16))
    reasons = dict(_backends.explain("varlen_attention", call))
    assert "CPU" in reasons["triton"] and "CPU" in reasons["torch"]


def test_float32_matmuls_use_tf32_only_when_torch_does():
    assert triton_attention._precision(torch.float32) == "ieee"
    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_attention._precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 64, 80, 128, 256, 2048])
def test_gpu_configs_use_warpgroup_tiles(kernel, dtype, D):
    """Every GPU config: a walk block at least the own block, a head-dim chunk no
    wider than the padded head dim, and in 16-bit 64-row (or larger) tiles for wgmma."""
    configs = triton_attention.gpu_configs(kernel, D, dtype)
    assert configs and len(set(configs)) == len(configs)
    for bm, bn, bd, warps, stages in configs:
        own, walk = (bn, bm) if kernel == "dkdv" else (bm, bn)
        assert walk >= own and 16 <= bd <= max(16, 1 << (D - 1).bit_length())
        assert dtype == torch.float32 or min(bm, bn) >= 64


@pytest.mark.triton
def test_triton_is_deterministic_and_skips_no_row(device):
    q, k, v, cu_q, cu_k = attention_inputs([9, 1, 30], [9, 1, 30], H=2, D=32, device=device)
    first = setok_kernels.varlen_attention(q, k, v, cu_q, backend="triton", return_lse=True)
    second = setok_kernels.varlen_attention(q, k, v, cu_q, backend="triton", return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.triton
def test_triton_malformed_offsets_stay_in_bounds(device):
    """Decreasing / out-of-range offsets (what validation would refuse) reach the
    kernels directly: defined results, no out-of-bounds access."""
    q, k, v = (torch.randn(12, 2, 16, device=device) for _ in range(3))
    cu = torch.tensor([0, 9, 4, 40], dtype=torch.int32, device=device)
    out, lse = triton_attention.attention_forward(q, k, v, cu, cu, 40, 40, 0.25)
    assert out.shape == q.shape and lse.shape == (2, 12)
    assert torch.isfinite(out).all()
    grads = triton_attention.attention_backward(torch.randn_like(q), None, q, k, v, out, lse, cu, cu, 40, 40, 0.25)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [16, 80])  # 80: the chunked head-dim path in the interpreter (64 + a 16-wide tail)
@pytest.mark.parametrize("poisoned", ["q", "k", "v", "dout"])
def test_triton_non_finite_values_stay_in_their_segment(device, poisoned, D, dtype):
    """SPEC: NaN or Inf in one image must not change the other images' results. The
    segments share packed tiles and their dots (0 * NaN = NaN), yet every other
    segment's out, lse, dq, dk and dv is bit-identical to the clean run's; the
    poisoned segment's results are not all finite."""
    lens = [5, 3, 7]  # one tile; the poisoned segment [5, 8) has neighbours on both sides
    q, k, v, cu, _ = attention_inputs(lens, lens, H=2, D=D, device=device)
    inputs = dict(q=q, k=k, v=v, dout=torch.randn_like(q))
    dlse = torch.randn(2, q.shape[0], device=device)
    # fresh leaves per run: run() makes float32 inputs themselves require grad
    attend = lambda: run("triton", *(inputs[n].clone() for n in "qkv"), cu, cu, dtype, inputs["dout"], dlse, self_attention=True)  # noqa: E731
    clean = attend()
    inputs[poisoned] = inputs[poisoned].clone()
    inputs[poisoned][6, 0, 1] = math.nan
    inputs[poisoned][7, 1, D - 1] = math.inf
    dirty = attend()
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=device)
    inside[5:8] = True
    for name, c, d in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty):
        rows = (lambda t: t.transpose(0, 1)) if name == "lse" else (lambda t: t)
        assert torch.equal(rows(c)[~inside], rows(d)[~inside]), f"{name} of the other segments changed"
    assert not all(torch.isfinite(t[inside]).all() for t in (dirty[0], *dirty[2:])), "the poison vanished"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_equals_eager(device, backend):
    q, k, v, cu_q, _ = attention_inputs([4, 1, 6], [4, 1, 6], H=2, D=16, device=device)

    def f(q, k, v):
        return setok_kernels.varlen_attention(q, k, v, cu_q, max_seqlen_q=6, backend=backend).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_forcing_unavailable_backend_names_the_reason(backend):
    q, k, v, cu_q, _ = attention_inputs([3, 2], [3, 2], H=1, D=16)
    with pytest.raises(BackendUnavailableError, match=backend) as info:
        setok_kernels.varlen_attention(q, k, v, cu_q, backend=backend)
    impl = next(i for i in _backends.implementations("varlen_attention") if i.name == backend)
    assert impl.unavailable_reason() in str(info.value)


def _auto_order(dtype, head_dim):
    call = CallInfo(torch.device("cuda"), dtype, False, dict(head_dim=head_dim))
    return [name for name, _ in _backends.explain("varlen_attention", call)]


def test_auto_order_table():
    """The documented auto order (attention_backends.py): flash kernels first up to head_dim 256 in
    16-bit, the chunked Triton kernel first above it and in fp32."""
    assert _auto_order(torch.float16, 128) == ["flash_attn", "torch", "triton", "xformers", "reference"]
    assert _auto_order(torch.bfloat16, 2048) == ["triton", "flash_attn", "torch", "xformers", "reference"]
    assert _auto_order(torch.float32, 64)[0] == "triton"
    flash = next(i for i in _backends.implementations("varlen_attention") if i.name == "flash_attn")
    call = CallInfo(torch.device("cuda"), torch.float16, False, dict(head_dim=512))
    assert "256" in flash.check(call)


def test_memory_efficient_lse_layout_conversion():
    """The (S, H, max_seqlen) lse of memory-efficient kernels, and unwritten rows
    outside every segment, map onto the setok convention."""
    q, k, v, cu_q, cu_k = attention_inputs([2, 0, 3], [3, 1, 0], H=2, D=8, lead=1, trail=2)
    want_out, want_lse = oracle(q, k, v, cu_q, cu_k, 0.5)
    S, Tq = cu_q.numel() - 1, q.shape[0]
    padded = torch.full((S, 2, 32), float("nan"))
    for s in range(S):
        a, b = int(cu_q[s]), int(cu_q[s + 1])
        seg_lse = want_lse[:, a:b].float()
        padded[s, :, : b - a] = seg_lse.masked_fill(torch.isinf(seg_lse), math.inf)  # flash marks keyless rows +inf
    garbage = want_out.float().clone()
    garbage[0] = garbage[-2:] = 7.0  # rows no kernel writes
    lse = attention_backends._per_segment_lse(padded, cu_q, Tq)
    lse[:, 0] = 3.0
    out, lse = attention_backends._to_setok_convention(garbage, lse, cu_q)
    torch.testing.assert_close(lse, want_lse.float())
    torch.testing.assert_close(out, want_out.float())
