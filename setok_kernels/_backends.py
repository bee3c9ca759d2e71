"""One backend mechanism for every op.

Each implementation of an op declares what it supports (devices, dtypes, grad,
per-call limits) and answers *why* it declines a call. ``resolve`` picks the
implementation: the one named by ``backend=`` / the environment, or, for
``"auto"``, the first in its op family's auto order (``AUTO_ORDER``, refined
per call by ``auto_order``) that accepts the call. Forcing an implementation
that declines raises :class:`BackendUnavailableError` with its reasons, never
a silent fallback. The backward of an op runs the backend its forward ran
(ops.py passes the resolved name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = [
    "BackendUnavailableError",
    "Impl",
    "CallInfo",
    "register",
    "resolve",
    "implementations",
    "backend_names",
    "normalize_backend",
    "auto_order",
]

# The auto order of each op family: "auto" runs the first of these that accepts
# the call. Every implementation is registered under one of its family's names.
AUTO_ORDER = {
    # Triton's fused kernels on CUDA (the interpreter on the CPU is for tests and
    # must be forced), then the compiled library's CPU/CUDA kernels, then the
    # pure-PyTorch reference, which accepts every call.
    "dpc": ("triton", "native", "reference"),
    # flash-attn's and torch's flash kernels are the fastest for the 16-bit head
    # dims they have (<= FLASH_MAX_HEAD_DIM); the Triton kernel packs short
    # segments into shared tiles; xformers reads the offsets on the host (a sync,
    # not capturable); the reference last. On the CPU, torch's fused kernel.
    # auto_order moves Triton first where no flash kernel applies.
    "attention": ("flash_attn", "torch", "triton", "xformers", "reference"),
}
# flash-attn's and torch's flash kernels take head dims up to this
FLASH_MAX_HEAD_DIM = 256

_ATTENTION_OPS = ("varlen_attention", "varlen_attention_backward")
_ENV = {"dpc": "SETOK_BACKEND", "attention": "SETOK_ATTN_BACKEND"}


def family(op: str) -> str:
    return "attention" if op in _ATTENTION_OPS else "dpc"


def auto_order(op: str, call: CallInfo) -> tuple[str, ...]:
    """``AUTO_ORDER`` of ``op``'s family, refined by what the call is."""
    order = AUTO_ORDER[family(op)]
    if op in _ATTENTION_OPS and (call.extra.get("head_dim", 0) > FLASH_MAX_HEAD_DIM or call.dtype == torch.float32):
        # no flash kernel above its head dims or in float32: the chunked Triton kernel
        # leads the memory-efficient ones (torch's, xformers')
        order = ("triton",) + tuple(name for name in order if name != "triton")
    return order


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message lists why."""


@dataclass(frozen=True)
class CallInfo:
    """What an implementation may look at to accept or decline a call."""

    device: torch.device
    dtype: torch.dtype
    requires_grad: bool = False
    # op-specific static facts (e.g. k, head_dim); never tensor values
    extra: dict = field(default_factory=dict)


@dataclass
class Impl:
    op: str
    name: str  # one of AUTO_ORDER[family(op)]
    fn: Callable
    devices: Optional[tuple[str, ...]]  # None: any device
    dtypes: tuple[torch.dtype, ...]
    # devices where "auto" may pick it (e.g. the Triton interpreter on CPU is
    # for testing only and must be forced)
    auto_devices: Optional[tuple[str, ...]] = None
    supports_grad: bool = True
    # returns None when usable on this machine, else why not (cached)
    available: Callable[[], Optional[str]] = lambda: None
    # returns None when this call fits, else why not
    check: Optional[Callable[[CallInfo], Optional[str]]] = None
    _availability: Optional[tuple[Optional[str]]] = None

    def unavailable_reason(self) -> Optional[str]:
        if self._availability is None:
            try:
                reason = self.available()
            except Exception as exc:  # a broken optional dependency is a reason, not a crash
                reason = f"{type(exc).__name__}: {exc}"
            self._availability = (reason,)
        return self._availability[0]

    def decline_reason(self, call: CallInfo, forced: bool) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason:
            return reason
        dev = call.device.type
        if self.devices is not None and dev not in self.devices:
            return f"device {dev} not supported (supports {', '.join(self.devices)})"
        if not forced and self.auto_devices is not None and dev not in self.auto_devices:
            return f"not chosen automatically on {dev}; force it with backend='{self.name}'"
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(call.dtype).replace('torch.', '')} not supported (supports {names})"
        if call.requires_grad and not self.supports_grad:
            return "does not support gradients"
        if self.check is not None:
            return self.check(call)
        return None


_REGISTRY: dict[str, list[Impl]] = {}


def register(impl: Impl) -> Impl:
    """Add (or replace) ``impl``; the registry keeps its family's auto order."""
    order = AUTO_ORDER[family(impl.op)]
    if impl.name not in order:
        raise ValueError(f"{impl.op}: backend {impl.name!r} is not in the auto order {order} (_backends.AUTO_ORDER)")
    impls = _REGISTRY.setdefault(impl.op, [])
    impls[:] = sorted([i for i in impls if i.name != impl.name] + [impl], key=lambda i: order.index(i.name))
    return impl


def implementations(op: str) -> list[Impl]:
    return list(_REGISTRY.get(op, ()))


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def backend_names(family: str) -> tuple[str, ...]:
    return ("auto",) + AUTO_ORDER[family]


def normalize_backend(backend: Optional[str], family: str = "dpc", arg: str = "backend") -> str:
    """Resolve ``None`` through the environment and reject unknown names."""
    allowed = backend_names(family)
    if backend is None or backend == "":
        env = _ENV[family]
        backend = os.environ.get(env, "auto") or "auto"
        arg = f"{env} (environment)"
    if not isinstance(backend, str):
        raise TypeError(f"{arg} must be a str, got {type(backend).__name__}")
    if backend not in allowed:
        raise ValueError(f"{arg}: unknown backend {backend!r}; expected one of {', '.join(allowed)}")
    return backend


def resolve(op: str, backend: str, call: CallInfo) -> Impl:
    """Pick the implementation of ``op`` for this call (``backend`` already normalised)."""
    impls = _REGISTRY.get(op, [])
    if backend != "auto":
        for impl in impls:
            if impl.name == backend:
                reason = impl.decline_reason(call, forced=True)
                if reason is None:
                    return impl
                raise BackendUnavailableError(f"setok.{op}: backend '{backend}' cannot run this call: {reason}")
        have = ", ".join(i.name for i in impls) or "none"
        raise BackendUnavailableError(f"setok.{op}: backend '{backend}' has no implementation of this op (has: {have})")
    reasons = []
    for impl in _in_auto_order(op, call):
        reason = impl.decline_reason(call, forced=False)
        if reason is None:
            return impl
        reasons.append(f"{impl.name}: {reason}")
    raise BackendUnavailableError(f"setok.{op}: no backend accepts this call ({'; '.join(reasons)})")


def _in_auto_order(op: str, call: CallInfo) -> list[Impl]:
    impls = _REGISTRY.get(op, [])
    order = auto_order(op, call)
    if order is AUTO_ORDER[family(op)]:
        return impls  # registered in that order
    return sorted(impls, key=lambda i: order.index(i.name))


def explain(op: str, call: CallInfo) -> list[tuple[str, Optional[str]]]:
    """(backend, None | reason it declines) for each implementation, in auto order."""
    return [(i.name, i.decline_reason(call, forced=False)) for i in _in_auto_order(op, call)]
