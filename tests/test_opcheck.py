"""``torch.library.opcheck`` over every ``torch.ops.setok.*`` op, in one place.

Each public op runs on every backend that can run on the device under test
(the reference, the compiled library, Triton: on the GPU where there is one,
else in its interpreter; flash-attn and xformers where installed), each
internal ``native_*`` op on the CPU (its CUDA kernels are checked through the
public ops' "native" backend on a GPU). ``test_every_op_has_cases`` fails
when an op is added without cases here.
"""

import pytest
import torch

from setok_kernels import _backends, _native

from ._data import attention_inputs, first_members, mixture, offsets, scattered_mask
from .conftest import DEVICE

OPS = torch.ops.setok
# the Triton DPC kernels are checked under static shapes (as they are compiled); everything else under all of opcheck
_STATIC = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
# the internal ops have no autograd of their own: their public op carries it
_NATIVE = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
_DPC_FAMILY = ("pairwise_distance", "knn_density", "density_delta", "select_centers", "assign_to_centers",
               "dpc_cluster")


# ------------------------------------------------------------------ inputs


def _clustering(device):
    """(x, mask) and what the reference makes of them: density, delta, score, centres, labels."""
    x = mixture(2, 23, 5).to(device)
    mask = scattered_mask(2, 23).to(device)
    density = OPS.knn_density(x, 3, mask, "reference")
    delta, _ = OPS.density_delta(x, density, mask, "column_max", "none", "reference")
    score = density * delta
    centers, num = OPS.select_centers(score, 0.5, 4, 23, mask, 0, "index", "reference")
    labels = OPS.assign_to_centers(x, centers, num, mask, "euclidean", "reference")
    return dict(x=x, mask=mask, density=density, score=score, centers=centers, num=num, labels=labels)


def _merging(device):
    """Tokens with labels and centres from a num_centers=6 clustering, weights and blend shares that need grad."""
    x = mixture(2, 23, 5).to(device)
    r = OPS.dpc_cluster(x, 3, 0.5, 4, 6, None, "global_max", 6, "score", "index", "reference")
    labels, num, centers = r[0], r[1], r[2]
    w = torch.rand(2, 23, device=device)
    a = torch.rand(2, 6, device=device)
    return dict(x=x.requires_grad_(), labels=labels, num=num, centers=centers, w=w.requires_grad_(),
                a=a.requires_grad_(), g=torch.randn(2, 6, 5, device=device), gws=torch.randn(2, 6, device=device))


def _segments(device):
    cu = offsets([4, 0, 5, 11], device=device)  # an empty segment
    return dict(cu=cu, t=torch.randn(20, 6, device=device, requires_grad=True),
                w=torch.rand(20, device=device, requires_grad=True), g=torch.randn(4, 6, device=device))


def _attention(device):
    q, k, v, cu_q, cu_k = attention_inputs([3, 0, 5], [2, 4, 1], H=2, D=16, device=device)
    cu = offsets([4, 0, 5, 11], device=device)
    qs, ks, vs = (torch.randn(20, 2, 8, device=device) for _ in range(3))
    out, lse = OPS.varlen_attention(q, k, v, cu_q, cu_k, 8, 8, 0.3, "reference")
    return dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, cu=cu, qs=qs, ks=ks, vs=vs, out=out, lse=lse,
                dout=torch.randn_like(q), dlse=torch.randn_like(lse))


def _grad(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


# op -> (inputs, [args(inputs, backend), ...]); each case ends with (or holds) the backend name
CASES = {
    "pairwise_distance": (_clustering, [
        lambda d, b: (d["x"], d["mask"], b),
        lambda d, b: (d["x"], None, b),
    ]),
    "knn_density": (_clustering, [lambda d, b: (d["x"], 3, d["mask"], b)]),
    "density_delta": (_clustering, [
        lambda d, b: (d["x"], d["density"], d["mask"], "global_max", "index", b),
        lambda d, b: (d["x"], d["density"], d["mask"], "column_max", "none", b),
    ]),
    "select_centers": (_clustering, [
        lambda d, b: (d["score"], 0.5, 4, 6, d["mask"], 0, "index", b),
        lambda d, b: (d["score"], 0.5, 4, 6, d["mask"], 0, "score", b),
        lambda d, b: (d["score"], 0.5, 4, 6, d["mask"], 6, "score", b),
    ]),
    "assign_to_centers": (_clustering, [
        lambda d, b: (d["x"], d["centers"], d["num"], d["mask"], "euclidean", b),
        lambda d, b: (d["x"], d["centers"], d["num"], d["mask"], "cosine", b),
    ]),
    "dpc_cluster": (_clustering, [
        lambda d, b: (d["x"], 3, 0.5, 4, 23, d["mask"], "column_max", 0, "index", "none", b),
        lambda d, b: (d["x"], 3, 0.5, 4, 5, d["mask"], "global_max", 5, "score", "index", b),
    ]),
    "pack_clusters": (_clustering, [lambda d, b: (d["labels"], d["num"], 23, b)]),
    "segment_mean": (_segments, [
        lambda d, b: (d["t"], d["cu"], b),
        lambda d, b: (d["t"], d["cu"], b, d["w"], 1e-3),
    ]),
    "segment_mean_backward": (_segments, [lambda d, b: (d["g"], d["cu"], 20, b)]),
    "segment_mean_weighted_backward": (_segments, [
        lambda d, b: (d["g"], d["t"].detach(), d["cu"], d["w"].detach(), 1e-3, b),
        lambda d, b: (d["g"], d["t"].detach(), d["cu"], None, 0.5, b),
    ]),
    "merge_clusters": (_merging, [
        lambda d, b: (d["x"], d["labels"], d["num"], 6, d["w"], 1e-6, d["centers"], d["a"], b),
        lambda d, b: (d["x"], d["labels"], d["num"], 6, None, 0.0, None, None, b),
    ]),
    "merge_clusters_backward": (_merging, [
        lambda d, b: (d["g"], d["gws"], d["x"].detach(), d["labels"], d["num"], d["w"].detach(), 1e-6, d["centers"],
                      d["a"].detach(), b),
        lambda d, b: (d["g"], d["gws"], d["x"].detach(), d["labels"], d["num"], None, 0.0, None, None, b),
    ]),
    "varlen_attention": (_attention, [
        lambda d, b: (*_grad(d["q"], d["k"], d["v"]), d["cu_q"], d["cu_k"], 8, 8, 0.3, b),
        lambda d, b: (*_grad(d["qs"], d["ks"], d["vs"]), d["cu"], d["cu"], 11, 11, 0.3, b),
    ]),
    "varlen_attention_backward": (_attention, [
        lambda d, b: (d["dout"], None, d["q"], d["k"], d["v"], d["out"], d["lse"], d["cu_q"], d["cu_k"], 8, 8, 0.3, b),
        lambda d, b: (d["dout"], d["dlse"], d["q"], d["k"], d["v"], d["out"], d["lse"], d["cu_q"], d["cu_k"], 8, 8, 0.3,
                      b),
    ]),
}


def _native_cpu():
    x = mixture(2, 12, 4)
    mask = scattered_mask(2, 12)
    density = OPS.native_knn_density(x, 3, mask)
    centers, num = OPS.native_select_centers(density, None, 0.5, 2, 5, 0, "index")
    labels = OPS.native_dpc_cluster(x, 3, 0.5, 2, 5, None, "column_max", 0, "index", "none")[0]
    return dict(x=x, mask=mask, density=density, centers=centers, num=num, labels=labels)


NATIVE_CASES = {
    "native_knn_density": [lambda d: (d["x"], 3, d["mask"])],
    "native_density_delta": [lambda d: (d["x"], d["density"], d["mask"], "column_max", "index")],
    "native_select_centers": [
        lambda d: (d["density"], d["mask"], 0.5, 2, 5, 0, "index"),
        lambda d: (d["density"], d["mask"], 0.5, 2, 5, 5, "score"),
    ],
    "native_assign_to_centers": [
        lambda d: (d["x"], d["centers"], d["num"], None, "euclidean"),
        lambda d: (d["x"], d["centers"], d["num"], d["mask"], "cosine"),
    ],
    "native_dpc_cluster": [
        lambda d: (d["x"], 3, 0.5, 2, 5, d["mask"], "global_max", 0, "index", "none"),
        lambda d: (d["x"], 3, 0.5, 2, 5, d["mask"], "column_max", 5, "score", "index"),
    ],
    "native_pack_clusters": [lambda d: (d["labels"], d["num"], 5)],
    "native_segment_mean": [
        lambda d: (torch.randn(10, 3), offsets([4, 0, 5])),
        lambda d: (torch.randn(10, 3), offsets([4, 0, 5]), torch.rand(10), 1e-3),
    ],
    "native_segment_mean_backward": [lambda d: (torch.randn(3, 3), offsets([4, 0, 5]), 10)],
    "native_segment_mean_weighted_backward": [
        lambda d: (torch.randn(3, 3), torch.randn(10, 3), offsets([4, 0, 5]), torch.rand(10), 1e-3),
    ],
    "native_merge_clusters": [
        lambda d: (d["x"], d["labels"], d["num"], 5, torch.rand(2, 12), 1e-6, first_members(d["labels"], 5),
                   torch.rand(2, 5)),
        lambda d: (d["x"], d["labels"], d["num"], 5, None, 0.0, None, None),
    ],
    "native_merge_clusters_backward": [
        lambda d: (torch.randn(2, 5, 4), torch.randn(2, 5), d["x"], d["labels"], d["num"], torch.rand(2, 12), 1e-6,
                   first_members(d["labels"], 5), torch.rand(2, 5)),
        lambda d: (torch.randn(2, 5, 4), torch.randn(2, 5), d["x"], d["labels"], d["num"], None, 0.0, None, None),
    ],
    "native_attention_segments": [
        lambda d: (torch.randn(9, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8), torch.zeros(10, 2, 8),
                   torch.zeros(2, 10), torch.tensor([[0, 4, 0, 3], [5, 9, 3, 7]]), 0.3),
    ],
    "native_build_info": [lambda d: ()],
}


# ------------------------------------------------------------------ the matrix


def _backends_here(op):
    """The backends that can take ``op`` on the device under test (any dtype the cases use)."""
    return [i.name for i in _backends.implementations(op)
            if i.unavailable_reason() is None and (i.devices is None or DEVICE in i.devices)]


def _public():
    for op in sorted(CASES):
        for backend in _backends_here(op):
            for i in range(len(CASES[op][1])):
                marks = [pytest.mark.triton] if backend == "triton" else []
                yield pytest.param(op, backend, i, id=f"{op}-{backend}-{i}", marks=marks)


@pytest.mark.parametrize("op,backend,case", list(_public()))
def test_opcheck(op, backend, case):
    inputs, cases = CASES[op]
    args = cases[case](inputs(DEVICE), backend)
    if backend == "triton" and op in _DPC_FAMILY:
        torch.library.opcheck(getattr(OPS, op), args, test_utils=_STATIC)
    else:
        torch.library.opcheck(getattr(OPS, op), args)


@pytest.mark.parametrize("op", sorted(NATIVE_CASES))
def test_opcheck_native(op):
    if not _native.build_info()["loaded"]:
        pytest.skip(f"native library unavailable: {_native.build_info()['reason']}")
    data = _native_cpu()
    # the build facts are a string: nothing for aot_autograd to trace
    utils = ("test_schema", "test_faketensor") if op == "native_build_info" else _NATIVE
    for case in NATIVE_CASES[op]:
        torch.library.opcheck(getattr(OPS, op), case(data), test_utils=utils)


def test_every_op_has_cases():
    registered = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("setok::")}
    assert registered == set(CASES) | set(NATIVE_CASES), "an op without opcheck cases (or cases for a removed op)"
    for op in CASES:
        assert _backends_here(op), f"{op}: no backend runs on {DEVICE}"
