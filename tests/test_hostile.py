"""Hostile input: every entry point refuses bad input with a clear error that
names the argument, or gives the documented result; nothing crashes, reads out of
bounds, or answers silently wrong.

Cases that could kill the interpreter (SIGFPE, SIGSEGV, an abort inside a kernel) run in a
fresh interpreter (``_isolated``), so that a crash fails the test rather than pytest. The
hypothesis tests at the end fuzz shapes, dtypes, masks and offsets for every op and hold
every backend available here to the reference: the same result, or the same error.
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import setok_kernels as sk
from setok_kernels import BackendUnavailableError
from setok_kernels import reference as R
from setok_model import MaskDecoder, SeTokConfig, SeTokDetokenizer, SeTokTokenizer
from setok_model.layers import VarlenAttention

from ._data import TOLERANCE, offsets, prefix_mask, strided

ROOT = Path(__file__).resolve().parents[1]
OPS = torch.ops.setok
DPC_BACKENDS = ("reference", "native", "triton")
ATTN_BACKENDS = ("reference", "torch", "triton")

# ---------------------------------------------------------------- isolation

_PROLOGUE = """
import json, math, torch, setok_kernels as sk
from setok_kernels import reference as R
O = torch.ops.setok

def case(name, fn):
    try:
        value = fn()
        out = {"error": None, "value": value if isinstance(value, (bool, int, float, str, list)) else None}
    except Exception as exc:
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins")
        out = {"error": type(exc).__name__, "kind": kind, "message": str(exc).splitlines()[0] if str(exc) else ""}
    print(json.dumps({"case": name, **out}), flush=True)
"""


def _isolated(body: str) -> dict:
    """Run ``body`` (calls ``case(name, fn)``) in a fresh interpreter.

    Returns {name: {"error": type name or None, "kind": its builtin base, "message", "value"}}.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _PROLOGUE + textwrap.dedent(body)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r.pop("case")] = r
    assert proc.returncode == 0, (
        f"the interpreter died (status {proc.returncode}) after cases {list(results)}:\n{proc.stderr[-3000:]}"
    )
    return results


def _refused(results: dict, pattern: str, kind: str = "ValueError") -> None:
    for name, r in results.items():
        assert r.get("kind") == kind and re.search(pattern, r["message"]), f"{name}: {r}"


# ---------------------------------------------------------------- 1. attention without heads


def test_attention_without_heads_or_head_dim_is_refused_by_every_backend():
    results = _isolated("""
        cu = torch.tensor([0, 3, 4], dtype=torch.int32)
        for H, D in ((0, 8), (2, 0)):
            q = torch.randn(4, H, D)
            for b in ("reference", "torch", "triton", "auto"):
                case(f"function H={H} D={D} {b}", lambda: sk.varlen_attention(q, q, q, cu, backend=b))
                case(f"op H={H} D={D} {b}", lambda: O.varlen_attention(q, q, q, cu, cu, 4, 4, 1.0, b))
    """)
    assert len(results) == 16
    _refused(results, r"q, k, v have (H = 0 heads|head dim D = 0)")


# ---------------------------------------------------------------- 2. offsets past the end


def test_bad_offsets_are_refused_on_cpu_even_with_validation_off():
    """On the CPU value checks cost no sync, so they always run: validate=False does not skip them."""
    results = _isolated("""
        x = torch.randn(4, 3)
        q = torch.randn(4, 2, 8)
        bad = {"past the end": [0, 2, 9], "decreasing": [0, 3, 1], "not from 0": [1, 4], "negative": [0, -2, 4]}
        for what, offsets in bad.items():
            for dtype in (torch.int32, torch.int64):
                cu = torch.tensor(offsets, dtype=dtype)
                for b in ("reference", "native"):
                    case(f"segment_mean {what} {dtype} {b}", lambda: sk.segment_mean(x, cu, backend=b, validate=False))
                    case(f"op segment_mean {what} {dtype} {b}", lambda: O.segment_mean(x, cu, b))
                    grad = torch.ones(cu.numel() - 1, 3)
                    case(f"op segment_mean_backward {what} {dtype} {b}", lambda: O.segment_mean_backward(grad, cu, 4, b))
                for b in ("reference", "torch", "triton"):
                    case(f"attention q {what} {dtype} {b}", lambda: sk.varlen_attention(q, q, q, cu, backend=b, validate=False))
                    good = torch.tensor([0, 2, 4][: cu.numel()], dtype=dtype).clamp(max=4)
                    case(f"attention k {what} {dtype} {b}", lambda: sk.varlen_attention(q, q, q, good, cu, validate=False, backend=b))
                    case(f"op attention {what} {dtype} {b}", lambda: O.varlen_attention(q, q, q, cu, cu, 4, 4, 1.0, b))
                case(f"pad_segments {what} {dtype}", lambda: sk.pad_segments(x, cu, 4, validate=False))
                case(f"unpad_segments {what} {dtype}", lambda: sk.unpad_segments(
                    torch.zeros(cu.numel() - 1, 4, 3), torch.ones(cu.numel() - 1, 4, dtype=torch.bool), cu, 4, validate=False))
    """)
    # refused before any backend is chosen: a backend missing here would not change the error
    _refused(results, r"cu_(seqlens|seqlens_q|seqlens_k|clusters) (ends at \d+, past the end|must be non-decreasing|must start at 0)")


def test_max_seqlen_shorter_than_a_segment_is_refused_on_cpu():
    q = torch.randn(6, 1, 4)
    cu = offsets([5, 1])
    with pytest.raises(ValueError, match=r"max_seqlen_q = 2 is shorter than the longest segment of cu_seqlens_q \(5\)"):
        sk.varlen_attention(q, q, q, cu, max_seqlen_q=2, validate=False)


def test_kernels_clamp_the_offsets_they_are_handed():
    """What CUDA with validate=False relies on: a kernel handed bad offsets stays inside its buffers.

    The internal entry points (below the value checks) give unspecified values of the
    documented shapes: never an out-of-bounds access (on CPU: a crash or an IndexError,
    on CUDA: a device-side assert), never an error.
    """
    results = _isolated("""
        x = torch.randn(5, 3, dtype=torch.float64)
        q = torch.randn(5, 1, 4, dtype=torch.float64)
        for offsets in ([0, 2, 9], [0, 4, 1, 5], [3, -7, 5], [0, 40, 2**31 - 1], [-2**31, 2**31 - 1]):
            cu = torch.tensor(offsets, dtype=torch.int32)
            S = cu.numel() - 1
            shapes = lambda out: [list(t.shape) for t in (out if isinstance(out, tuple) else (out,))]
            grad = torch.randn(S, 3, dtype=torch.float64)
            case(f"native segment_mean {offsets}", lambda: shapes(O.native_segment_mean(x, cu)) == [[S, 3]])
            case(f"native segment_mean_backward {offsets}", lambda: shapes(O.native_segment_mean_backward(grad, cu, 5)) == [[5, 3]])
            case(f"reference segment_mean {offsets}", lambda: shapes(R._segment_mean(x, cu)) == [[S, 3]])
            case(f"reference segment_mean_backward {offsets}", lambda: shapes(R._segment_mean_backward(grad, cu, 5)) == [[5, 3]])
            case(f"reference attention {offsets}", lambda: shapes(R._varlen_attention(q, q, q, cu, cu, 5, 5, 0.5)) == [[5, 1, 4], [1, 5]])
            case(f"reference pad_segments {offsets}", lambda: shapes(R.pad_segments(x, cu, 3)) == [[S, 3, 3], [S, 3]])
            padded, key_mask = torch.randn(S, 3, 3), torch.ones(S, 3, dtype=torch.bool)
            case(f"reference unpad_segments {offsets}", lambda: shapes(R.unpad_segments(padded, key_mask, cu, 5)) == [[5, 3]])
    """)
    for name, r in results.items():
        if name.startswith("native") and r["error"] == "NotImplementedError":
            continue  # the library is not built here
        assert r["error"] is None and r["value"] is True, f"{name}: {r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_validation_off_never_reads_out_of_bounds():
    """validate=False on CUDA: bad offsets, labels and centres give unspecified values, never a
    device-side assert or a memory error (the process would die: hence the subprocess)."""
    results = _isolated("""
        dev = "cuda"
        x = torch.randn(5, 3, device=dev)
        q = torch.randn(5, 2, 16, device=dev)
        feats = torch.randn(2, 6, 3, device=dev)
        for offsets in ([0, 2, 9], [0, 4, 1, 5], [3, -7, 5], [0, 40, 2**31 - 1]):
            cu = torch.tensor(offsets, dtype=torch.int32, device=dev)
            for b in ("reference", "native"):
                case(f"segment_mean {offsets} {b}", lambda: list(sk.segment_mean(x, cu, backend=b, validate=False).shape))
            for b in ("reference", "torch", "triton", "flash_attn"):
                case(f"attention {offsets} {b}", lambda: list(sk.varlen_attention(q.half(), q.half(), q.half(), cu, backend=b, validate=False).shape))
            case(f"pad_segments {offsets}", lambda: list(sk.pad_segments(x, cu, 3, validate=False)[0].shape))
            case(f"validate=True {offsets}", lambda: sk.segment_mean(x, cu, validate=True))
        labels = torch.tensor([[0, 7, 1, -5, 2, 1], [9, 0, -1, 5, 1, 0]], device=dev)
        num = torch.tensor([2, -3], device=dev)
        for b in ("reference", "native"):
            case(f"pack_clusters {b}", lambda: [t.cpu().tolist() for t in sk.pack_clusters(labels, num, 4, backend=b, validate=False)])
        centers = torch.tensor([[0, 99], [-4, 2]], device=dev)
        for b in ("reference", "triton"):
            case(f"assign_to_centers {b}", lambda: list(sk.assign_to_centers(feats, centers, torch.tensor([2, 5], device=dev), backend=b, validate=False).shape))
        torch.cuda.synchronize()
        case("synchronize", lambda: True)
    """)
    assert results["synchronize"]["value"] is True
    packs = [r["value"] for name, r in results.items() if name.startswith("pack_clusters") and r["error"] is None]
    assert all(p == packs[0] for p in packs), "same answer on every backend"
    for name, r in results.items():
        if name.startswith("validate=True"):
            assert r.get("kind") == "ValueError", (name, r)
        elif r["error"] != "BackendUnavailableError":
            assert r["error"] is None, (name, r)


# ---------------------------------------------------------------- 3. the custom ops check metadata


def test_custom_ops_check_their_arguments_whoever_calls_them():
    results = _isolated("""
        x = torch.randn(2, 6, 3)
        short = torch.ones(2, 5, dtype=torch.bool)
        density = torch.rand(2, 6)
        centers = torch.tensor([[0, 3], [1, -1]])
        num = torch.tensor([2, 1])
        for b in ("reference", "native", "triton"):
            case(f"short mask knn {b}", lambda: O.knn_density(x, 2, short, b))
            case(f"short mask cluster {b}", lambda: O.dpc_cluster(x, 2, 0.5, 2, 6, short, "column_max", 0, "index", "none", b))
            case(f"bogus densest_delta {b}", lambda: O.density_delta(x, density, None, "bogus", "none", b))
            case(f"bogus tie_break {b}", lambda: O.density_delta(x, density, None, "column_max", "random", b))
            case(f"bogus center_order {b}", lambda: O.select_centers(density, 0.5, 2, 6, None, 0, "random", b))
            case(f"bogus metric {b}", lambda: O.assign_to_centers(x, centers, num, None, "manhattan", b))
            case(f"num_centers != max_clusters {b}", lambda: O.dpc_cluster(x, 2, 0.5, 2, 6, None, "column_max", 3, "index", "none", b))
            case(f"k > N {b}", lambda: O.knn_density(x, 7, None, b))
            case(f"int32 centers {b}", lambda: O.assign_to_centers(x, centers.int(), num, None, "euclidean", b))
            case(f"mask on another device {b}", lambda: O.knn_density(x, 2, torch.ones(2, 6, dtype=torch.bool, device="meta"), b))
        # the native library's own entry points: a direct call must not read past a short mask
        case("native_knn_density short mask", lambda: O.native_knn_density(x, 2, short))
        case("native_pack_clusters short num", lambda: O.native_pack_clusters(torch.zeros(2, 6, dtype=torch.long), num[:1], 3))
        case("native_segment_mean 2-D cu", lambda: O.native_segment_mean(x[0], torch.zeros(1, 2, dtype=torch.long)))
    """)
    expected = {
        "short mask": r"mask must have shape \(B, N\) = \(2, 6\)",
        "bogus densest_delta": r"densest_delta must be one of column_max, global_max, got 'bogus'",
        "bogus tie_break": r"tie_break must be one of none, index, got 'random'",
        "bogus center_order": r"center_order must be one of index, score, got 'random'",
        "bogus metric": r"metric must be one of euclidean, cosine, got 'manhattan'",
        "num_centers != max_clusters": r"num_centers = 3 needs max_clusters == num_centers",
        "k > N": r"k = 7 exceeds the number of tokens N = 6",
        "int32 centers": r"centers must be int64, got int32",
        "mask on another device": r"mask is on meta but x is on cpu",
    }
    for name, r in results.items():
        if name.startswith("native_"):
            if r["error"] == "NotImplementedError":  # the library is not built here: no kernel to call
                continue
            assert r["kind"] == "RuntimeError" and re.search(r"setok: (mask|num_clusters|cu_seqlens) ", r["message"]), (name, r)
            continue
        pattern = next(p for key, p in expected.items() if name.startswith(key))
        assert r.get("kind") == "ValueError" and re.search(pattern, r["message"]), (name, r)


def test_metadata_checks_never_read_values():
    """On meta tensors (no values at all) the ops still refuse bad metadata, and accept good metadata."""
    x = torch.randn(2, 6, 3, device="meta")
    with pytest.raises(ValueError, match="mask must have shape"):
        OPS.knn_density(x, 2, torch.ones(2, 5, dtype=torch.bool, device="meta"), "")
    with pytest.raises(ValueError, match="densest_delta must be one of"):
        OPS.density_delta(x, torch.ones(2, 6, device="meta"), None, "bogus", "none", "")
    with pytest.raises(ValueError, match="max_clusters = 1073741824 gives B \\* max_clusters"):
        OPS.dpc_cluster(x, 2, 0.5, 2, 2**30, None, "column_max", 0, "index", "none", "")
    labels, num, centers, *_ = OPS.dpc_cluster(x, 2, 0.5, 2, 4, None, "column_max", 0, "index", "none", "")
    assert labels.shape == (2, 6) and centers.shape == (2, 4) and labels.device.type == "meta"
    q = torch.randn(5, 2, 8, device="meta")
    cu = torch.zeros(3, dtype=torch.int32, device="meta")
    assert OPS.varlen_attention(q, q, q, cu, cu, 5, 5, 0.3, "")[0].shape == q.shape


# ---------------------------------------------------------------- 4. pack_clusters agrees everywhere


def test_pack_clusters_gives_the_same_answer_or_error_on_every_backend():
    labels = torch.tensor([[0, 3, 1, -1, 2, 1], [0, 0, -1, 5, 1, -7]])
    num = torch.tensor([2, 1])
    for b in ("reference", "native"):
        with pytest.raises(ValueError, match=r"labels must lie in \[-1, num_clusters\[b\]\)"):
            sk.pack_clusters(labels, num, backend=b, validate=False)
        with pytest.raises(ValueError, match="labels has N = 0 tokens"):
            sk.pack_clusters(torch.zeros(2, 0, dtype=torch.long), num, backend=b)
    # below the value checks (CUDA, validate=False): out-of-range labels are unlabelled everywhere
    want = R._pack_clusters(labels, num, 6)
    valid = torch.where((labels >= 0) & (labels < num[:, None]), labels, -1)
    assert all(torch.equal(a, b) for a, b in zip(want, R._pack_clusters(valid, num, 6)))
    if sk._native.build_info()["loaded"]:
        got = OPS.native_pack_clusters(labels, num, 6)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------- 9. impossible sizes


def test_impossible_sizes_are_refused_before_allocating():
    results = _isolated("""
        labels = torch.zeros(4, 6, dtype=torch.long)
        num = torch.ones(4, dtype=torch.long)
        x = torch.randn(4, 6, 3)
        huge = 2**40
        for b in ("reference", "native"):
            case(f"pack {b}", lambda: sk.pack_clusters(labels, num, huge, backend=b))
            case(f"op pack {b}", lambda: O.pack_clusters(labels, num, huge, b))
        for b in ("reference", "native", "triton"):
            case(f"cluster {b}", lambda: sk.dpc_cluster(x, 2, max_clusters=huge, backend=b))
            case(f"select {b}", lambda: sk.select_centers(x[..., 0], max_clusters=huge, backend=b))
            # a (4, 2**40) view of one element: no memory, but an impossible number of slots
            wide = torch.zeros(1, 1, dtype=torch.long).expand(4, huge)
            case(f"assign {b}", lambda: sk.assign_to_centers(x, wide, num, backend=b))
        case("native_pack_clusters", lambda: O.native_pack_clusters(labels, num, huge))
    """)
    for name, r in results.items():
        if name.startswith("native_"):
            assert r["error"] == "NotImplementedError" or (r["kind"] == "RuntimeError" and "2^31 - 1" in r["message"]), (name, r)
        else:
            assert r.get("kind") == "ValueError" and re.search(r"(max_clusters|centers\.shape\[1\]) = 1099511627776 gives", r["message"]), (name, r)


def test_zero_and_none_bounds():
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="max_clusters must be >= 1, got 0"):
        sk.dpc_cluster(x, 2, max_clusters=0)
    with pytest.raises(ValueError, match="max_clusters must be >= 1, got 0"):
        SeTokConfig(16, 16, 8, 2, 16, max_clusters=0)
    assert sk.dpc_cluster(x, 2, max_clusters=None).centers.shape == (2, 6)


# ---------------------------------------------------------------- 6. ragged images


def _backend_or_skip(fn, backend, *args, **kwargs):
    try:
        return fn(*args, backend=backend, **kwargs)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("backend", DPC_BACKENDS)
@pytest.mark.parametrize("validate", [None, True, False])
def test_empty_and_short_images_are_not_errors(backend, validate):
    """k is clamped per image to its real tokens; an image without any gets no cluster."""
    torch.manual_seed(0)
    x = torch.randn(3, 10, 4)
    mask = prefix_mask([10, 0, 3], 10)  # image 1 empty, image 2 with 3 real tokens < k
    r = _backend_or_skip(sk.dpc_cluster, backend, x, 5, 0.5, 2, None, mask, validate=validate)
    assert r.num_clusters[1] == 0 and (r.labels[1] == -1).all() and (r.centers[1] == -1).all()
    assert (r.density[1] == 0).all() and (r.score[1] == 0).all() and (r.parent[1] == -1).all()
    alone = sk.dpc_cluster(x[2:, :3], 3, 0.5, 2, 10, backend="reference")
    assert torch.equal(r.labels[2, :3], alone.labels[0]) and torch.equal(r.num_clusters[2], alone.num_clusters[0])
    assert torch.equal(r.centers[2], alone.centers[0])
    density = _backend_or_skip(sk.knn_density, backend, x, 5, mask, validate=validate)
    torch.testing.assert_close(density[2, :3], alone.density[0], rtol=1e-5, atol=1e-6)


def test_tokenizer_with_an_empty_image_and_short_images_on_cpu():
    torch.manual_seed(0)
    config = SeTokConfig(12, 16, 8, 2, 16, 1, 1, k=64, min_clusters=3, max_clusters=5, block="pre_norm")
    tok = SeTokTokenizer(config).eval()
    features = torch.randn(3, 16, 12)
    mask = prefix_mask([16, 0, 2], 16)
    out = tok(features, mask)
    assert out.num_clusters[1] == 0 and (out.labels[1] == -1).all()
    padded, key_mask = out.padded()
    assert not key_mask[1].any() and (padded[1] == 0).all()
    assert key_mask[2].sum() == out.num_clusters[2] <= 2
    for b in (0, 2):  # the empty image changes nothing for the others
        alone = tok(features[b : b + 1], mask[b : b + 1])
        torch.testing.assert_close(padded[b], alone.padded()[0][0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 8. NaN / Inf, strides, degenerate sizes


def test_nan_or_inf_in_one_image_leaves_the_others_alone():
    results = _isolated("""
        torch.manual_seed(0)
        x = torch.randn(3, 12, 4)
        q = torch.randn(12, 2, 8)
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[1, 3, 2] = bad
            y[1, 7] = bad
            for b in ("reference", "native", "triton"):
                def same(b=b):
                    clean = sk.dpc_cluster(x, 4, 0.5, 3, backend=b)
                    dirty = sk.dpc_cluster(y, 4, 0.5, 3, backend=b)
                    return all(bool(torch.equal(c[[0, 2]], d[[0, 2]])) for c, d in zip(clean, dirty))
                case(f"dpc_cluster {bad} {b}", same)
            for b in ("reference", "native"):
                rows = x.flatten(0, 1)
                dirty_rows = rows.clone()
                dirty_rows[4] = bad
                seg = torch.tensor([0, 5, 9, 24], dtype=torch.int32)
                case(f"segment_mean {bad} {b}", lambda: bool(torch.equal(
                    sk.segment_mean(rows, seg, backend=b)[1:], sk.segment_mean(dirty_rows, seg, backend=b)[1:])))
            for b in ("reference", "torch", "triton"):
                dirty_q = q.clone()
                dirty_q[2] = bad
                case(f"attention {bad} {b}", lambda: bool(torch.equal(
                    sk.varlen_attention(q, q, q, cu, backend=b)[5:], sk.varlen_attention(dirty_q, dirty_q, dirty_q, cu, backend=b)[5:])))
        case("check_finite", lambda: sk.dpc_cluster(y, 4, check_finite=True))
    """)
    for name, r in results.items():
        if name == "check_finite":
            assert r.get("kind") == "ValueError" and "x holds NaN or Inf" in r["message"], r
        elif r["error"] != "BackendUnavailableError":
            assert r["error"] is None and r["value"] is True, f"{name}: {r}"


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_nan_and_inf_scores_select_the_same_centres_everywhere(backend):
    """NaN never passes the threshold, so it must not take a slot from a score that does."""
    score = torch.tensor([[0.7576, math.nan, 0.4031, 0.7347, 0.0293, -math.inf, math.nan, math.nan, 0.5695],
                          [math.inf, 0.2, math.nan, -math.inf, 0.1, 0.3, math.nan, 0.0, -0.5]])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 0] = False
    got = _backend_or_skip(sk.select_centers, backend, score, 0.5, 2, 3, mask)
    assert got[0][0].tolist() == [0, 3, 8], "the three scores above 0.5, NaN aside"
    for threshold, min_clusters, max_clusters in ((0.5, 2, 3), (0.5, 2, None), (2.0, 3, None), (math.inf, 2, 4)):
        want = sk.select_centers(score, threshold, min_clusters, max_clusters, mask, backend="reference")
        got = _backend_or_skip(sk.select_centers, backend, score, threshold, min_clusters, max_clusters, mask)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threshold, min_clusters, max_clusters, got, want)


def test_nan_features_in_one_image_leave_the_other_images_tokens_alone():
    torch.manual_seed(0)
    tok = _tiny().eval()
    features = torch.randn(3, 16, 12)
    dirty = features.clone()
    dirty[1, 5] = math.nan
    dirty[1, 9, 2] = math.inf
    clean_out, dirty_out = tok(features), tok(dirty)
    (clean, _), (other, _) = clean_out.padded(), dirty_out.padded()
    assert torch.equal(clean[[0, 2]], other[[0, 2]])
    assert torch.equal(clean_out.labels[[0, 2]], dirty_out.labels[[0, 2]])


@pytest.mark.parametrize("backend", DPC_BACKENDS)
def test_strided_inputs_give_the_results_of_contiguous_ones(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5)
    mask = torch.rand(2, 9) > 0.3
    xs, ms = strided(x), strided(mask)
    assert not xs.is_contiguous() and not ms.is_contiguous()
    want = sk.dpc_cluster(x, 3, 0.5, 2, 6, mask, backend="reference")
    got = _backend_or_skip(sk.dpc_cluster, backend, xs, 3, 0.5, 2, 6, ms)
    plain = sk.dpc_cluster(x, 3, 0.5, 2, 6, mask, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    assert torch.equal(got.labels, want.labels)
    labels, num = strided(want.labels), want.num_clusters
    if backend != "triton":
        p = sk.pack_clusters(labels, num, 6, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(p, sk.pack_clusters(want.labels, num, 6, backend=backend)))
        rows = torch.randn(18, 5)
        cu = p.cu_seqlens
        torch.testing.assert_close(sk.segment_mean(strided(rows), cu, backend=backend), sk.segment_mean(rows, cu, backend=backend))
    labels_s = _backend_or_skip(sk.assign_to_centers, backend, xs, strided(want.centers), num, ms)
    assert torch.equal(labels_s, want.labels)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_strided_attention_inputs(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    cu = offsets([3, 4])
    want = sk.varlen_attention(q, k, v, cu, backend=backend)
    got = sk.varlen_attention(strided(q), strided(k), strided(v), strided(cu[None])[0], backend=backend)
    torch.testing.assert_close(got, want)


def test_degenerate_sizes_on_every_backend():
    results = _isolated("""
        for b in ("reference", "native", "triton"):
            for B, N in ((0, 5), (2, 1), (0, 1)):
                x = torch.randn(B, N, 3)
                def run(x=x, b=b):
                    r = sk.dpc_cluster(x, 1, 0.5, 2, backend=b)
                    return [list(t.shape) for t in r] + [r.labels.tolist(), r.num_clusters.tolist()]
                case(f"dpc_cluster B={B} N={N} {b}", run)
            case(f"k = 0 {b}", lambda: sk.dpc_cluster(torch.randn(2, 4, 3), 0, backend=b))
            case(f"k > N {b}", lambda: sk.dpc_cluster(torch.randn(2, 4, 3), 5, backend=b))
            case(f"N = 0 {b}", lambda: sk.dpc_cluster(torch.randn(2, 0, 3), 1, backend=b))
            case(f"C = 0 {b}", lambda: sk.dpc_cluster(torch.randn(2, 4, 0), 1, backend=b))
        for b in ("reference", "native"):
            case(f"pack B=0 {b}", lambda: [list(t.shape) for t in sk.pack_clusters(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long), backend=b)])
            case(f"segment_mean T=0 {b}", lambda: list(sk.segment_mean(torch.randn(0, 3), torch.zeros(3, dtype=torch.int32), backend=b).shape))
        for b in ("reference", "torch", "triton"):
            q = torch.randn(0, 2, 8)
            case(f"attention T=0 {b}", lambda: list(sk.varlen_attention(q, q, q, torch.zeros(2, dtype=torch.int32), backend=b).shape))
    """)
    for name, r in results.items():
        if r["error"] == "BackendUnavailableError":
            continue
        if name.startswith("dpc_cluster"):
            B, N = (int(v) for v in re.findall(r"=(\d+)", name))
            assert r["error"] is None, (name, r)
            shapes, labels, num = r["value"][:7], r["value"][7], r["value"][8]
            assert shapes == [[B, N], [B], [B, N], [B, N], [B, N], [B, N], [B, N]], (name, shapes)
            assert labels == [[0] * N] * B and num == [1] * B, (name, r)
        elif name.startswith("k = 0"):
            assert r.get("kind") == "ValueError" and "k must be >= 1, got 0" in r["message"], (name, r)
        elif name.startswith("k > N"):
            assert r.get("kind") == "ValueError" and "k = 5 exceeds the number of tokens N = 4" in r["message"], (name, r)
        elif name.startswith(("N = 0", "C = 0")):
            assert r.get("kind") == "ValueError" and re.search(r"x has (N|C) = 0", r["message"]), (name, r)
        elif name.startswith("pack"):
            assert r["value"] == [[0], [1], [1], []], (name, r)
        elif name.startswith("segment_mean"):
            assert r["value"] == [2, 3], (name, r)
        else:
            assert r["value"] == [0, 2, 8], (name, r)


# ---------------------------------------------------------------- 5. model classes


def _tiny(**kw):
    fields = dict(input_dim=12, hidden_dim=16, token_dim=8, num_heads=2, mlp_dim=16, inner_layers=1, inter_layers=1,
                  k=3, min_clusters=2, max_clusters=5, block="pre_norm")
    return SeTokTokenizer(SeTokConfig(**{**fields, **kw}))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda t: t(torch.randn(16, 12)), ValueError, r"features must have shape \(B, N, 12\), got \(16, 12\)"),
        (lambda t: t(torch.randn(2, 16, 12).tolist()), TypeError, "features must be a torch.Tensor"),
        (lambda t: t(torch.randint(0, 3, (2, 16, 12))), TypeError, "features must be a floating tensor"),
        (lambda t: t(torch.randn(2, 0, 12), grid=(0, 0)), ValueError, "features has N = 0 patches"),
        (lambda t: t(torch.randn(2, 16, 12), grid=(-4, -4)), ValueError, r"grid\[0\] must be >= 1, got -4"),
        (lambda t: t(torch.randn(2, 16, 12), grid=(4.0, 4)), TypeError, r"grid\[0\] must be an int, got float"),
        (lambda t: t(torch.randn(2, 16, 12), grid=16), TypeError, r"grid must be a pair \(h, w\)"),
        (lambda t: t(torch.randn(2, 16, 12), grid=(2, 4)), ValueError, "grid 2x4 does not match N = 16"),
        (lambda t: t(torch.randn(2, 16, 12, dtype=torch.float64)), TypeError, "features are torch.float64 but the SeTokTokenizer weights are torch.float32"),
        (lambda t: t(torch.randn(2, 16, 12), torch.ones(2, 15, dtype=torch.bool)), ValueError, r"mask must have shape \(B, N\) = \(2, 16\)"),
    ],
)
def test_tokenizer_refuses_bad_input_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call(_tiny())


@pytest.mark.parametrize(
    "fields,error,message",
    [
        (dict(num_heads=0), ValueError, "num_heads must be >= 1, got 0"),
        (dict(num_heads=3), ValueError, r"dim \(16\) must be divisible by num_heads \(3\)"),
        (dict(num_heads=2.0), TypeError, "num_heads must be an int, got float"),
        (dict(k=0), ValueError, "k must be >= 1, got 0"),
        (dict(max_clusters=0), ValueError, "max_clusters must be >= 1, got 0"),
        (dict(min_clusters=-1), ValueError, "min_clusters must be >= 1"),
        (dict(hidden_dim=0), ValueError, "hidden_dim must be >= 1"),
        (dict(inner_layers=-1), ValueError, "inner_layers must be >= 0"),
        (dict(threshold=math.nan), ValueError, "threshold must not be NaN"),
        (dict(dropout=1.5), ValueError, r"dropout must be a float in \[0, 1\)"),
        (dict(densest_delta="max"), ValueError, "densest_delta must be one of"),
    ],
)
def test_config_refuses_bad_fields_by_name(fields, error, message):
    with pytest.raises(error, match=message):
        _tiny(**fields)


def test_model_parts_refuse_bad_input_by_name():
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        VarlenAttention(16, 0)
    with pytest.raises(ValueError, match=r"grid\[1\] must be >= 1"):
        SeTokDetokenizer(8, 16, 2, 16, 1, (4, 0), 3)
    decoder = MaskDecoder(8, 12, 16, 2)
    tokens, cu = torch.randn(4, 8), offsets([2, 2])
    with pytest.raises(ValueError, match=r"features must have shape \(B, N, 12\)"):
        decoder(tokens, cu, torch.randn(16, 12))
    with pytest.raises(ValueError, match="not a square"):
        decoder(tokens, cu, torch.randn(2, 15, 12))
    with pytest.raises(ValueError, match=r"cu_clusters must have B \+ 1 = 4 offsets for the 3 images"):
        decoder(tokens, cu, torch.randn(3, 16, 12))
    detok = SeTokDetokenizer(8, 16, 2, 16, 1, (4, 4), 3)
    with pytest.raises(ValueError, match=r"tokens must have shape \(S, 8\), got \(8,\)"):
        detok(tokens[0], cu)
    with pytest.raises(ValueError, match="cu_clusters must be 1-D"):
        detok(tokens, cu[None])
    assert detok(tokens[:0], torch.zeros(1, dtype=torch.int32)).shape == (0, 16, 3)


def test_state_dict_missing_a_key_is_named():
    from tests._official_loop import random_official_state_dict

    sd = random_official_state_dict(16, 24, token_dim=8, dtype=torch.float32)
    for key in ("out.weight", "inter_encoder.mlp.fc1.weight"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(ValueError, match=f"missing {re.escape(key)}"):
            SeTokTokenizer.from_official_state_dict(broken, num_heads=2)
    broken = {k: v for k, v in sd.items() if k != "inner_encoder.layers.1.1.qkv.bias"}
    tok = SeTokTokenizer(SeTokConfig(16, 16, 8, 2, 24))
    with pytest.raises(ValueError, match=r"misses 1 key\(s\): inner_encoder\.layers\.1\.1\.qkv\.bias"):
        tok.load_official_state_dict(broken)


# ---------------------------------------------------------------- fuzz: every backend vs the reference


def _outcome(fn):
    """("ok", outputs) or ("error", type name, message); None when the backend declines the call."""
    try:
        out = fn()
    except BackendUnavailableError:
        return None
    except (ValueError, TypeError) as exc:  # the package's clear errors; anything else fails the test
        return ("error", type(exc).__name__, str(exc))
    return ("ok", tuple(out) if isinstance(out, tuple) else (out,))


def _agree(op: str, backends, call) -> None:
    want = _outcome(lambda: call("reference"))
    assert want is not None
    event(f"{op}: {want[0]}")  # --hypothesis-show-statistics: how many examples got past the checks
    for backend in backends:
        got = _outcome(lambda: call(backend))
        if got is None:
            continue
        assert got[0] == want[0], f"{op} {backend}: {got[:3]} but the reference {want[:3]}"
        if want[0] == "error":
            assert got[1:] == want[1:], f"{op} {backend}: {got[1:]} but the reference {want[1:]}"
            continue
        for i, (a, b) in enumerate(zip(got[1], want[1])):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{op} {backend} output {i}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
            if a.is_floating_point():
                # the same computation in the same dtype: apart by at most one rounding step
                tol = TOLERANCE[b.dtype].rtol
                torch.testing.assert_close(a, b, equal_nan=True, rtol=tol, atol=tol, msg=f"{op} {backend} output {i}")
            else:
                assert torch.equal(a, b), f"{op} {backend} output {i}: {a} vs {b}"


# small and derandomized: the same examples every run (Triton runs in its interpreter on the CPU)
_FUZZ = settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def _mostly(good, *bad):
    """``good``, or one of the hostile values ``bad`` about one time in ten.

    (The hostile branch is an inner value: hypothesis favours the ends of a range.)
    """
    return st.integers(0, 9).flatmap(lambda i: st.sampled_from(bad) if i == 3 else good)


@st.composite
def _cluster_case(draw):
    B, N, C = draw(st.integers(0, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(B, N, C, generator=g).to(draw(_DTYPES))
    if draw(st.booleans()):
        x = strided(x)
    mask = draw(st.sampled_from([None, "random", "empty image", "short"]))
    if mask == "random":
        mask = torch.rand(B, N, generator=g) > 0.3
    elif mask == "empty image":
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[:1] = False
    elif mask == "short":
        mask = torch.arange(N)[None, :].expand(B, N) < 2
    return dict(
        x=x, mask=mask, k=draw(_mostly(st.integers(1, N), 0, N + 1)),
        threshold=draw(_mostly(st.sampled_from([0.5, 0.0, -1.0, math.inf]), math.nan)),
        min_clusters=draw(_mostly(st.integers(1, 4), 0)),
        max_clusters=draw(_mostly(st.sampled_from([None, 1, 3, N + 2]), 0, 2**40)),
        densest_delta=draw(_mostly(st.sampled_from(["column_max", "global_max"]), "bogus")),
        # where select_centers gets NaN, Inf, -Inf scores (mostly nowhere)
        poison=torch.randperm(max(B * N, 1), generator=g)[: draw(st.sampled_from([0, 1, 3]))],
    )


@pytest.mark.parametrize(
    "op", ["dpc_cluster", "knn_density", "density_delta", "select_centers", "assign_to_centers", "pairwise_distance"]
)
@_FUZZ
@given(case=_cluster_case())
def test_fuzz_clustering_ops_agree_with_the_reference(op, case):
    x, mask = case["x"], case["mask"]
    ref = sk.dpc_cluster(x, max(1, min(case["k"], x.shape[1])), 0.5, 2, None, mask, backend="reference")
    score = ref.score.clone()
    if score.numel():
        poison = case["poison"]
        score.view(-1)[poison] = torch.tensor([math.nan, math.inf, -math.inf], dtype=score.dtype)[: len(poison)]
    calls = {
        "dpc_cluster": lambda b: sk.dpc_cluster(x, case["k"], case["threshold"], case["min_clusters"], case["max_clusters"], mask, case["densest_delta"], backend=b),
        "knn_density": lambda b: sk.knn_density(x, case["k"], mask, backend=b),
        "density_delta": lambda b: sk.density_delta(x, ref.density, mask, case["densest_delta"], backend=b),
        "select_centers": lambda b: sk.select_centers(score, case["threshold"], case["min_clusters"], case["max_clusters"], mask, backend=b),
        "assign_to_centers": lambda b: sk.assign_to_centers(x, ref.centers, ref.num_clusters, mask, backend=b),
        "pairwise_distance": lambda b: sk.pairwise_distance(x, mask, backend=b),
    }
    _agree(op, DPC_BACKENDS, calls[op])


@st.composite
def _offsets(draw, T: int):
    S = draw(st.integers(0, 4))
    offsets = [0] + sorted(draw(st.lists(st.integers(0, T), min_size=S, max_size=S)))
    hostile = draw(_mostly(st.just(None), "past the end", "decreasing", "not from 0"))
    if hostile == "past the end":
        offsets[-1] = T + draw(st.integers(1, 3))
    elif hostile == "decreasing" and len(offsets) > 2:
        offsets[1], offsets[2] = offsets[2] + 1, offsets[1]
    elif hostile == "not from 0":
        offsets[0] = 1
    return torch.tensor(offsets, dtype=draw(st.sampled_from([torch.int32, torch.int64])))


@st.composite
def _packing_case(draw):
    B, N = draw(st.integers(0, 3)), draw(_mostly(st.integers(1, 6), 0))
    M = draw(_mostly(st.sampled_from([None, 1, 3, 8]), 0, 2**40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    num = torch.randint(0, (M or N) + 1, (B,), generator=g)
    labels = (torch.rand(B, N, generator=g) * (num[:, None] + 1)).long() - 1  # in [-1, num[b])
    if draw(_mostly(st.just(False), True)):
        labels = labels + 2  # some labels >= num_clusters
    T = draw(st.integers(0, 8))
    dtype = draw(_DTYPES)
    weighted = draw(st.booleans())
    return dict(labels=labels, num=num, M=M, x=torch.randn(T, 3, generator=g).to(dtype),
                feats=torch.randn(B, N, 3, generator=g).to(dtype),
                weight=torch.rand(T, generator=g) if weighted else None,
                token_weight=torch.rand(B, N, generator=g) if weighted else None,
                eps=draw(_mostly(st.sampled_from([0.0, 1e-6]), -1.0, math.nan)),
                cu=draw(_offsets(T)), validate=draw(st.sampled_from([None, False, True])))


@pytest.mark.parametrize("op", ["pack_clusters", "segment_mean", "merge_clusters", "pad_segments"])
@_FUZZ
@given(case=_packing_case())
def test_fuzz_packing_ops_agree_with_the_reference(op, case):
    v = case["validate"]
    calls = {
        "pack_clusters": lambda b: sk.pack_clusters(case["labels"], case["num"], case["M"], backend=b, validate=v),
        "segment_mean": lambda b: sk.segment_mean(case["x"], case["cu"], weight=case["weight"], eps=case["eps"], backend=b, validate=v),
        "merge_clusters": lambda b: sk.merge_clusters(
            case["feats"], case["labels"], case["num"], case["M"], weight=case["token_weight"], eps=case["eps"], backend=b, validate=v),
        # one implementation: the check runs before it, or nothing does
        "pad_segments": lambda b: sk.pad_segments(case["x"], case["cu"], case["M"] if case["M"] is not None else 4, validate=v),
    }
    _agree(op, ("native",), calls[op])


@st.composite
def _attention_case(draw):
    Tq, Tk = draw(st.integers(0, 7)), draw(st.integers(0, 7))
    H, D = draw(_mostly(st.integers(1, 2), 0)), draw(_mostly(st.sampled_from([1, 8, 16]), 0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=dtype) for T in (Tq, Tk, Tk))
    cu_q = draw(_offsets(Tq))
    cu_k = draw(st.sampled_from([None, "same length"]))
    if cu_k is not None:
        S = cu_q.numel() - 1
        cu_k = torch.tensor([0] + sorted(draw(st.lists(st.integers(0, Tk), min_size=S, max_size=S))), dtype=cu_q.dtype)
    return dict(q=q, k=q if cu_k is None else k, v=q if cu_k is None else v, cu_q=cu_q, cu_k=cu_k,
                scale=draw(_mostly(st.sampled_from([None, 0.5]), math.inf)))


@settings(_FUZZ, max_examples=30)
@given(_attention_case())
def test_fuzz_attention_agrees_with_the_reference(case):
    def call(b):
        return sk.varlen_attention(case["q"], case["k"], case["v"], case["cu_q"], case["cu_k"], scale=case["scale"], backend=b, validate=False)

    _agree("varlen_attention", ATTN_BACKENDS, call)
