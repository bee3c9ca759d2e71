"""setok_kernels: fast, batched, exact SeTok clustering and ragged attention ops.

Every op exists as ``setok_kernels.NAME`` (validating Python function),
``torch.ops.setok.NAME`` (the custom op) and ``setok_kernels.reference.NAME``
(pure PyTorch, the semantics). Backends register themselves on import; see
``python -m setok_kernels.info``.
"""

from . import ops, reference  # noqa: F401  (defines torch.ops.setok.*, registers the reference)
from ._backends import BackendUnavailableError
from ._validation import DTypeError
from . import functional
from .functional import *  # noqa: F401,F403  (every op's function and result type: functional.__all__)

__version__ = "0.1.0"


# Each backend module registers its implementations on import; one whose
# dependency is missing (Triton, the compiled library, flash-attn, xformers)
# registers with the reason it is unavailable instead of failing.
from . import _native, attention_backends, triton_attention, triton_dpc, triton_merge  # noqa: E402,F401

__all__ = ["BackendUnavailableError", "DTypeError", "reference", "ops"]
__all__ += functional.__all__
