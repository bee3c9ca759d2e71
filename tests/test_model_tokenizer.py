"""SeTokTokenizer: reference-weight parity, masks, gradients, autocast, checkpointing, compile.

Each test that runs the tokenizer takes the ``device`` under test (tests/conftest.py);
the reference loop it is compared with runs on the CPU."""

import dataclasses

import pytest
import torch

from setok_model import SeTokConfig, SeTokTokenizer
from tests._official_loop import official_tokenize, random_official_state_dict

C, HEADS, MLP, TOKEN_DIM = 16, 2, 24, 12


def clustered_features(B=3, side=6, dtype=torch.float64):
    """Image 0: tight blobs (centres pass the threshold); image 1: noise (the min_clusters
    fallback); image 2: looser blobs. The images get different numbers of clusters."""
    g = torch.Generator().manual_seed(0)
    N = side * side
    blobs = torch.randn(4, C, generator=g, dtype=torch.float64) * 3
    pick = torch.randint(0, 4, (N,), generator=g)
    images = [
        blobs[pick] + 0.05 * torch.randn(N, C, generator=g, dtype=torch.float64),
        3 * torch.randn(N, C, generator=g, dtype=torch.float64),
        blobs[pick % 3] + 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64),
    ]
    return torch.stack(images[:B]).to(dtype)


def official_weights(dtype=torch.float64):
    sd = random_official_state_dict(C, MLP, token_dim=TOKEN_DIM, dtype=dtype)
    sd["image_feature_encoder.vision_model.proj.weight"] = torch.randn(3, 3)  # the vision tower: ignored
    return {f"model.tokenizer.{key}": value for key, value in sd.items()}


def _cpu(out):
    """The output with its tensors on the CPU, to compare with the reference loop (which runs there)."""
    tensors = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return dataclasses.replace(out, **{k: v.cpu() for k, v in tensors.items() if torch.is_tensor(v)})


def test_official_weights_give_the_reference_clusters_and_tokens(device):
    sd = official_weights()
    features = clustered_features()
    tok = SeTokTokenizer.from_official_state_dict(sd, num_heads=HEADS, prefix="model.tokenizer.", k=4, min_clusters=5)
    assert tok.out.weight.dtype == torch.float64
    assert (tok.config.hidden_dim, tok.config.mlp_dim, tok.config.token_dim) == (C, MLP, TOKEN_DIM)
    assert (tok.config.inner_layers, tok.config.inter_layers) == (2, 2)
    out = _cpu(tok.to(device).eval()(features.to(device)))
    expected = official_tokenize(sd, features, HEADS, k=4, min_clusters=5, prefix="model.tokenizer.")

    counts = [len(tokens) for tokens, _, _ in expected]
    assert len(set(counts)) > 1, "the batch must be ragged"
    assert counts[1] == 5, "image 1 must take the min_clusters fallback"
    assert out.num_clusters.tolist() == counts
    assert out.cu_clusters.dtype == torch.int32 and out.cu_clusters.tolist() == [0, counts[0], sum(counts[:2]), sum(counts)]
    padded, key_mask = out.padded()
    assert padded.shape == (3, 36, TOKEN_DIM) and out.tokens.shape == (3 * 36, TOKEN_DIM)
    for b, (tokens, labels, score) in enumerate(expected):
        assert torch.equal(out.labels[b], labels)
        torch.testing.assert_close(out.score[b], score, rtol=1e-12, atol=0)
        n = len(tokens)
        rel = (padded[b, :n] - tokens).norm() / tokens.norm()
        assert rel < 1e-6
        assert key_mask[b].tolist() == [True] * n + [False] * (36 - n)
        assert torch.equal(padded[b, n:], torch.zeros_like(padded[b, n:]))
    assert torch.equal(out.tokens[sum(counts) :], torch.zeros_like(out.tokens[sum(counts) :]))


def test_load_official_state_dict_into_an_existing_tokenizer(device):
    sd = official_weights(torch.float32)
    config = SeTokConfig(C, C, TOKEN_DIM, HEADS, MLP, k=4, min_clusters=5)
    tok = SeTokTokenizer(config)
    tok.load_official_state_dict(sd, prefix="model.tokenizer.")
    features = clustered_features(dtype=torch.float32)
    expected = official_tokenize(sd, features, HEADS, k=4, min_clusters=5, prefix="model.tokenizer.")
    padded, _ = tok.to(device)(features.to(device)).padded()
    for b, (tokens, _, _) in enumerate(expected):
        torch.testing.assert_close(padded[b, : len(tokens)].cpu(), tokens, rtol=1e-4, atol=1e-5)


def test_official_loading_rejects_what_the_reference_cannot_be():
    sd = official_weights(torch.float32)
    with pytest.raises(ValueError, match="shared_norm"):
        SeTokTokenizer(SeTokConfig(C, C, TOKEN_DIM, HEADS, MLP, block="pre_norm")).load_official_state_dict(sd, "model.tokenizer.")
    with pytest.raises(ValueError, match="input_dim"):
        SeTokTokenizer(SeTokConfig(8, C, TOKEN_DIM, HEADS, MLP)).load_official_state_dict(sd, "model.tokenizer.")
    with pytest.raises(ValueError, match="missing"):
        SeTokTokenizer.from_official_state_dict(sd, HEADS, prefix="tokenizer.")
    sd["model.tokenizer.inner_encoder.layers.1.0.weight"] = sd["model.tokenizer.inner_encoder.layers.1.0.weight"] + 1
    with pytest.raises(ValueError, match="shares one norm1"):
        SeTokTokenizer.from_official_state_dict(sd, HEADS, prefix="model.tokenizer.")
    del sd["model.tokenizer.out.bias"]
    sd["model.tokenizer.inner_encoder.layers.1.0.weight"] = sd["model.tokenizer.inner_encoder.norm1.weight"]
    tok = SeTokTokenizer(SeTokConfig(C, C, TOKEN_DIM, HEADS, MLP))
    with pytest.raises(ValueError, match="misses 1 key.*model.tokenizer.out.bias"):
        tok.load_official_state_dict(sd, "model.tokenizer.")


def tiny_tokenizer(block="pre_norm", input_dim=20, **kw):
    config = SeTokConfig(input_dim, C, TOKEN_DIM, HEADS, MLP, 1, 1, k=3, min_clusters=3, max_clusters=6, block=block, **kw)
    return SeTokTokenizer(config)


def test_masked_patches_never_change_the_tokens(device):
    tok = tiny_tokenizer().to(device).eval()
    features = torch.randn(2, 25, 20, device=device)
    mask = torch.rand(2, 25, device=device) > 0.3
    out = tok(features, mask)
    noisy = torch.where(mask[..., None], features, 100 * torch.randn_like(features))
    again = tok(noisy, mask)
    assert torch.equal(out.labels, again.labels) and (out.labels[~mask] == -1).all()
    torch.testing.assert_close(out.tokens, again.tokens)
    assert out.tokens.shape == (2 * 6, TOKEN_DIM) and (out.num_clusters <= 6).all()


@pytest.mark.parametrize("block", ["shared_norm", "pre_norm"])
def test_gradients_reach_parameters_and_features_and_checkpointing_matches(block, device):
    tok = tiny_tokenizer(block).to(device, torch.float64)
    features = torch.randn(2, 16, 20, dtype=torch.float64, device=device, requires_grad=True)

    def grads():
        tok.zero_grad()
        features.grad = None
        out = tok(features, grid=(2, 8))
        (out.tokens.sin().sum()).backward()
        return [p.grad.clone() for p in tok.parameters()] + [features.grad.clone()]

    plain = grads()
    assert all(g.abs().sum() > 0 for g in plain)
    tok.set_gradient_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_keeps_the_clusters(device):
    tok = tiny_tokenizer().to(device)
    features = torch.randn(2, 16, 20, device=device)
    ref = tok(features)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = tok(features)
    out.tokens.float().square().mean().backward()
    assert out.tokens.dtype == torch.bfloat16
    assert torch.equal(out.labels, ref.labels)
    torch.testing.assert_close(out.tokens.float(), ref.tokens, rtol=0.1, atol=0.1)
    assert all(p.grad is not None for p in tok.parameters())


def test_compiled_encoders_match_eager(device):
    tok = tiny_tokenizer("shared_norm").to(device)
    features = torch.randn(2, 16, 20, device=device)
    eager = tok(features).tokens
    eager.sum().backward()
    eager_grad = tok.inner_encoder.attn[0].qkv.weight.grad.clone()
    tok.zero_grad()
    tok.inner_encoder.compile(backend="aot_eager")
    tok.inter_encoder.compile(backend="aot_eager")
    compiled = tok(features).tokens
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(tok.inner_encoder.attn[0].qkv.weight.grad, eager_grad)


def test_bad_inputs_raise():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"\(B, N, 20\)"):
        tok(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="not a square"):
        tok(torch.randn(2, 15, 20))
    with pytest.raises(ValueError, match="does not match"):
        tok(torch.randn(2, 16, 20), grid=(3, 5))
    with pytest.raises(ValueError, match="block"):
        tiny_tokenizer("post_norm")
