"""SeTok / SETOKIM models on top of the setok_kernels ops.

Everything is batched and ragged: the tokens of a batch are packed rows with
int32 offsets (``cu_clusters``), and every attention over them runs through
``setok_kernels.varlen_attention``. ``SetokimForCausalLM`` needs the optional
``transformers`` package (imported on first use).
"""

from .chat_univi import ChatUniViMerge, ChatUniViOutput
from .decoders import MaskDecoder, SeTokDetokenizer, cluster_masks
from .losses import (
    ConceptContrastiveLoss,
    concept_contrastive_loss,
    gather_with_grad,
    mask_loss,
    patchify,
    pool_tokens,
    reconstruction_loss,
    unpatchify,
)
from .projector import ProjectorOutput, SeTokProjector
from .tokenizer import SeTokConfig, SeTokOutput, SeTokTokenizer

__all__ = [
    "SeTokConfig",
    "SeTokOutput",
    "SeTokTokenizer",
    "SeTokDetokenizer",
    "MaskDecoder",
    "cluster_masks",
    "patchify",
    "unpatchify",
    "reconstruction_loss",
    "mask_loss",
    "pool_tokens",
    "gather_with_grad",
    "concept_contrastive_loss",
    "ConceptContrastiveLoss",
    "SeTokProjector",
    "ProjectorOutput",
    "ChatUniViMerge",
    "ChatUniViOutput",
    "SetokimForCausalLM",
    "IMAGE_PROMPT",
]


def __getattr__(name):
    # transformers is optional: the SETOKIM wrapper loads on first access
    if name in ("SetokimForCausalLM", "IMAGE_PROMPT"):
        from . import setokim

        return getattr(setokim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
