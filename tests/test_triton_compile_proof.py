"""The compile proof (setok_kernels/compile_proof.py): its case grid reaches every kernel of every
setok_kernels.triton_* module, and it compiles.

Kernels are recorded and compiled outside Triton's interpreter, so these
checks run in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import importlib, json, pkgutil
from triton.runtime.jit import JITFunction
import setok_kernels
from setok_kernels import compile_proof

launches = compile_proof.record_launches()
modules = [importlib.import_module(f"setok_kernels.{m.name}") for m in pkgutil.iter_modules(setok_kernels.__path__)
           if m.name.startswith("triton_")]
kernels = sorted(
    name for module in modules for name, obj in vars(module).items()
    if isinstance(obj, JITFunction) and name.endswith("_kernel")
)
# one small config compiled for sm_90: the machinery works with this triton
small = [l for l in launches if l.fn.__name__ == "_sq_norms_kernel"][:1]
result = compile_proof.compile_all(90, small)[0]
print(json.dumps(dict(
    kernels=kernels,
    recorded=sorted({l.fn.__name__ for l in launches}),
    errors=compile_proof._RECORD_ERRORS,
    result=dict(kernel=result.kernel, regs=result.regs, problems=result.problems, error=result.error),
)))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SETOK_COMPILE_PROOF_CACHE"] = ""  # compile for real
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path_factory.mktemp("proof"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_is_launched_by_the_case_grid(probe):
    assert probe["errors"] == []
    assert probe["kernels"], "no Triton kernels found"
    assert set(probe["kernels"]) <= set(probe["recorded"]), set(probe["kernels"]) - set(probe["recorded"])


def test_a_recorded_launch_compiles_for_sm90(probe):
    result = probe["result"]
    assert result["kernel"] == "_sq_norms_kernel"
    assert result["error"] is None and result["problems"] == []
    assert result["regs"] > 0


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
