#!/usr/bin/env bash
# The CUDA build with CUDA_HOME unset, without a GPU: a CUDA torch in a cached
# venv, the nvcc on PATH, `pip install --no-build-isolation --no-deps -e .` of a
# copy of this tree; the library must then load with its CUDA part.
#
# The torch is pinned (TORCH_CUDA_TORCH, default 2.14.1: the CUDA 13.0 wheel
# among this machine's local wheels; the GPU machine has 2.11.0+cu130, same
# CUDA major) and installed with its nvidia libraries but without the cudart
# wheel, which the local index lacks: the resolved toolkit's lib64 provides
# libcudart.so.13 at import. ~3 GB; cached under $SETOK_CI_CACHE (default
# .ci/cache). Builds for sm_90 only (tools/check_cuda.py compiles sm_80 too).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH_CUDA_TORCH:-2.14.1}
NVIDIA="nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
        nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx"
CACHE=${SETOK_CI_CACHE:-$PWD/.ci/cache}
venv="$CACHE/venv-torch-$TORCH-cuda-$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --no-deps "torch==$TORCH" $NVIDIA
    "$venv/bin/python" -m pip install -q numpy setuptools wheel ninja typing-extensions sympy networkx jinja2 filelock fsspec
    touch "$venv/.complete"
fi

home=$("$PYTHON" -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tk", "setok_kernels/_cuda_toolkit.py")
tk = importlib.util.module_from_spec(spec); sys.modules["tk"] = tk; spec.loader.exec_module(tk)
print(tk.find(environ={}).home or "")')
[ -n "$home" ] || { echo "cuda_build_check: no CUDA toolkit found from the nvcc on PATH" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar --exclude=.git --exclude=.ci/cache --exclude=build --exclude='*.egg-info' --exclude='setok_kernels/_C*' \
    --exclude=setok_kernels/_build.json -cf - . | tar -xf - -C "$work"
cd "$work"
start=$SECONDS
env -u CUDA_HOME -u CUDA_PATH LD_LIBRARY_PATH="$home/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    SETOK_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" \
    "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps --no-index -e . >&2
LD_LIBRARY_PATH="$home/lib64" "$venv/bin/python" - <<'EOF'
import json

import torch

from setok_kernels import _native, info

native, build = _native.build_info(), info._build_record()
print(json.dumps(build, indent=1))
assert native["loaded"] and native["with_cuda"], native
cuda_ops = ", ".join(sorted(op for op, devices in native["ops"].items() if "cuda" in devices))
print(f"cuda_build_check: torch {torch.__version__}: built {build['parts']} with CUDA_HOME unset "
      f"(toolkit {build['cuda_home']}: {build['cuda_home_source']}); CUDA ops: {cuda_ops}")
EOF
echo "cuda_build_check: build and check in $((SECONDS - start)) s"
