"""Argument checks of the model classes: a clear error naming the argument, before any layer runs."""

from __future__ import annotations

import functools
import math
import operator
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from setok_kernels import _validation as V


def renamed(**old_to_new: str):
    """Accept each old keyword argument for one release, with a DeprecationWarning
    (the project's names are in docs/NAMES.md)."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got {old!r} and its new name {new!r}: pass {new!r} only")
                    warnings.warn(f"{fn.__qualname__}(): {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap


def deprecated_field(new: str, old: str) -> property:
    """A read-only alias ``old`` of the field ``new`` of a result type, for one release."""

    def get(self):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use .{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated alias of ``{new}``.")


def count(v, arg: str, minimum: int = 1) -> int:
    """An int (not a bool, not a float) >= ``minimum``."""
    if isinstance(v, bool):
        raise TypeError(f"{arg} must be an int, got bool")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{arg} must be an int, got {type(v).__name__}") from None
    if v < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {v}")
    return v


def heads(dim: int, num_heads, arg: str = "num_heads") -> int:
    num_heads = count(num_heads, arg)
    if dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by {arg} ({num_heads})")
    return num_heads


def probability(p, arg: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{arg} must be a float in [0, 1), got {p!r}")
    return float(p)


def pair(g, arg: str = "grid") -> tuple[int, int]:
    """``(h, w)``, two ints >= 1."""
    if isinstance(g, (str, bytes)) or not hasattr(g, "__len__") or len(g) != 2:
        raise TypeError(f"{arg} must be a pair (h, w) of ints, got {g!r}")
    h, w = (count(v, f"{arg}[{i}]") for i, v in enumerate(g))
    return h, w


def grid(N: int, g: Optional[tuple[int, int]], arg: str = "grid") -> tuple[int, int]:
    """``(h, w)`` with ``h * w == N``; None: the square grid (N must be a square)."""
    if g is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"features have N = {N} patches, not a square: pass {arg}=(h, w)")
        return side, side
    h, w = pair(g, arg)
    if h * w != N:
        raise ValueError(f"{arg} {h}x{w} does not match N = {N} patches")
    return h, w


def features(x, module: nn.Module, channels: int, arg: str = "features") -> tuple[int, int, int]:
    """``(B, N, channels)`` floating, N >= 1, on the module's device in its dtype (autocast aside)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != channels:
        raise ValueError(f"{arg} must have shape (B, N, {channels}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise V.DTypeError(f"{arg} must be a floating tensor, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{arg} has N = 0 patches; every image needs at least one")
    _like_weights(x, module, arg)
    return tuple(x.shape)


def _like_weights(x: Tensor, module: nn.Module, arg: str) -> None:
    """On the module's device, in its dtype (unless autocast decides the dtypes)."""
    param = next(module.parameters(), None)
    if param is None:
        return
    if x.device != param.device:
        raise ValueError(f"{arg} is on {x.device} but the {type(module).__name__} is on {param.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise V.DTypeError(
            f"{arg} are {x.dtype} but the {type(module).__name__} weights are {param.dtype}: "
            f"convert one (module.to(dtype) or {arg}.to(dtype)) or run under torch.autocast"
        )


def packed_tokens(tokens, cu_clusters, module: nn.Module, channels: int) -> int:
    """Packed ``tokens (S, channels)`` with offsets ``cu_clusters (B+1,)``; returns B."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[-1] != channels:
        raise ValueError(f"tokens must have shape (S, {channels}), got {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise V.DTypeError(f"tokens must be a floating tensor, got {tokens.dtype}")
    _like_weights(tokens, module, "tokens")
    return V.offsets(cu_clusters, "cu_clusters", tokens, "tokens")
