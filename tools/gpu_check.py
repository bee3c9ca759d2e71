"""``make gpu-check OUT=dir``: everything a bare GPU machine must show, in one command, offline.

    python tools/gpu_check.py OUT_DIR [--budget SECONDS]

Steps, each timed, logged to OUT_DIR/logs/ and summarised in OUT_DIR/report.md:

1. environment: device, driver, Python, torch, CUDA, Triton, nvcc, and the
   CUDA toolkit the build resolves (no GPU needed);
2. build: ``pip install --no-build-isolation --no-deps -e .`` for this GPU's
   architecture, then checks that the library loaded with its CUDA part
   (needs a CUDA build of torch, not a GPU);
3. tests: the whole suite on the GPU (the ``device`` fixture makes every op
   test run there: Triton, native CUDA and torch backends against the
   reference, values and gradients);
4. sanitizers: compute-sanitizer memcheck over tools/sanitize_calls.py (one
   small call of every CUDA and Triton kernel, forward and backward), then
   racecheck over the same calls (shared memory hazards);
5. CUDA graph: the tokenizer forward captured, replayed on new input, equal
   to eager;
6. benchmarks at the real shapes (benchmarks/*: DPC B=32 N=729 C=1152 bf16
   and N=16384, attention D=2048 and D=128, pack, tokenizer), timed with CUDA
   events; the report has each median, % of its floor and its ratio to each
   baseline.

Without a GPU it runs what needs none (1; 2 with a CUDA torch; and the calls
of step 4 on the CPU, Triton interpreted, so that they keep up with the API),
says in one line that the rest needs a GPU, and exits 0 unless one of those
failed: CI runs that part. With a
GPU it exits 1 if any step failed. Steps share a time budget (default 8
minutes); a step cut short by it is a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _toolkit_finder():
    """setok_kernels/_cuda_toolkit.py by path: this process must not load the library before it is rebuilt."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_setok_cuda_toolkit", ROOT / "setok_kernels" / "_cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Step:
    name: str
    status: str  # ok, FAILED, skipped
    seconds: float
    summary: str
    details: str = ""  # markdown appended under the step


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        return max(1.0, min(cap, self.deadline - time.monotonic()))


def _run(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None) -> tuple[int, str]:
    """Run ``cmd`` in the repository, output to ``log``: (exit code, 124 on timeout; the log's text)."""
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
        f.write(f"\n[exit {code} after {time.monotonic() - start:.0f} s]\n")
    text = log.read_text(errors="replace")
    return code, text


def _tail(text: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(text.rstrip().splitlines()[-lines:]) + "\n```"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------ steps


def environment(out: Path, budget: Budget) -> Step:
    import torch

    _cuda_toolkit = _toolkit_finder()
    facts = {"python": platform.python_version(), "torch": torch.__version__, "torch CUDA": torch.version.cuda}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as exc:
        facts["triton"] = f"not importable ({exc})"
    toolkit = _cuda_toolkit.find()
    facts["CUDA toolkit"] = f"{toolkit.home} ({toolkit.source})" if toolkit.home else f"none ({toolkit.source})"
    if toolkit.nvcc:
        facts["nvcc"] = _cuda_toolkit.nvcc_version(toolkit.nvcc)
    facts["compute-sanitizer"] = _sanitizer() or "not found"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["device"] = f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
            facts["driver"] = query.stdout.strip()
    else:
        facts["device"] = "no CUDA device"
    (out / "environment.json").write_text(json.dumps(facts, indent=1))
    table = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return Step("environment", "ok", 0.0, facts["device"], "| | |\n|---|---|\n" + table)


def _sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    home = _toolkit_finder().find().home
    for candidate in ([found] if found else []) + ([os.path.join(home, "bin", "compute-sanitizer"),
                                                    os.path.join(home, "compute-sanitizer", "compute-sanitizer")] if home else []):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def build(out: Path, budget: Budget) -> Step:
    import torch

    if not torch.version.cuda:
        return Step("build", "skipped", 0.0, f"torch {torch.__version__} is a CPU build: no CUDA part to build")
    env = dict(os.environ)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        env.setdefault("SETOK_CUDA_ARCH_LIST", f"{major}.{minor}")
    archs = env.get("SETOK_CUDA_ARCH_LIST") or env.get("TORCH_CUDA_ARCH_LIST") or "setup.py's default"
    env.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0))))
    cmd = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    code, text = _run(cmd, out / "logs" / "build.log", budget.left(240), env)
    if code != 0:
        return Step("build", "FAILED", 0.0, f"pip install exited {code}", _tail(text))
    probe = "from setok_kernels import _native, info; import json; print(json.dumps({'native': _native.build_info(), 'build': info._build_record()}, default=str))"
    proc = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=budget.left(60))
    if proc.returncode != 0:
        return Step("build", "FAILED", 0.0, "the built package does not import", _tail(proc.stdout + proc.stderr))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    native = info["native"]
    ok = native["loaded"] and native["with_cuda"]
    summary = f"{(info['build'] or {}).get('parts', '?')} for {archs}"
    if not ok:
        summary = f"library loaded={native['loaded']}, with_cuda={native['with_cuda']}: {native['reason']}"
    details = "```\n" + json.dumps(info, indent=1, default=str) + "\n```"
    return Step("build", "ok" if ok else "FAILED", 0.0, summary, details)


def tests(out: Path, budget: Budget) -> Step:
    junit = out / "logs" / "tests.xml"
    cmd = [PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-rf"]
    # measured on an H200 machine (16 cores): one process spends most of its
    # time in Triton's JIT and reached ~150 of ~550 tests in 300 s; workers
    # compile in parallel and share the GPU (pytest-xdist, where installed)
    try:
        import xdist  # noqa: F401

        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    code, text = _run(cmd, out / "logs" / "tests.log", budget.left(300))
    last = text.strip().splitlines()[-2] if text.strip() else ""
    summary = next((line for line in reversed(text.splitlines()) if " passed" in line or " failed" in line), last)
    return Step("tests", "ok" if code == 0 else "FAILED", 0.0, summary.strip("= "), "" if code == 0 else _tail(text, 40))


def sanitizers(out: Path, budget: Budget) -> Step:
    tool = _sanitizer()
    if tool is None:
        return Step("sanitizers", "FAILED", 0.0, "compute-sanitizer not found (PATH, CUDA toolkit)")
    script = [PY, str(ROOT / "tools" / "sanitize_calls.py")]
    # compile and autotune outside the sanitizer first (both cached on disk): under
    # it, kernels then only load and run, instead of being timed ~100x slower
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="1")
    code, text = _run(script, out / "logs" / "sanitize_warmup.log", budget.left(120), env)
    if code != 0:
        return Step("sanitizers", "FAILED", 0.0, "the calls fail without a sanitizer", _tail(text, 40))
    results = []
    for check in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "1", "--print-limit", "20", *script]
        code, text = _run(cmd, out / "logs" / f"{check}.log", budget.left(150), env)
        errors = next((line for line in reversed(text.splitlines()) if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line), "")
        results.append((check, code, errors.replace("=========", "").strip(), text))
    failed = [r for r in results if r[1] != 0]
    summary = "; ".join(f"{check}: {'ok' if code == 0 else f'exit {code}'} {errors}" for check, code, errors, _ in results)
    details = "\n".join(_tail(text, 40) for *_, text in failed)
    return Step("sanitizers", "FAILED" if failed else "ok", 0.0, summary, details)


def cuda_graph(out: Path, budget: Budget) -> Step:
    code, text = _run([PY, str(ROOT / "tools" / "cuda_graph_check.py")], out / "logs" / "cuda_graph.log", budget.left(120))
    last = text.strip().splitlines()[-2] if text.strip() else ""  # the line before "[exit ...]"
    return Step("CUDA graph", "ok" if code == 0 else "FAILED", 0.0, last, "" if code == 0 else _tail(text, 40))


def cpu_calls(out: Path, budget: Budget) -> Step:
    """Without a GPU: the sanitizer's calls on the CPU (Triton interpreted), so that they keep up with the API."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [PY, str(ROOT / "tools" / "sanitize_calls.py"), "--device", "cpu", "--dtypes", "float32"]
    code, text = _run(cmd, out / "logs" / "sanitize_calls_cpu.log", budget.left(240), env)
    counts = {word: text.count(f"\n{word} ") for word in ("ok", "declined", "FAILED")}
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) + " (tools/sanitize_calls.py on the CPU)"
    return Step("calls (CPU)", "ok" if code == 0 else "FAILED", 0.0, summary, "" if code == 0 else _tail(text, 60))


def benchmarks(out: Path, budget: Budget) -> Step:
    bench_json = out / "bench.json"
    cmd = [PY, "-m", "pytest", "benchmarks", "--benchmark-only", f"--benchmark-json={bench_json}", "-q",
           "-p", "no:cacheprovider", "--bench-device", "cuda"]
    code, text = _run(cmd, out / "logs" / "benchmarks.log", budget.left(240))
    if not bench_json.exists():
        return Step("benchmarks", "FAILED", 0.0, f"no results (pytest exit {code})", _tail(text, 40))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    data = json.loads(bench_json.read_text())
    table = report.markdown(data).split("\n", 1)[1]  # without its title
    measured = sum(1 for b in data["benchmarks"] if b.get("stats"))
    status = "ok" if code == 0 else "FAILED"
    return Step("benchmarks", status, 0.0, f"{measured} measured (pytest exit {code})", table)


# (name, step, runs with a GPU, runs without one)
STEPS: list[tuple[str, Callable[[Path, Budget], Step], bool, bool]] = [
    ("environment", environment, True, True),
    ("build", build, True, True),
    ("calls (CPU)", cpu_calls, False, True),
    ("tests", tests, True, False),
    ("sanitizers", sanitizers, True, False),
    ("CUDA graph", cuda_graph, True, False),
    ("benchmarks", benchmarks, True, False),
]


def write_report(out: Path, steps: list[Step], gpu: bool) -> Path:
    lines = ["# setok gpu-check", "", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"- command: `python tools/gpu_check.py {out}`", ""]
    lines += ["| step | status | time | summary |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} s | {s.summary} |" for s in steps]
    if not gpu:
        lines += ["", "No CUDA device: tests, sanitizers, CUDA graph and benchmarks were not run."]
    for s in steps:
        if s.details:
            lines += ["", f"## {s.name}", "", s.details]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for report.md, bench.json and logs/")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    gpu = _has_gpu()
    steps = []
    for name, fn, with_gpu, without_gpu in STEPS:
        if not (with_gpu if gpu else without_gpu):
            continue
        start = time.monotonic()
        try:
            step = fn(out, budget)
        except Exception as exc:  # a crashing step is a failed step; the others still run
            step = Step(name, "FAILED", 0.0, f"{type(exc).__name__}: {exc}")
        step.seconds = time.monotonic() - start
        steps.append(step)
        print(f"gpu-check: {step.name:<12} {step.status:<7} {step.seconds:5.0f} s  {step.summary}", flush=True)
    path = write_report(out, steps, gpu)
    print(f"gpu-check: report in {path}")
    if not gpu:
        print("gpu-check: no CUDA device here: tests, sanitizers, CUDA graph and benchmarks need a GPU (not run)")
        return 0 if all(s.status != "FAILED" for s in steps) else 1
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
