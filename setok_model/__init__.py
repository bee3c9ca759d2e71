"""SeTok / SETOKIM models on top of the setok_kernels ops.

Everything is batched and ragged: the tokens of a batch are packed rows with
int32 offsets (``cu_clusters``), and every attention over them runs through
``setok_kernels.varlen_attention``. ``SetokimForCausalLM`` needs the optional
``transformers`` package (imported on first use).
"""

from . import chat_univi, decoders, losses, projector, tokenizer
from .chat_univi import *  # noqa: F401,F403 (each module's __all__ is its public names)
from .decoders import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .projector import *  # noqa: F401,F403
from .tokenizer import *  # noqa: F401,F403

__all__ = [
    *tokenizer.__all__,
    *decoders.__all__,
    *losses.__all__,
    *projector.__all__,
    *chat_univi.__all__,
    "SetokimForCausalLM",
    "IMAGE_PROMPT",
]


def __getattr__(name):
    # transformers is optional: the SETOKIM wrapper loads on first access
    if name in ("SetokimForCausalLM", "IMAGE_PROMPT"):
        from . import setokim

        return getattr(setokim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
