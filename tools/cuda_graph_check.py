"""The tokenizer forward captured in a CUDA graph, replayed on new input, equal to eager.

Part of ``make gpu-check`` (tools/gpu_check.py); needs a GPU. The forward has
no host sync by contract, so capture must succeed, and a replay must give
bit-identical results to an eager call on the same input (the kernels are
deterministic).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from setok_model import SeTokConfig, SeTokTokenizer  # noqa: E402

FIELDS = ("tokens", "cu_clusters", "num_clusters", "labels", "score")


def main() -> int:
    torch.manual_seed(0)
    device = torch.device("cuda")
    config = SeTokConfig(input_dim=256, hidden_dim=256, token_dim=256, num_heads=2, mlp_dim=512,
                         k=16, min_clusters=8, max_clusters=64)
    model = SeTokTokenizer(config).to(device, torch.bfloat16).eval()
    static = torch.randn(4, 196, 256, device=device, dtype=torch.bfloat16)
    fresh = torch.randn_like(static)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream: compiles, allocates
            for _ in range(2):
                model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static)
        static.copy_(fresh)
        graph.replay()
        eager = model(fresh)
    torch.cuda.synchronize()
    different = [f for f in FIELDS if not torch.equal(getattr(captured, f), getattr(eager, f))]
    if different:
        print(f"CUDA graph replay differs from eager in {', '.join(different)}")
        return 1
    print(f"tokenizer forward (B=4, N=196, bf16) captured, replayed on new input: equal to eager "
          f"({int(eager.num_clusters.sum())} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
