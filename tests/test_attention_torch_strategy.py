"""The torch backend's CPU strategy (setok_kernels/attention_backends.py): segments
grouped by the cost model into padded batches or called one by one. Whatever the
grouping, values, lse and gradients (lse gradient included) equal the float64
reference; the group boundaries of the model; the plan's memo; the convention
for rows without keys."""

import math

import pytest
import torch

import setok_kernels
from setok_kernels import attention_backends as ab

from ._data import attention_inputs


@pytest.fixture
def strategy(monkeypatch):
    """``strategy(call_us, bwd_width)``: the model's constants for this test (plans re-made)."""

    def set_(call_us=ab._CPU_CALL_US, bwd_width=ab._CPU_BWD_MAX_WIDTH):
        monkeypatch.setattr(ab, "_CPU_CALL_US", call_us)
        monkeypatch.setattr(ab, "_CPU_BWD_MAX_WIDTH", bwd_width)
        ab._PLANS.clear()

    yield set_
    ab._PLANS.clear()


# every segment its own call / every segment in as few groups as the model allows / the default
STRATEGIES = {"single": (0.0, 0), "grouped": (math.inf, 1 << 30), "default": (ab._CPU_CALL_US, ab._CPU_BWD_MAX_WIDTH)}

CASES = [
    # lens_q, lens_k, H, D (empty and length-1 segments, cross attention, equal lengths)
    ([3, 1, 0, 7, 2, 1, 5, 1, 1], None, 2, 16),
    ([4, 4, 4, 4, 9, 9, 1], None, 1, 128),
    ([2, 0, 5, 3, 1, 6], [3, 4, 0, 2, 1, 6], 2, 32),
    ([1, 2, 3], [5, 1, 2], 1, 2048),
]


def _run(backend, q, k, v, cu_q, cu_k, dout, dlse):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend=backend, return_lse=True)
    loss = (out * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _inputs(lens_q, lens_k, H, D, dtype):
    """Inputs with two query rows after the last segment; ``lens_k`` None:
    self-attention (k, v with q's rows)."""
    q, k, v, cu_q, cu_k = attention_inputs(lens_q, lens_k or lens_q, H, D, trail=2)
    gen = torch.Generator().manual_seed(3)
    if lens_k is None:
        k, v = torch.randn(q.shape, generator=gen), torch.randn(q.shape, generator=gen)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(H, q.shape[0], generator=gen).to(dtype)
    return q, k, v, cu_q, None if lens_k is None else cu_k, dout, dlse


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("lens_q,lens_k,H,D", CASES)
def test_every_strategy_matches_the_reference_in_float64(strategy, name, lens_q, lens_k, H, D):
    strategy(*STRATEGIES[name])
    q, k, v, cu_q, cu_k, dout, dlse = _inputs(lens_q, lens_k, H, D, torch.float64)
    want = _run("reference", q, k, v, cu_q, cu_k, dout, dlse)
    got = _run("torch", q, k, v, cu_q, cu_k, dout, dlse)
    for label, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, label
        assert g.is_contiguous(), label
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"{name} {label}")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_float32(strategy, name):
    strategy(*STRATEGIES[name])
    q, k, v, cu_q, cu_k, dout, dlse = _inputs([5, 0, 1, 9, 3, 3, 12, 2], None, 2, 64, torch.float32)
    want = _run("reference", *(t.double() if t.is_floating_point() else t for t in (q, k, v, cu_q)), cu_k,
                dout.double(), dlse.double())
    got = _run("torch", q, k, v, cu_q, cu_k, dout, dlse)
    for label, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5, msg=f"{name} {label}")


def test_keyless_rows_and_rows_outside_every_segment(strategy):
    """Query segments without keys, keys without queries, rows after the last
    segment: 0 / -inf, no gradient, in every strategy."""
    for name in STRATEGIES:
        strategy(*STRATEGIES[name])
        q, k, v, cu_q, cu_k, dout, dlse = _inputs([2, 3, 0, 1], [0, 3, 4, 2], 1, 16, torch.float32)
        out, lse, dq, dk, dv = _run("torch", q, k, v, cu_q, cu_k, dout, dlse)
        keyless = torch.tensor([True] * 2 + [False] * 3 + [False] + [True] * 2)  # segment 0 has no keys; trail
        assert torch.all(out[keyless] == 0) and torch.all(lse[:, keyless] == -math.inf), name
        assert torch.all(dq[keyless] == 0) and torch.all(dq[~keyless] != 0), name
        # keys of segment 2 have no queries
        assert torch.all(dk[3:7] == 0) and torch.all(dv[3:7] == 0) and torch.all(dk[:3] != 0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,H,D", CASES)
def test_compiled_segment_loop_equals_the_python_loop(strategy, monkeypatch, lens_q, lens_k, H, D, dtype):
    """The compiled loop over the segments called one by one makes the Python loop's
    kernel calls: bit-equal outputs and lse, rows outside the segments included."""
    if ab._native_segments() is None:
        pytest.skip("setok's compiled library is not loaded")
    strategy(*STRATEGIES["single"])
    q, k, v, cu_q, cu_k, _, _ = _inputs(lens_q, lens_k, H, D, dtype)
    ran, results = [], {}
    for name, loop in (("compiled", ab._native_segments()), ("python", ab._python_segments)):
        def counted(*args, loop=loop, name=name):
            ran.append(name)
            return loop(*args)
        monkeypatch.setattr(ab, "_native_segments", lambda counted=counted: counted)
        results[name] = setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="torch", return_lse=True)
    assert ran == ["compiled", "python"], "each loop ran once"
    compiled, python = results["compiled"], results["python"]
    for label, c, p in zip(("out", "lse"), compiled, python):
        assert c.dtype == p.dtype and c.shape == p.shape and c.is_contiguous(), label
        assert torch.equal(c, p), label


def test_compiled_segment_loop_names_a_bad_segment():
    if ab._native_segments() is None:
        pytest.skip("setok's compiled library is not loaded")
    q = torch.randn(5, 1, 4)
    out, lse = torch.zeros(6, 1, 4), torch.zeros(1, 6)
    for bounds, what in (([[0, 6, 0, 5]], "outside q"), ([[2, 2, 0, 5]], "is empty"), ([[0, 5, -1, 5]], "outside")):
        with pytest.raises(RuntimeError, match=rf"segments\[0\] = .*{what}"):
            ab._native_segments()(q, q, q, out, lse, torch.tensor(bounds), 0.5)
    with pytest.raises(RuntimeError, match="segments must be an \\(S, 4\\) int64"):
        ab._native_segments()(q, q, q, out, lse, torch.tensor([[0, 5, 0]]), 0.5)


def test_all_segments_empty(strategy):
    q, k, v, cu_q, cu_k = attention_inputs([0, 0], [0, 0], 2, 8, trail=3)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)  # keys in no segment
    out, lse = setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="torch", return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_grouping_follows_the_cost_model():
    """Tiny segments share calls, long ones get their own, sorted by work."""
    live = [(0, 1, 0, 1), (1, 3, 1, 3), (3, 200, 3, 200), (200, 201, 200, 201), (201, 400, 201, 400)]
    groups = ab._groups(live, 2, 128)
    assert groups == [[(0, 1, 0, 1), (200, 201, 200, 201), (1, 3, 1, 3)], [(3, 200, 3, 200)], [(201, 400, 201, 400)]]
    # wider heads make padding and copies costlier: smaller groups
    live = [(i * 100, i * 100 + 20 + i, i * 100, i * 100 + 20 + i) for i in range(8)]
    assert len(ab._groups(live, 2, 32)) == 1
    assert len(ab._groups(live, 2, 2048)) == 8


def test_group_boundary(strategy, monkeypatch):
    """A segment joins when it adds less than a call (strictly): at the boundary it does not."""
    monkeypatch.setattr(ab, "_CPU_US_PER_PAIR", 1.0)
    monkeypatch.setattr(ab, "_CPU_US_PER_ROW_ELEMENT", 0.0)
    live = [(0, 3, 0, 3), (3, 7, 3, 7)]
    added = 2 * 4 * 4 - 3 * 3 - 4 * 4  # padding 3 -> 4 (pair units with H = D = 1)
    strategy(call_us=added)
    assert ab._groups(live, 1, 1) == [[live[0]], [live[1]]]
    strategy(call_us=added + 1e-9)
    assert ab._groups(live, 1, 1) == [live]
    # both sides of the boundary compute the same
    q, k, v, cu_q, _ = attention_inputs([3, 4], [3, 4], 1, 1)
    results = []
    for call_us in (added, added + 1e-9):
        strategy(call_us=call_us)
        results.append(setok_kernels.varlen_attention(q, k, v, cu_q, backend="torch"))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_backward_groups_stop_at_their_width(strategy):
    """Backward groups: no wider than _CPU_BWD_MAX_WIDTH (max(wq, wk) * D), the forward's may be."""
    live = [(i * 8, i * 8 + 8, i * 8, i * 8 + 8) for i in range(4)]
    strategy(call_us=1e6, bwd_width=8 * 16)
    assert len(ab._groups(live, 1, 16, backward=True)) == 1
    strategy(call_us=1e6, bwd_width=8 * 16 - 1)
    assert len(ab._groups(live, 1, 16, backward=True)) == 4
    assert len(ab._groups(live, 1, 16)) == 1


def test_a_nan_stays_in_its_segment_when_grouped(strategy):
    """Padded positions repeat their own segment's rows: a NaN in one segment of a
    group leaves the others' values and gradients finite and exact."""
    strategy(*STRATEGIES["grouped"])
    q, k, v, cu_q, _, dout, dlse = _inputs([3, 2, 4, 1], None, 1, 8, torch.float64)
    clean = _run("reference", q, k, v, cu_q, None, dout, dlse)
    k[3 + 1] = math.nan  # segment 1: rows 3, 4
    got = _run("torch", q, k, v, cu_q, None, dout, dlse)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[3:5] = False
    for g, w in zip(got[:1] + got[2:], clean[:1] + clean[2:]):
        torch.testing.assert_close(g[others], w[others], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1][:, others], clean[1][:, others], rtol=1e-12, atol=1e-12)


def test_gradcheck_grouped_float64(strategy):
    strategy(*STRATEGIES["grouped"])
    q, k, v, cu_q, cu_k = attention_inputs([2, 1, 0, 3], [3, 1, 2, 2], H=1, D=4)
    inputs = tuple(t.double().requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="torch", return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, inputs)


def test_plan_is_memoized_on_the_offsets_values(strategy):
    strategy()
    q, k, v, cu_q, _ = attention_inputs([3, 1, 5], [3, 1, 5], 1, 8)
    plan = ab._cpu_plan(q, k, cu_q, cu_q)
    same = cu_q.clone()
    assert ab._cpu_plan(q, k, same, same) is plan
    assert ab._cpu_plan(q, k, cu_q, cu_q, backward=True) is not plan
    other = cu_q.clone()
    other[1] += 1
    assert ab._cpu_plan(q, k, other, other) is not plan


def test_keyless_rows_from_key_lengths_even_when_a_kernel_leaves_nan():
    """A kernel's lse / output for a query row whose segment has no keys may be NaN
    (memory-efficient kernel on an H200): the key lengths make it 0 / -inf."""
    q, k, v, cu_q, cu_k = attention_inputs([2, 0, 3], [0, 4, 3], H=2, D=4)
    out = torch.randn_like(q)
    lse = torch.randn(2, q.shape[0])
    out[:2] = math.nan
    lse[:, :2] = math.nan
    got_out, got_lse = ab._to_setok_convention(out, lse, cu_q, cu_k)
    assert torch.all(got_out[:2] == 0) and torch.all(got_lse[:, :2] == -math.inf)
    torch.testing.assert_close(got_out[2:], out[2:])
    torch.testing.assert_close(got_lse[:, 2:], lse[:, 2:])


def test_lse_gradient_returns_contiguous_gradients():
    """With an lse gradient the backward widens the head dim by one column; the
    gradients it returns are contiguous, as the op's fake (empty_like) declares."""
    q, k, v, cu_q, cu_k = attention_inputs([3, 0, 5], [2, 4, 1], H=2, D=16)
    out, lse = ab.torch_forward(q, k, v, cu_q, cu_k, 8, 8, 0.3)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    for grad, like in zip(ab.torch_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, 8, 8, 0.3), (q, k, v)):
        assert grad.is_contiguous() and grad.stride() == torch.empty_like(like).stride()


@pytest.mark.parametrize("backend", [None, "torch", "reference"])
def test_gradient_free_calls_skip_the_op_with_its_results_and_errors(monkeypatch, backend):
    """Without gradients, outside traces and modes, ``varlen_attention`` runs the op's
    body itself (``ops.attention_direct``): the op's results bit for bit, its value
    checks on the CPU (``validate=False`` too), the op under a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from setok_kernels import ops

    q, k, v, cu_q, cu_k = attention_inputs([3, 0, 7, 1], [2, 5, 0, 4], H=2, D=32, trail=2)
    direct, run = [], ops.attention_direct
    monkeypatch.setattr(ops, "attention_direct", lambda *a: direct.append(a[0].name) or run(*a))
    got = setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend=backend, return_lse=True)
    want = torch.ops.setok.varlen_attention(q, k, v, cu_q, cu_k, 7, 5, 32**-0.5, backend or "")
    assert len(direct) == 1 and all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        setok_kernels.varlen_attention(q, k, v, cu_q[[0, 3, 1, 3, 4]], cu_k, backend=backend, validate=False)
    direct.clear()

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
    assert "setok.varlen_attention.default" in Seen.ops and not direct
    q.requires_grad_()
    setok_kernels.varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
    assert not direct  # a call that needs gradients goes through the op (its autograd)


# ------------------------------------------------------------------ the encoders around it (setok_model.layers)


@pytest.mark.parametrize("block", ["shared_norm", "pre_norm"])
@pytest.mark.parametrize("training", [False, True])
def test_encoder_segment_means_equal_the_means_of_its_rows(block, training):
    """``segment_means=True`` (fc2 applied to the means) gives the segment means of
    the rows, values and gradients, with an empty segment (mean 0)."""
    from setok_model.layers import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(block, 16, 2, 24, 2, 0.0).double().train(training)
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 16, dtype=torch.float64)

    def grads(means):
        enc.zero_grad()
        x.grad = None
        (means * weight).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in enc.parameters()]

    want = setok_kernels.segment_mean(enc(x, cu, 5), cu)
    want_grads = grads(want)
    got = enc(x, cu, 5, segment_means=True)
    assert torch.all(got[1] == 0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_encoder_segment_means_with_dropout_active_are_the_rows_means():
    """Dropout after fc2 acts per row: then the rows are computed and averaged."""
    from setok_model.layers import build_encoder

    enc = build_encoder("shared_norm", 16, 2, 24, 1, 0.3).train()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    x = torch.randn(9, 16)
    torch.manual_seed(1)
    want = setok_kernels.segment_mean(enc(x, cu, 5), cu)
    torch.manual_seed(1)
    torch.testing.assert_close(enc(x, cu, 5, segment_means=True), want)


def test_encoder_residual_stream_keeps_its_dtype_under_autocast():
    """The in-place residual adds fall back to ``x + branch`` when the branch is 16-bit."""
    from setok_model.layers import build_encoder

    enc = build_encoder("shared_norm", 16, 2, 24, 1, 0.0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc(x, cu, 5).dtype == torch.float32
        assert enc(x, cu, 5, segment_means=True).dtype == torch.float32
