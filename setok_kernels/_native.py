"""The compiled extension ``setok_kernels._C`` as the ``native`` backend.

Schemas and fake (meta) implementations of the internal ``setok::native_*``
ops live here; the library built from csrc/ only registers their CPU and
CUDA kernels. A missing or stale library is a warning, never an import
error: the ``native`` implementations then register with the reason they
cannot run.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Optional

import torch

from . import _native_abi, ops
from ._backends import Impl, register

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDICES = (torch.int64, torch.int32)

_SCHEMAS = {
    "native_knn_density": "(Tensor x, int k, Tensor? mask) -> Tensor",
    "native_density_delta": (
        "(Tensor x, Tensor density, Tensor? mask, str densest_delta, str tie_break) -> (Tensor, Tensor)"
    ),
    "native_select_centers": (
        "(Tensor score, Tensor? mask, float threshold, int min_clusters, int max_clusters, int num_centers,"
        " str center_order) -> (Tensor, Tensor)"
    ),
    "native_assign_to_centers": "(Tensor x, Tensor centers, Tensor num_clusters, Tensor? mask, str metric) -> Tensor",
    "native_dpc_cluster": (
        "(Tensor x, int k, float threshold, int min_clusters, int max_clusters, Tensor? mask, str densest_delta,"
        " int num_centers, str center_order, str tie_break) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "native_pack_clusters": "(Tensor labels, Tensor num_clusters, int max_clusters) -> (Tensor, Tensor, Tensor, Tensor)",
    "native_segment_mean": "(Tensor x, Tensor cu_seqlens, Tensor? weight=None, float eps=0.0) -> Tensor",
    "native_segment_mean_weighted_backward": (
        "(Tensor grad, Tensor x, Tensor cu_seqlens, Tensor? weight, float eps) -> (Tensor, Tensor)"
    ),
    "native_merge_clusters": (
        "(Tensor x, Tensor labels, Tensor num_clusters, int max_clusters, Tensor? weight, float eps, Tensor? centers,"
        " Tensor? center_weight) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "native_merge_clusters_backward": (
        "(Tensor grad_tokens, Tensor grad_weight_sum, Tensor x, Tensor labels, Tensor num_clusters, Tensor? weight,"
        " float eps, Tensor? centers, Tensor? center_weight) -> (Tensor, Tensor, Tensor)"
    ),
    "native_segment_mean_backward": "(Tensor grad, Tensor cu_seqlens, int num_rows) -> Tensor",
    "native_attention_segments": (
        "(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor segments, float scale) -> ()"
    ),
    "native_build_info": "() -> str",
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"setok::{_name}", _schema)


# the internal ops take their public op's implementation arguments (Impl.fn
# order, enums as strings), so they share its output shapes
for _name in ("knn_density", "density_delta", "select_centers", "assign_to_centers", "dpc_cluster",
              "pack_clusters", "segment_mean", "segment_mean_backward", "segment_mean_weighted_backward",
              "merge_clusters", "merge_clusters_backward"):
    torch.library.register_fake(f"setok::native_{_name}")(getattr(ops, f"{_name}_meta"))


@torch.library.register_fake("setok::native_attention_segments")
def _(q, k, v, out, lse, segments, scale):
    """The torch backend's per-segment loop (attention_backends): writes into out and lse only."""


# ------------------------------------------------------------------ loading


def _library_path() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so")))
    return found[0] if found else None


def _base_version(version: str) -> str:
    return version.split("+")[0]


def _load() -> tuple[Optional[str], Optional[str], dict]:
    """(path, None | why the library is unusable, its build facts)."""
    path = _library_path()
    if path is None:
        return None, "compiled library setok_kernels._C not built (pip install --no-build-isolation -e .)", {}
    built_for = _native_abi.embedded_fingerprint(path)
    expected = _native_abi.fingerprint(_SCHEMAS)
    if built_for != expected:
        # loading it would abort the process (torch checks kernel schemas in
        # the library's static initialisers), so it is never loaded
        return path, (
            f"compiled library {os.path.basename(path)} implements other native op schemas"
            f" ({built_for or 'unversioned'}, this source needs {expected}): stale build, rebuild it"
        ), {}
    try:
        torch.ops.load_library(path)
        facts = dict(item.split("=", 1) for item in torch.ops.setok.native_build_info().split(";"))
    except (OSError, RuntimeError) as exc:
        return path, f"compiled library {os.path.basename(path)} failed to load (stale build?): {exc}", {}
    built, running = facts.get("torch", "?"), _base_version(torch.__version__)
    if built != running:
        return path, f"compiled library built for torch {built}, running torch {running}: rebuild it", facts
    return path, None, facts


_PATH, _UNAVAILABLE, _FACTS = _load()
if _UNAVAILABLE is not None:
    warnings.warn(f"setok_kernels: native backend disabled: {_UNAVAILABLE}", RuntimeWarning, stacklevel=2)


def _devices(name: str) -> tuple[str, ...]:
    if _UNAVAILABLE is not None:
        return ("cpu",)
    op = f"setok::{name}"
    keys = (("cpu", "CPU"), ("cuda", "CUDA"))
    return tuple(dev for dev, key in keys if torch._C._dispatch_has_kernel_for_dispatch_key(op, key))


def build_info() -> dict:
    """What ``python -m setok_kernels.info`` reports about the compiled library."""
    ops = {op: list(_devices(f"native_{op}")) for op in _IMPLS} if _UNAVAILABLE is None else {}
    if ops:  # not a backend of its own: the torch attention backend's loop over segments on the CPU
        ops["attention_segments (torch backend)"] = list(_devices("native_attention_segments"))
    return {
        "loaded": _UNAVAILABLE is None,
        "path": _PATH,
        "reason": _UNAVAILABLE,
        "built_for_torch": _FACTS.get("torch"),
        "with_cuda": _FACTS.get("cuda") == "1",
        "openmp": _FACTS.get("openmp") == "1",
        "threads": torch.get_num_threads(),
        "ops": ops,
    }


# ------------------------------------------------------------------ backend


def _knn_density(x, k, mask):
    return torch.ops.setok.native_knn_density(x, k, mask)


def _density_delta(x, density, mask, densest_delta, tie_break):
    return torch.ops.setok.native_density_delta(x, density, mask, densest_delta, tie_break)


def _select_centers(score, mask, threshold, min_clusters, max_clusters, num_centers, center_order):
    return torch.ops.setok.native_select_centers(
        score, mask, threshold, min_clusters, max_clusters, num_centers, center_order
    )


def _assign_to_centers(x, centers, num_clusters, mask, metric):
    return torch.ops.setok.native_assign_to_centers(x, centers, num_clusters, mask, metric)


def _dpc_cluster(x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order, tie_break):
    return torch.ops.setok.native_dpc_cluster(
        x, k, threshold, min_clusters, max_clusters, mask, densest_delta, num_centers, center_order, tie_break
    )


def _pack_clusters(labels, num_clusters, max_clusters):
    return torch.ops.setok.native_pack_clusters(labels, num_clusters, max_clusters)


def _segment_mean(x, cu_seqlens, weight, eps):
    return torch.ops.setok.native_segment_mean(x, cu_seqlens, weight, eps)


def _segment_mean_weighted_backward(grad, x, cu_seqlens, weight, eps):
    return torch.ops.setok.native_segment_mean_weighted_backward(grad, x, cu_seqlens, weight, eps)


def _merge_clusters(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight):
    return torch.ops.setok.native_merge_clusters(x, labels, num_clusters, max_clusters, weight, eps, centers, center_weight)


def _merge_clusters_backward(grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers, center_weight):
    return torch.ops.setok.native_merge_clusters_backward(
        grad_tokens, grad_weight_sum, x, labels, num_clusters, weight, eps, centers, center_weight
    )


def _segment_mean_backward(grad, cu_seqlens, num_rows):
    return torch.ops.setok.native_segment_mean_backward(grad, cu_seqlens, num_rows)


_IMPLS = {
    "knn_density": (_knn_density, _FLOATS),
    "density_delta": (_density_delta, _FLOATS),
    "select_centers": (_select_centers, _FLOATS),
    "assign_to_centers": (_assign_to_centers, _FLOATS),
    "dpc_cluster": (_dpc_cluster, _FLOATS),
    "pack_clusters": (_pack_clusters, _INDICES),
    "segment_mean": (_segment_mean, _FLOATS),
    "segment_mean_backward": (_segment_mean_backward, _FLOATS),
    "segment_mean_weighted_backward": (_segment_mean_weighted_backward, _FLOATS),
    "merge_clusters": (_merge_clusters, _FLOATS),
    "merge_clusters_backward": (_merge_clusters_backward, _FLOATS),
}

for _op, (_fn, _dtypes) in _IMPLS.items():
    register(
        Impl(
            op=_op,
            name="native",
            fn=_fn,
            devices=_devices(f"native_{_op}"),
            dtypes=_dtypes,
            available=lambda: _UNAVAILABLE,
        )
    )
