"""Builds the native extension ``setok_kernels._C`` from csrc/ when it can.

- C++ (csrc/cpu/*.cpp, OpenMP) whenever torch is importable at build time;
- CUDA (csrc/cuda/*.cu) as well when ``torch.version.cuda`` is set and a
  complete CUDA toolkit is found (setok_kernels/_cuda_toolkit.py: CUDA_HOME,
  else the nvcc on PATH seen through symlinks and wrapper scripts, else
  /usr/local/cuda, else the nvidia pip wheels); no GPU needs to be visible;
- nothing (pure Python) when torch is missing or ``SETOK_SKIP_BUILD=1``.

Knobs: SETOK_SKIP_BUILD=1 (pure Python), SETOK_SKIP_CUDA=1 (C++ only),
SETOK_CUDA_ARCH_LIST or TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS
(parallel compile jobs, read by torch's ninja build), SETOK_DEBUG=1.
What was found and built is written to setok_kernels/_build.json, which
``python -m setok_kernels.info`` prints.
Install with ``pip install --no-build-isolation -e .``.
"""

import glob
import importlib.util
import json
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _load_module(name):
    """A torch-free module of setok_kernels by path: importing the package would load the old build."""
    path = os.path.join(ROOT, "setok_kernels", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_setok{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _log(msg):
    print(f"setok: {msg}", file=sys.stderr)


def _write_record(record):
    with open(os.path.join(ROOT, "setok_kernels", "_build.json"), "w") as f:
        json.dump(record, f, indent=1)


def _cuda_plan(torch, cuda_sources):
    """(CUDA_HOME or None, build-record fields): whether and with which toolkit to build the CUDA part."""
    if not cuda_sources:
        return None, {"cuda": "no csrc/cuda sources"}
    if os.environ.get("SETOK_SKIP_CUDA", "0") == "1":
        return None, {"cuda": "skipped (SETOK_SKIP_CUDA=1)"}
    if not torch.version.cuda:
        return None, {"cuda": f"torch {torch.__version__} is a CPU build"}
    finder = _load_module("_cuda_toolkit")
    toolkit = finder.find()
    record = {
        "cuda_home": toolkit.home,
        "cuda_home_source": toolkit.source,
        "cuda_home_skipped": [f"{path}: {why}" for path, why in toolkit.rejected],
    }
    _log(f"CUDA toolkit: {toolkit.describe()}")
    if toolkit.home is None:
        record["cuda"] = "no complete CUDA toolkit (set CUDA_HOME)"
        return None, record
    record["nvcc_version"] = finder.nvcc_version(toolkit.nvcc)
    return toolkit.home, record


def _extensions():
    record = {"parts": "none"}
    if os.environ.get("SETOK_SKIP_BUILD", "0") == "1":
        _log("SETOK_SKIP_BUILD=1, installing pure Python")
        _write_record(dict(record, reason="SETOK_SKIP_BUILD=1"))
        return [], {}
    try:
        import torch
    except ImportError:
        _log("torch not importable at build time, installing pure Python (use pip install --no-build-isolation)")
        _write_record(dict(record, reason="torch not importable at build time"))
        return [], {}

    cpp = _sources("csrc/cpu/*.cpp")
    cuda = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    record.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if not cpp and not cuda:
        _write_record(dict(record, reason="no csrc sources"))
        return [], {}
    cuda_home, cuda_record = _cuda_plan(torch, cuda)
    record.update(cuda_record)
    if cuda_home is not None:
        # torch.utils.cpp_extension fixes its CUDA_HOME at import: set it first
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home

    debug = os.environ.get("SETOK_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # -g0: python's CFLAGS carry -g
    # no -std: torch's BuildExtension adds the standard its headers need
    # (C++17 up to torch 2.9, C++20 after); with py_limited_api it also
    # defines Py_LIMITED_API (the sources include no Python header anyway)
    cxx += ["-fopenmp"]
    # the native op schemas this build implements, embedded in the binary:
    # setok_kernels._native refuses a library whose fingerprint differs
    abi = _load_module("_native_abi")
    schema = abi.fingerprint(abi.schemas_in_source(os.path.join(ROOT, "setok_kernels", "_native.py")))
    record["schema_fingerprint"] = schema
    cxx.append(f"-DSETOK_SCHEMA_FINGERPRINT={schema}")
    extra = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True)

    if cuda_home is not None:
        archs = os.environ.get("SETOK_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch when it writes the -gencode flags
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DSETOK_WITH_CUDA", f"-DSETOK_SCHEMA_FINGERPRINT={schema}"]
        extra["cxx"].append("-DSETOK_WITH_CUDA")
        ext = cpp_extension.CUDAExtension("setok_kernels._C", cpp + cuda, extra_compile_args=extra, **kwargs)
        record.update(parts="C++ + CUDA", cuda_arch_list=archs)
    else:
        ext = cpp_extension.CppExtension("setok_kernels._C", cpp, extra_compile_args=extra, **kwargs)
        record.update(parts="C++")
    record["max_jobs"] = os.environ.get("MAX_JOBS")
    _log(f"building setok_kernels._C ({record['parts']})" + (f"; no CUDA: {record['cuda']}" if "cuda" in record else ""))
    _write_record(record)
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
