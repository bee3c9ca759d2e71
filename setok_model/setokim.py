"""SETOKIM: any Hugging Face causal LM reading SeTok visual tokens.

A prompt holds ``IMAGE_PROMPT`` (``[Img]<image>[/Img]``) once per image; the
``<image>`` placeholder of image i is replaced by image i's visual tokens,
however many SeTok found. Needs ``transformers`` (imported here, lazily from
``setok_model``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

from .projector import SeTokProjector
from .tokenizer import SeTokConfig

__all__ = ["IMAGE_START", "IMAGE_END", "IMAGE_PLACEHOLDER", "IMAGE_PROMPT", "SetokimForCausalLM"]

IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER = "[Img]", "[/Img]", "<image>"
IMAGE_PROMPT = IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END
IGNORE_INDEX = -100

_PROJECTOR_WEIGHTS = "setok_projector.safetensors"
_PROJECTOR_CONFIG = "setok_projector.json"


class SetokimForCausalLM(nn.Module):
    """``language_model`` (a transformers causal LM) + its text ``tokenizer`` + a :class:`SeTokProjector`.

    The constructor adds ``[Img]``, ``[/Img]`` and ``<image>`` to the
    tokenizer as special tokens and grows the LM's embeddings to match.
    """

    def __init__(self, language_model: nn.Module, tokenizer, projector: SeTokProjector):
        super().__init__()
        width = language_model.get_input_embeddings().embedding_dim
        if projector.llm_dim != width:
            raise ValueError(f"projector.llm_dim ({projector.llm_dim}) must equal the LM's embedding width ({width})")
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.projector = projector
        tokenizer.add_tokens([IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER], special_tokens=True)
        if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(len(tokenizer))
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    # ------------------------------------------------------------ splicing

    def build_inputs(
        self,
        input_ids: Tensor,
        features: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        feature_mask: Optional[Tensor] = None,
        grid: Optional[tuple[int, int]] = None,
    ) -> dict:
        """Embeddings with each ``<image>`` replaced by its image's visual tokens.

        ``input_ids (B, L)`` may hold any number of ``<image>`` per row; the
        ``I`` placeholders, in row-major order, take ``features (I, N, C)`` in
        order. Rows are re-padded on the tokenizer's padding side. Returns
        ``inputs_embeds``, ``attention_mask``, ``position_ids`` and, with
        ``labels``, labels where visual positions are ignored (-100).
        One host read sizes the output (the LM needs a dense batch anyway).
        """
        B, L = input_ids.shape
        dev = input_ids.device
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_image = (input_ids == self.image_token_id) & real
        placeholders = is_image.flatten().nonzero().flatten()
        if placeholders.numel() != features.shape[0]:
            raise ValueError(f"input_ids hold {placeholders.numel()} {IMAGE_PLACEHOLDER} tokens for {features.shape[0]} images")
        visual = self.projector(features, feature_mask, grid)

        # where each input token lands: a placeholder widens to its image's token count
        image_of = (is_image.flatten().cumsum(0) - 1).clamp(min=0).view(B, L)
        width = torch.where(is_image, visual.num_clusters[image_of], real.long())
        end = width.cumsum(1)
        lengths = end[:, -1]
        L_new = int(lengths.max())
        shift = L_new - lengths if self.tokenizer.padding_side == "left" else torch.zeros_like(lengths)
        start = end - width + shift[:, None] + torch.arange(B, device=dev)[:, None] * L_new  # flat row index
        dump = B * L_new  # one scratch row for everything that lands nowhere

        text = real & ~is_image
        text_target = torch.where(text, start, dump).flatten()
        S = visual.packed.shape[0]
        rows = torch.arange(S, device=dev)
        cu = visual.cu_clusters.long()
        image = torch.searchsorted(cu[1:], rows, right=True).clamp(max=max(features.shape[0] - 1, 0))
        vis_target = torch.where(rows < cu[-1], start.flatten()[placeholders][image] + rows - cu[image], dump)

        text_embeds = self.language_model.get_input_embeddings()(input_ids)
        values = torch.cat([text_embeds.flatten(0, 1), visual.packed.to(text_embeds.dtype)])
        embeds = text_embeds.new_zeros(dump + 1, text_embeds.shape[-1])
        embeds = embeds.index_put((torch.cat([text_target, vis_target]),), values)[:dump].view(B, L_new, -1)

        pos = torch.arange(L_new, device=dev)
        mask = (pos >= shift[:, None]) & (pos < (shift + lengths)[:, None])
        out = dict(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        if labels is not None:
            new_labels = labels.new_full((dump + 1,), IGNORE_INDEX)
            out["labels"] = new_labels.index_put((text_target,), labels.flatten())[:dump].view(B, L_new)
        return out

    def forward(self, input_ids, features=None, attention_mask=None, labels=None, feature_mask=None, grid=None, **lm_kwargs):
        if features is None:  # text only
            return self.language_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **lm_kwargs)
        inputs = self.build_inputs(input_ids, features, attention_mask, labels, feature_mask, grid)
        return self.language_model(**inputs, **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids, features, attention_mask=None, feature_mask=None, grid=None, **generate_kwargs):
        """The LM's ``generate`` from the spliced embeddings; returns the new token ids only."""
        inputs = self.build_inputs(input_ids, features, attention_mask, None, feature_mask, grid)
        inputs.pop("position_ids")  # generate derives positions from the attention mask
        return self.language_model.generate(**inputs, **generate_kwargs)

    # ------------------------------------------------------------ files

    def save_pretrained(self, directory: str) -> None:
        """``language_model/`` and ``tokenizer/`` in the transformers format, the projector as safetensors + JSON."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.language_model.save_pretrained(os.path.join(directory, "language_model"))
        self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
        state = {k: v.detach().contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, os.path.join(directory, _PROJECTOR_WEIGHTS))
        meta = dict(setok=self.projector.config.to_dict(), llm_dim=self.projector.llm_dim, projector=self.projector.projector_type)
        with open(os.path.join(directory, _PROJECTOR_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, **lm_kwargs) -> "SetokimForCausalLM":
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with open(os.path.join(directory, _PROJECTOR_CONFIG)) as f:
            meta = json.load(f)
        projector = SeTokProjector(SeTokConfig.from_dict(meta["setok"]), meta["llm_dim"], meta["projector"])
        projector.load_state_dict(load_file(os.path.join(directory, _PROJECTOR_WEIGHTS)))
        language_model = AutoModelForCausalLM.from_pretrained(os.path.join(directory, "language_model"), **lm_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
        return cls(language_model, tokenizer, projector)
