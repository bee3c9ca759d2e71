"""The compile proof (setok_kernels/compile_proof.py): its case grid reaches every Triton kernel of
setok_kernels, per target it records the launch configs the dispatcher picks for that architecture
family, and it compiles.

Kernels are recorded and compiled outside Triton's interpreter, so these
checks run in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import importlib, json, pkgutil
import torch
from triton.runtime.jit import JITFunction
import setok_kernels
from setok_kernels import compile_proof, triton_attention, triton_dpc

recorded, picks = {}, {}
for arch in (80, 90):
    launches = compile_proof.record_launches(arch)
    recorded[arch] = sorted({l.fn.__name__ for l in launches})
    knn = [l.kwargs for l in launches if l.fn.__name__ == "_knn_density_kernel"]
    fwd = [l.kwargs for l in launches if l.fn.__name__ == "_fwd_kernel" and l.args[0].dtype.itemsize == 2]
    picks[arch] = dict(
        knn=sorted({(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_C"], k["num_warps"], k["num_stages"], k["EXACT"]) for k in knn}),
        fwd=sorted({(k["HEAD_DIM"], k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_D"], k["num_warps"], k["num_stages"]) for k in fwd}),
    )
    errors = list(compile_proof._RECORD_ERRORS)
modules = []
for m in pkgutil.iter_modules(setok_kernels.__path__):
    if m.name not in ("_C", "info", "__main__"):  # _C: the native extension
        modules.append(importlib.import_module(f"setok_kernels.{m.name}"))
kernels = sorted({
    name for module in modules for name, obj in vars(module).items()
    if isinstance(obj, JITFunction) and name.endswith("_kernel")
})
# the attention tables the dispatcher holds, per family, for the recorded head dims
tables = {arch: sorted({(D, *c) for D in {f[0] for f in picks[arch]["fwd"]}
                        for c in triton_attention.gpu_configs("fwd", D, torch.bfloat16, arch)})
          for arch in (80, 90)}
dpc = {arch: [triton_dpc._TILES[arch][2, False]["BLOCK_C"], triton_dpc._TILES[arch][4, False]["BLOCK_C"]] for arch in (80, 90)}
# one small config compiled for sm_90, and the --only filter
small = list({l.args[0].dtype: l for l in launches if l.fn.__name__ == "_sq_norms_kernel"}.values())
result = compile_proof.compile_all(90, small)[0]
only = compile_proof.compile_all(90, small, only="^_sq_norms_kernel bf16 ")
print(json.dumps(dict(
    kernels=kernels, recorded=recorded, errors=errors, picks=picks, tables=tables, dpc=dpc,
    result=dict(kernel=result.kernel, regs=result.regs, problems=result.problems, error=result.error),
    only=[r.config for r in only],
)))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SETOK_COMPILE_PROOF_CACHE"] = ""  # compile for real
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path_factory.mktemp("proof"), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_is_launched_by_the_case_grid(probe):
    assert probe["errors"] == []
    assert probe["kernels"], "no Triton kernels found"
    for arch, recorded in probe["recorded"].items():
        assert set(probe["kernels"]) <= set(recorded), (arch, set(probe["kernels"]) - set(recorded))


def test_the_proof_records_each_architectures_own_configs(probe):
    """Per target, the launches are the dispatcher's picks for that family: the DPC tiles of
    triton_dpc._TILES and the attention autotuner's candidates of gpu_configs(..., family)."""
    for arch in ("80", "90"):
        block_c = {c for _, _, c, _, _, exact in probe["picks"][arch]["knn"] if not exact}
        assert set(probe["dpc"][arch]) <= block_c
        assert [tuple(f) for f in probe["picks"][arch]["fwd"]] == [tuple(t) for t in probe["tables"][arch]]
    assert probe["picks"]["80"]["knn"] != probe["picks"]["90"]["knn"]
    assert probe["picks"]["80"]["fwd"] != probe["picks"]["90"]["fwd"]


def test_a_recorded_launch_compiles_for_sm90(probe):
    result = probe["result"]
    assert result["kernel"] == "_sq_norms_kernel"
    assert result["error"] is None and result["problems"] == []
    assert result["regs"] > 0


def test_only_compiles_the_matching_rows(probe):
    assert len(probe["only"]) == 1 and probe["only"][0].startswith("bf16 ")


def test_occupancy_follows_the_cuda_rules():
    from setok_kernels import compile_proof as cp

    # 8 warps x 128 regs: 32 KiB of registers per block, two blocks fill the 64 KiB file
    assert cp._occupancy(128, 0, 8, cp._LIMITS[90]) == 16 / 64
    # shared memory bound: 100 KiB (+1 KiB reserved) per block, two fit in sm_90's 228 KiB
    assert cp._occupancy(32, 100 * 1024, 4, cp._LIMITS[90]) == 8 / 64
    # sm_80 has 164 KiB: one fits
    assert cp._occupancy(32, 100 * 1024, 4, cp._LIMITS[80]) == 4 / 64
    # registers are allocated 256 per warp: 33 regs count as 40, 51 warps fit, so 12 blocks of 4
    assert cp._occupancy(33, 0, 4, cp._LIMITS[90]) == 48 / 64


def test_arch_names():
    from setok_kernels import compile_proof as cp

    assert [cp.parse_arch(a) for a in ("sm_90", "sm_90a", "80")] == [90, 90, 80]
    with pytest.raises(ValueError, match="sm_75"):
        cp.parse_arch("sm_75")


@pytest.mark.parametrize("capability, family", [((9, 0), 90), ((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((10, 0), 80),
                                                ((12, 0), 80)])
def test_arch_family_of_a_device(monkeypatch, capability, family):
    """Compute capability 9.x takes the sm_90 (wgmma) tables, every other GPU the sm_80 (mma.sync) ones."""
    from setok_kernels import _arch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert _arch.family(torch.device("cuda", 0)) == family
    assert _arch.family(torch.device("cpu")) == 90
    with _arch.target(80):
        assert _arch.family(torch.device("cuda", 0)) == _arch.family(torch.device("cpu")) == 80
    with _arch.target(90):
        assert _arch.family(torch.device("cuda", 0)) == 90
    assert _arch.family(torch.device("cuda", 0)) == family
