"""The Python functions in front of ``torch.ops.setok.*``.

They validate arguments (SPEC.md "Conventions") before any kernel runs, fill
in defaults, and wrap tuple outputs in NamedTuples. The rules live in
``_validation`` and the custom ops run them too, whoever calls them: metadata
(shapes, dtypes, devices, enum strings, sizes) always, without a sync; values
(offsets, labels, centres in range) always on CPU tensors, where reading them
costs no sync, and on CUDA only with ``validate=True``. With validation off on
CUDA, kernels clamp offsets and indices to their buffers: wrong input then
gives unspecified values, never an out-of-bounds access. ``backend=None`` defers to
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
from . import reference as _reference
from .reference import ClusterResult, MergeResult, Packing

# one function here per op of the reference, under its name (the list is declared there)
__all__ = list(_reference.__all__)


def _backend(backend: Optional[str], family: str = "dpc") -> str:
    return "" if backend is None else normalize_backend(backend, family)


def _finite(x, mask, check_finite: bool) -> None:
    if check_finite:
        V.finite(x, "x", mask)


def pairwise_distance(x: Tensor, mask: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """(B, N, N) scaled distances ``||x_i - x_j|| / sqrt(C)``; masked pairs are +inf.

    Materialises N x N: for debugging and baselines only.
    """
    V.check_pairwise_distance(x, mask)
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
    """``exp(-mean d^2 over the k nearest real tokens, self included)``; 0 where masked.

    An image with fewer real tokens than k uses them all; ``validate`` has no
    value check to run here (kept for a uniform signature).
    """
    V.check_knn_density(x, k, mask)
    _finite(x, mask, check_finite)
    return _ops.knn_density(x.detach(), k, mask, _backend(backend))


def density_delta(
    x: Tensor,
    density: Tensor,
    mask: Optional[Tensor] = None,
    densest_delta: str = "column_max",
    tie_break: str = "none",
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """``(delta, parent)``: distance to (and index of) the nearest denser token, delta capped (SPEC.md).

    ``tie_break="index"``: of two tokens of equal density the lower index
    counts as denser (the deterministic form of the random noise TCFormer and
    its descendants add); the default ``"none"`` is exact SeTok.
    """
    V.check_density_delta(x, density, mask, densest_delta, tie_break)
    return _ops.density_delta(x.detach(), density.detach(), mask, densest_delta, tie_break, _backend(backend))


def select_centers(
    score: Tensor,
    threshold: float = 0.5,
    min_clusters: int = 8,
    max_clusters: Optional[int] = None,
    mask: Optional[Tensor] = None,
    num_centers: Optional[int] = None,
    center_order: str = "index",
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``(centers (B, M), -1 padded; num_clusters (B,))`` from per-token scores.

    ``num_centers=n``: exactly the n highest scores per image (ties: lower
    index; all real tokens if fewer), no threshold, ``M = n``. Centres are in
    ascending index, or by descending score with ``center_order="score"``.
    """
    B, N = V.scores(score)
    M = V.cluster_bound(N, max_clusters, num_centers, B)
    V.check_select_centers(score, threshold, min_clusters, M, mask, num_centers or 0, center_order)
    return _ops.select_centers(
        score.detach(), float(threshold), min_clusters, M, mask, num_centers or 0, center_order, _backend(backend)
    )


def assign_to_centers(
    x: Tensor,
    centers: Tensor,
    num_clusters: Tensor,
    mask: Optional[Tensor] = None,
    metric: str = "euclidean",
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tensor:
    """Label of each real token: position of its nearest centre (earlier centre on ties).

    ``metric="cosine"``: the centre of largest cosine similarity (a zero
    vector has similarity 0 to everything).
    """
    V.check_assign_to_centers(x, centers, num_clusters, mask, metric, ints=V.INDEX_DTYPES)
    if V.validate_on_device(validate, x):
        V.assign_to_centers_values(x, centers, num_clusters, mask)
    return _ops.assign_to_centers(x.detach(), centers.long(), num_clusters.long(), mask, metric, _backend(backend))


def dpc_cluster(
    x: Tensor,
    k: int = 5,
    threshold: float = 0.5,
    min_clusters: int = 8,
    max_clusters: Optional[int] = None,
    mask: Optional[Tensor] = None,
    densest_delta: str = "column_max",
    num_centers: Optional[int] = None,
    center_order: str = "index",
    tie_break: str = "none",
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
    check_finite: bool = False,
) -> ClusterResult:
    """DPC-kNN clustering of each image's real tokens (SPEC.md); no host sync.

    ``centers`` has ``M`` columns: ``num_centers`` when set, else
    ``max_clusters``, else N. An image's k is clamped to its real-token count,
    and an image without real tokens gets no cluster (labels -1). ``validate``
    has no value check to run here.

    Drop-in options (TCFormer family): ``num_centers=n`` takes exactly the n
    highest scores per image (``M = n``, no threshold); ``center_order="score"``
    numbers centres, and so labels, by descending score; ``tie_break="index"``
    makes the lower index the denser of two equal densities.

    Magnitudes: every backend centres each image (distances use differences
    or mean-centred features) and scales it by a power of two before taking
    distances, so no finite ``x`` is refused and none gives NaN: where the
    float32 squared distances overflow (|x - mean| ~ 1e19) densities are 0
    and scores 0; where they underflow (~1e-20) densities are 1; both as in
    exact arithmetic rounded to float32. A distance beyond the float32 range
    (|x| ~ 1e38) gives ``delta = inf``. NaN or Inf in ``x`` raise with
    ``check_finite=True``; otherwise they change only their own image.
    """
    B, N, _ = V.features(x)
    M = V.cluster_bound(N, max_clusters, num_centers, B)
    args = (k, threshold, min_clusters, M, mask, densest_delta, num_centers or 0, center_order, tie_break)
    V.check_dpc_cluster(x, *args)
    _finite(x, mask, check_finite)
    out = _ops.dpc_cluster(x.detach(), k, float(threshold), *args[2:], _backend(backend))
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
      (``M = max_clusters``, N when None); ``cu_clusters (B+1,) int32`` says where
      each image's segments start.
    - ``max_seqlen``: a 0-dim int64 tensor (reading it is the caller's sync).
    """
    B, N = V.cluster_labels(labels)
    M = V.cluster_bound(N, max_clusters, None, B)
    V.check_pack_clusters(labels, num_clusters, M)
    if V.validate_on_device(validate, labels):
        V.pack_clusters_values(labels, num_clusters, M)
    return Packing(*_ops.pack_clusters(labels.long(), num_clusters.long(), M, _backend(backend)))


def segment_mean(
    x: Tensor,
    cu_seqlens: Tensor,
    *,
    weight: Optional[Tensor] = None,
    eps: float = 0.0,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tensor:
    """``(S, C)`` weighted mean ``sum(w x) / (sum(w) + eps)`` of each segment of the packed ``x (T, C)``.

    ``weight (T,)`` defaults to 1 per row; differentiable in ``x`` and ``weight``.
    A segment whose denominator is 0 (empty, with ``eps = 0``) gives 0.
    """
    V.check_segment_mean(x, cu_seqlens, weight, eps)
    if V.validate_on_device(validate, x):
        V.segment_mean_values(x, cu_seqlens)
    return _ops.segment_mean(x, cu_seqlens, _backend(backend), weight, float(eps))


def merge_clusters(
    x: Tensor,
    labels: Tensor,
    num_clusters: Tensor,
    max_clusters: Optional[int] = None,
    *,
    weight: Optional[Tensor] = None,
    eps: float = 0.0,
    centers: Optional[Tensor] = None,
    center_weight=None,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> MergeResult:
    """Merge each cluster's tokens into one, fused and sync-free: a :class:`MergeResult`.

    Slot ``m < num_clusters[b]`` (``M = max_clusters``, N when None) gets
    ``sum(w x) / (sum(w) + eps)`` over the tokens with ``labels == m``
    (``w = weight``, default 1; label -1 is in no cluster), the same as
    ``pack_clusters`` + ``segment_mean`` + ``pad_segments`` in one pass.
    With ``centers (B, M)`` and ``center_weight = a`` (a float or a (B, M)
    tensor) it gets ``a * x[centre] + (1 - a) * (weighted mean of the
    other members)``, and a cluster whose centre is its only member gets the
    centre itself. ``counts`` include the centre; ``weight_sum`` is
    ``sum(w)`` without eps. Empty slots hold 0. Differentiable in ``x``,
    ``weight`` and a tensor ``center_weight``; also through ``weight_sum``.
    """
    B, N, _ = V.features(x)
    M = V.cluster_bound(N, max_clusters, None, B)
    if center_weight is not None and not isinstance(center_weight, Tensor):
        a = V.number(center_weight, "center_weight")
        center_weight = torch.full((B, M), a, dtype=_ops.acc_dtype(x.dtype), device=x.device)
    V.check_merge_clusters(x, labels, num_clusters, M, weight, eps, centers, center_weight)
    if V.validate_on_device(validate, x):
        V.merge_clusters_values(x, labels, num_clusters, M, centers)
    out = _ops.merge_clusters(x, labels, num_clusters, M, weight, float(eps), centers, center_weight, _backend(backend))
    return MergeResult(*out)


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
    ``return_lse=True`` also returns the log-sum-exp ``(H, Tq)`` (natural log, -inf
    for rows without keys) in the accumulation dtype: float32, float64 for float64
    inputs. It is differentiable: its gradient flows into q and k.
    """
    self_attention = cu_seqlens_k is None
    cu_k = cu_seqlens_q if self_attention else cu_seqlens_k
    # the op's own check, with neutral stand-ins for the arguments still to default
    V.check_varlen_attention(
        q, k, v, cu_seqlens_q, cu_k,
        0 if max_seqlen_q is None else max_seqlen_q, 0 if max_seqlen_k is None else max_seqlen_k, 1.0 if scale is None else scale,
    )
    if self_attention and k.shape[0] != q.shape[0]:
        raise ValueError("self-attention (cu_seqlens_k=None) needs k and v with as many rows as q")
    max_q = q.shape[0] if max_seqlen_q is None else max_seqlen_q
    max_k = (max_q if self_attention else k.shape[0]) if max_seqlen_k is None else max_seqlen_k
    if scale is None:
        scale = _ops.default_scale(q.shape[-1])
    if V.validate_on_device(validate, q):
        V.varlen_attention_values(q, k, cu_seqlens_q, cu_k, max_q, max_k)
    name = _backend(backend, "attention")
    cu_q = cu_seqlens_q
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and _ops.direct_attention_ok(q, k, v, cu_q, cu_k):
        # the op's body without the op (eager, no gradients), the backend resolved as the op would
        impl = _ops.resolve_attention(q, k, max_q, max_k, name, False)
        out, lse = _ops.attention_direct(impl, q, k, v, cu_q, cu_k, max_q, max_k, float(scale))
    else:
        if name:  # resolve "auto" here, knowing whether gradients are needed
            name = _ops.resolve_attention(q, k, max_q, max_k, name, needs_grad).name
        out, lse = _ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, float(scale), name)
    return (out, lse) if return_lse else out


def pad_segments(x: Tensor, cu_clusters: Tensor, max_clusters: int, *, validate: Optional[bool] = None):
    """Packed segment rows ``x (S, ...)`` -> ``(B, M, ...)`` and a key mask ``(B, M)``.

    Image b's rows are ``x[cu_clusters[b]:cu_clusters[b+1]]``; differentiable in x.
    Offsets outside x (CUDA, validation off) give empty slots.
    """
    V.check_pad_segments(x, cu_clusters, max_clusters)
    if V.run_values(validate, x, cu_clusters):
        V.pad_segments_values(x, cu_clusters, max_clusters)
    return _reference.pad_segments(x, cu_clusters, max_clusters)


def unpad_segments(padded: Tensor, key_mask: Tensor, cu_clusters: Tensor, num_rows: int, *, validate: Optional[bool] = None):
    """Inverse of :func:`pad_segments`: ``(B, M, ...)`` -> ``(num_rows, ...)`` packed."""
    V.check_unpad_segments(padded, key_mask, cu_clusters, num_rows)
    if V.run_values(validate, padded, cu_clusters):
        V.offsets_values(cu_clusters, "cu_clusters", num_rows, "num_rows")
    return _reference.unpad_segments(padded, key_mask, cu_clusters, num_rows)
