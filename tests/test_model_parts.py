"""Detokenizer, mask decoder, losses and projector on top of the tokenizer."""

import pytest
import torch
import torch.nn.functional as F

from setok_model import (
    ConceptContrastiveLoss,
    MaskDecoder,
    SeTokConfig,
    SeTokDetokenizer,
    SeTokProjector,
    SeTokTokenizer,
    cluster_masks,
    concept_contrastive_loss,
    mask_loss,
    patchify,
    pool_tokens,
    reconstruction_loss,
    unpatchify,
)

from ._data import offsets

CONFIG = SeTokConfig(12, 16, 8, 2, 32, 1, 1, k=3, min_clusters=3, max_clusters=5, block="pre_norm")


def tokenize(features):
    torch.manual_seed(1)
    return SeTokTokenizer(CONFIG).to(features.device)(features)


def each_image_alone(fn, features):
    return [fn(features[b : b + 1]) for b in range(features.shape[0])]


def test_detokenizer_decodes_each_image_from_its_own_tokens(device):
    features = torch.randn(3, 16, 12, device=device)
    detok = SeTokDetokenizer(8, 16, 2, 32, 2, grid=(4, 4), out_dim=3 * 2 * 2).to(device)
    out = tokenize(features)
    assert len(set(out.num_clusters.tolist())) > 1
    pred = detok(out.tokens, out.cu_clusters)
    assert pred.shape == (3, 16, 12)
    for b, alone in enumerate(each_image_alone(lambda f: detok(*_packed(tokenize(f))), features)):
        torch.testing.assert_close(pred[b], alone[0])
    images = torch.randn(3, 3, 8, 8, device=device)
    target = patchify(images, 2)
    assert torch.equal(unpatchify(target, 2, (4, 4)), images)
    loss = reconstruction_loss(pred, target)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in detok.parameters())


def _packed(out):
    return out.tokens, out.cu_clusters


def test_detokenizer_handles_an_image_without_tokens():
    detok = SeTokDetokenizer(8, 16, 2, 32, 1, grid=(2, 2), out_dim=4)
    tokens = torch.randn(6, 8)
    cu = offsets([3, 0])  # image 1 has no token
    pred = detok(tokens, cu, max_clusters=3)
    assert torch.isfinite(pred).all()
    alone = detok(tokens[3:].zero_(), offsets([0]), max_clusters=3)
    torch.testing.assert_close(pred[1], alone[0])


def test_reconstruction_loss_values():
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    torch.testing.assert_close(reconstruction_loss(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(reconstruction_loss(pred, target, "l1"), F.l1_loss(pred, target))
    keep = torch.tensor([[True] * 5, [False] * 5])
    torch.testing.assert_close(reconstruction_loss(pred, target, mask=keep), F.mse_loss(pred[0], target[0]))
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(pred, target, "huber")


def test_mask_decoder_masks_per_token_and_loss():
    features = torch.randn(3, 16, 12)
    out = tokenize(features)
    dec = MaskDecoder(8, 12, 16, 2)
    logits, key_mask = dec(out.tokens, out.cu_clusters, features)
    assert logits.shape == (3, 5, 4, 4)
    assert key_mask.sum(1).tolist() == out.num_clusters.tolist()
    for b in range(3):
        alone = tokenize(features[b : b + 1])
        one, _ = dec(alone.tokens, alone.cu_clusters, features[b : b + 1])
        n = int(out.num_clusters[b])
        torch.testing.assert_close(logits[b, :n], one[0, :n])
    big, _ = dec(out.tokens, out.cu_clusters, features, image_size=(8, 8))
    assert big.shape == (3, 5, 8, 8)

    target = cluster_masks(out.labels, 5, (4, 4))
    assert torch.equal(target.sum(1), torch.ones(3, 4, 4))  # every patch in exactly one cluster
    assert target.sum((2, 3))[~key_mask].abs().sum() == 0
    perfect = (target * 2 - 1) * 30
    assert mask_loss(perfect, target, key_mask) < 1e-3
    wrong = mask_loss(-perfect, target, key_mask)
    assert wrong > 10
    # padding tokens never count
    assert mask_loss(torch.where(key_mask[..., None, None], perfect, -perfect), target, key_mask) < 1e-3
    loss = mask_loss(logits, target, key_mask)
    loss.backward()
    assert all(p.grad is not None for p in dec.parameters())


def naive_pair_term(img, txt, scale):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    B = img.shape[0]
    terms = [-torch.log_softmax(scale * img[i] @ txt.T, 0)[i] - torch.log_softmax(scale * txt[i] @ img.T, 0)[i] for i in range(B)]
    return sum(terms) / (2 * B)


def naive_concept_term(img, scale, concepts, cmask):
    img, concepts = F.normalize(img, dim=-1), F.normalize(concepts, dim=-1)
    B, K = cmask.shape
    real = [(i, k) for i in range(B) for k in range(K) if cmask[i, k]]
    pool = torch.stack([concepts[i, k] for i, k in real])
    image_term = 0.0
    for i in range(B):
        logp = torch.log_softmax(scale * img[i] @ pool.T, 0)
        own = [j for j, (o, _) in enumerate(real) if o == i]
        image_term += -logp[own].mean() / B
    concept_term = sum(-torch.log_softmax(scale * concepts[i, k] @ img.T, 0)[i] for i, k in real) / len(real)
    return (image_term + concept_term) / 2


def test_concept_contrastive_loss_matches_the_definition():
    B, K, E = 4, 3, 8
    img, txt, concepts = torch.randn(B, E), torch.randn(B, E), torch.randn(B, K, E)
    cmask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    module = ConceptContrastiveLoss()
    got = module(img, txt, concepts, cmask)
    expected = naive_pair_term(img, txt, 1 / 0.07) + naive_concept_term(img, 1 / 0.07, concepts, cmask)
    torch.testing.assert_close(got, expected)
    # absent concepts do not matter
    other = torch.where(cmask[..., None], concepts, torch.randn_like(concepts))
    torch.testing.assert_close(module(img, txt, other, cmask), got)
    got.backward()
    assert module.logit_scale.grad is not None and module.logit_scale.grad != 0
    torch.testing.assert_close(concept_contrastive_loss(img, txt, torch.tensor(0.0)), naive_pair_term(img, txt, 1.0))


def test_pool_tokens_is_the_mean_per_image(device):
    out = tokenize(torch.randn(2, 16, 12, device=device))
    pooled = pool_tokens(out.tokens, out.cu_clusters)
    padded, key_mask = out.padded()
    expected = (padded * key_mask[..., None]).sum(1) / key_mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_projector_returns_padded_and_packed_llm_embeddings(projector, device):
    features = torch.randn(3, 16, 12, device=device)
    proj = SeTokProjector(CONFIG, llm_dim=24, projector=projector).to(device)
    out = proj(features)
    S = int(out.cu_clusters[-1])
    assert out.embeds.shape == (3, 5, 24) and out.packed.shape == (15, 24)
    torch.testing.assert_close(out.packed[:S], proj.projector(out.tokenizer_output.tokens[:S]))
    assert torch.equal(out.packed[S:], torch.zeros_like(out.packed[S:]))
    assert torch.equal(out.embeds[out.mask], out.packed[:S])
    assert torch.equal(out.embeds[~out.mask], torch.zeros_like(out.embeds[~out.mask]))
    with pytest.raises(ValueError, match="projector"):
        SeTokProjector(CONFIG, 24, "qformer")


def test_former_names_still_work_with_a_deprecation_warning(device):
    """cu_tokens / num_tokens / max_tokens (docs/NAMES.md) read and pass for one release, with a warning."""
    tok = SeTokTokenizer(CONFIG).to(device)
    out = tok(torch.randn(2, 16, CONFIG.input_dim, device=device))
    for old, new in (("cu_tokens", "cu_clusters"), ("num_tokens", "num_clusters"), ("max_tokens", "max_clusters")):
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated"):
            assert getattr(out, old) is getattr(out, new)
    with pytest.warns(DeprecationWarning, match="max_tokens"):
        assert tok.max_tokens(16) == tok.cluster_slots(16)
    detok = SeTokDetokenizer(CONFIG.token_dim, 16, 2, 32, 1, (4, 4), 3).to(device)
    want = detok(out.tokens, out.cu_clusters, max_clusters=out.max_clusters)
    with pytest.warns(DeprecationWarning, match="'(cu|max)_tokens' is deprecated"):
        got = detok(out.tokens, cu_tokens=out.cu_clusters, max_tokens=out.max_clusters)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="pass 'cu_clusters' only"):
        detok(out.tokens, cu_tokens=out.cu_clusters, cu_clusters=out.cu_clusters)
