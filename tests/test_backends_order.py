"""One auto order per op family (_backends.AUTO_ORDER), the backward on the
forward's backend, empty attention answered before any backend, and one rule
for M (_validation.cluster_bound)."""

import math

import pytest
import torch

import setok_kernels as sk
from setok_kernels import _backends, ops, reference
from setok_kernels import _validation as V
from setok_kernels._backends import AUTO_ORDER, CallInfo, Impl, auto_order

from ._data import attention_inputs, offsets, random_labels


def _call(dtype=torch.float16, device="cuda", **extra):
    return CallInfo(torch.device(device), dtype, False, extra)


# ------------------------------------------------------------------ auto order


def test_every_backend_registers_in_its_family_order():
    for op in _backends.registered_ops():
        order = AUTO_ORDER[_backends.family(op)]
        names = [i.name for i in _backends.implementations(op)]
        assert names == [n for n in order if n in names], op
        assert names[-1] == "reference", f"{op}: the reference takes every call, so it comes last"


def test_a_name_outside_the_order_is_refused():
    before = _backends.implementations("knn_density")
    with pytest.raises(ValueError, match="not in the auto order"):
        _backends.register(Impl(op="knn_density", name="flash_attn", fn=None, devices=None, dtypes=(torch.float32,)))
    assert _backends.implementations("knn_density") == before


def test_backend_names_are_the_family_orders():
    assert _backends.backend_names("dpc") == ("auto",) + AUTO_ORDER["dpc"]
    assert _backends.backend_names("attention") == ("auto",) + AUTO_ORDER["attention"]


@pytest.mark.parametrize("op", ["varlen_attention", "varlen_attention_backward"])
def test_attention_order_is_refined_per_call(op):
    """Triton leads where no flash kernel applies (head dim > 256, float32); elsewhere the table."""
    table = AUTO_ORDER["attention"]
    assert auto_order(op, _call(torch.float16, head_dim=128)) == table
    assert auto_order(op, _call(torch.bfloat16, head_dim=256)) == table
    assert auto_order(op, _call(torch.float64, head_dim=64)) == table
    for call in (_call(torch.bfloat16, head_dim=512), _call(torch.float32, head_dim=64)):
        order = auto_order(op, call)
        assert order[0] == "triton" and sorted(order) == sorted(table)
        assert [n for n in order if n != "triton"] == [n for n in table if n != "triton"]


def test_dpc_order_ignores_the_call():
    for call in (_call(torch.float32, head_dim=4096), _call(torch.float64, device="cpu", k=3)):
        assert auto_order("dpc_cluster", call) is AUTO_ORDER["dpc"]


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.float32, 64), (torch.bfloat16, 1024)])
def test_explain_follows_auto_order_and_resolve_takes_its_first_taker(dtype, head_dim):
    for device in ("cpu", "cuda"):
        call = _call(dtype, device, head_dim=head_dim)
        rows = _backends.explain("varlen_attention", call)
        names = [name for name, _ in rows]
        assert names == [n for n in auto_order("varlen_attention", call) if n in names]
        first = next(name for name, reason in rows if reason is None)
        assert _backends.resolve("varlen_attention", "auto", call).name == first


# ------------------------------------------------------------------ backward on the forward's backend


class _Spy:
    def __init__(self, fn):
        self.fn, self.backends = fn, []

    def __call__(self, *args):
        self.backends.append(args[-1])
        return self.fn(*args)


def _spy(monkeypatch, name):
    spy = _Spy(getattr(ops, name))
    monkeypatch.setattr(ops, name, spy)
    return spy


def test_attention_backward_gets_the_forwards_backend_by_name(monkeypatch):
    spy = _spy(monkeypatch, "varlen_attention_backward")
    q, k, v, cu_q, cu_k = attention_inputs([3, 2], [2, 4], H=2, D=8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ran = _backends.resolve("varlen_attention", "auto", CallInfo(q.device, q.dtype, False, ops._attn_extra(q, k, 5, 6))).name
    ops.varlen_attention(q, k, v, cu_q, cu_k, 5, 6, 0.3, "")[0].sum().backward()
    assert spy.backends == [ran]  # "" (auto) arrives resolved
    # the environment at backward time does not matter: the forward's backend runs
    monkeypatch.setenv("SETOK_ATTN_BACKEND", "reference")
    out = ops.varlen_attention(q, k, v, cu_q, cu_k, 5, 6, 0.3, "")[0]
    monkeypatch.setenv("SETOK_ATTN_BACKEND", ran)
    out.sum().backward()
    assert spy.backends == [ran, "reference"]


def test_segment_mean_backward_gets_the_forwards_backend_by_name(monkeypatch):
    plain = _spy(monkeypatch, "segment_mean_backward")
    weighted = _spy(monkeypatch, "segment_mean_weighted_backward")
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    cu = offsets([3, 0, 4])
    ran = _backends.resolve("segment_mean", "auto", CallInfo(x.device, x.dtype, False, {})).name
    monkeypatch.setenv("SETOK_BACKEND", "reference")
    first = ops.segment_mean(x, cu, "")
    second = ops.segment_mean(x, cu, "auto", w, 0.5)
    monkeypatch.setenv("SETOK_BACKEND", "auto")
    (first.sum() + second.sum()).backward()
    assert plain.backends == ["reference"] and weighted.backends == [ran]


def test_merge_clusters_backward_gets_the_forwards_backend_by_name(monkeypatch):
    spy = _spy(monkeypatch, "merge_clusters_backward")
    B, N, M = 2, 9, 3
    x = torch.randn(B, N, 4, dtype=torch.float64, requires_grad=True)
    num = torch.tensor([3, 2])
    labels = random_labels(B, N, M, num)
    monkeypatch.setenv("SETOK_BACKEND", "reference")
    out = ops.merge_clusters(x, labels, num, M, None, 0.0, None, None, "")[0]
    monkeypatch.setenv("SETOK_BACKEND", "auto")
    out.sum().backward()
    assert spy.backends == ["reference"]


# ------------------------------------------------------------------ nothing to attend


EMPTY = {  # (Tq, Tk, cu_seqlens_q, cu_seqlens_k)
    "no query rows": (0, 3, [0, 0, 0], [0, 2, 3]),
    "no key rows": (3, 0, [0, 2, 3], [0, 0, 0]),
    "no segment": (3, 2, [0], [0]),
}


@pytest.mark.parametrize("case", EMPTY)
@pytest.mark.parametrize("backend", ["", "reference", "torch"])
def test_nothing_to_attend_is_answered_before_any_backend(monkeypatch, case, backend):
    for impl in _backends.implementations("varlen_attention") + _backends.implementations("varlen_attention_backward"):
        monkeypatch.setattr(impl, "fn", lambda *a, name=impl.name: pytest.fail(f"{name} was called"))
    Tq, Tk, cu_q, cu_k = EMPTY[case]
    q = torch.randn(Tq, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(Tk, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    out, lse = ops.varlen_attention(q, k, v, cu_q, cu_k, 2, 2, 0.5, backend)
    assert torch.equal(out, torch.zeros_like(q))
    assert lse.dtype == torch.float64 and lse.shape == (2, q.shape[0]) and (lse == -math.inf).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


# ------------------------------------------------------------------ M: one rule


@pytest.mark.parametrize(
    "max_clusters,num_centers,M",
    [(None, None, 10), (None, 0, 10), (4, None, 4), (4, 0, 4), (None, 3, 3), (3, 3, 3), (12, None, 12)],
)
def test_cluster_bound(max_clusters, num_centers, M):
    assert V.cluster_bound(10, max_clusters, num_centers, 2) == M


@pytest.mark.parametrize(
    "max_clusters,num_centers,error,match",
    [
        (5, 3, ValueError, "needs max_clusters == num_centers, got 5"),
        (0, None, ValueError, "max_clusters must be >= 1, got 0"),
        (-1, None, ValueError, "max_clusters must be >= 1"),
        (None, -2, ValueError, "num_centers must be >= 0"),
        (2.0, None, TypeError, "max_clusters must be an int"),
        (None, True, TypeError, "num_centers must be an int"),
        (2**30, None, ValueError, "int32 offsets"),
    ],
)
def test_reference_and_public_functions_refuse_the_same_bounds(max_clusters, num_centers, error, match):
    """The reference used to take num_centers over a different max_clusters, and N for max_clusters=0."""
    x = torch.randn(4, 10, 3)
    score = torch.rand(4, 10)
    labels = torch.zeros(4, 10, dtype=torch.int64)
    num = torch.ones(4, dtype=torch.int64)
    calls = [
        lambda f: f.dpc_cluster(x, 3, max_clusters=max_clusters, num_centers=num_centers),
        lambda f: f.select_centers(score, max_clusters=max_clusters, num_centers=num_centers),
    ]
    if num_centers is None:
        calls += [
            lambda f: f.pack_clusters(labels, num, max_clusters),
            lambda f: f.merge_clusters(x, labels, num, max_clusters),
        ]
    for call in calls:
        for module in (reference, sk):
            with pytest.raises(error, match=match):
                call(module)


def test_reference_and_public_functions_size_m_alike():
    x = torch.randn(2, 10, 3)
    for kw, M in ((dict(), 10), (dict(max_clusters=4), 4), (dict(num_centers=3), 3), (dict(max_clusters=3, num_centers=3), 3)):
        for module in (reference, sk):
            assert module.dpc_cluster(x, 3, **kw).centers.shape == (2, M)
            assert module.select_centers(torch.rand(2, 10), **kw)[0].shape == (2, M)
    labels, num = torch.zeros(2, 10, dtype=torch.int64), torch.ones(2, dtype=torch.int64)
    for module in (reference, sk):
        assert module.pack_clusters(labels, num).cu_seqlens.shape == (2 * 10 + 1,)
        assert module.merge_clusters(x, labels, num).tokens.shape == (2, 10, 3)
