"""SetokimForCausalLM on a tiny random Llama and a tiny word-level tokenizer (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="SETOKIM wraps Hugging Face models (extra 'hf')")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402  (installed with transformers)

from setok_model import IMAGE_PROMPT, SeTokConfig, SeTokProjector, SetokimForCausalLM

WORDS = ["[UNK]", "[PAD]", "</s>", "describe", "the", "image", "a", "cat", "on", "mat", "and", "compare"]
WIDTH = 32


def text_tokenizer(padding_side):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>", padding_side=padding_side
    )


def tiny_setokim(padding_side="right"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1, eos_token_id=2,
    )
    lm = transformers.LlamaForCausalLM(config).eval()
    setok = SeTokConfig(12, 16, 16, 2, 32, 1, 1, k=3, min_clusters=3, max_clusters=5, block="pre_norm")
    return SetokimForCausalLM(lm, text_tokenizer(padding_side), SeTokProjector(setok, WIDTH))


PROMPTS = [f"describe {IMAGE_PROMPT} a cat", f"compare {IMAGE_PROMPT} and {IMAGE_PROMPT}"]


def test_visual_tokens_are_spliced_between_img_markers():
    model = tiny_setokim()
    assert len(model.tokenizer) == len(WORDS) + 3
    assert model.language_model.get_input_embeddings().num_embeddings == len(WORDS) + 3
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    features = torch.randn(3, 16, 12)
    inputs = model.build_inputs(batch.input_ids, features, batch.attention_mask, labels=batch.input_ids.clone())
    visual = model.projector(features)
    counts = visual.num_clusters.tolist()
    assert len(set(counts)) > 1
    embed = model.language_model.get_input_embeddings()
    ids = {w: model.tokenizer.convert_tokens_to_ids(w) for w in ["describe", "compare", "and", "a", "cat", "[Img]", "[/Img]"]}

    def expect(pieces):
        """pieces: words or image indices; returns the expected embeddings and labels."""
        embs, labs = [], []
        for piece in pieces:
            if isinstance(piece, int):
                n = counts[piece]
                start = int(visual.cu_clusters[piece])
                embs.append(visual.packed[start : start + n])
                labs += [-100] * n
            else:
                embs.append(embed.weight[ids[piece]][None])
                labs.append(ids[piece])
        return torch.cat(embs), torch.tensor(labs)

    rows = [
        expect(["describe", "[Img]", 0, "[/Img]", "a", "cat"]),
        expect(["compare", "[Img]", 1, "[/Img]", "and", "[Img]", 2, "[/Img]"]),
    ]
    L = max(len(e) for e, _ in rows)
    assert inputs["inputs_embeds"].shape == (2, L, WIDTH)
    for b, (emb, lab) in enumerate(rows):
        n = len(emb)
        torch.testing.assert_close(inputs["inputs_embeds"][b, :n], emb)
        assert inputs["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
        assert inputs["labels"][b].tolist() == lab.tolist() + [-100] * (L - n)
        assert inputs["position_ids"][b, :n].tolist() == list(range(n))

    out = model(batch.input_ids, features, batch.attention_mask, labels=batch.input_ids.clone())
    out.loss.backward()
    assert model.projector.tokenizer.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3 <image> tokens for 2 images"):
        model.build_inputs(batch.input_ids, features[:2], batch.attention_mask)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = tiny_setokim("left")
    features = torch.randn(3, 16, 12)
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    together = model.generate(batch.input_ids, features, batch.attention_mask, **kw)
    first = model.generate(model.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids, features[:1], **kw)
    second = model.generate(model.tokenizer(PROMPTS[1:], return_tensors="pt").input_ids, features[1:], **kw)
    assert together.shape == (2, 4)
    assert together[0].tolist() == first[0].tolist()
    assert together[1].tolist() == second[0].tolist()
    # greedy generation is the argmax of the forward pass, step by step
    inputs = model.build_inputs(model.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids, features[:1])
    embeds = inputs["inputs_embeds"]
    with torch.no_grad():
        for step in range(4):
            nxt = model.language_model(inputs_embeds=embeds).logits[0, -1].argmax()
            assert int(nxt) == int(first[0, step])
            embeds = torch.cat([embeds, model.language_model.get_input_embeddings()(nxt)[None, None]], 1)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_setokim()
    model.save_pretrained(str(tmp_path))
    loaded = SetokimForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert len(loaded.tokenizer) == len(model.tokenizer) and loaded.image_token_id == model.image_token_id
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    features = torch.randn(3, 16, 12)
    with torch.no_grad():
        a = model(batch.input_ids, features, batch.attention_mask).logits
        b = loaded(batch.input_ids, features, batch.attention_mask).logits
    torch.testing.assert_close(a, b)
