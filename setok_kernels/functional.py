"""The Python functions in front of ``torch.ops.setok.*``.

They validate arguments (SPEC.md "Conventions") before any kernel runs, fill
in defaults, and wrap tuple outputs in NamedTuples. ``backend=None`` defers to
``SETOK_BACKEND`` / ``SETOK_ATTN_BACKEND`` (read inside the op, so a compiled
graph follows the environment of the call).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validation as V
from . import ops as _ops
from ._backends import normalize_backend
from .reference import ClusterResult, Packing, pad_segments, unpad_segments

__all__ = [
    "ClusterResult",
    "Packing",
    "pairwise_distance",
    "knn_density",
    "density_delta",
    "select_centers",
    "assign_to_centers",
    "dpc_cluster",
    "pack_clusters",
    "segment_mean",
    "varlen_attention",
    "pad_segments",
    "unpad_segments",
]


def _backend(backend: Optional[str], family: str = "dpc") -> str:
    return "" if backend is None else normalize_backend(backend, family)


def _features_and_mask(x, mask, validate, check_finite, k=None):
    B, N, C = V.features(x)
    V.mask(mask, B, N, x)
    if k is not None:
        V.k_neighbours(k, N)
    if V.should_validate(validate, x, mask):
        V.real_counts_at_least(mask, B, N, k or 1)
    if check_finite:
        V.finite(x, "x", mask)
    return B, N, C


def pairwise_distance(x: Tensor, mask: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """(B, N, N) scaled distances ``||x_i - x_j|| / sqrt(C)``; masked pairs are +inf.

    Materialises N x N: for debugging and baselines only.
    """
    _features_and_mask(x, mask, False, False)
    return _ops.pairwise_distance(x.detach(), mask, _backend(backend))


def knn_density(
    x: Tensor,
    k: int,
    mask: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
    check_finite: bool = False,
) -> Tensor:
    """``exp(-mean d^2 over the k nearest real tokens, self included)``; 0 where masked."""
    _features_and_mask(x, mask, validate, check_finite, k)
    return _ops.knn_density(x.detach(), k, mask, _backend(backend))


def density_delta(
    x: Tensor,
    density: Tensor,
    mask: Optional[Tensor] = None,
    densest_delta: str = "column_max",
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """``(delta, parent)``: distance to (and index of) the nearest strictly denser token."""
    B, N, _ = _features_and_mask(x, mask, validate, False)
    V.per_token(density, B, N, x, "density", dtypes=V.FLOAT_DTYPES)
    V.densest_delta(densest_delta)
    return _ops.density_delta(x.detach(), density.detach(), mask, densest_delta, _backend(backend))


def select_centers(
    score: Tensor,
    threshold: float = 0.5,
    min_clusters: int = 8,
    max_clusters: Optional[int] = None,
    mask: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``(centers (B, M) ascending, -1 padded; num_clusters (B,))`` from per-token scores."""
    V.tensor(score, "score")
    if score.dim() != 2:
        raise ValueError(f"score must have shape (B, N), got {tuple(score.shape)}")
    if score.dtype not in V.FLOAT_DTYPES:
        raise V.DTypeError(f"score must be a floating tensor, got {score.dtype}")
    B, N = score.shape
    V.mask(mask, B, N, score, "score")
    threshold = V.threshold(threshold)
    V.positive(min_clusters, "min_clusters")
    M = N if max_clusters is None else V.positive(max_clusters, "max_clusters")
    return _ops.select_centers(score.detach(), threshold, min_clusters, M, mask, _backend(backend))


def assign_to_centers(
    x: Tensor,
    centers: Tensor,
    num_clusters: Tensor,
    mask: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tensor:
    """Label of each real token: position of its nearest centre (earlier centre on ties)."""
    B, N, _ = V.features(x)
    V.mask(mask, B, N, x)
    V.tensor(centers, "centers")
    if centers.dim() != 2 or centers.shape[0] != B:
        raise ValueError(f"centers must have shape (B, M) with B = {B}, got {tuple(centers.shape)}")
    if centers.dtype not in V.INDEX_DTYPES:
        raise V.DTypeError(f"centers must be int32 or int64, got {centers.dtype}")
    V.same_device(centers, "centers", x, "x")
    V.tensor(num_clusters, "num_clusters")
    if num_clusters.shape != (B,):
        raise ValueError(f"num_clusters must have shape (B,) = ({B},), got {tuple(num_clusters.shape)}")
    if num_clusters.dtype not in V.INDEX_DTYPES:
        raise V.DTypeError(f"num_clusters must be int32 or int64, got {num_clusters.dtype}")
    V.same_device(num_clusters, "num_clusters", x, "x")
    if V.should_validate(validate, x):
        V.centers_values(centers, num_clusters, N, mask)
    return _ops.assign_to_centers(x.detach(), centers.long(), num_clusters.long(), mask, _backend(backend))


def dpc_cluster(
    x: Tensor,
    k: int = 5,
    threshold: float = 0.5,
    min_clusters: int = 8,
    max_clusters: Optional[int] = None,
    mask: Optional[Tensor] = None,
    densest_delta: str = "column_max",
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
    check_finite: bool = False,
) -> ClusterResult:
    """DPC-kNN clustering of each image's real tokens (SPEC.md); no host sync.

    ``centers`` has ``M = max_clusters or N`` columns. With validation off an
    image's k is clamped to its real-token count, and an image without real
    tokens gets no cluster.
    """
    _, N, _ = _features_and_mask(x, mask, validate, check_finite, k)
    threshold = V.threshold(threshold)
    V.positive(min_clusters, "min_clusters")
    M = N if max_clusters is None else V.positive(max_clusters, "max_clusters")
    V.densest_delta(densest_delta)
    out = _ops.dpc_cluster(x.detach(), k, threshold, min_clusters, M, mask, densest_delta, _backend(backend))
    return ClusterResult(*out)


def pack_clusters(
    labels: Tensor,
    num_clusters: Tensor,
    max_clusters: Optional[int] = None,
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Packing:
    """Group tokens by (image, cluster) for varlen kernels, with static shapes.

    - ``perm (B*N,)``: the real tokens grouped by (image, cluster), each
      cluster's tokens in ascending index, then the unlabelled (masked) tokens;
      ``cu_seqlens[-1]`` is the number of real tokens.
    - ``cu_seqlens (B*M + 1,) int32``: one segment per cluster, images in
      order, then empty trailing segments up to the static bound ``B*M``
      (``M = max_clusters or N``); ``cu_clusters (B+1,) int32`` says where
      each image's segments start.
    - ``max_seqlen``: a 0-dim int64 tensor (reading it is the caller's sync).
    """
    V.tensor(labels, "labels")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, N), got {tuple(labels.shape)}")
    if labels.dtype not in V.INDEX_DTYPES:
        raise V.DTypeError(f"labels must be int32 or int64, got {labels.dtype}")
    B, N = labels.shape
    V.tensor(num_clusters, "num_clusters")
    if num_clusters.shape != (B,):
        raise ValueError(f"num_clusters must have shape (B,) = ({B},), got {tuple(num_clusters.shape)}")
    if num_clusters.dtype not in V.INDEX_DTYPES:
        raise V.DTypeError(f"num_clusters must be int32 or int64, got {num_clusters.dtype}")
    V.same_device(num_clusters, "num_clusters", labels, "labels")
    M = N if max_clusters is None else V.positive(max_clusters, "max_clusters")
    if V.should_validate(validate, labels):
        V.labels_values(labels, num_clusters, M)
    return Packing(*_ops.pack_clusters(labels.long(), num_clusters.long(), M, _backend(backend)))


def _check_offsets(cu, arg, total, total_arg, validate, ref, ref_arg):
    S = V.cu_seqlens(cu, arg)
    V.same_device(cu, arg, ref, ref_arg)
    if V.should_validate(validate, cu):
        V.offsets_values(cu, arg, total, total_arg)
    return S


def segment_mean(
    x: Tensor,
    cu_seqlens: Tensor,
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tensor:
    """``(S, C)`` mean of each segment of the packed ``x (T, C)``; 0 for an empty segment."""
    V.tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, C), got {tuple(x.shape)}")
    if x.dtype not in V.FLOAT_DTYPES:
        raise V.DTypeError(f"x must be a floating tensor, got {x.dtype}")
    _check_offsets(cu_seqlens, "cu_seqlens", x.shape[0], "x", validate, x, "x")
    return _ops.segment_mean(x, cu_seqlens, _backend(backend))


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    *,
    return_lse: bool = False,
    validate: Optional[bool] = None,
):
    """Non-causal attention inside each segment: ``q (Tq, H, D)``, ``k, v (Tk, H, D)``.

    ``cu_seqlens_k=None`` is self-attention over the same segments. A query
    row with no keys gets 0. ``max_seqlen_*`` are host ints; when None the
    static bound (the packed length) is used, never a device read.
    ``return_lse=True`` also returns the log-sum-exp ``(H, Tq)`` float32.
    """
    for t, arg in ((q, "q"), (k, "k"), (v, "v")):
        V.tensor(t, arg)
        if t.dim() != 3:
            raise ValueError(f"{arg} must have shape (T, H, D), got {tuple(t.shape)}")
        if t.dtype not in V.FLOAT_DTYPES:
            raise V.DTypeError(f"{arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise V.DTypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    V.same_device(k, "k", q, "q")
    V.same_device(v, "v", q, "q")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q and k must have the same (H, D), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
    self_attention = cu_seqlens_k is None
    cu_k = cu_seqlens_q if self_attention else cu_seqlens_k
    S = _check_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q", validate, q, "q")
    S_k = _check_offsets(cu_k, "cu_seqlens_k", k.shape[0], "k", validate, q, "q")
    if S != S_k:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {S + 1} and {S_k + 1}")
    if self_attention and k.shape[0] != q.shape[0]:
        raise ValueError("self-attention (cu_seqlens_k=None) needs k and v with as many rows as q")
    max_q = q.shape[0] if max_seqlen_q is None else V.integer(max_seqlen_q, "max_seqlen_q")
    max_k = (max_q if self_attention and max_seqlen_k is None else k.shape[0]) if max_seqlen_k is None else V.integer(max_seqlen_k, "max_seqlen_k")
    if max_q < 0 or max_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    if scale is None:
        scale = _ops.default_scale(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    name = _backend(backend, "attention")
    if name:
        # resolve "auto" here, knowing whether gradients are needed
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        name = _ops.resolve_attention(q, k, max_q, max_k, name, needs_grad).name
    cu_q = cu_seqlens_q
    cu_k = cu_q if self_attention else cu_seqlens_k
    out, lse = _ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, float(scale), name)
    return (out, lse) if return_lse else out
