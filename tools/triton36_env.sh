#!/usr/bin/env bash
# Prints the path of a venv with triton==3.6.0 (the GPU machine's Triton) and
# the CPU torch, creating it on first use. Cached under $SETOK_CI_CACHE
# (default .ci/cache, gitignored); the directory name carries the Python
# version and a hash of the requirements below, so changing them makes a new
# one. Creating it takes ~40 s with the wheels on local disk.
#
# numpy is deliberately not capped: Triton 3.6's interpreter turns integer
# kernel arguments into one-element numpy arrays and calls int() on them,
# which numpy >= 2.4 refuses, so a Python `range` bounded by a kernel argument
# fails there. Capping numpy would hide that from the tests while users of
# triton 3.6 with a current numpy still hit it; the kernels avoid the path
# instead (loop bounds that are tensors or constexprs), and this leg keeps
# them honest.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
REQS="torch==$TORCH_VERSION triton==3.6.0 numpy pytest hypothesis"
CACHE=${SETOK_CI_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.ci/cache}
key=$("$PYTHON" -c "import hashlib, sys; print('py%d.%d-' % sys.version_info[:2] + hashlib.sha256(sys.argv[1].encode()).hexdigest()[:10])" "$REQS")
venv="$CACHE/venv-triton-3.6.0-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$CACHE"
    echo "triton36_env: creating $venv ($REQS)" >&2
    "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q $REQS >&2
    touch "$venv/.complete"
fi
echo "$venv"
