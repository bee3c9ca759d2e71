"""The SeTok reference tokenizer as OFFICIAL.md describes it: one image, one cluster at a time.

Written from OFFICIAL.md and SPEC.md with plain torch, independent of
setok_kernels and setok_model: the parity oracle of ``SeTokTokenizer`` and
the per-image, per-cluster baseline of the benchmarks. Eval mode, no noise.

    official_tokenize(state_dict, features, num_heads, k=64, threshold=0.5,
                      min_clusters=64, prefix="")
        -> list over images of (tokens (n_clusters, token_dim), labels (N,), score (N,))
"""

import math

import torch
import torch.nn.functional as F


def position_embedding(inv_freq, h, w, C, dtype):
    """(h*w, C): patch ``a*w + b`` gets ``concat(ex(a), ey(b))[:C]``, sin/cos interleaved."""

    def e(n):
        angle = torch.arange(n, dtype=inv_freq.dtype)[:, None] * inv_freq[None, :]
        return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(n, -1)

    ex, ey = e(h), e(w)
    a = torch.arange(h * w) // w
    b = torch.arange(h * w) % w
    return torch.cat([ex[a], ey[b]], dim=1)[:, :C].to(dtype)


def dpc_knn(x, k, threshold, min_clusters):
    """Column-max DPC-kNN of one image ``x (N, C)``: (labels, score, number of clusters)."""
    N, C = x.shape
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(C)
    nearest = torch.topk(d, k=min(k, N), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    denser = density[None, :] > density[:, None]
    # the reference fills the "not denser" entries of column j with j's row maximum: every delta is capped
    delta = torch.where(denser, d, d.max(-1).values[None, :]).min(-1).values
    score = density * delta
    centres = (score > threshold).nonzero().flatten()
    if centres.numel() == 0:
        ranked = sorted(range(N), key=lambda i: (-float(score[i]), i))
        centres = torch.tensor(sorted(ranked[:min_clusters]))
    labels = d[:, centres].argmin(-1)
    labels[centres] = torch.arange(len(centres))
    return labels, score, len(centres)


def block(sd, name, x, num_heads):
    """The reference "Block" on one sequence ``x (n, dim)``."""
    dim = x.shape[-1]
    hd = dim // num_heads

    def norm(which, t):
        return F.layer_norm(t, (dim,), sd[f"{name}.{which}.weight"], sd[f"{name}.{which}.bias"], 1e-5)

    i = 0
    while f"{name}.layers.{i}.1.qkv.weight" in sd:
        a = f"{name}.layers.{i}.1"
        qkv = F.linear(norm("norm1", x), sd[f"{a}.qkv.weight"], sd[f"{a}.qkv.bias"])
        q, k, v = qkv.reshape(-1, 3, num_heads, hd).permute(1, 2, 0, 3)
        attn = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1)
        out = (attn @ v).transpose(0, 1).reshape(-1, dim)
        x = x + F.linear(out, sd[f"{a}.proj.weight"], sd[f"{a}.proj.bias"])
        i += 1
    hidden = F.gelu(F.linear(norm("norm2", x), sd[f"{name}.mlp.fc1.weight"], sd[f"{name}.mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[f"{name}.mlp.fc2.weight"], sd[f"{name}.mlp.fc2.bias"])


@torch.no_grad()
def official_tokenize(state_dict, features, num_heads, k=64, threshold=0.5, min_clusters=64, prefix=""):
    sd = {key[len(prefix) :]: v.to(features.dtype) for key, v in state_dict.items() if key.startswith(prefix)}
    B, N, C = features.shape
    side = math.isqrt(N)
    pe = position_embedding(sd["position_embedding.inv_freq"].to(torch.float64), side, side, C, features.dtype)
    results = []
    for b in range(B):
        x = features[b] + pe
        labels, score, n = dpc_knn(x, k, threshold, min_clusters)
        vectors = []
        for c in range(n):
            members = (labels == c).nonzero().flatten()
            vectors.append(block(sd, "inner_encoder", x[members], num_heads).mean(0))
        tokens = block(sd, "inter_encoder", torch.stack(vectors), num_heads)
        results.append((F.linear(tokens, sd["out.weight"], sd["out.bias"]), labels, score))
    return results


def random_official_state_dict(dim, mlp_dim, inner_layers=2, inter_layers=2, token_dim=None, dtype=torch.float32, seed=0):
    """Random weights in the reference key layout (shared norm1 repeated as ``layers.{i}.0``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=dim**-0.5):
        return torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)

    sd = {}
    for enc, depth in (("inner_encoder", inner_layers), ("inter_encoder", inter_layers)):
        for norm in ("norm1", "norm2"):
            sd[f"{enc}.{norm}.weight"] = 1 + rand(dim, scale=0.2)
            sd[f"{enc}.{norm}.bias"] = rand(dim, scale=0.2)
        for i in range(depth):
            sd[f"{enc}.layers.{i}.0.weight"] = sd[f"{enc}.norm1.weight"].clone()
            sd[f"{enc}.layers.{i}.0.bias"] = sd[f"{enc}.norm1.bias"].clone()
            sd[f"{enc}.layers.{i}.1.qkv.weight"] = rand(3 * dim, dim)
            sd[f"{enc}.layers.{i}.1.qkv.bias"] = rand(3 * dim, scale=0.2)
            sd[f"{enc}.layers.{i}.1.proj.weight"] = rand(dim, dim)
            sd[f"{enc}.layers.{i}.1.proj.bias"] = rand(dim, scale=0.2)
        sd[f"{enc}.mlp.fc1.weight"] = rand(mlp_dim, dim)
        sd[f"{enc}.mlp.fc1.bias"] = rand(mlp_dim, scale=0.2)
        sd[f"{enc}.mlp.fc2.weight"] = rand(dim, mlp_dim, scale=mlp_dim**-0.5)
        sd[f"{enc}.mlp.fc2.bias"] = rand(dim, scale=0.2)
    ch = math.ceil(dim / 4) * 2
    sd["position_embedding.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, ch, 2).float() / ch)
    sd["out.weight"] = rand(token_dim or dim, dim)
    sd["out.bias"] = rand(token_dim or dim, scale=0.2)
    return sd
