"""setok.varlen_attention: Triton kernels (interpreter on CPU), the reference, and
the third-party backends' declared support, against an independent oracle.

Tolerances follow flash-attn's rule: a backend's error against the float64
oracle may be at most a small multiple of the reference's own error in the
same dtype (plus one rounding step of the dtype).
"""

import math

import pytest
import torch

import setok_kernels
from setok_kernels import BackendUnavailableError, _backends, attention_backends
from setok_kernels._backends import CallInfo

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# one rounding step of the output dtype, relative to the output magnitude
ULP = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


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


def offsets(lengths, start=0):
    return torch.tensor([start] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def make_case(lens_q, lens_k, H, D, lead=0, trail=0):
    cu_q = offsets(lens_q, lead)
    cu_k = offsets(lens_k)
    Tq, Tk = int(cu_q[-1]) + trail, int(cu_k[-1])
    q, k, v = torch.randn(Tq, H, D), torch.randn(Tk, H, D), torch.randn(Tk, H, D)
    return q, k, v, cu_q, cu_k


def run(backend, q, k, v, cu_q, cu_k, dtype, dout, self_attention=False):
    """(out, lse, dq, dk, dv) through the public function, gradients from ``dout``."""
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = setok_kernels.varlen_attention(
        q, k, v, cu_q, None if self_attention else cu_k, backend=backend, return_lse=True
    )
    out.backward(dout.to(dtype))
    return out, lse, q.grad, k.grad, v.grad


def max_err(a, b):
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite pattern differs"
    return (a.double() - b.double())[finite].abs().max().item() if finite.any() else 0.0


def assert_close_to_oracle(backend, case, dtype, self_attention=False):
    q, k, v, cu_q, cu_k = case
    scale = q.shape[-1] ** -0.5
    dout = torch.randn_like(q)
    # float64 oracle of values and gradients
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, lse64 = oracle(q64, k64, v64, cu_q, cu_k, scale)
    out64.backward(dout.double())
    want = (out64.detach(), lse64.detach(), q64.grad, k64.grad, v64.grad)
    got = run(backend, q, k, v, cu_q, cu_k, dtype, dout, self_attention)
    ref = run("reference", q, k, v, cu_q, cu_k, dtype, dout, self_attention)
    for name, g, r, w in zip(("out", "lse", "dq", "dk", "dv"), got, ref, want):
        assert g.dtype == (torch.float32 if name == "lse" else dtype), name
        assert g.shape == w.shape, name
        bound = 3 * max_err(r, w) + ULP[dtype] * max(1.0, w[torch.isfinite(w)].abs().max().item() if w.numel() else 1.0)
        err = max_err(g, w)
        assert err <= bound, f"{backend} {name} {dtype}: error {err:.3g} > {bound:.3g} (reference error {max_err(r, w):.3g})"
    # rows without keys and rows outside every segment: exactly 0 and -inf
    keyless = torch.isinf(want[1])
    assert torch.all(got[1][keyless] == -math.inf)
    assert torch.all(got[0].transpose(0, 1)[keyless] == 0)


SHORT = [3, 1, 0, 7, 2, 1, 5]  # many short segments, one empty, several of length 1


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,H", [(16, 1), (64, 4), (128, 2)])
def test_triton_self_attention_short_segments(dtype, D, H):
    case = make_case(SHORT, SHORT, H, D)
    assert_close_to_oracle("triton", case, dtype, self_attention=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,H,lens", [(256, 2, [5, 1, 4]), (512, 3, [2, 3]), (2048, 2, [3, 1, 4])])
def test_triton_large_head_dims(dtype, D, H, lens):
    case = make_case(lens, lens, H, D)
    assert_close_to_oracle("triton", case, dtype, self_attention=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cross_attention_empty_segments(dtype):
    # empty key segments (rows get 0), empty query segments (keys get zero grads),
    # segment lengths that differ between q and k, rows after all segments
    case = make_case([2, 0, 3, 4, 0, 1], [5, 3, 0, 1, 6, 2], H=2, D=32, trail=3)
    assert_close_to_oracle("triton", case, dtype)


@pytest.mark.triton
def test_triton_long_segment_spans_many_tiles():
    # a few hundred tokens: many q tiles and key blocks, the workspace path
    case = make_case([300, 2, 40], [300, 2, 40], H=1, D=16)
    assert_close_to_oracle("triton", case, torch.float32, self_attention=True)


@pytest.mark.triton
def test_triton_8_heads_16bit_long_tile_walk():
    case = make_case([70, 1, 9], [70, 1, 9], H=8, D=16)
    assert_close_to_oracle("triton", case, torch.float16, self_attention=True)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize(
    "D,H,lens_q,lens_k",
    [(16, 1, [1, 0, 3], [1, 0, 3]), (32, 2, [300, 4], [300, 4]), (2048, 2, [3, 5], [3, 5]), (128, 4, [2, 0, 5], [0, 4, 3])],
)
def test_reference_matches_oracle(dtype, D, H, lens_q, lens_k):
    case = make_case(lens_q, lens_k, H, D, trail=1)
    assert_close_to_oracle("reference", case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "D,H,lens_q,lens_k",
    [(16, 1, [1, 0, 3], [1, 0, 3]), (32, 2, [300, 4], [300, 4]), (2048, 2, [3, 5], [3, 5]), (128, 4, [2, 0, 5], [0, 4, 3])],
)
def test_torch_cpu_matches_oracle(dtype, D, H, lens_q, lens_k):
    """torch's fused CPU flash kernel per length bucket (auto's choice on CPU)."""
    case = make_case(lens_q, lens_k, H, D, trail=1)
    assert_close_to_oracle("torch", case, dtype)


def test_torch_declines_float64_and_auto_falls_back():
    q, k, v, cu_q, _ = make_case([3, 2], [3, 2], H=1, D=16)
    with pytest.raises(BackendUnavailableError, match="dtype float64 not supported"):
        setok_kernels.varlen_attention(q.double(), k.double(), v.double(), cu_q, backend="torch")
    call = CallInfo(torch.device("cpu"), torch.float64, True, dict(head_dim=16))
    chosen = next(name for name, reason in _backends.explain("varlen_attention", call) if reason is None)
    assert chosen == "reference"


@pytest.mark.triton
def test_triton_is_deterministic_and_skips_no_row():
    q, k, v, cu_q, cu_k = make_case([9, 1, 30], [9, 1, 30], H=2, D=32)
    first = setok_kernels.varlen_attention(q, k, v, cu_q, backend="triton", return_lse=True)
    second = setok_kernels.varlen_attention(q, k, v, cu_q, backend="triton", return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.triton
def test_triton_malformed_offsets_stay_in_bounds():
    """validate=False with decreasing / out-of-range offsets: defined results, no crash."""
    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 9, 4, 40], dtype=torch.int32)
    out, lse = setok_kernels.varlen_attention(q, k, v, cu, backend="triton", validate=False, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 12)
    assert torch.isfinite(out).all()


def test_opcheck():
    q, k, v, cu_q, cu_k = make_case([3, 0, 5], [2, 4, 1], H=2, D=16)
    for backend in ("reference", "triton", "torch"):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 8, 8, 0.3, backend)
        torch.library.opcheck(torch.ops.setok.varlen_attention, args)


def test_gradcheck_reference_float64():
    q, k, v, cu_q, cu_k = make_case([3, 1, 0], [2, 0, 3], H=2, D=8)
    inputs = tuple(t.double().requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="reference")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_equals_eager(backend):
    q, k, v, cu_q, _ = make_case([4, 1, 6], [4, 1, 6], H=2, D=16)

    def f(q, k, v):
        return setok_kernels.varlen_attention(q, k, v, cu_q, max_seqlen_q=6, backend=backend).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_forcing_unavailable_backend_names_the_reason(backend):
    q, k, v, cu_q, _ = make_case([3, 2], [3, 2], H=1, D=16)
    with pytest.raises(BackendUnavailableError, match=backend) as info:
        setok_kernels.varlen_attention(q, k, v, cu_q, backend=backend)
    impl = next(i for i in _backends.implementations("varlen_attention") if i.name == backend)
    assert impl.unavailable_reason() in str(info.value)


def test_triton_declines_float64():
    q, k, v, cu_q, _ = make_case([3], [3], H=1, D=16)
    with pytest.raises(BackendUnavailableError, match="dtype float64 not supported"):
        setok_kernels.varlen_attention(q.double(), k.double(), v.double(), cu_q, backend="triton")


def _auto_order(dtype, head_dim):
    call = CallInfo(torch.device("cuda"), dtype, False, dict(head_dim=head_dim))
    return [name for name, _ in _backends.explain("varlen_attention", call)]


def test_auto_order_table():
    """The documented (unmeasured) table: flash kernels first up to head_dim 256 in
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
    q, k, v, cu_q, cu_k = make_case([2, 0, 3], [3, 1, 0], H=2, D=8, lead=1, trail=2)
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
