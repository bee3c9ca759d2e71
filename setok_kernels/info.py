"""``python -m setok_kernels.info``: what runs here, and why the rest does not.

Prints versions, devices, how the native library was built (the record
setup.py wrote: toolkit found, parts built, architectures) and its state now,
the CUDA toolkit visible now, and for every op each backend in ``auto`` order
with the reason it declines a typical call (or "ok"). ``--json`` prints the
same as JSON. ``--compile sm_90 sm_80`` compiles every Triton launch
configuration for those GPUs instead (setok_kernels/compile_proof.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

import torch

import setok_kernels

from . import _backends, _cuda_toolkit
from ._backends import CallInfo

_BUILD_RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")

# Static facts of a typical call, per op family, for the support report.
_TYPICAL = dict(B=8, N=576, C=1152, k=64, M=576, S=512, head_dim=128, heads=2, Tq=4608, Tk=4608, max_seqlen_q=128, max_seqlen_k=128)


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown")


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def _dtype_for(op: str, device: str) -> torch.dtype:
    if op == "pack_clusters":
        return torch.int64
    return torch.bfloat16 if device == "cuda" else torch.float32


def _build_record() -> Optional[dict]:
    try:
        with open(_BUILD_RECORD) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _toolkit() -> dict:
    toolkit = _cuda_toolkit.find()
    return {
        "home": toolkit.home,
        "source": toolkit.source,
        "nvcc": _cuda_toolkit.nvcc_version(toolkit.nvcc) if toolkit.nvcc else None,
        "skipped": [f"{path}: {why}" for path, why in toolkit.rejected],
    }


def collect() -> dict:
    native = None
    if "setok_kernels._native" in sys.modules:
        native = sys.modules["setok_kernels._native"].build_info()
    report = {
        "setok": setok_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "xformers": _version("xformers"),
        "devices": [torch.cuda.get_device_name(0) if d == "cuda" else platform.processor() or "cpu" for d in _devices()],
        "env": {k: os.environ[k] for k in ("SETOK_BACKEND", "SETOK_ATTN_BACKEND", "TRITON_INTERPRET") if k in os.environ},
        "build": _build_record(),
        "cuda_toolkit": _toolkit(),
        "native": native,
        "ops": {},
    }
    for op in _backends.registered_ops():
        per_device = {}
        for device in _devices():
            call = CallInfo(torch.device(device), _dtype_for(op, device), op.endswith("_backward"), dict(_TYPICAL))
            per_device[device] = [
                {"backend": name, "status": "ok" if reason is None else reason}
                for name, reason in _backends.explain(op, call)
            ]
        report["ops"][op] = per_device
    return report


def _print(report: dict) -> None:
    print(f"setok {report['setok']}  python {report['python']}  torch {report['torch']}"
          f" (cuda {report['torch_cuda'] or 'none'})  triton {report['triton'] or 'not installed'}")
    print(f"flash-attn {report['flash_attn'] or 'not installed'}  xformers {report['xformers'] or 'not installed'}")
    print(f"devices: {', '.join(report['devices'])}")
    if report["env"]:
        print("environment: " + ", ".join(f"{k}={v}" for k, v in report["env"].items()))
    build = report["build"]
    if build is None:
        print("build: no record (setok_kernels/_build.json: install with pip install --no-build-isolation -e .)")
    else:
        print("build: " + ", ".join(f"{k}={v}" for k, v in build.items() if v not in (None, [])))
    toolkit = report["cuda_toolkit"]
    print(f"CUDA toolkit now: {toolkit['home'] or 'none'} ({toolkit['source']}"
          + (f", nvcc {toolkit['nvcc']}" if toolkit["nvcc"] else "") + ")")
    for skipped in toolkit["skipped"]:
        print(f"  skipped {skipped}")
    native = report["native"]
    if native is None:
        print("native library: module not present")
    else:
        print("native library: " + ", ".join(f"{k}={v}" for k, v in native.items()))
    for op, per_device in report["ops"].items():
        print(f"\n{op}")
        for device, rows in per_device.items():
            chosen = next((r["backend"] for r in rows if r["status"] == "ok"), "none")
            print(f"  {device}: auto -> {chosen}")
            for row in rows:
                print(f"    {row['backend']:<11} {row['status']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="setok info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--compile", nargs="+", metavar="ARCH",
                        help="compile every Triton launch config for these targets (e.g. sm_90 sm_80), no GPU needed")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compiles for --compile (default: all cores)")
    parser.add_argument("--only", metavar="REGEX",
                        help="with --compile: compile only the table rows ('kernel config') matching this regex")
    args = parser.parse_args(argv)
    if args.compile:
        from . import compile_proof

        return compile_proof.main(args.compile, args.jobs, args.only)
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
