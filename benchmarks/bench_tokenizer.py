"""Group ``tokenizer``: SeTok tokenizer forward, end to end (eval, no grad).

``setok_model.SeTokTokenizer`` (batched, packed, no host sync) against the
reference's way (``tests/_official_loop.official_tokenize``: one image and
one cluster at a time), both from the same reference-layout weights.

Work counted for the floor (dominant terms): the two DPC passes over all
token pairs, and the encoders' linear layers on every token (the inter-cluster
encoder and the attention scores, on far fewer rows, are left out).
"""

from __future__ import annotations

import pytest
import torch

from .conftest import pool_size

# (id, B, N, dim, heads, mlp, k, min_clusters)
CUDA_CASES = [("B32-N729-C1152", 32, 729, 1152, 2, 4096, 64, 64)]
# the CPU goal of issue 6: B=4, N=576, dim 256, reference clustering defaults
CPU_CASES = [("B4-N576-C256", 4, 576, 256, 2, 256, 64, 64), ("B4-N576-C256-k16", 4, 576, 256, 2, 256, 16, 8)]
LAYERS = 2  # inner and inter depth, as in the reference


def _workload(case, device, dtype):
    """Reference-layout weights on the device and a pool of feature batches."""
    name, B, N, dim, heads, mlp, k, min_clusters = case
    try:
        from tests._official_loop import random_official_state_dict
    except ImportError as exc:
        pytest.skip(f"the reference loop is not importable: {exc}")
    weights = random_official_state_dict(dim, mlp, LAYERS, LAYERS, dtype=torch.float32)
    weights = {key: w.to(device, dtype) if key != "position_embedding.inv_freq" else w for key, w in weights.items()}
    gen = torch.Generator().manual_seed(N)
    elt = torch.finfo(dtype).bits // 8
    pool = [(torch.randn(B, N, dim, generator=gen).to(device, dtype),) for _ in range(pool_size(B * N * dim * elt))]
    shape = dict(B=B, N=N, dim=dim, heads=heads, mlp=mlp, k=k, dtype=str(dtype)[6:])
    return weights, pool, shape, B * N * dim * elt


def _encoder_flops(B, N, dim, mlp):
    """Two DPC distance passes over all pairs, and the encoders' linear layers on every token."""
    return 4 * B * N * N * dim + 2 * B * N * (LAYERS * 4 * dim * dim + 2 * dim * mlp)


def _tokenizer(weights, case, device):
    from setok_model import SeTokTokenizer

    name, B, N, dim, heads, mlp, k, min_clusters = case
    return SeTokTokenizer.from_official_state_dict(weights, num_heads=heads, k=k, min_clusters=min_clusters).to(device)


@pytest.mark.parametrize("impl", ["setok", "official_loop"])
def test_tokenizer_forward(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "tokenizer"
    name, B, N, dim, heads, mlp, k, min_clusters = case
    weights, pool, shape, nbytes = _workload(case, device, dtype)
    if impl == "setok":
        model = _tokenizer(weights, case, device).eval()

        @torch.no_grad()
        def fn(x):
            return model(x)
    else:
        from tests._official_loop import official_tokenize

        def fn(x):
            return official_tokenize(weights, x, heads, k=k, min_clusters=min_clusters)

    measure(fn, pool, impl=impl, case=name, role="setok" if impl == "setok" else "baseline",
            flops=_encoder_flops(B, N, dim, mlp), bytes=nbytes, shape=shape)


def test_tokenizer_forward_backward(measure, benchmark, device, dtype, case):
    """Training step cost: forward + backward through the encoders (the clustering has no gradient)."""
    benchmark.group = "tokenizer-train"
    name, B, N, dim, heads, mlp, k, min_clusters = case
    weights, pool, shape, nbytes = _workload(case, device, dtype)
    model = _tokenizer(weights, case, device).train()

    def fn(x):
        out = model(x.requires_grad_())
        out.tokens.float().square().mean().backward()
        return out

    # the backward costs about twice the encoders' forward; the clustering runs once
    flops = _encoder_flops(B, N, dim, mlp) + 2 * 2 * B * N * (LAYERS * 4 * dim * dim + 2 * dim * mlp)
    measure(fn, pool, impl="setok", case=name, role="setok", flops=flops, bytes=nbytes, shape=shape)
