"""Compile every csrc/cuda/*.cu for sm_80 and sm_90, and link against cudart: no GPU.

Catches CUDA compile errors on machines whose torch is CPU-only (its include
directory still ships the ATen/c10 CUDA headers). Flags follow setup.py and
torch's own CUDAExtension defaults. The toolkit is the one setup.py would
build with (setok_kernels/_cuda_toolkit.py); the objects are then linked
into a shared library with ``-L<toolkit>/lib64 -lcudart``, as torch's build
links the extension (torch's own symbols stay undefined: a shared library
may leave them to the loader), which catches a toolkit that compiles but
cannot link. Exits non-zero on the first failure, printing the tool's output.

Knobs: NVCC (compiler path; default: the resolved toolkit's nvcc),
SETOK_CHECK_ARCH (default "80 90").
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


def _toolkit():
    """setok_kernels/_cuda_toolkit.py by path, as setup.py loads it (no package import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_setok_cuda_toolkit", os.path.join(ROOT, "setok_kernels", "_cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    found = module.find()
    if found.home is None:
        sys.exit(f"check_cuda: no CUDA toolkit: {found.describe()}")
    print(f"check_cuda: CUDA toolkit {found.describe()}")
    return found


def _archs() -> list[str]:
    return os.environ.get("SETOK_CHECK_ARCH", "80 90").replace(",", " ").split()


def _flags() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [])
    return [
        "-c",
        *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in _archs()),
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
    toolkit = _toolkit()
    nvcc, flags = os.environ.get("NVCC") or toolkit.nvcc, _flags()
    start = time.perf_counter()
    objects = []
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
        objects.append(obj)
    lib = os.path.join(out_dir, "libcheck.so")
    lib_dir = next((d for d in ("lib64", "lib") if os.path.isdir(os.path.join(toolkit.home, d))), "lib64")
    link = [shutil.which("c++") or "g++", "-shared", *objects, f"-L{os.path.join(toolkit.home, lib_dir)}", "-lcudart", "-o", lib]
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode != 0:
        print(" ".join(link) + "\n" + proc.stdout + proc.stderr, file=sys.stderr)
        print("check_cuda: FAILED to link against cudart", file=sys.stderr)
        return 1
    print(f"check_cuda: {len(sources)} file(s) compiled for {', '.join('sm_' + a for a in _archs())} and linked "
          f"with -lcudart from {toolkit.home} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
