"""Compile every csrc/cuda/*.cu for sm_90 to an object file: no link, no GPU.

Catches CUDA compile errors on machines whose torch is CPU-only (its include
directory still ships the ATen/c10 CUDA headers). Flags follow setup.py and
torch's own CUDAExtension defaults. Exits non-zero on the first failure,
printing nvcc's output.

Knobs: NVCC (compiler path; default CUDA_HOME/bin/nvcc or nvcc on PATH),
SETOK_CHECK_ARCH (default 90).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc() -> str:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        sys.exit("check_cuda: nvcc not found (set NVCC or CUDA_HOME)")
    return found


def _flags() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    arch = os.environ.get("SETOK_CHECK_ARCH", "90")
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [])
    return [
        "-c",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17",
        "-O3",
        "-lineinfo",
        "-DSETOK_WITH_CUDA",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        # a CPU torch ships c10/cuda headers but not their generated
        # cuda_cmake_macros.h (export macros only: irrelevant without a link)
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-Xcompiler",
        "-fPIC",
        *common,
        f"-I{inc}",
        f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}",
        f"-I{sysconfig.get_paths()['include']}",
    ]


def main() -> int:
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        sys.exit("check_cuda: no csrc/cuda/*.cu found")
    out_dir = os.path.join(ROOT, "build", "check-cuda")
    os.makedirs(out_dir, exist_ok=True)
    nvcc, flags = _nvcc(), _flags()
    start = time.perf_counter()
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        t0 = time.perf_counter()
        proc = subprocess.run([nvcc, *flags, src, "-o", obj], capture_output=True, text=True)
        rel = os.path.relpath(src, ROOT)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"check_cuda: FAILED to compile {rel} (nvcc exit {proc.returncode})", file=sys.stderr)
            return 1
        if proc.stderr.strip():  # warnings
            print(proc.stderr, file=sys.stderr)
        print(f"check_cuda: {rel} -> {os.path.relpath(obj, ROOT)} ok ({time.perf_counter() - t0:.1f} s)")
    print(f"check_cuda: {len(sources)} file(s) compiled for sm_{os.environ.get('SETOK_CHECK_ARCH', '90')} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
