"""Builds the native extension ``setok_kernels._C`` from csrc/ when it can.

- C++ (csrc/cpu/*.cpp, OpenMP) whenever torch is importable at build time;
- CUDA (csrc/cuda/*.cu) as well when ``torch.version.cuda`` is set and a CUDA
  toolchain (nvcc / CUDA_HOME) exists; no GPU needs to be visible;
- nothing (pure Python) when torch is missing or ``SETOK_SKIP_BUILD=1``.

Knobs: SETOK_SKIP_BUILD=1, TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
MAX_JOBS (parallel compile jobs, read by torch's ninja build), SETOK_DEBUG=1.
Install with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("SETOK_SKIP_BUILD", "0") == "1":
        print("setok: SETOK_SKIP_BUILD=1, installing pure Python", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("setok: torch not importable at build time, installing pure Python "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    cpp = _sources("csrc/cpu/*.cpp")
    cuda = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if not cpp and not cuda:
        return [], {}
    debug = os.environ.get("SETOK_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # -g0: python's CFLAGS carry -g
    # no -std: torch's BuildExtension adds the standard its headers need
    # (C++17 up to torch 2.9, C++20 after); with py_limited_api it also
    # defines Py_LIMITED_API (the sources include no Python header anyway)
    cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True)

    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and bool(cuda)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DSETOK_WITH_CUDA"]
        extra["cxx"].append("-DSETOK_WITH_CUDA")
        ext = cpp_extension.CUDAExtension("setok_kernels._C", cpp + cuda, extra_compile_args=extra, **kwargs)
    else:
        ext = cpp_extension.CppExtension("setok_kernels._C", cpp, extra_compile_args=extra, **kwargs)
    print(f"setok: building setok_kernels._C ({'C++ + CUDA' if with_cuda else 'C++'})", file=sys.stderr)
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
