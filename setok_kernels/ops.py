"""The ``torch.ops.setok.*`` custom ops: schemas, fake impls, autograd.

Each op is defined once here. Its body resolves a backend (see
``_backends``) and calls that implementation, so every backend is reachable
through the same op, torch.compile sees one opaque node per op, and fake
(meta) implementations give output shapes that depend only on input shapes
and arguments.

The ``backend`` string argument is ``""`` for "from the environment"
(``SETOK_BACKEND`` / ``SETOK_ATTN_BACKEND``), else a backend name. An op with
a backward passes the backward op the backend its forward resolved to, by
name: gradients always come from the implementation that computed the
forward's saved outputs, whatever "auto" or the environment say later.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from . import _backends
from . import _segments
from . import _validation as V
from ._backends import CallInfo
from ._segments import acc_dtype


def resolve(op: str, backend: str, t: Tensor, requires_grad: bool = False, **extra) -> _backends.Impl:
    name = _backends.normalize_backend(backend or None, _backends.family(op))
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
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args)  # entering the two contexts costs ~10 us per call
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args)

    return body


def _checked(check, values=None):
    """Run ``check`` (metadata, never syncs) on the op's arguments before its body,
    whoever calls the op; ``values`` (reads tensors) too when they are all on the CPU.

    The checks take the op's arguments by name, each the ones it declares.
    Applied to fake impls as well, so a traced graph refuses bad input early.
    """

    def wrap(fn):
        names = tuple(inspect.signature(fn).parameters)
        takes = {c: set(inspect.signature(c).parameters) for c in (check, values) if c is not None}

        @functools.wraps(fn)
        def body(*args, **kwargs):
            if len(args) > len(names) or not kwargs.keys() <= set(names[len(args):]):
                raise TypeError(f"{fn.__name__}() takes each of the arguments {', '.join(names)} once")
            given = dict(zip(names, args), **kwargs)
            check(**{n: a for n, a in given.items() if n in takes[check]})
            if values is not None and V.on_cpu(*given.values()):
                values(**{n: a for n, a in given.items() if n in takes[values]})
            return fn(*args, **kwargs)

        return body

    return wrap


# ------------------------------------------------------------------ output shapes
# From each op's implementation arguments (``Impl.fn`` order): the fake impls
# below and the internal ops of the backends (``_native``) share them; the
# issue-17 options have defaults for internal ops that do not take them yet.


def knn_density_meta(x, k, mask):
    return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))


def density_delta_meta(x, density, mask, densest_delta, tie_break="none"):
    return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype)), x.new_empty(x.shape[:2], dtype=torch.int64)


def select_centers_meta(score, mask, threshold, min_clusters, max_clusters, num_centers=0, center_order="index"):
    B = score.shape[0]
    return score.new_empty(B, max_clusters, dtype=torch.int64), score.new_empty(B, dtype=torch.int64)


def assign_to_centers_meta(x, centers, num_clusters, mask, metric="euclidean"):
    return x.new_empty(x.shape[:2], dtype=torch.int64)


def dpc_cluster_meta(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers=0,
                     center_order="index", tie_break="none"):
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


def segment_mean_meta(x, cu_seqlens, weight=None, eps=0.0):
    return x.new_empty(cu_seqlens.shape[0] - 1, x.shape[1])


def segment_mean_weighted_backward_meta(grad, x, cu_seqlens, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=x.dtype if weight is None else weight.dtype)


def merge_clusters_meta(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight):
    B, _, C = x.shape
    return (
        x.new_empty(B, max_clusters, C),
        x.new_empty(B, max_clusters, dtype=torch.bool),
        x.new_empty(B, max_clusters, dtype=torch.int64),
        x.new_empty(B, max_clusters, dtype=acc_dtype(x.dtype)),
    )


def merge_clusters_backward_meta(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers,
                                 center_weight):
    B, N, _ = x.shape
    w_dtype = x.dtype if weight is None else weight.dtype
    a_dtype = acc_dtype(x.dtype) if center_weight is None else center_weight.dtype
    return torch.empty_like(x), x.new_empty(B, N, dtype=w_dtype), x.new_empty(grad_tokens.shape[:2], dtype=a_dtype)


def segment_mean_backward_meta(grad, cu_seqlens, num_rows):
    return grad.new_empty(num_rows, grad.shape[1])


def _dpc_extra(x: Tensor, **kw) -> dict:
    return dict(B=x.shape[0], N=x.shape[1], C=x.shape[2], **kw)


# ------------------------------------------------------------------ clustering


@torch.library.custom_op("setok::pairwise_distance", mutates_args=())
@_checked(V.check_pairwise_distance)
@_exact
def pairwise_distance(x: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    return resolve("pairwise_distance", backend, x, **_dpc_extra(x)).fn(x, mask)


@pairwise_distance.register_fake
@_checked(V.check_pairwise_distance)
def _(x, mask, backend):
    B, N, _ = x.shape
    return x.new_empty(B, N, N, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("setok::knn_density", mutates_args=())
@_checked(V.check_knn_density)
@_exact
def knn_density(x: Tensor, k: int, mask: Optional[Tensor], backend: str) -> Tensor:
    return resolve("knn_density", backend, x, **_dpc_extra(x, k=k)).fn(x, k, mask)


@knn_density.register_fake
@_checked(V.check_knn_density)
def _(x, k, mask, backend):
    return knn_density_meta(x, k, mask)


@torch.library.custom_op("setok::density_delta", mutates_args=())
@_checked(V.check_density_delta)
@_exact
def density_delta(
    x: Tensor, density: Tensor, mask: Optional[Tensor], densest_delta: str, tie_break: str, backend: str
) -> tuple[Tensor, Tensor]:
    impl = resolve("density_delta", backend, x, **_dpc_extra(x, tie_break=tie_break))
    return impl.fn(x, density, mask, densest_delta, tie_break)


@density_delta.register_fake
@_checked(V.check_density_delta)
def _(x, density, mask, densest_delta, tie_break, backend):
    return density_delta_meta(x, density, mask, densest_delta, tie_break)


@torch.library.custom_op("setok::select_centers", mutates_args=())
@_checked(V.check_select_centers)
@_exact
def select_centers(
    score: Tensor,
    threshold: float,
    min_clusters: int,
    max_clusters: int,
    mask: Optional[Tensor],
    num_centers: int,
    center_order: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``num_centers`` 0: the threshold rule; n > 0: exactly the top n (then ``max_clusters == n``)."""
    extra = dict(B=score.shape[0], N=score.shape[1], num_centers=num_centers, center_order=center_order)
    impl = resolve("select_centers", backend, score, **extra)
    return impl.fn(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order)


@select_centers.register_fake
@_checked(V.check_select_centers)
def _(score, threshold, min_clusters, max_clusters, mask, num_centers, center_order, backend):
    return select_centers_meta(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order)


@torch.library.custom_op("setok::assign_to_centers", mutates_args=())
@_checked(V.check_assign_to_centers, V.assign_to_centers_values)
@_exact
def assign_to_centers(
    x: Tensor, centers: Tensor, num_clusters: Tensor, mask: Optional[Tensor], metric: str, backend: str
) -> Tensor:
    impl = resolve("assign_to_centers", backend, x, **_dpc_extra(x, M=centers.shape[1], metric=metric))
    return impl.fn(x, centers, num_clusters, mask, metric)


@assign_to_centers.register_fake
@_checked(V.check_assign_to_centers)
def _(x, centers, num_clusters, mask, metric, backend):
    return assign_to_centers_meta(x, centers, num_clusters, mask, metric)


@torch.library.custom_op("setok::dpc_cluster", mutates_args=())
@_checked(V.check_dpc_cluster)
@_exact
def dpc_cluster(
    x: Tensor,
    k: int,
    threshold: float,
    min_clusters: int,
    max_clusters: int,
    mask: Optional[Tensor],
    densest_delta: str,
    num_centers: int,
    center_order: str,
    tie_break: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``max_clusters`` is the resolved bound M (``N`` when the user gave None, ``num_centers`` when > 0)."""
    extra = _dpc_extra(x, k=k, M=max_clusters, num_centers=num_centers, center_order=center_order, tie_break=tie_break)
    impl = resolve("dpc_cluster", backend, x, **extra)
    args = (x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order, tie_break)
    return tuple(impl.fn(*args))


@dpc_cluster.register_fake
@_checked(V.check_dpc_cluster)
def _(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order, tie_break, backend):
    return dpc_cluster_meta(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order,
                            tie_break)


# ------------------------------------------------------------------ packing


@torch.library.custom_op("setok::pack_clusters", mutates_args=())
@_checked(V.check_pack_clusters, V.pack_clusters_values)
@_exact
def pack_clusters(labels: Tensor, num_clusters: Tensor, max_clusters: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N = labels.shape
    impl = resolve("pack_clusters", backend, labels, B=B, N=N, M=max_clusters)
    return tuple(impl.fn(labels, num_clusters, max_clusters))


@pack_clusters.register_fake
@_checked(V.check_pack_clusters)
def _(labels, num_clusters, max_clusters, backend):
    return pack_clusters_meta(labels, num_clusters, max_clusters)


@torch.library.custom_op("setok::segment_mean", mutates_args=())
@_checked(V.check_segment_mean, V.segment_mean_values)
@_exact
def segment_mean(x: Tensor, cu_seqlens: Tensor, backend: str, weight: Optional[Tensor] = None, eps: float = 0.0) -> Tensor:
    """``sum(w x) / (sum(w) + eps)`` per segment (w = 1 without weight); 0 where that denominator is 0."""
    return _segment_mean_impl(x, cu_seqlens, backend, weight).fn(x, cu_seqlens, weight, eps)


def _segment_mean_impl(x, cu_seqlens, backend, weight) -> _backends.Impl:
    return resolve("segment_mean", backend, x, S=cu_seqlens.numel() - 1, C=x.shape[1], weighted=weight is not None)


@segment_mean.register_fake
@_checked(V.check_segment_mean)
def _(x, cu_seqlens, backend, weight=None, eps=0.0):
    return segment_mean_meta(x, cu_seqlens, weight, eps)


@torch.library.custom_op("setok::segment_mean_backward", mutates_args=())
@_checked(V.check_segment_mean_backward, V.segment_mean_backward_values)
@_exact
def segment_mean_backward(grad: Tensor, cu_seqlens: Tensor, num_rows: int, backend: str) -> Tensor:
    impl = resolve("segment_mean_backward", backend, grad, S=grad.shape[0], C=grad.shape[1])
    return impl.fn(grad, cu_seqlens, num_rows)


@segment_mean_backward.register_fake
@_checked(V.check_segment_mean_backward)
def _(grad, cu_seqlens, num_rows, backend):
    return segment_mean_backward_meta(grad, cu_seqlens, num_rows)


@torch.library.custom_op("setok::segment_mean_weighted_backward", mutates_args=())
@_checked(V.check_segment_mean_weighted_backward, V.segment_mean_weighted_backward_values)
@_exact
def segment_mean_weighted_backward(
    grad: Tensor, x: Tensor, cu_seqlens: Tensor, weight: Optional[Tensor], eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    """``(grad_x (T, C), grad_weight (T,))`` of the weighted segment mean."""
    impl = resolve("segment_mean_weighted_backward", backend, x, S=grad.shape[0], C=x.shape[1])
    return tuple(impl.fn(grad, x, cu_seqlens, weight, eps))


@segment_mean_weighted_backward.register_fake
@_checked(V.check_segment_mean_weighted_backward)
def _(grad, x, cu_seqlens, weight, eps, backend):
    return segment_mean_weighted_backward_meta(grad, x, cu_seqlens, weight, eps)


def _segment_mean_setup(ctx, inputs, output):
    x, cu_seqlens, backend, weight, eps = inputs
    # the plain mean's backward needs only the offsets; a weighted one needs x and w
    ctx.plain = weight is None and eps == 0.0
    ctx.save_for_backward(cu_seqlens, *(() if ctx.plain else (x, weight)))
    ctx.num_rows = x.shape[0]
    ctx.backend = _segment_mean_impl(x, cu_seqlens, backend, weight).name
    ctx.eps = eps


def _segment_mean_bwd(ctx, grad):
    if ctx.plain:
        (cu_seqlens,) = ctx.saved_tensors
        return segment_mean_backward(grad.contiguous(), cu_seqlens, ctx.num_rows, ctx.backend), None, None, None, None
    cu_seqlens, x, weight = ctx.saved_tensors
    grad_x, grad_w = segment_mean_weighted_backward(grad.contiguous(), x, cu_seqlens, weight, ctx.eps, ctx.backend)
    return grad_x, None, None, (grad_w if weight is not None else None), None


segment_mean.register_autograd(_segment_mean_bwd, setup_context=_segment_mean_setup)


@torch.library.custom_op("setok::merge_clusters", mutates_args=())
@_checked(V.check_merge_clusters, V.merge_clusters_values)
@_exact
def merge_clusters(
    x: Tensor,
    labels: Tensor,
    num_clusters: Tensor,
    max_clusters: int,
    weight: Optional[Tensor],
    eps: float,
    centers: Optional[Tensor],
    center_weight: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tokens (B, M, C), key_mask, counts, weight_sum (B, M))``; ``center_weight`` is a (B, M) tensor here."""
    impl = _merge_clusters_impl(x, max_clusters, center_weight, backend)
    return tuple(impl.fn(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight))


def _merge_clusters_impl(x, max_clusters, center_weight, backend) -> _backends.Impl:
    B, N, C = x.shape
    return resolve("merge_clusters", backend, x, B=B, N=N, C=C, M=max_clusters, blend=center_weight is not None)


@merge_clusters.register_fake
@_checked(V.check_merge_clusters)
def _(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight, backend):
    return merge_clusters_meta(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight)


@torch.library.custom_op("setok::merge_clusters_backward", mutates_args=())
@_checked(V.check_merge_clusters_backward, V.merge_clusters_backward_values)
@_exact
def merge_clusters_backward(
    grad_tokens: Tensor,
    grad_weight_sum: Tensor,
    x: Tensor,
    labels: Tensor,
    num_clusters: Tensor,
    weight: Optional[Tensor],
    eps: float,
    centers: Optional[Tensor],
    center_weight: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x (B, N, C), grad_weight (B, N), grad_center_weight (B, M))``."""
    B, N, C = x.shape
    M = grad_tokens.shape[1]
    impl = resolve("merge_clusters_backward", backend, x, B=B, N=N, C=C, M=M, blend=center_weight is not None)
    return tuple(impl.fn(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers, center_weight))


@merge_clusters_backward.register_fake
@_checked(V.check_merge_clusters_backward)
def _(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers, center_weight, backend):
    return merge_clusters_backward_meta(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers,
                                        center_weight)


def _merge_clusters_setup(ctx, inputs, output):
    x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight, backend = inputs
    ctx.save_for_backward(x, labels, num_clusters, weight, centers, center_weight)
    ctx.eps, ctx.backend = eps, _merge_clusters_impl(x, max_clusters, center_weight, backend).name


def _merge_clusters_bwd(ctx, grad_tokens, grad_key_mask, grad_counts, grad_weight_sum):
    x, labels, num_clusters, weight, centers, center_weight = ctx.saved_tensors
    grad_x, grad_w, grad_a = merge_clusters_backward(
        grad_tokens.contiguous(), grad_weight_sum.contiguous(), x, labels, num_clusters, weight, ctx.eps, centers,
        center_weight, ctx.backend,
    )
    grad_w = grad_w if weight is not None else None
    grad_a = grad_a if center_weight is not None else None
    return grad_x, None, None, None, grad_w, None, None, grad_a, None


merge_clusters.register_autograd(_merge_clusters_bwd, setup_context=_merge_clusters_setup)


# ------------------------------------------------------------------ attention


def _attn_extra(q: Tensor, k: Tensor, max_q: int, max_k: int) -> dict:
    return dict(head_dim=q.shape[-1], heads=q.shape[1], Tq=q.shape[0], Tk=k.shape[0], max_seqlen_q=max_q, max_seqlen_k=max_k)


def resolve_attention(q, k, max_q, max_k, backend, requires_grad) -> _backends.Impl:
    return resolve("varlen_attention", backend, q, requires_grad, **_attn_extra(q, k, max_q, max_k))


@torch.library.custom_op("setok::varlen_attention", mutates_args=())
@_checked(V.check_varlen_attention, V.varlen_attention_values)
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
    """Returns ``(out (Tq, H, D), lse (H, Tq))``, lse in the accumulation dtype (float32,
    float64 for float64 inputs); -inf for rows without keys."""
    impl = resolve_attention(q, k, max_seqlen_q, max_seqlen_k, backend, False)
    return _attention(impl, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


def _attention(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale):
    if _segments.nothing_to_attend(q, k, cu_q):  # here, for every backend
        return _segments.no_attention(q)
    return tuple(impl.fn(q, k, v, cu_q, cu_k, max_q, max_k, scale))


_attention_exact = _exact(_attention)


def _mode_probes():
    """torch's private probes of active function/dispatch modes and functorch transforms (torch >= 2.6);
    None where one is missing: then every call goes through the op."""
    try:
        return (torch._C._len_torch_function_stack, torch._C._len_torch_dispatch_stack,
                torch._C._functorch.peek_interpreter_stack)
    except AttributeError:
        return None


_MODE_PROBES = _mode_probes()


def direct_attention_ok(*tensors: Tensor) -> bool:
    """Whether a checked, resolved, gradient-free call on CPU tensors may skip the op
    (``attention_direct``): only plain tensors outside any trace, mode, functorch
    transform or profiler, which would otherwise see or reroute the op."""
    if _MODE_PROBES is None:
        return False
    function_modes, dispatch_modes, transforms = _MODE_PROBES
    return (
        all(type(t) is Tensor and t.device.type == "cpu" for t in tensors)
        and not torch.compiler.is_compiling()
        and function_modes() == 0
        and dispatch_modes() == 0
        and transforms() is None
        and not getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
    )


def attention_direct(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """The op's body for a call whose metadata its caller checked and whose backend
    ``impl`` it resolved (``direct_attention_ok``): the op would repeat both, and
    its dispatch layers cost ~0.3 ms per call at B=4, N=576, D=128 (their Python
    runs with caches left cold by the kernels), 6% of the forward."""
    V.varlen_attention_values(q, k, cu_q, cu_k, max_q, max_k)  # the op's CPU value checks
    return _attention_exact(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale)


@varlen_attention.register_fake
@_checked(V.check_varlen_attention)
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=acc_dtype(q.dtype))


@torch.library.custom_op("setok::varlen_attention_backward", mutates_args=())
@_checked(V.check_varlen_attention_backward, V.varlen_attention_values)
@_exact
def varlen_attention_backward(
    dout: Tensor,
    dlse: Optional[Tensor],
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
    if _segments.nothing_to_attend(q, k, cu_seqlens_q):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return tuple(impl.fn(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale))


@varlen_attention_backward.register_fake
@_checked(V.check_varlen_attention_backward)
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, backend = inputs
    out, lse = output
    # the forward's resolution repeated (same call, same answer): its backend by name
    ctx.backend = resolve_attention(q, k, max_q, max_k, backend, False).name
    ctx.args = (max_q, max_k, scale)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    # an unused output's gradient arrives as None, not zeros: the lse term costs nothing unless used
    ctx.set_materialize_grads(False)


def _attention_bwd(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale = ctx.args
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dk, dv = varlen_attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attention.register_autograd(_attention_bwd, setup_context=_attention_setup)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
