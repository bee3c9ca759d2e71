"""One backend mechanism for every op.

Each implementation of an op declares what it supports (devices, dtypes, grad,
per-call limits) and answers *why* it declines a call. ``resolve`` picks the
implementation: the one named by ``backend=`` / the environment, or, for
``"auto"``, the first in priority order that accepts the call. Forcing an
implementation that declines raises :class:`BackendUnavailableError` with its
reasons, never a silent fallback.
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
]

# Backend names accepted per op family. Attention has more (external libraries).
DPC_BACKENDS = ("auto", "triton", "native", "reference")
ATTN_BACKENDS = ("auto", "triton", "flash_attn", "torch", "xformers", "reference")

_ENV = {"dpc": "SETOK_BACKEND", "attention": "SETOK_ATTN_BACKEND"}


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
    name: str
    fn: Callable
    priority: int  # lower runs first under "auto"
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
    # per-call priority for "auto" (e.g. by head dim); None: ``priority``
    priority_for_call: Optional[Callable[[CallInfo], int]] = None
    _availability: Optional[tuple[Optional[str]]] = None

    def rank(self, call: CallInfo) -> int:
        return self.priority if self.priority_for_call is None else self.priority_for_call(call)

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
    impls = _REGISTRY.setdefault(impl.op, [])
    impls[:] = [i for i in impls if i.name != impl.name] + [impl]
    impls.sort(key=lambda i: i.priority)
    return impl


def implementations(op: str) -> list[Impl]:
    return list(_REGISTRY.get(op, ()))


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def backend_names(family: str) -> tuple[str, ...]:
    return ATTN_BACKENDS if family == "attention" else DPC_BACKENDS


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
    for impl in sorted(impls, key=lambda i: i.rank(call)):
        reason = impl.decline_reason(call, forced=False)
        if reason is None:
            return impl
        reasons.append(f"{impl.name}: {reason}")
    raise BackendUnavailableError(f"setok.{op}: no backend accepts this call ({'; '.join(reasons)})")


def explain(op: str, call: CallInfo) -> list[tuple[str, Optional[str]]]:
    """(backend, None | reason it declines) for each implementation, in auto order."""
    ranked = sorted(implementations(op), key=lambda i: i.rank(call))
    return [(i.name, i.decline_reason(call, forced=False)) for i in ranked]
