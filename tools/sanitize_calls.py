"""One small call of every kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/sanitize_calls.py

Every op with every backend that has device kernels (triton, native; torch
for attention), forward and backward, with a mask, a ragged batch (an image
with no real token, k larger than an image's real tokens) and the enum
arguments, at small shapes: the sanitizer slows kernels ~100x. A backend that
declines a call is listed, not an error. Runs on the CPU too (Triton in its
interpreter, set TRITON_INTERPRET=1), which is how CI keeps this script in
step with the API. Prints one line per call; exits 1 if a call raised.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import setok_kernels as sk  # noqa: E402
from setok_kernels import BackendUnavailableError  # noqa: E402


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    B, N, C = 3, 50, 40  # C not a multiple of 16: the masked tails of the C chunks run
    x = torch.randn(B, N, C, generator=g).to(device, dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 7:] = False  # 7 real tokens: fewer than k below
    mask[2] = False  # no real token
    return x, mask.to(device)


def _dpc_calls(device, dtype, backend):
    x, mask = _inputs(device, dtype)
    k, M = 8, 12
    yield "pairwise_distance", lambda: sk.pairwise_distance(x, mask, backend=backend)
    for m in (None, mask):
        tag = "masked" if m is not None else "dense"
        yield f"knn_density {tag}", lambda m=m: sk.knn_density(x, k, m, backend=backend)
        density = sk.knn_density(x, k, m, backend="reference")
        for tie_break in ("none", "index"):
            yield f"density_delta {tag} {tie_break}", lambda m=m, t=tie_break, d=density: sk.density_delta(
                x, d, m, "column_max", t, backend=backend)
        score = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1)).to(device)
        yield f"select_centers {tag}", lambda m=m: sk.select_centers(score, 0.5, 4, M, m, backend=backend)
        yield f"select_centers {tag} top-n", lambda m=m: sk.select_centers(
            score, 0.5, 4, M, m, num_centers=M, center_order="score", backend=backend)
        centers, num = sk.select_centers(score, 0.5, 4, M, m, backend="reference")
        for metric in ("euclidean", "cosine"):
            yield f"assign_to_centers {tag} {metric}", lambda m=m, c=centers, n=num, mt=metric: sk.assign_to_centers(
                x, c, n, m, mt, backend=backend)
        yield f"dpc_cluster {tag}", lambda m=m: sk.dpc_cluster(x, k, 0.5, 4, M, m, backend=backend)
        if backend == "triton":  # small images take the Gram path; a zero budget, the streaming kernels
            yield f"dpc_cluster {tag} streaming", lambda m=m: _without_gram(
                lambda: sk.dpc_cluster(x, k, 0.5, 4, M, m, backend=backend))


def _without_gram(call):
    saved = os.environ.get("SETOK_DPC_GRAM_BYTES")
    os.environ["SETOK_DPC_GRAM_BYTES"] = "0"
    try:
        return call()
    finally:
        if saved is None:
            del os.environ["SETOK_DPC_GRAM_BYTES"]
        else:
            os.environ["SETOK_DPC_GRAM_BYTES"] = saved


def _bookkeeping_calls(device, dtype, backend):
    x, mask = _inputs(device, dtype)
    r = sk.dpc_cluster(x, 8, 0.5, 4, 12, mask, backend="reference")
    yield "pack_clusters", lambda: sk.pack_clusters(r.labels, r.num_clusters, 12, backend=backend)
    # many clusters: Triton's max_seqlen by atomics into a zero-filled output
    many = torch.randint(0, 700, (8, 400), generator=torch.Generator().manual_seed(2)).to(device)
    yield "pack_clusters M=700", lambda: sk.pack_clusters(many, torch.full((8,), 700, device=device), 700,
                                                          backend=backend)
    p = sk.pack_clusters(r.labels, r.num_clusters, 12, backend="reference")
    rows = x.flatten(0, 1)[p.perm].detach().requires_grad_()
    weight = torch.rand(rows.shape[0], device=device, dtype=dtype, requires_grad=True)

    def segment_mean():
        out = sk.segment_mean(rows, p.cu_seqlens, backend=backend)
        out.float().sum().backward()

    def segment_mean_weighted():
        out = sk.segment_mean(rows, p.cu_seqlens, weight=weight, eps=1e-6, backend=backend)
        out.float().sum().backward()

    def merge():
        xs = x.detach().requires_grad_()
        out = sk.merge_clusters(xs, r.labels, r.num_clusters, 12, centers=r.centers, center_weight=0.5, backend=backend)
        out.tokens.float().sum().backward()

    yield "segment_mean fwd+bwd", segment_mean
    yield "segment_mean weighted fwd+bwd", segment_mean_weighted
    yield "merge_clusters fwd+bwd", merge


def _attention_calls(device, dtype, backend):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 1, 9, 9, 40, 47], dtype=torch.int32, device=device)  # an empty segment, a 1-token one
    cu_k = torch.tensor([0, 3, 5, 9, 30, 33], dtype=torch.int32, device=device)
    for D in (64, 2048):
        q = torch.randn(47, 2, D, generator=g).to(device, dtype).requires_grad_()
        kv = [torch.randn(33, 2, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2)]

        def attend(q=q, kv=kv):
            out = sk.varlen_attention(q, *kv, cu, cu_k, 31, 21, backend=backend)
            out.float().sum().backward()

        yield f"varlen_attention D={D} fwd+bwd", attend


def _guarded(calls):
    """The calls of a family; building their inputs (with the reference) failing is a failed call too."""
    try:
        yield from calls
    except Exception:
        error = traceback.format_exc()

        def fail():
            raise RuntimeError(f"building the inputs failed:\n{error}")

        yield "inputs", fail


FAMILIES = {
    "triton": (_dpc_calls, _bookkeeping_calls, _attention_calls),
    "native": (_dpc_calls, _bookkeeping_calls),
    "torch": (_attention_calls,),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--backends", default=",".join(FAMILIES))
    args = parser.parse_args(argv)
    failures = 0
    for backend in args.backends.split(","):
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            for family in FAMILIES[backend]:
                for name, call in _guarded(family(args.device, dtype, backend)):
                    label = f"{backend:<7} {str(dtype)[6:]:<9} {name}"
                    try:
                        call()
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        print(f"ok       {label}")
                    except BackendUnavailableError as exc:
                        print(f"declined {label}: {str(exc).splitlines()[0][:120]}")
                    except Exception:
                        failures += 1
                        print(f"FAILED   {label}\n{traceback.format_exc()}")
    print(f"sanitize_calls: {failures} call(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
