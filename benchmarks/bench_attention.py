"""Group ``attention``: ragged self-attention inside clusters (forward).

Segments are clusters: each image's N tokens split into about M clusters of
uneven sizes (random cut points), packed image after image. setok's
``varlen_attention`` backends against a per-segment SDPA loop, padded SDPA
with a key mask, SDPA on nested (jagged) tensors, and flash-attn / xformers
called directly when installed.

Work counted for the floor: ``4 H D sum(L^2)`` FLOPs (QK^T and PV) and
reading q, k, v and writing the output once.
"""

from __future__ import annotations

import pytest
import torch

import setok_kernels as sk

from . import baselines as bl
from .conftest import pool_size

# (id, B, N, M, H, D): SeTok's tokenizer is hidden 4096 / 2 heads (D = 2048)
# in the reference configuration; D = 128 is the usual head size.
CUDA_CASES = [("B32-N729-H2-D2048", 32, 729, 64, 2, 2048), ("B32-N729-H16-D128", 32, 729, 64, 16, 128)]
CPU_CASES = [("B4-N576-H2-D128", 4, 576, 16, 2, 128), ("B4-N576-H4-D32", 4, 576, 32, 4, 32)]

SETOK = ("triton", "flash_attn", "torch", "xformers", "reference")
BASELINES = ("sdpa_per_segment", "sdpa_padded", "sdpa_nested", "flash_attn_direct", "xformers_direct")


def segment_lengths(B: int, N: int, M: int, gen: torch.Generator) -> list[int]:
    """Uneven cluster sizes, M per image summing to N (cut points drawn uniformly)."""
    lengths = []
    for _ in range(B):
        cuts = torch.randperm(N - 1, generator=gen)[: M - 1].add(1).sort().values.tolist()
        edges = [0, *cuts, N]
        lengths += [b - a for a, b in zip(edges, edges[1:])]
    return lengths


@pytest.mark.parametrize("impl", SETOK + BASELINES)
def test_varlen_attention(measure, benchmark, device, dtype, case, impl):
    benchmark.group = "attention"
    name, B, N, M, H, D = case
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton interpreter is for tests, not timings")
    gen = torch.Generator().manual_seed(B * N + H * D)
    lengths = segment_lengths(B, N, M, gen)
    T, max_len = B * N, max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    elt = torch.finfo(dtype).bits // 8
    pool = [
        tuple(torch.randn(T, H, D, generator=gen).to(device, dtype) for _ in range(3))
        for _ in range(pool_size(3 * T * H * D * elt))
    ]
    scale = D**-0.5
    flops = 4 * H * D * sum(L * L for L in lengths)
    nbytes = 4 * T * H * D * elt

    if impl in SETOK:
        def fn(q, k, v):
            return sk.varlen_attention(q, k, v, cu, max_seqlen_q=max_len, max_seqlen_k=max_len, scale=scale, backend=impl)
    elif impl == "sdpa_per_segment":
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

        def fn(q, k, v):
            return bl.attention_per_segment(q, k, v, bounds, scale)
    elif impl == "sdpa_padded":
        index, valid = bl.padding_index(cu, max_len)

        def fn(q, k, v):
            return bl.attention_padded(q, k, v, index, valid, scale)
    elif impl == "sdpa_nested":
        offsets = cu.long()

        def fn(q, k, v):
            return bl.attention_nested(q, k, v, offsets, scale)
    elif impl == "flash_attn_direct":
        pytest.importorskip("flash_attn")
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or D > 256:
            pytest.skip("flash-attn runs fp16/bf16 on CUDA with head dim <= 256")

        def fn(q, k, v):
            return bl.attention_flash_attn(q, k, v, cu, max_len, scale)
    else:
        pytest.importorskip("xformers")
        if device.type != "cuda":
            pytest.skip("xformers' memory-efficient attention needs CUDA")
        bias = bl.xformers_bias(lengths)

        def fn(q, k, v):
            return bl.attention_xformers(q, k, v, bias, scale)

    if impl == "sdpa_nested":
        try:
            fn(*pool[0])
        except (RuntimeError, NotImplementedError) as exc:  # kernel coverage of jagged SDPA varies by version and device
            pytest.skip(f"SDPA on nested tensors: {str(exc).splitlines()[0]}")
    measure(fn, pool, impl=impl, case=name, role="setok" if impl in SETOK else "baseline", flops=flops, bytes=nbytes,
            shape=dict(B=B, N=N, segments=len(lengths), max_seqlen=max_len, H=H, D=D, dtype=str(dtype)[6:]))
