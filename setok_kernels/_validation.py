"""Input checks of SPEC.md "Conventions", one definition per rule.

Per op, two kinds, taking the op's arguments by name:

- ``check_<op>``: metadata (types, ranks, shapes, dtypes, devices, enum
  strings, sizes). Never reads a tensor value, so never syncs. Every custom op
  runs it on every call (``ops._checked``), whoever calls the op, before any
  backend; the Python functions and the public reference call the same code.
- ``<op>_values``: offsets, labels and centres in range. Reads tensors, which
  costs no device sync on the CPU: the custom ops run it whenever their
  tensors are on the CPU; on CUDA only ``validate=True`` runs it (in
  functional.py). With it off, kernels clamp offsets and indices to their
  buffers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
DENSEST_DELTA_MODES = ("column_max", "global_max")
CENTER_ORDERS = ("index", "score")
TIE_BREAKS = ("none", "index")
METRICS = ("euclidean", "cosine")
# int32 offsets (cu_seqlens) and segment counts must address every row and segment
INDEX_LIMIT = 2**31 - 1


class DTypeError(ValueError, TypeError):
    """An unsupported tensor dtype: both a ValueError and a TypeError."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------- primitives


def tensor(t, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


def integer(v, arg: str) -> int:
    if isinstance(v, torch.SymInt):
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
    return v


def number(v, arg: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{arg} must be a float, got {type(v).__name__}")
    return float(v)


def choice(v, arg: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{arg} must be a str, got {type(v).__name__}")
    if v not in allowed:
        raise ValueError(f"{arg} must be one of {', '.join(allowed)}, got {v!r}")
    return v


def floating(t, arg: str, dims: str) -> torch.Tensor:
    """A floating tensor of rank ``len(dims)``; ``dims`` names the axes, e.g. ``"B, N, C"``."""
    tensor(t, arg)
    rank = dims.count(",") + 1
    if t.dim() != rank:
        raise ValueError(f"{arg} must have shape ({dims}), got {t.dim()} dims {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{arg} must be float16, bfloat16, float32 or float64, got {_name(t.dtype)}")
    return t


def index_tensor(t, arg: str, dims: str, shape: tuple, ref: torch.Tensor, ref_arg: str) -> torch.Tensor:
    """An int32/int64 tensor of exactly ``shape`` (axes named ``dims``) on ``ref``'s device."""
    tensor(t, arg)
    if t.dtype not in INDEX_DTYPES:
        raise DTypeError(f"{arg} must be int32 or int64, got {_name(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        want = ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "")
        raise ValueError(f"{arg} must have shape ({dims}) = ({want}), got {tuple(t.shape)}")
    same_device(t, arg, ref, ref_arg)
    return t


def features(x, arg: str = "x") -> tuple[int, int, int]:
    """``(B, N, C)`` floating features with N >= 1 and C >= 1."""
    floating(x, arg, "B, N, C")
    B, N, C = x.shape
    if N == 0:
        raise ValueError(f"{arg} has N = 0 tokens; every image needs at least one token")
    if C == 0:
        raise ValueError(f"{arg} has C = 0 channels")
    return B, N, C


def same_device(t: torch.Tensor, arg: str, ref: torch.Tensor, ref_arg: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{arg} is on {t.device} but {ref_arg} is on {ref.device}; they must be on one device")


def token_mask(m, B: int, N: int, ref: torch.Tensor, ref_arg: str = "x", arg: str = "mask") -> None:
    if m is None:
        return
    tensor(m, arg)
    if m.dtype != torch.bool:
        raise DTypeError(f"{arg} must be a bool tensor (True = real token), got {_name(m.dtype)}")
    if m.dim() != 2 or m.shape[0] != B or m.shape[1] != N:
        raise ValueError(f"{arg} must have shape (B, N) = ({B}, {N}) to match {ref_arg}, got {tuple(m.shape)}")
    same_device(m, arg, ref, ref_arg)


def per_token(t, B: int, N: int, ref: torch.Tensor, arg: str, ref_arg: str = "x", dtypes=None) -> None:
    tensor(t, arg)
    if t.dim() != 2 or t.shape[0] != B or t.shape[1] != N:
        raise ValueError(f"{arg} must have shape (B, N) = ({B}, {N}) to match {ref_arg}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise DTypeError(f"{arg} must be one of {', '.join(map(_name, dtypes))}, got {_name(t.dtype)}")
    same_device(t, arg, ref, ref_arg)


def k_neighbours(k, N: int, arg: str = "k") -> int:
    """1 <= k <= N. An image with fewer real tokens than k is not an error: k is clamped per image."""
    integer(k, arg)
    if k < 1:
        raise ValueError(f"{arg} must be >= 1, got {k}")
    if k > N:
        raise ValueError(f"{arg} = {k} exceeds the number of tokens N = {N}")
    return k


def not_nan(t, arg: str = "threshold") -> float:
    t = number(t, arg)
    if math.isnan(t):
        raise ValueError(f"{arg} must not be NaN")
    return t


def positive(v, arg: str) -> int:
    integer(v, arg)
    if v < 1:
        raise ValueError(f"{arg} must be >= 1, got {v}")
    return v


def densest_delta(mode, arg: str = "densest_delta") -> str:
    return choice(mode, arg, DENSEST_DELTA_MODES)


def slots(B: int, M: int, arg: str = "max_clusters") -> None:
    """Refuse a bound M whose B*M outputs int32 offsets cannot address, before anything is allocated.

    B counts as at least 1: per-image work is sized by M even for an empty batch.
    """
    if max(B, 1) * M > INDEX_LIMIT:
        raise ValueError(
            f"{arg} = {M} gives B * {arg} = {max(B, 1) * M} cluster slots for B = {B} images, "
            f"over the {INDEX_LIMIT} that int32 offsets address"
        )


def cluster_bound(N: int, max_clusters, num_centers, B: int) -> int:
    """M, the cluster slots per image, computed and checked in this one place.

    ``num_centers`` when > 0 (``max_clusters`` must then be None or equal), else
    ``max_clusters`` (>= 1), else N. None and 0 both mean no ``num_centers``.
    The ops get M resolved; their checks call this again, which returns it unchanged.
    """
    if num_centers is None:
        num_centers = 0
    integer(num_centers, "num_centers")
    if num_centers < 0:
        raise ValueError(f"num_centers must be >= 0 (0: threshold rule), got {num_centers}")
    if max_clusters is None:
        max_clusters = num_centers or N
    M = positive(max_clusters, "max_clusters")
    if num_centers and M != num_centers:
        raise ValueError(f"num_centers = {num_centers} needs max_clusters == num_centers, got {M}")
    slots(B, M)
    return M


def offsets(cu, arg: str, ref: torch.Tensor, ref_arg: str) -> int:
    """1-D int32/int64 offsets on ``ref``'s device; returns the number of segments."""
    tensor(cu, arg)
    if cu.dtype not in INDEX_DTYPES:
        raise DTypeError(f"{arg} must be int32 or int64, got {_name(cu.dtype)}")
    if cu.dim() != 1:
        raise ValueError(f"{arg} must be 1-D, got shape {tuple(cu.shape)}")
    if cu.numel() < 1:
        raise ValueError(f"{arg} must hold at least one offset (0)")
    same_device(cu, arg, ref, ref_arg)
    S = cu.numel() - 1
    if S > INDEX_LIMIT:
        raise ValueError(f"{arg} has {S} segments, over the {INDEX_LIMIT} that int32 offsets address")
    return S


def on_cpu(*tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))


def validate_on_device(validate: Optional[bool], *tensors) -> bool:
    """Whether a Python function runs the value checks itself: only for ``validate=True`` off the CPU.

    On the CPU the custom ops always run them; under torch.compile a traced
    graph cannot branch on values (the ops still check at run time on CPU).
    """
    return bool(validate) and not on_cpu(*tensors) and not torch.compiler.is_compiling()


def run_values(validate: Optional[bool], *tensors) -> bool:
    """For helpers that are not custom ops: value checks on the CPU always, elsewhere with ``validate=True``."""
    if torch.compiler.is_compiling():
        return False
    return on_cpu(*tensors) or bool(validate)


# ----------------------------------------------------------------- op metadata


def check_pairwise_distance(x, mask=None) -> None:
    B, N, _ = features(x)
    token_mask(mask, B, N, x)


def check_knn_density(x, k, mask=None) -> None:
    B, N, _ = features(x)
    token_mask(mask, B, N, x)
    k_neighbours(k, N)


def check_density_delta(x, density, mask=None, densest_delta="column_max", tie_break="none") -> None:
    B, N, _ = features(x)
    token_mask(mask, B, N, x)
    per_token(density, B, N, x, "density", dtypes=FLOAT_DTYPES)
    choice(densest_delta, "densest_delta", DENSEST_DELTA_MODES)
    choice(tie_break, "tie_break", TIE_BREAKS)


def scores(score, arg: str = "score") -> tuple[int, int]:
    """``(B, N)`` floating per-token scores with N >= 1."""
    B, N = floating(score, arg, "B, N").shape
    if N == 0:
        raise ValueError(f"{arg} has N = 0 tokens; every image needs at least one token")
    return B, N


def check_select_centers(score, threshold, min_clusters, max_clusters, mask=None, num_centers=0, center_order="index") -> None:
    B, N = scores(score)
    token_mask(mask, B, N, score, "score")
    not_nan(threshold)
    positive(min_clusters, "min_clusters")
    cluster_bound(N, max_clusters, num_centers, B)
    choice(center_order, "center_order", CENTER_ORDERS)


def check_assign_to_centers(x, centers, num_clusters, mask=None, metric="euclidean", *, ints=(torch.int64,)) -> None:
    """``ints``: the dtypes accepted for ``centers``; the op takes int64, the Python function converts int32."""
    B, N, _ = features(x)
    token_mask(mask, B, N, x)
    tensor(centers, "centers")
    if centers.dim() != 2 or centers.shape[0] != B:
        raise ValueError(f"centers must have shape (B, M) with B = {B}, got {tuple(centers.shape)}")
    if centers.dtype not in ints:
        raise DTypeError(f"centers must be {' or '.join(map(_name, ints))}, got {_name(centers.dtype)}")
    index_tensor(centers, "centers", "B, M", tuple(centers.shape), x, "x")
    slots(B, centers.shape[1], "centers.shape[1]")
    index_tensor(num_clusters, "num_clusters", "B,", (B,), x, "x")
    choice(metric, "metric", METRICS)


def check_dpc_cluster(
    x, k, threshold, min_clusters, max_clusters, mask=None, densest_delta="column_max",
    num_centers=0, center_order="index", tie_break="none",
) -> None:
    B, N, _ = features(x)
    token_mask(mask, B, N, x)
    k_neighbours(k, N)
    not_nan(threshold)
    positive(min_clusters, "min_clusters")
    cluster_bound(N, max_clusters, num_centers, B)
    choice(densest_delta, "densest_delta", DENSEST_DELTA_MODES)
    choice(center_order, "center_order", CENTER_ORDERS)
    choice(tie_break, "tie_break", TIE_BREAKS)


def cluster_labels(labels) -> tuple[int, int]:
    """``(B, N)`` int32/int64 labels with N >= 1 and B * N addressable by int32 offsets."""
    tensor(labels, "labels")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, N), got {tuple(labels.shape)}")
    B, N = labels.shape
    index_tensor(labels, "labels", "B, N", (B, N), labels, "labels")
    if N == 0:
        raise ValueError("labels has N = 0 tokens; every image needs at least one token")
    if B * N > INDEX_LIMIT:
        raise ValueError(f"labels has B * N = {B * N} tokens, over the {INDEX_LIMIT} that int32 offsets address")
    return B, N


def check_pack_clusters(labels, num_clusters, max_clusters) -> None:
    B, N = cluster_labels(labels)
    index_tensor(num_clusters, "num_clusters", "B,", (B,), labels, "labels")
    cluster_bound(N, max_clusters, None, B)


def check_segment_mean(x, cu_seqlens, weight=None, eps=0.0) -> None:
    floating(x, "x", "T, C")
    offsets(cu_seqlens, "cu_seqlens", x, "x")
    if weight is not None:
        floating(weight, "weight", "T")
        if weight.shape[0] != x.shape[0]:
            raise ValueError(f"weight must have shape (T,) = ({x.shape[0]},) to match x, got {tuple(weight.shape)}")
        same_device(weight, "weight", x, "x")
    e = number(eps, "eps")
    if not e >= 0 or math.isinf(e):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def check_segment_mean_backward(grad, cu_seqlens, num_rows) -> None:
    floating(grad, "grad", "S, C")
    S = offsets(cu_seqlens, "cu_seqlens", grad, "grad")
    if grad.shape[0] != S:
        raise ValueError(f"grad must have one row per segment ({S}), got {grad.shape[0]}")
    integer(num_rows, "num_rows")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")


def check_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, scale=1.0) -> None:
    for t, arg in ((q, "q"), (k, "k"), (v, "v")):
        floating(t, arg, "T, H, D")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise DTypeError(f"q, k, v must share one dtype, got {_name(q.dtype)}, {_name(k.dtype)}, {_name(v.dtype)}")
    same_device(k, "k", q, "q")
    same_device(v, "v", q, "q")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q and k must have the same (H, D), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
    if q.shape[1] == 0:
        raise ValueError("q, k, v have H = 0 heads; attention needs at least one")
    if q.shape[2] == 0:
        raise ValueError("q, k, v have head dim D = 0; attention needs D >= 1")
    S = offsets(cu_seqlens_q, "cu_seqlens_q", q, "q")
    S_k = offsets(cu_seqlens_k, "cu_seqlens_k", q, "q")
    if S != S_k:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {S + 1} and {S_k + 1}")
    for value, arg in ((max_seqlen_q, "max_seqlen_q"), (max_seqlen_k, "max_seqlen_k")):
        if integer(value, arg) < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")
    s = number(scale, "scale")
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale}")


def check_varlen_attention_backward(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, scale=1.0, dlse=None
) -> None:
    check_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    for t, arg in ((dout, "dout"), (out, "out")):
        floating(t, arg, "T, H, D")
        if t.shape != q.shape:
            raise ValueError(f"{arg} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        same_device(t, arg, q, "q")
    _row_stats(lse, "lse", q)
    if dlse is not None:
        _row_stats(dlse, "dlse", q)


def _row_stats(t, arg: str, q) -> None:
    """A per-(head, query row) statistic such as the log-sum-exp: floating ``(H, Tq)``."""
    floating(t, arg, "H, T")
    if tuple(t.shape) != (q.shape[1], q.shape[0]):
        raise ValueError(f"{arg} must have shape (H, Tq) = {(q.shape[1], q.shape[0])}, got {tuple(t.shape)}")
    same_device(t, arg, q, "q")


def check_pad_segments(x, cu_clusters, max_clusters) -> None:
    tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have shape (S, ...), got a 0-dim tensor")
    B = offsets(cu_clusters, "cu_clusters", x, "x")
    slots(B, positive(max_clusters, "max_clusters"))


def check_unpad_segments(padded, key_mask, cu_clusters, num_rows) -> None:
    tensor(padded, "padded")
    if padded.dim() < 2:
        raise ValueError(f"padded must have shape (B, M, ...), got {tuple(padded.shape)}")
    B, M = padded.shape[:2]
    tensor(key_mask, "key_mask")
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, M):
        raise ValueError(f"key_mask must be a bool tensor of shape (B, M) = ({B}, {M}), got {key_mask.dtype} {tuple(key_mask.shape)}")
    same_device(key_mask, "key_mask", padded, "padded")
    if offsets(cu_clusters, "cu_clusters", padded, "padded") != B:
        raise ValueError(f"cu_clusters must have B + 1 = {B + 1} offsets, got {cu_clusters.numel()}")
    if integer(num_rows, "num_rows") < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")


# ----------------------------------------------------------------- value checks


def finite(x: torch.Tensor, arg: str = "x", mask_=None) -> None:
    bad = ~torch.isfinite(x).all(-1)
    if mask_ is not None:
        bad &= mask_
    if bool(bad.any()):
        where = bad.nonzero()[:4].tolist()
        raise ValueError(f"{arg} holds NaN or Inf (first at [image, token] {where})")


def _offsets_ok(cu: torch.Tensor, total: int, longest: Optional[int]) -> bool:
    """One pass, one host read: starts at 0, non-decreasing, ends by ``total``, no segment over ``longest``."""
    if cu.numel() <= 512:  # up to ~512 values one read and a list pass beat five tensor ops (CPU, measured)
        c = cu.tolist()
        steps = [b - a for a, b in zip(c, c[1:])]
        return c[0] == 0 and c[-1] <= total and min(steps, default=0) >= 0 and (longest is None or max(steps, default=0) <= longest)
    steps = cu[1:] - cu[:-1]
    ok = (cu[0] == 0) & (cu[-1] <= total) & (steps >= 0).all()
    if longest is not None:
        ok &= (steps <= longest).all()
    return bool(ok)


def offsets_values(
    cu: torch.Tensor, arg: str, total: int, total_arg: str, longest: Optional[int] = None, longest_arg: str = ""
) -> None:
    """``cu`` addresses rows ``[0, total)`` of ``total_arg``; with ``longest``, no segment is longer."""
    if _offsets_ok(cu, total, longest):
        return  # the diagnosis below only runs on bad input
    if int(cu[0]) != 0:
        raise ValueError(f"{arg} must start at 0, got {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{arg} must be non-decreasing")
    if int(cu[-1]) > total:
        raise ValueError(f"{arg} ends at {int(cu[-1])}, past the end of {total_arg} ({total} rows)")
    seg = int((cu[1:] - cu[:-1]).max())
    raise ValueError(f"{longest_arg} = {longest} is shorter than the longest segment of {arg} ({seg})")


def labels_values(labels: torch.Tensor, num_clusters: torch.Tensor, M: int) -> None:
    if bool((num_clusters < 0).any()) or bool((num_clusters > M).any()):
        raise ValueError(f"num_clusters must lie in [0, {M}] (max_clusters)")
    if bool((labels < -1).any()) or bool((labels >= num_clusters[:, None]).any()):
        raise ValueError("labels must lie in [-1, num_clusters[b]) for every image b")


def centers_values(centers: torch.Tensor, num_clusters: torch.Tensor, N: int, mask_) -> None:
    M = centers.shape[1]
    if bool((num_clusters < 0).any()) or bool((num_clusters > M).any()):
        raise ValueError(f"num_clusters must lie in [0, {M}] (the width of centers)")
    valid = torch.arange(M, device=centers.device)[None, :] < num_clusters[:, None]
    c = centers[valid].long()
    if bool(((c < 0) | (c >= N)).any()):
        raise ValueError(f"centers must hold token indices in [0, {N}) in their first num_clusters[b] entries")
    if mask_ is not None:
        b = valid.nonzero()[:, 0]
        if c.numel() and not bool(mask_[b, c].all()):
            raise ValueError("centers must be real tokens (mask True)")


def assign_to_centers_values(x, centers, num_clusters, mask=None) -> None:
    centers_values(centers, num_clusters, x.shape[1], mask)


def pack_clusters_values(labels, num_clusters, max_clusters) -> None:
    labels_values(labels, num_clusters, max_clusters)


def segment_mean_values(x, cu_seqlens) -> None:
    offsets_values(cu_seqlens, "cu_seqlens", x.shape[0], "x")


def segment_mean_backward_values(cu_seqlens, num_rows) -> None:
    offsets_values(cu_seqlens, "cu_seqlens", num_rows, "the forward's x")


def varlen_attention_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    offsets_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q", max_seqlen_q, "max_seqlen_q")
    if cu_seqlens_k is not cu_seqlens_q or k.shape[0] != q.shape[0] or max_seqlen_k < max_seqlen_q:
        offsets_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k", max_seqlen_k, "max_seqlen_k")


def pad_segments_values(x, cu_clusters, max_clusters) -> None:
    offsets_values(cu_clusters, "cu_clusters", x.shape[0], "x", max_clusters, "max_clusters")


# ----------------------------------------------------------------- merge_clusters (H5)


def check_merge_clusters(x, labels, num_clusters, max_clusters, weight=None, eps=0.0, centers=None,
                         center_weight=None) -> None:
    """Op-level metadata: ``center_weight`` is a (B, M) floating tensor here (the function takes a float too)."""
    B, N, _ = features(x)
    index_tensor(labels, "labels", "B, N", (B, N), x, "x")
    index_tensor(num_clusters, "num_clusters", "B,", (B,), x, "x")
    M = cluster_bound(N, max_clusters, None, B)
    if weight is not None:
        floating(weight, "weight", "B, N")
        if tuple(weight.shape) != (B, N):
            raise ValueError(f"weight must have shape (B, N) = ({B}, {N}) to match x, got {tuple(weight.shape)}")
        same_device(weight, "weight", x, "x")
    e = number(eps, "eps")
    if not e >= 0 or math.isinf(e):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if (centers is None) != (center_weight is None):
        raise ValueError("centers and center_weight go together: the blend needs each cluster's centre")
    if centers is not None:
        index_tensor(centers, "centers", "B, M", (B, M), x, "x")
        floating(center_weight, "center_weight", "B, M")
        if tuple(center_weight.shape) != (B, M):
            raise ValueError(f"center_weight must have shape (B, M) = ({B}, {M}), got {tuple(center_weight.shape)}")
        same_device(center_weight, "center_weight", x, "x")


def merge_clusters_values(x, labels, num_clusters, max_clusters, centers=None) -> None:
    labels_values(labels, num_clusters, max_clusters)
    if centers is not None:
        centers_values(centers, num_clusters, x.shape[1], None)
        # each cluster has its own centre (the GPU backwards map a token to the one cluster it centres)
        M = centers.shape[1]
        live = torch.arange(M, device=centers.device)[None, :] < num_clusters[:, None]
        ranked = torch.where(live, centers.long(), -1 - torch.arange(M, device=centers.device)).sort(1).values
        if M > 1 and bool((ranked[:, 1:] == ranked[:, :-1]).any()):
            raise ValueError("centers must be distinct tokens within an image (in their first num_clusters[b] entries)")


def check_merge_clusters_backward(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight=None, eps=0.0,
                                  centers=None, center_weight=None) -> None:
    floating(grad_tokens, "grad_tokens", "B, M, C")
    B, M, C = grad_tokens.shape
    check_merge_clusters(x, labels, num_clusters, M, weight, eps, centers, center_weight)
    if grad_tokens.shape[0] != x.shape[0] or C != x.shape[2]:
        raise ValueError(f"grad_tokens must have shape (B, M, C) with B, C of x, got {tuple(grad_tokens.shape)}")
    floating(grad_weight_sum, "grad_weight_sum", "B, M")
    if tuple(grad_weight_sum.shape) != (B, M):
        raise ValueError(f"grad_weight_sum must have shape (B, M) = ({B}, {M}), got {tuple(grad_weight_sum.shape)}")
    same_device(grad_tokens, "grad_tokens", x, "x")
    same_device(grad_weight_sum, "grad_weight_sum", x, "x")


def merge_clusters_backward_values(grad_tokens, x, labels, num_clusters, centers=None) -> None:
    merge_clusters_values(x, labels, num_clusters, grad_tokens.shape[1], centers)


def check_segment_mean_weighted_backward(grad, x, cu_seqlens, weight=None, eps=0.0) -> None:
    check_segment_mean(x, cu_seqlens, weight, eps)
    floating(grad, "grad", "S, C")
    S = cu_seqlens.numel() - 1
    if tuple(grad.shape) != (S, x.shape[1]):
        raise ValueError(f"grad must have shape (S, C) = ({S}, {x.shape[1]}), got {tuple(grad.shape)}")
    same_device(grad, "grad", x, "x")


def segment_mean_weighted_backward_values(x, cu_seqlens) -> None:
    offsets_values(cu_seqlens, "cu_seqlens", x.shape[0], "x")
