"""setok_kernels: fast, batched, exact SeTok clustering and ragged attention ops.

Every op exists as ``setok_kernels.NAME`` (validating Python function),
``torch.ops.setok.NAME`` (the custom op) and ``setok_kernels.reference.NAME``
(pure PyTorch, the semantics). Backends register themselves on import; see
``python -m setok_kernels.info``.
"""

from . import ops, reference  # noqa: F401  (defines torch.ops.setok.*, registers the reference)
from ._backends import BackendUnavailableError
from ._validation import DTypeError
from .functional import (
    ClusterResult,
    MergeResult,
    Packing,
    assign_to_centers,
    density_delta,
    dpc_cluster,
    knn_density,
    merge_clusters,
    pack_clusters,
    pad_segments,
    pairwise_distance,
    segment_mean,
    select_centers,
    unpad_segments,
    varlen_attention,
)

__version__ = "0.1.0"


# Each backend module registers its implementations on import; one whose
# dependency is missing (Triton, the compiled library, flash-attn, xformers)
# registers with the reason it is unavailable instead of failing.
from . import _native, attention_backends, triton_attention, triton_dpc, triton_merge  # noqa: E402,F401

__all__ = [
    "BackendUnavailableError",
    "DTypeError",
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
    "merge_clusters",
    "MergeResult",
    "varlen_attention",
    "pad_segments",
    "unpad_segments",
    "reference",
    "ops",
]
