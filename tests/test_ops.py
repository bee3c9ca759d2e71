"""The op layer: torch.compile, backend selection, input validation (opcheck: tests/test_opcheck.py)."""

import pytest
import torch

import setok_kernels as sk
from setok_kernels import BackendUnavailableError, _backends

from ._data import attention_inputs, mixture, offsets, scattered_mask


def _cluster_inputs(device="cpu"):
    return mixture(2, 23, 5).to(device), scattered_mask(2, 23).to(device)


def _backend(device):
    """On a GPU, what auto picks there (the GPU kernels); on the CPU, the reference (quick)."""
    return "auto" if device == "cuda" else "reference"


# opcheck of every op on every backend: tests/test_opcheck.py


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph_dpc_and_attention(device):
    x, mask = _cluster_inputs(device)

    def pipeline(x, mask):
        r = sk.dpc_cluster(x, 3, 0.5, 4, 8, mask)
        p = sk.pack_clusters(r.labels, r.num_clusters, 8)
        pooled = sk.segment_mean(x.flatten(0, 1)[p.perm], p.cu_seqlens)
        return r.labels, p.cu_seqlens, pooled

    eager = pipeline(x, mask)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(x, mask)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)

    q, k, v, cu, _ = attention_inputs([1, 5, 0, 8], [1, 5, 0, 8], H=2, D=16, device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def attend(q, k, v):
        return sk.varlen_attention(q, k, v, cu, max_seqlen_q=8, backend=_backend(device))

    out = attend(q, k, v)
    out_c = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, out_c)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    for a, b in zip(g, g_c):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- backends


def test_backend_names_and_environment(monkeypatch):
    x, _ = _cluster_inputs()
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        sk.dpc_cluster(x, 3, backend="fast")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        sk.varlen_attention(torch.randn(3, 1, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4), torch.tensor([0, 3]), backend="cuda")
    monkeypatch.setenv("SETOK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SETOK_BACKEND"):
        sk.dpc_cluster(x, 3)
    monkeypatch.setenv("SETOK_BACKEND", "reference")
    assert torch.equal(sk.dpc_cluster(x, 3).labels, sk.dpc_cluster(x, 3, backend="reference").labels)


def test_forced_backend_that_declines_names_its_reason():
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    impls = {i.name: i for i in _backends.implementations("knn_density")}
    if "triton" in impls:
        with pytest.raises(BackendUnavailableError, match="triton.*float64"):
            sk.knn_density(x, 2, backend="triton")
    fake = _backends.Impl(op="knn_density", name="native", fn=None, devices=("cuda",), dtypes=(torch.float32,))
    saved = _backends.implementations("knn_density")
    try:
        _backends.register(fake)
        with pytest.raises(BackendUnavailableError, match="backend 'native' cannot run this call: device cpu not supported"):
            sk.knn_density(x, 2, backend="native")
        # auto skips it and says nothing
        assert sk.knn_density(x, 2).shape == (1, 8)
    finally:
        _backends._REGISTRY["knn_density"] = saved


def test_info_reports_every_op(capsys):
    from setok_kernels import info

    assert info.main([]) == 0
    text = capsys.readouterr().out
    for op in ("dpc_cluster", "varlen_attention", "pack_clusters", "segment_mean"):
        assert op in text
    assert "auto ->" in text


def test_public_names_are_declared_once_and_exist_everywhere():
    """reference.__all__ is the op API: the validating functions and the package export exactly those names."""
    from setok_kernels import functional, reference

    assert functional.__all__ == reference.__all__
    assert set(sk.__all__) == set(reference.__all__) | {"BackendUnavailableError", "DTypeError", "reference", "ops"}
    for name in reference.__all__:
        assert getattr(sk, name) is getattr(functional, name), name
        assert callable(getattr(reference, name)), name
        if name[0].islower():  # an op: the validating function is not the reference's
            assert getattr(functional, name) is not getattr(reference, name), name
    ops = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("setok::")}
    assert {n for n in reference.__all__ if n[0].islower()} - ops == {"pad_segments", "unpad_segments"}


# ---------------------------------------------------------------- bad input


def _bad_calls():
    x = torch.randn(2, 6, 3)
    m = torch.ones(2, 6, dtype=torch.bool)
    labels = torch.zeros(2, 6, dtype=torch.int64)
    num = torch.ones(2, dtype=torch.int64)
    q = torch.randn(6, 2, 4)
    cu = offsets([2, 4])
    return [
        ("x must have shape \\(B, N, C\\)", ValueError, lambda: sk.dpc_cluster(x[0], 2)),
        ("x must be a torch.Tensor", TypeError, lambda: sk.dpc_cluster(x.tolist(), 2)),
        ("x must be float16, bfloat16, float32 or float64, got int64", ValueError, lambda: sk.dpc_cluster(x.long(), 2)),
        ("x must be float16", TypeError, lambda: sk.knn_density(x.to(torch.int32), 2)),
        ("mask must have shape \\(B, N\\) = \\(2, 6\\)", ValueError, lambda: sk.dpc_cluster(x, 2, mask=m[:, :5])),
        ("mask must have shape", ValueError, lambda: sk.dpc_cluster(x, 2, mask=m[:1])),
        ("mask must be a bool tensor", ValueError, lambda: sk.dpc_cluster(x, 2, mask=m.float())),
        ("mask is on meta but x is on cpu", ValueError, lambda: sk.dpc_cluster(x, 2, mask=m.to("meta"))),
        ("k must be >= 1", ValueError, lambda: sk.dpc_cluster(x, 0)),
        ("k = 7 exceeds the number of tokens N = 6", ValueError, lambda: sk.knn_density(x, 7)),
        ("k must be an int", TypeError, lambda: sk.knn_density(x, 2.0)),
        ("threshold must not be NaN", ValueError, lambda: sk.dpc_cluster(x, 2, float("nan"))),
        ("max_clusters must be >= 1", ValueError, lambda: sk.dpc_cluster(x, 2, max_clusters=0)),
        ("min_clusters must be >= 1", ValueError, lambda: sk.dpc_cluster(x, 2, min_clusters=0)),
        ("x has N = 0 tokens", ValueError, lambda: sk.dpc_cluster(torch.randn(2, 0, 3), 1)),
        ("densest_delta must be one of", ValueError, lambda: sk.dpc_cluster(x, 2, densest_delta="max")),
        ("density must have shape \\(B, N\\)", ValueError, lambda: sk.density_delta(x, torch.ones(2, 5))),
        ("labels must have shape \\(B, N\\)", ValueError, lambda: sk.pack_clusters(labels[0], num)),
        ("num_clusters must have shape \\(B,\\)", ValueError, lambda: sk.pack_clusters(labels, num[:1])),
        ("labels must lie in", ValueError, lambda: sk.pack_clusters(labels + 1, num)),
        ("centers must hold token indices", ValueError, lambda: sk.assign_to_centers(x, torch.full((2, 3), 9), num)),
        ("cu_seqlens must be int32 or int64", ValueError, lambda: sk.segment_mean(x[0], cu.float())),
        ("cu_seqlens must be 1-D", ValueError, lambda: sk.segment_mean(x[0], cu[None])),
        ("cu_seqlens must be non-decreasing", ValueError, lambda: sk.segment_mean(x[0], torch.tensor([0, 4, 2]))),
        ("cu_seqlens ends at 9, past the end of x \\(6 rows\\)", ValueError, lambda: sk.segment_mean(x[0], torch.tensor([0, 9]))),
        ("cu_seqlens_q ends at 7, past the end of q", ValueError, lambda: sk.varlen_attention(q, q, q, torch.tensor([0, 7], dtype=torch.int32))),
        ("cu_seqlens_q must be int32 or int64", TypeError, lambda: sk.varlen_attention(q, q, q, cu.float())),
        ("cu_seqlens_q and cu_seqlens_k must have the same length", ValueError, lambda: sk.varlen_attention(q, q, q, cu, cu[:2])),
        ("q must have shape \\(T, H, D\\)", ValueError, lambda: sk.varlen_attention(q[0], q, q, cu)),
        ("q, k, v must share one dtype", ValueError, lambda: sk.varlen_attention(q, q.double(), q, cu)),
        ("k is on meta but q is on cpu", ValueError, lambda: sk.varlen_attention(q, q.to("meta"), q, cu)),
        ("q and k must have the same \\(H, D\\)", ValueError, lambda: sk.varlen_attention(q, q[:, :1], q[:, :1], cu)),
    ]


@pytest.mark.parametrize("message,error,call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_named(message, error, call):
    with pytest.raises(error, match=message):
        call()


def test_missing_native_library_is_a_warning(tmp_path):
    """A copy of the package without its compiled library imports, warns, and clusters."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    src = Path(sk.__file__).parent
    shutil.copytree(src, tmp_path / "setok_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import setok_kernels as sk\n"
        "assert any('native' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "r = sk.dpc_cluster(torch.randn(2, 20, 4), 3)\n"
        "assert r.labels.shape == (2, 20)\n"
        "from setok_kernels import _backends\n"
        "reason = {i.name: i.unavailable_reason() for i in _backends.implementations('dpc_cluster')}['native']\n"
        "assert reason and 'not built' in reason, reason\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
