"""Where the CUDA toolkit is: shared by setup.py (which loads this file by path,
without importing the package), tools/check_cuda.py and ``setok info``.

torch's own guess (``CUDA_HOME``, else the parent of the ``nvcc`` on PATH,
else /usr/local/cuda) takes /usr/local for a /usr/local/bin/nvcc that is a
symlink or a wrapper script, and linking then fails (-lcudart not found).
Here a candidate counts only when it is complete enough to build and link an
extension: ``bin/nvcc``, ``cuda_runtime.h`` and a linkable ``libcudart.so``.

Candidates, in order: ``CUDA_HOME`` / ``CUDA_PATH`` (taken as given: an
explicit choice); for the nvcc on PATH, its real path, then the toolkit nvcc
itself reports (``nvcc -dryrun`` prints ``TOP=``: this sees through wrapper
scripts), then its parent; /usr/local/cuda; the CUDA 13 pip wheels'
``site-packages/nvidia/cu13``. Standard library only.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

_TOP = re.compile(r"^#\$ TOP=(.+)$", re.MULTILINE)
_VERSION = re.compile(r"release (\d+\.\d+)")


@dataclass
class Toolkit:
    home: Optional[str]  # None: no usable toolkit
    source: str  # how it was found, or why none was
    nvcc: Optional[str] = None
    rejected: list = field(default_factory=list)  # (candidate, why not) in search order

    def describe(self) -> str:
        lines = [f"{self.home} ({self.source})" if self.home else f"none ({self.source})"]
        lines += [f"  skipped {path}: {why}" for path, why in self.rejected]
        return "\n".join(lines)


def _lib_dirs(home: str) -> list[str]:
    return [os.path.join(home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]


def problems(home: str) -> list[str]:
    """What ``home`` lacks to build and link a CUDA extension (empty: usable)."""
    missing = []
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        missing.append("no bin/nvcc")
    headers = [os.path.join(home, "include"), os.path.join(home, "targets", "x86_64-linux", "include")]
    if not any(os.path.isfile(os.path.join(h, "cuda_runtime.h")) for h in headers):
        missing.append("no include/cuda_runtime.h")
    # torch links with -L{home}/lib64 (or lib) -lcudart: the unversioned name must exist there
    if not any(os.path.exists(os.path.join(d, "libcudart.so")) for d in _lib_dirs(home)[:2]):
        missing.append("no lib64/libcudart.so or lib/libcudart.so to link against")
    return missing


def reported_top(nvcc: str, run: Callable = subprocess.run) -> Optional[str]:
    """The toolkit root an nvcc reports for itself (``nvcc -dryrun`` prints ``#$ TOP=...``)."""
    try:
        proc = run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = _TOP.search((proc.stdout or "") + (proc.stderr or ""))
    return os.path.normpath(m.group(1).strip()) if m else None


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(dirs))


def find(
    environ: Optional[dict] = None,
    which: Callable[[str], Optional[str]] = shutil.which,
    run: Callable = subprocess.run,
    roots: Sequence[str] = ("/usr/local/cuda",),
    site_dirs: Optional[Sequence[str]] = None,
) -> Toolkit:
    """The CUDA toolkit to build with (arguments exist for tests over fake layouts)."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            home = os.path.normpath(environ[var])
            return Toolkit(home, f"${var}", os.path.join(home, "bin", "nvcc"))

    rejected: list = []
    candidates: list[tuple[str, str]] = []
    nvcc = which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), f"real path of nvcc on PATH ({real})"))
        top = reported_top(nvcc, run)
        if top:
            candidates.append((top, f"toolkit reported by nvcc on PATH ({nvcc})"))
        candidates.append((os.path.dirname(os.path.dirname(os.path.abspath(nvcc))), f"parent of nvcc on PATH ({nvcc})"))
    candidates += [(root, "default location") for root in roots]
    for site in _site_dirs() if site_dirs is None else site_dirs:
        for home in sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*")), reverse=True):
            candidates.append((home, "nvidia pip packages"))

    seen = set()
    for home, source in candidates:
        key = os.path.realpath(home)
        if key in seen:
            continue
        seen.add(key)
        missing = problems(home)
        if not missing:
            return Toolkit(os.path.normpath(home), source, os.path.join(home, "bin", "nvcc"), rejected)
        rejected.append((home, "; ".join(missing)))
    return Toolkit(None, "no complete toolkit found" if candidates else "no nvcc on PATH, no toolkit in known places",
                   None, rejected)


def nvcc_version(nvcc: str, run: Callable = subprocess.run) -> Optional[str]:
    try:
        proc = run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.search(proc.stdout or "")
    return m.group(1) if m else None
