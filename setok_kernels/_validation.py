"""Input checks of SPEC.md "Conventions".

Static checks (types, ranks, shapes, dtypes, devices, scalar arguments) always
run, before any kernel, and never read tensor values. Checks that must read
values run only with ``validate=True`` (the default for CPU tensors: on CUDA
they would sync).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
DENSEST_DELTA_MODES = ("column_max", "global_max")


class DTypeError(ValueError, TypeError):
    """An unsupported tensor dtype: both a ValueError and a TypeError."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(t, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


def integer(v, arg: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.SymInt):
            return v
        raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
    return v


def features(x, arg: str = "x") -> tuple[int, int, int]:
    """``(B, N, C)`` floating features with N >= 1 and C >= 1."""
    tensor(x, arg)
    if x.dim() != 3:
        raise ValueError(f"{arg} must have shape (B, N, C), got {x.dim()} dims {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{arg} must be float16, bfloat16, float32 or float64, got {_name(x.dtype)}"
        )
    B, N, C = x.shape
    if N == 0:
        raise ValueError(f"{arg} has N = 0 tokens; every image needs at least one token")
    if C == 0:
        raise ValueError(f"{arg} has C = 0 channels")
    return B, N, C


def same_device(t: torch.Tensor, arg: str, ref: torch.Tensor, ref_arg: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{arg} is on {t.device} but {ref_arg} is on {ref.device}; they must be on one device")


def mask(m, B: int, N: int, ref: torch.Tensor, ref_arg: str = "x", arg: str = "mask") -> None:
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
    integer(k, arg)
    if k < 1:
        raise ValueError(f"{arg} must be >= 1, got {k}")
    if k > N:
        raise ValueError(f"{arg} = {k} exceeds the number of tokens N = {N}")
    return k


def threshold(t, arg: str = "threshold") -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{arg} must be a float, got {type(t).__name__}")
    if math.isnan(t):
        raise ValueError(f"{arg} must not be NaN")
    return float(t)


def positive(v, arg: str) -> int:
    integer(v, arg)
    if v < 1:
        raise ValueError(f"{arg} must be >= 1, got {v}")
    return v


def densest_delta(mode, arg: str = "densest_delta") -> str:
    if not isinstance(mode, str):
        raise TypeError(f"{arg} must be a str, got {type(mode).__name__}")
    if mode not in DENSEST_DELTA_MODES:
        raise ValueError(f"{arg} must be one of {', '.join(DENSEST_DELTA_MODES)}, got {mode!r}")
    return mode


def cu_seqlens(cu, arg: str) -> int:
    """1-D int32/int64 offsets; returns the number of segments."""
    tensor(cu, arg)
    if cu.dtype not in INDEX_DTYPES:
        raise DTypeError(f"{arg} must be int32 or int64, got {_name(cu.dtype)}")
    if cu.dim() != 1:
        raise ValueError(f"{arg} must be 1-D, got shape {tuple(cu.shape)}")
    if cu.numel() < 1:
        raise ValueError(f"{arg} must hold at least one offset (0)")
    return cu.numel() - 1


def should_validate(validate: Optional[bool], *tensors: torch.Tensor) -> bool:
    """Value checks default to on for CPU tensors and off elsewhere (they sync).

    Under torch.compile they are off: a traced graph cannot branch on values.
    """
    if torch.compiler.is_compiling():
        return False
    if validate is not None:
        return bool(validate)
    return all(t.device.type == "cpu" for t in tensors if t is not None)


# ----------------------------------------------------------------- value checks


def real_counts_at_least(mask_, B: int, N: int, k: int, arg: str = "mask") -> None:
    if mask_ is None:
        return  # N >= k was checked statically
    counts = mask_.sum(1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{arg}: image(s) {empty} have no real token")
    short = (counts < k).nonzero().flatten().tolist()
    if short:
        raise ValueError(
            f"k = {k} exceeds the real-token count of image(s) {short} "
            f"(counts {counts[short].tolist()}); lower k or pass validate=False to clamp k per image"
        )


def finite(x: torch.Tensor, arg: str = "x", mask_=None) -> None:
    bad = ~torch.isfinite(x).all(-1)
    if mask_ is not None:
        bad &= mask_
    if bool(bad.any()):
        where = bad.nonzero()[:4].tolist()
        raise ValueError(f"{arg} holds NaN or Inf (first at [image, token] {where})")


def offsets_values(cu: torch.Tensor, arg: str, total: int, total_arg: str) -> None:
    if int(cu[0]) != 0:
        raise ValueError(f"{arg} must start at 0, got {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{arg} must be non-decreasing")
    if int(cu[-1]) > total:
        raise ValueError(f"{arg} ends at {int(cu[-1])}, past the end of {total_arg} ({total} rows)")


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
    c = centers[valid]
    if bool(((c < 0) | (c >= N)).any()):
        raise ValueError(f"centers must hold token indices in [0, {N}) in their first num_clusters[b] entries")
    if mask_ is not None:
        b = valid.nonzero()[:, 0]
        if c.numel() and not bool(mask_[b, c].all()):
            raise ValueError("centers must be real tokens (mask True)")
