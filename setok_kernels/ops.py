"""The ``torch.ops.setok.*`` custom ops: schemas, fake impls, autograd.

Each op is defined once here. Its body resolves a backend (see
``_backends``) and calls that implementation, so every backend is reachable
through the same op, torch.compile sees one opaque node per op, and fake
(meta) implementations give output shapes that depend only on input shapes
and arguments.

The ``backend`` string argument is ``""`` for "from the environment"
(``SETOK_BACKEND`` / ``SETOK_ATTN_BACKEND``), else a backend name.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from . import _backends
from ._backends import CallInfo
from .reference import acc_dtype

_ATTENTION_OPS = ("varlen_attention", "varlen_attention_backward")


def _family(op: str) -> str:
    return "attention" if op in _ATTENTION_OPS else "dpc"


def resolve(op: str, backend: str, t: Tensor, requires_grad: bool = False, **extra) -> _backends.Impl:
    name = _backends.normalize_backend(backend or None, _family(op))
    return _backends.resolve(op, name, CallInfo(t.device, t.dtype, requires_grad, extra))


def _exact(fn):
    """Run an op body in its inputs' own precision.

    Autocast state is thread-local, so without this the torch ops inside a
    body (reference math, the native wrappers) would be recast by an outer
    ``torch.autocast`` region; the op's contract (float32 accumulation,
    output dtype = input dtype) must not depend on the caller's context.
    """

    @functools.wraps(fn)
    def body(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args)

    return body


# ------------------------------------------------------------------ output shapes
# From each op's implementation arguments (``Impl.fn`` order): the fake impls
# below and the internal ops of the backends (``_native``) share them.


def knn_density_meta(x, k, mask):
    return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))


def density_delta_meta(x, density, mask, densest_delta):
    return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype)), x.new_empty(x.shape[:2], dtype=torch.int64)


def select_centers_meta(score, mask, threshold, min_clusters, max_clusters):
    B = score.shape[0]
    return score.new_empty(B, max_clusters, dtype=torch.int64), score.new_empty(B, dtype=torch.int64)


def assign_to_centers_meta(x, centers, num_clusters, mask):
    return x.new_empty(x.shape[:2], dtype=torch.int64)


def dpc_cluster_meta(x, k, threshold, min_clusters, max_clusters, mask, densest_delta):
    B, N, _ = x.shape
    acc, i64 = acc_dtype(x.dtype), torch.int64
    labels, parent = x.new_empty(B, N, dtype=i64), x.new_empty(B, N, dtype=i64)
    centers, num = x.new_empty(B, max_clusters, dtype=i64), x.new_empty(B, dtype=i64)
    score, density, delta = (x.new_empty(B, N, dtype=acc) for _ in range(3))
    return labels, num, centers, score, density, delta, parent


def pack_clusters_meta(labels, num_clusters, max_clusters):
    B, N = labels.shape
    return (
        labels.new_empty(B * N, dtype=torch.int64),
        labels.new_empty(B * max_clusters + 1, dtype=torch.int32),
        labels.new_empty(B + 1, dtype=torch.int32),
        labels.new_empty((), dtype=torch.int64),
    )


def segment_mean_meta(x, cu_seqlens):
    return x.new_empty(cu_seqlens.shape[0] - 1, x.shape[1])


def segment_mean_backward_meta(grad, cu_seqlens, num_rows):
    return grad.new_empty(num_rows, grad.shape[1])


def _dpc_extra(x: Tensor, **kw) -> dict:
    return dict(B=x.shape[0], N=x.shape[1], C=x.shape[2], **kw)


# ------------------------------------------------------------------ clustering


@torch.library.custom_op("setok::pairwise_distance", mutates_args=())
@_exact
def pairwise_distance(x: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    return resolve("pairwise_distance", backend, x, **_dpc_extra(x)).fn(x, mask)


@pairwise_distance.register_fake
def _(x, mask, backend):
    B, N, _ = x.shape
    return x.new_empty(B, N, N, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("setok::knn_density", mutates_args=())
@_exact
def knn_density(x: Tensor, k: int, mask: Optional[Tensor], backend: str) -> Tensor:
    return resolve("knn_density", backend, x, **_dpc_extra(x, k=k)).fn(x, k, mask)


@knn_density.register_fake
def _(x, k, mask, backend):
    return knn_density_meta(x, k, mask)


@torch.library.custom_op("setok::density_delta", mutates_args=())
@_exact
def density_delta(x: Tensor, density: Tensor, mask: Optional[Tensor], densest_delta: str, backend: str) -> tuple[Tensor, Tensor]:
    impl = resolve("density_delta", backend, x, **_dpc_extra(x))
    return impl.fn(x, density, mask, densest_delta)


@density_delta.register_fake
def _(x, density, mask, densest_delta, backend):
    return density_delta_meta(x, density, mask, densest_delta)


@torch.library.custom_op("setok::select_centers", mutates_args=())
@_exact
def select_centers(
    score: Tensor, threshold: float, min_clusters: int, max_clusters: int, mask: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    impl = resolve("select_centers", backend, score, B=score.shape[0], N=score.shape[1])
    return impl.fn(score, mask, threshold, min_clusters, max_clusters)


@select_centers.register_fake
def _(score, threshold, min_clusters, max_clusters, mask, backend):
    return select_centers_meta(score, mask, threshold, min_clusters, max_clusters)


@torch.library.custom_op("setok::assign_to_centers", mutates_args=())
@_exact
def assign_to_centers(x: Tensor, centers: Tensor, num_clusters: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    impl = resolve("assign_to_centers", backend, x, **_dpc_extra(x, M=centers.shape[1]))
    return impl.fn(x, centers, num_clusters, mask)


@assign_to_centers.register_fake
def _(x, centers, num_clusters, mask, backend):
    return assign_to_centers_meta(x, centers, num_clusters, mask)


@torch.library.custom_op("setok::dpc_cluster", mutates_args=())
@_exact
def dpc_cluster(
    x: Tensor,
    k: int,
    threshold: float,
    min_clusters: int,
    max_clusters: int,
    mask: Optional[Tensor],
    densest_delta: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``max_clusters`` is the resolved bound M (``N`` when the user gave None)."""
    impl = resolve("dpc_cluster", backend, x, **_dpc_extra(x, k=k, M=max_clusters))
    return tuple(impl.fn(x, k, threshold, min_clusters, max_clusters, mask, densest_delta))


@dpc_cluster.register_fake
def _(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, backend):
    return dpc_cluster_meta(x, k, threshold, min_clusters, max_clusters, mask, densest_delta)


# ------------------------------------------------------------------ packing


@torch.library.custom_op("setok::pack_clusters", mutates_args=())
@_exact
def pack_clusters(labels: Tensor, num_clusters: Tensor, max_clusters: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N = labels.shape
    impl = resolve("pack_clusters", backend, labels, B=B, N=N, M=max_clusters)
    return tuple(impl.fn(labels, num_clusters, max_clusters))


@pack_clusters.register_fake
def _(labels, num_clusters, max_clusters, backend):
    return pack_clusters_meta(labels, num_clusters, max_clusters)


@torch.library.custom_op("setok::segment_mean", mutates_args=())
@_exact
def segment_mean(x: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
    impl = resolve("segment_mean", backend, x, S=cu_seqlens.numel() - 1, C=x.shape[1])
    return impl.fn(x, cu_seqlens)


@segment_mean.register_fake
def _(x, cu_seqlens, backend):
    return segment_mean_meta(x, cu_seqlens)


@torch.library.custom_op("setok::segment_mean_backward", mutates_args=())
@_exact
def segment_mean_backward(grad: Tensor, cu_seqlens: Tensor, num_rows: int, backend: str) -> Tensor:
    impl = resolve("segment_mean_backward", backend, grad, S=grad.shape[0], C=grad.shape[1])
    return impl.fn(grad, cu_seqlens, num_rows)


@segment_mean_backward.register_fake
def _(grad, cu_seqlens, num_rows, backend):
    return segment_mean_backward_meta(grad, cu_seqlens, num_rows)


def _segment_mean_setup(ctx, inputs, output):
    x, cu_seqlens, backend = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.num_rows = x.shape[0]
    ctx.backend = backend


def _segment_mean_bwd(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return segment_mean_backward(grad.contiguous(), cu_seqlens, ctx.num_rows, ctx.backend), None, None


segment_mean.register_autograd(_segment_mean_bwd, setup_context=_segment_mean_setup)


# ------------------------------------------------------------------ attention


def _attn_extra(q: Tensor, k: Tensor, max_q: int, max_k: int) -> dict:
    return dict(head_dim=q.shape[-1], heads=q.shape[1], Tq=q.shape[0], Tk=k.shape[0], max_seqlen_q=max_q, max_seqlen_k=max_k)


def resolve_attention(q, k, max_q, max_k, backend, requires_grad) -> _backends.Impl:
    return resolve("varlen_attention", backend, q, requires_grad, **_attn_extra(q, k, max_q, max_k))


@torch.library.custom_op("setok::varlen_attention", mutates_args=())
@_exact
def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out (Tq, H, D), lse (H, Tq) float32)``; lse is -inf for rows without keys."""
    impl = resolve_attention(q, k, max_seqlen_q, max_seqlen_k, backend, False)
    return tuple(impl.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale))


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("setok::varlen_attention_backward", mutates_args=())
@_exact
def varlen_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = resolve("varlen_attention_backward", backend, q, True, **_attn_extra(q, k, max_seqlen_q, max_seqlen_k))
    return tuple(impl.fn(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale))


@varlen_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, backend = inputs
    out, lse = output
    # the backward runs the backend the forward ran: "auto" resolves identically
    ctx.backend = resolve_attention(q, k, max_q, max_k, backend, True).name
    ctx.args = (max_q, max_k, scale)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)


def _attention_bwd(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale = ctx.args
    dq, dk, dv = varlen_attention_backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attention.register_autograd(_attention_bwd, setup_context=_attention_setup)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
