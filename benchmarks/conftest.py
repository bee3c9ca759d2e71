"""Shared set-up of the benchmark suite (pytest-benchmark).

Every benchmark goes through the ``measure`` fixture, which

- builds nothing itself: callers pass a pool of inputs made beforehand, and
  successive rounds rotate through it so that caches (GPU L2, CPU L3) do not
  flatter an op that reads the same bytes every round;
- warms up before measuring (first calls compile, autotune, allocate);
- synchronises CUDA inside the timed call, so a round ends when its kernels do;
  on CUDA it also times each round with CUDA events (device time, free of the
  host's launch and sync overhead) and records their median, which
  ``report.py`` reports when present;
- records in ``extra_info`` the work done (FLOPs, bytes) and the floor it
  implies on this device, from which ``report.py`` states "% of floor".

Floors: on an H100 / H200 the datasheet peaks (dense bf16 tensor-core FLOP/s,
HBM bytes/s); on any other device (the CPU included) a matmul rate and a copy
bandwidth measured once per session, here, and labelled as measured.

Options: ``--bench-device cpu|cuda`` (default: cuda when available) and
``--run-memory`` for the peak-RSS measurement (slow).
Shapes: the real ones on CUDA, scaled-down ones on the CPU.
"""

from __future__ import annotations

import itertools
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch

import setok_kernels
from setok_kernels import BackendUnavailableError

# Seconds of measured rounds per benchmark, after calibration.
_TARGET_SECONDS = {"cuda": 0.5, "cpu": 1.0}
_MIN_ROUNDS, _MAX_ROUNDS = 3, 200
# Rotate inputs until the pool outgrows the last-level cache (H100 L2 is 50 MB).
_CACHE_BYTES = 64 << 20
_MAX_POOL = 8

# Datasheet peaks: (dense bf16/fp16 FLOP/s, fp32 FLOP/s, memory bytes/s).
_DATASHEETS = {
    "H100": (989e12, 67e12, 3.35e12),
    "H200": (989e12, 67e12, 4.8e12),
}


def pytest_addoption(parser):
    group = parser.getgroup("setok")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"), help="device to benchmark (default: cuda when available)")
    group.addoption("--run-memory", action="store_true", help="also run the peak-RSS measurement (slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "memory: peak-RSS measurement in a subprocess; runs only with --run-memory")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's own rule collects ``test_*.py``; a file
    named on the command line it collects itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-memory"):
        return
    skip = pytest.mark.skip(reason="peak-RSS measurement: pass --run-memory to run it")
    for item in items:
        if "memory" in item.keywords:
            item.add_marker(skip)


def _device_type(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    """``case`` runs over the module's CUDA_CASES (real shapes) or CPU_CASES (scaled down)."""
    if "case" in metafunc.fixturenames:
        cases = metafunc.module.CUDA_CASES if _device_type(metafunc.config) == "cuda" else metafunc.module.CPU_CASES
        metafunc.parametrize("case", cases, ids=[c[0] for c in cases])


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    name = _device_type(pytestconfig)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: no CUDA device", returncode=2)
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ floors


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s at the benchmark dtype
    bytes: float  # bytes/s
    source: str


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    # best of many: on a shared machine the best call is the one the others let run
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _measured_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / _best_seconds(lambda: a @ b, device)
    src = torch.empty(32 << 20, dtype=torch.uint8, device=device)  # 32 MiB
    dst = torch.empty_like(src)
    # a copy reads and writes every byte
    bandwidth = 2 * src.numel() / _best_seconds(lambda: dst.copy_(src), device)
    return Peak(flops, bandwidth, f"measured this session: {n}x{n} {str(dtype)[6:]} matmul, 32 MiB copy")


@pytest.fixture(scope="session")
def peak(device, dtype) -> Peak:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, single, bandwidth) in _DATASHEETS.items():
            if key in name:
                flops = half if dtype in (torch.float16, torch.bfloat16) else single
                return Peak(flops, bandwidth, f"{key} datasheet")
    return _measured_peak(device, dtype)


@pytest.fixture(scope="session")
def environment(device) -> dict:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "setok": setok_kernels.__version__,
        "torch": torch.__version__,
        "triton": version("triton"),
        "flash_attn": version("flash-attn"),
        "xformers": version("xformers"),
    }


# ------------------------------------------------------------------ measuring


def pool_size(input_bytes: int) -> int:
    """Distinct input sets to rotate through so that together they overflow the cache."""
    return max(1, min(_MAX_POOL, math.ceil(_CACHE_BYTES / max(1, input_bytes))))


def skip_unless_runs(fn: Callable, args: Sequence) -> None:
    """Call once; a backend that declines the call skips the benchmark with its reason."""
    try:
        fn(*args)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def measure(benchmark, device, peak, environment):
    """``measure(fn, pool, impl=, case=, flops=, bytes=, role=)`` times ``fn(*pool[i])``.

    ``role`` is "setok" for the project's code, "baseline" for what it is
    compared against; ``case`` names the problem (shape), the unit of
    comparison in the report.
    """

    def run(fn: Callable, pool: Sequence[Sequence], *, impl: str, case: str, flops: float = 0.0,
            bytes: float = 0.0, role: str = "setok", **extra) -> object:
        pool = list(pool)
        floor = max(flops / peak.flops, bytes / peak.bytes)
        benchmark.extra_info.update(
            impl=impl, case=case, role=role, flops=flops, bytes=bytes, floor_s=floor,
            peak_flops=peak.flops, peak_bytes=peak.bytes, peak_source=peak.source, pool=len(pool),
            **environment, **extra,
        )
        if benchmark.disabled:  # smoke run: exactly one call
            try:
                return benchmark.pedantic(fn, args=tuple(pool[0]))
            except BackendUnavailableError as exc:
                pytest.skip(str(exc))
        # The warm-up call (compiles, autotunes, allocates) over-estimates a
        # call; when even it fits the budget, a second call calibrates the rounds.
        def timed_once(args):
            sync(device)
            start = time.perf_counter()
            fn(*args)
            sync(device)
            return time.perf_counter() - start

        skip_unless_runs(fn, pool[0])
        once = timed_once(pool[-1])
        rounds = int(min(_MAX_ROUNDS, max(_MIN_ROUNDS, _TARGET_SECONDS[device.type] / max(once, 1e-9))))
        turn = itertools.count()

        def setup():
            sync(device)
            return tuple(pool[next(turn) % len(pool)]), {}

        event_seconds: list[float] = []

        def timed(*args):
            if device.type != "cuda":
                return fn(*args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            end.synchronize()
            event_seconds.append(start.elapsed_time(end) / 1e3)
            return out

        out = benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1)
        if event_seconds:
            benchmark.extra_info["event_median_s"] = statistics.median(event_seconds)
        return out

    return run
