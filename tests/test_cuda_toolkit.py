"""CUDA toolkit resolution (setok_kernels/_cuda_toolkit.py) over fake toolkit layouts."""

import os
import stat
import subprocess

import pytest

from setok_kernels import _cuda_toolkit as tk


def _exe(path, body="exit 0"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n{body}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(path)


def _toolkit(home, lib="lib64", cudart="libcudart.so"):
    """A fake toolkit whose nvcc reports its own root the way nvcc -dryrun does."""
    nvcc = _exe(os.path.join(home, "bin", "nvcc"), 'echo "#\\$ TOP=$(dirname "$0")/.." >&2')
    os.makedirs(os.path.join(home, "include"), exist_ok=True)
    open(os.path.join(home, "include", "cuda_runtime.h"), "w").close()
    os.makedirs(os.path.join(home, lib), exist_ok=True)
    open(os.path.join(home, lib, cudart), "w").close()
    return nvcc


def _which(path):
    return lambda name: path if name == "nvcc" else None


def _find(**kw):
    kw.setdefault("environ", {})
    kw.setdefault("which", lambda name: None)
    kw.setdefault("roots", ())
    kw.setdefault("site_dirs", ())
    return tk.find(**kw)


def test_cuda_home_is_taken_as_given(tmp_path):
    got = _find(environ={"CUDA_HOME": str(tmp_path / "anywhere")}, which=_which("/usr/bin/nvcc"))
    assert (got.home, got.source) == (str(tmp_path / "anywhere"), "$CUDA_HOME")


def test_symlinked_nvcc_resolves_to_its_toolkit(tmp_path):
    real = _toolkit(tmp_path / "cuda-13.0")
    link = tmp_path / "usr" / "local" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    got = _find(which=_which(str(link)))
    assert got.home == str(tmp_path / "cuda-13.0")
    assert got.source.startswith("real path")


def test_wrapper_script_nvcc_resolves_through_dryrun(tmp_path):
    real = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _exe(tmp_path / "usr" / "local" / "bin" / "nvcc", f'exec {real} "$@"')
    got = _find(which=_which(wrapper))
    assert got.home == str(tmp_path / "cuda-13.0")
    assert got.source.startswith("toolkit reported by nvcc")
    # the wrapper's parent (torch's own guess) was considered first and refused
    assert [path for path, _ in got.rejected] == [str(tmp_path / "usr" / "local")]
    assert "libcudart.so" in got.rejected[0][1]


def test_lib_instead_of_lib64(tmp_path):
    nvcc = _toolkit(tmp_path / "cuda", lib="lib")
    assert _find(which=_which(nvcc)).home == str(tmp_path / "cuda")


def test_default_root_when_no_nvcc_on_path(tmp_path):
    _toolkit(tmp_path / "cuda")
    got = _find(roots=(str(tmp_path / "cuda"),))
    assert (got.home, got.source) == (str(tmp_path / "cuda"), "default location")


def test_cuda13_pip_wheels(tmp_path):
    site = tmp_path / "site-packages"
    _toolkit(site / "nvidia" / "cu13", lib="lib")
    got = _find(site_dirs=(str(site),))
    assert (got.home, got.source) == (str(site / "nvidia" / "cu13"), "nvidia pip packages")


def test_versioned_cudart_only_is_not_linkable(tmp_path):
    """Wheels may ship only libcudart.so.13; -lcudart needs the unversioned name."""
    site = tmp_path / "site-packages"
    _toolkit(site / "nvidia" / "cu13", lib="lib", cudart="libcudart.so.13")
    got = _find(site_dirs=(str(site),))
    assert got.home is None
    assert "libcudart.so" in got.rejected[0][1]


def test_nothing_found(tmp_path):
    got = _find(roots=(str(tmp_path / "missing"),))
    assert got.home is None and got.rejected


@pytest.mark.skipif(not __import__("shutil").which("nvcc") or bool(os.environ.get("CUDA_HOME")),
                    reason="needs nvcc on PATH and CUDA_HOME unset")
def test_nvcc_on_path_gives_a_complete_toolkit():
    got = tk.find()
    assert got.home is not None and tk.problems(got.home) == [], got.describe()
    assert subprocess.run([got.nvcc, "--version"], capture_output=True).returncode == 0
