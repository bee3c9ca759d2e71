"""Ahead-of-time compile of every Triton launch the dispatcher can make; no GPU needed.

``python -m setok_kernels.info --compile sm_90 [sm_80 ...]``

The configurations are not listed here: they are whatever the backends'
own launchers compute for the target. Per target, ``_arch.target(arch)``
makes every launcher choose its configs as on a GPU of that architecture
family (the dispatcher's per-architecture tables), and each registered
``triton`` implementation is called
on small CPU tensors covering every bucket its host code distinguishes
(dtype, mask, k list width, head-dim chunk, select block size, the DPC
Gram and streaming paths and the Gram row-block sizes, the enum arguments,
ints equal to 1 or not divisible by 16); ``JITFunction.run`` and
``Autotuner.run`` are patched to record the launch (every autotune candidate)
instead of running it. Every distinct launch is
then specialised exactly as Triton's runtime would (its own binder, for the
target's backend) and compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``: Triton's bundled ptxas makes the cubin and
reports registers and spills; the SASS is searched for HGMMA (Hopper's
warpgroup MMA), which a 16-bit ``tl.dot`` should use on sm_90.

Fails (exit 1) on a compile error, a register spill, or shared memory over
the per-block limit. Occupancy is the resident warps per SM over the SM's
64, from registers, shared memory and threads (CUDA occupancy rules).
Results are cached per kernel source and specialisation (``_ResultCache``):
a rerun compiles only what changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import _arch, _backends
from ._backends import CallInfo
from ._triton import INTERPRETING

# Per-SM and per-block limits (CUDA programming guide, compute capabilities).
_LIMITS = {
    80: dict(smem_sm=167936, smem_block=166912, regs_sm=65536, warps_sm=64, blocks_sm=32),
    90: dict(smem_sm=233472, smem_block=232448, regs_sm=65536, warps_sm=64, blocks_sm=32),
}
_SMEM_RESERVED = 1024  # per block, sm_80 and later

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Launch:
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Result:
    kernel: str
    config: str
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    occupancy: float = 0.0
    hgmma: Optional[bool] = None  # None: no 16-bit dot, or not sm_90
    error: Optional[str] = None
    problems: list = field(default_factory=list)


# ------------------------------------------------------------------ recording


@contextlib.contextmanager
def _recording(sink: list) -> Iterator[None]:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    original, original_tuned = JITFunction.run, Autotuner.run

    def record_tuned(self, *args, **kwargs):
        # every config the autotuner would time for this call (after its own pruning)
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    def record(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, kwargs))
        # the kernel does not run: zero its tensors so that host code after it
        # (e.g. a gather by the indices it would have written) sees valid values
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.zero_()

    JITFunction.run, Autotuner.run = record, record_tuned
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = original, original_tuned


def _impl(op: str):
    for impl in _backends.implementations(op):
        if impl.name == "triton":
            return impl
    return None


def _call(op: str, dtype: torch.dtype, extra: dict, *args) -> None:
    """Call the triton implementation of ``op`` (its backend signature) as ops.py would for a CUDA
    tensor, unless it declines such a call (then the dispatcher never launches it either)."""
    impl = _impl(op)
    if impl is None:
        return
    call = CallInfo(torch.device("cuda"), dtype, op.endswith("_backward"), extra)
    if impl.decline_reason(call, forced=True) is not None:
        return
    try:
        impl.fn(*args)
    except Exception as exc:  # the launcher itself failed: reported, and the proof fails
        _RECORD_ERRORS.append(f"{op} ({str(dtype)[6:]}, {extra}): {type(exc).__name__}: {exc}")


_RECORD_ERRORS: list[str] = []


def _features(B, N, C, dtype, masked):
    x = torch.randn(B, N, C).to(dtype)
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, N // 2:] = False
    return x, mask


@contextlib.contextmanager
def _gram_budget(nbytes: Optional[int]) -> Iterator[None]:
    """The DPC Gram path's memory budget (``dpc_gram.budget``, read per call) meanwhile; None: the default."""
    name, old = "SETOK_DPC_GRAM_BYTES", os.environ.get("SETOK_DPC_GRAM_BYTES")
    if nbytes is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = str(nbytes)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _dpc_cases() -> None:
    # small images take the Gram path (dpc_gram) by default; a zero budget sends the same
    # calls down the streaming kernels, which large images take
    for budget in (None, 0):
        with _gram_budget(budget):
            _dpc_grid()
    _gram_rows_cases()
    _select_cases()


def _gram_rows_cases() -> None:
    """The Gram path's row passes hold whole rows: one compile per padded row length, up to its largest N."""
    try:
        from . import dpc_gram
    except ImportError:
        return
    C = 16
    with _gram_budget(None):
        for p in range(4, dpc_gram.MAX_ROW.bit_length()):
            N = (1 << (p - 1)) + 1  # the bucket's smallest N (not 16-divisible); 2^p below: aligned
            for n in (N, 1 << p) if (1 << p) < dpc_gram.MAX_ROW else (N,):
                for masked in (False, True):
                    x, mask = _features(1, n, C, torch.float32, masked)
                    extra = dict(B=1, N=n, C=C)
                    _call("knn_density", torch.float32, dict(extra, k=8), x, 8, mask)
                    _call("density_delta", torch.float32, dict(extra, tie_break="index"), x, torch.rand(1, n), mask,
                          "column_max", "index")


def _dpc_grid() -> None:
    B = 2
    for dtype in _DTYPES:
        for masked in (False, True):
            # the real C (1152, 16-divisible), one that is not, and narrow ones (smaller C chunks)
            for C in (1152, 100, 64, 32, 16):
                x, mask = _features(B, 64, C, dtype, masked)
                extra = dict(B=B, N=64, C=C)
                _call("pairwise_distance", dtype, extra, x, mask)
                _call("knn_density", dtype, dict(extra, k=4), x, 4, mask)
            N, C = 256, 1152
            x, mask = _features(B, N, C, dtype, masked)
            extra = dict(B=B, N=N, C=C)
            for k in (1, 2, 3, 4, 8, 16, 32, 64, 128):  # every k-list width
                _call("knn_density", dtype, dict(extra, k=k), x, k, mask)
            density = torch.rand(B, N)
            for densest_delta in ("column_max", "global_max"):
                for tie_break in ("none", "index"):
                    _call("density_delta", dtype, dict(extra, tie_break=tie_break),
                          x, density, mask, densest_delta, tie_break)
            M = 16
            centers = torch.arange(M).repeat(B, 1) * 3
            num = torch.tensor([M, M // 2])
            for metric in ("euclidean", "cosine"):
                _call("assign_to_centers", dtype, dict(extra, M=M, metric=metric), x, centers, num, mask, metric)
            _call("dpc_cluster", dtype, dict(extra, k=8, M=M), x, 8, 0.5, 4, M, mask, "column_max", 0, "index", "none")


def _select_cases() -> None:
    # centre selection: scores are fp32 whatever the features; block size and warps follow N
    for masked in (False, True):
        for N in [1 << p for p in range(0, 16)]:
            score = torch.rand(1, N)
            mask = None
            if masked:
                mask = torch.ones(1, N, dtype=torch.bool)
                mask[0, N // 2:] = False
            M = min(N, 64)
            for num_centers, center_order in ((0, "index"), (M, "index"), (M, "score")):
                extra = dict(B=1, N=N, M=M, num_centers=num_centers, center_order=center_order)
                _call("select_centers", torch.float32, extra, score, mask, 0.5, min(8, M), M, num_centers, center_order)


def _head_dims(family: int) -> list[int]:
    """Head dims covering every launch-config bucket of the attention kernels on ``family``.

    The kernels take the head dim as a constexpr, so each value is its own
    compile: per group of head dims with the same config lists (read from
    ``triton_attention.configs``), its largest member; plus 72 (not a multiple
    of 16: masked tails, unaligned rows).
    """
    from . import triton_attention as ta

    groups: dict = {}
    for D in range(1, 2049):
        key = tuple(tuple(ta.configs(kernel, D, dtype, family)) for kernel in ("fwd", "dq", "dkdv") for dtype in _DTYPES)
        groups[key] = D  # ascending: the group's largest
    return sorted(set(groups.values()) | {72})


def _attention_cases(family: int) -> None:
    H = 2
    for dtype in _DTYPES:
        for D in _head_dims(family):
            # 2^15 segments (mostly empty): the segment search takes a realistic largest step count
            lens = [0] * 32765 + [5, 40, 19]
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
            T = int(cu[-1])
            q, k, v = (torch.randn(T, H, D).to(dtype) for _ in range(3))
            extra = dict(head_dim=D, heads=H, Tq=T, Tk=T, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
            scale = D ** -0.5
            _call("varlen_attention", dtype, extra, q, k, v, cu, cu, max(lens), max(lens), scale)
            out = torch.randn(T, H, D).to(dtype)
            lse = torch.randn(H, T)
            for dlse in (None, torch.randn(H, T)):  # the lse used downstream or not
                _call("varlen_attention_backward", dtype, extra, out, dlse, q, k, v, out, lse, cu, cu,
                      max(lens), max(lens), scale)


def _merge_cases() -> None:
    """Cluster merging, forward and backward: with and without weights, and blended with the centres or not."""
    B, N, M = 2, 64, 8
    labels, num = torch.randint(0, M, (B, N)), torch.full((B,), M)
    centers = torch.arange(M).repeat(B, 1)
    for dtype in (*_DTYPES, torch.float64):  # float64 has no tensor-core path to lose here: supported on CUDA
        for C in (1152, 100):
            x = torch.randn(B, N, C).to(dtype)
            for weight in (None, torch.rand(B, N)):
                for blend in (None, torch.full((B, M), 0.5)):
                    centres = None if blend is None else centers
                    extra = dict(B=B, N=N, C=C, M=M, blend=blend is not None)
                    _call("merge_clusters", dtype, extra, x, labels, num, M, weight, 1e-6, centres, blend)
                    _call("merge_clusters_backward", dtype, extra, torch.randn(B, M, C).to(dtype), torch.randn(B, M),
                          x, labels, num, weight, 1e-6, centres, blend)


def _pack_cases() -> None:
    """``pack_clusters``: every M_PAD bucket (M up to the backend's 1024, powers of two or not), int32 and
    int64 labels, one image (an int equal to 1) or several, N not divisible by 16; max_seqlen by program 0
    and atomic (B * N * lane ops over PACK_MAX_LANE_OPS: B = 32, N = 729 at M_PAD >= 256; B = 512, N = 255 at all)."""
    for B, N in ((32, 729), (1, 64), (512, 255)):
        for M in (1, 20, 37, 100, 200, 500, 729):
            num = torch.full((B,), M)
            for dtype in (torch.int64, torch.int32):
                labels = torch.randint(0, M, (B, N)).to(dtype)
                _call("pack_clusters", dtype, dict(B=B, N=N, M=M), labels, num.to(dtype), M)


def record_launches(arch: int = 90) -> list[Launch]:
    """Every Triton launch the backends make over the case grid on a GPU of ``arch`` (nothing runs)."""
    launches: list[Launch] = []
    with _recording(launches), torch.no_grad(), _arch.target(arch):
        _dpc_cases()
        _merge_cases()
        _pack_cases()
        _attention_cases(_arch.family(torch.device("cuda")))
    return launches


# ------------------------------------------------------------------ compiling


def _label(fn, signature: dict, constexprs: dict, attrs: dict, options) -> str:
    """The first pointer's dtype, the constexprs (ints equal to 1 included), the ints not 16-divisible, warps/stages."""
    names = fn.arg_names
    parts = [next((t[1:] for t in signature.values() if t.startswith("*")), "")]
    parts += [f"{names[path[0]]}={getattr(value, 'value', value)}" for path, value in sorted(constexprs.items())]
    odd = [name for i, name in enumerate(names) if signature.get(name) in ("i32", "i64") and not attrs.get((i,))]
    if odd:
        parts.append("odd:" + ",".join(odd))
    parts.append(f"w{options.num_warps}s{options.num_stages}")
    return " ".join(parts)


def _specialise(launch: Launch, backend):
    """Triton's runtime specialisation of this launch for ``backend`` (its binder and argument packing)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_DOT16 = re.compile(r"tt\.dot .*: tensor<[0-9x]+x(?:bf16|f16)>")


def _sass(cubin: bytes) -> str:
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = shutil.which("cuobjdump", path=tools) or shutil.which("cuobjdump")
    if cuobjdump is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True)
    return proc.stdout


def _occupancy(regs: int, smem: int, warps: int, limits: dict) -> float:
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (limits["regs_sm"] // regs_per_warp) // warps
    by_smem = limits["smem_sm"] // (smem + _SMEM_RESERVED)
    by_threads = limits["warps_sm"] // warps
    blocks = min(by_regs, by_smem, by_threads, limits["blocks_sm"])
    return blocks * warps / limits["warps_sm"]


def compile_all(arch: int, launches: list[Launch], jobs: int = 1, only: Optional[str] = None) -> list[Result]:
    """Compile each distinct launch for ``arch``; ``only``: a regular expression the
    "kernel config" row of the table must match (the others are skipped)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    limits = _LIMITS[arch]
    wanted = re.compile(only) if only else None
    unique: dict[tuple, tuple] = {}
    for launch in launches:
        options, signature, constexprs, attrs = _specialise(launch, backend)
        if wanted and not wanted.search(f"{launch.fn.__name__} {_label(launch.fn, signature, constexprs, attrs, options)}"):
            continue
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        key = (src.hash(), repr(sorted(options.__dict__.items())))
        unique.setdefault(key, (launch, src, options, signature, constexprs, attrs))

    global _WORK
    _WORK = [(target, limits, *item) for item in unique.values()]
    cache = _ResultCache(arch)
    results: list[Optional[Result]] = [cache.get(key) for key in unique]
    todo = [i for i, r in enumerate(results) if r is None]
    keys = list(unique)
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(todo) > 1:
            import multiprocessing

            # fork: the children inherit the recorded launches (JITFunctions do not pickle)
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            fresh = pool.imap(_compile_one, todo)
        else:
            fresh = map(_compile_one, todo)
        for i, res in zip(todo, fresh):  # cached as they come: an interrupted run keeps its work
            results[i] = res
            cache.put(keys[i], res)
    return results


class _ResultCache:
    """Results of earlier runs, one JSON file per (triton version, arch, kernel source and specialisation, options).

    The key covers everything the compiler sees (ASTSource.hash includes the
    source of the kernel and of every function it calls), so a hit is what a
    compile would give. In ``$SETOK_COMPILE_PROOF_CACHE`` (default
    ~/.cache/setok/compile-proof; empty: no cache). Compile errors are not cached.
    """

    def __init__(self, arch: int):
        import hashlib

        import triton

        self._hashlib = hashlib
        self._salt = f"{triton.__version__}-sm_{arch}"
        default = os.path.join(os.path.expanduser("~"), ".cache", "setok", "compile-proof")
        self.dir = os.environ.get("SETOK_COMPILE_PROOF_CACHE", default)

    def _path(self, key) -> str:
        digest = self._hashlib.sha256(f"{self._salt}-{key!r}".encode()).hexdigest()
        return os.path.join(self.dir, digest + ".json")

    def get(self, key) -> Optional[Result]:
        if not self.dir:
            return None
        try:
            with open(self._path(key)) as f:
                return Result(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key, res: Result) -> None:
        if not self.dir or res.error:
            return
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._path(key) + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(res.__dict__, f)
        os.replace(tmp, self._path(key))


_WORK: list = []


def _compile_one(index: int) -> Result:
    import triton
    from triton import knobs

    target, limits, launch, src, options, signature, constexprs, attrs = _WORK[index]
    res = Result(launch.fn.__name__, _label(launch.fn, signature, constexprs, attrs, options))
    log = io.StringIO()
    # a private cache, so that ptxas runs and prints its report for every config
    with tempfile.TemporaryDirectory() as cache, _knob(knobs.cache, "dir", cache), \
            _knob(knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(log):
        try:
            kernel = triton.compile(src, target=target, options=options.__dict__)
        except Exception as exc:  # a compile error is a finding, not a crash of the proof
            # Triton's CompilationError: "at line:col:", the source, then the cause on the last line
            lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [""]
            where = f" {lines[0]}" if lines[0].startswith("at ") else ""
            res.error = f"{type(exc).__name__}{where} {lines[-1].strip()}"
            res.problems.append("compile error")
            return res
        sass = _sass(kernel.asm["cubin"]) if target.arch >= 90 and _DOT16.search(kernel.asm["ttir"]) else None
    text = log.getvalue()
    m = _PTXAS.search(text)
    res.regs = int(m.group(1)) if m else 0
    m = _SPILL.search(text)
    if m:
        res.spill_stores, res.spill_loads = int(m.group(1)), int(m.group(2))
    res.smem = int(kernel.metadata.shared)
    res.occupancy = _occupancy(res.regs, res.smem, options.num_warps, limits)
    if sass is not None:
        res.hgmma = "HGMMA" in sass
    if res.spill_stores or res.spill_loads:
        res.problems.append(f"spills {res.spill_stores} B")
    if res.smem > limits["smem_block"]:
        res.problems.append(f"smem {res.smem} B > {limits['smem_block']}")
    return res


@contextlib.contextmanager
def _knob(holder, name, value):
    old = getattr(holder, name)
    setattr(holder, name, value)
    try:
        yield
    finally:
        setattr(holder, name, old)


def _table(arch: int, results: list[Result]) -> str:
    rows = [("kernel", "config", "regs", "spill B", "smem B", "occ", "HGMMA", "status")]
    for r in sorted(results, key=lambda r: (r.kernel, r.config)):
        hgmma = "-" if r.hgmma is None else ("yes" if r.hgmma else "no")
        status = "; ".join(r.problems) + (f" ({r.error})" if r.error else "") if r.problems else "ok"
        rows.append((r.kernel, r.config, str(r.regs), str(r.spill_stores), str(r.smem), f"{r.occupancy:.0%}", hgmma, status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return f"sm_{arch}\n" + "\n".join(lines)


def parse_arch(text: str) -> int:
    arch = int(text.lower().removeprefix("sm_").rstrip("a"))
    if arch not in _LIMITS:
        raise ValueError(f"unsupported arch {text!r}; expected one of {', '.join(f'sm_{a}' for a in _LIMITS)}")
    return arch


def main(archs: list[str], jobs: int = 0, only: Optional[str] = None) -> int:
    """Compile every recorded launch for each arch, print the tables, return the exit status.

    ``only``: compile just the rows matching this regular expression (see ``compile_all``).
    """
    if INTERPRETING:
        # kernels are created at import: in interpreter mode there is nothing to compile
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        extra = ["--jobs", str(jobs)] + (["--only", only] if only else [])
        return subprocess.call([sys.executable, "-m", "setok_kernels.info", "--compile", *archs, *extra], env=env)
    try:
        import triton
    except ImportError as exc:
        print(f"compile proof: triton is not importable ({exc})")
        return 1
    targets = [parse_arch(a) for a in archs]
    jobs = jobs or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    failed = False
    for arch in targets:
        t0 = time.perf_counter()
        _RECORD_ERRORS.clear()
        launches = record_launches(arch)  # the configs the dispatcher picks on this architecture
        for error in _RECORD_ERRORS:
            print(f"compile proof: a launcher failed before any kernel: {error}")
        results = compile_all(arch, launches, jobs, only)
        print(_table(arch, results))
        bad = [r for r in results if r.problems]
        failed |= bool(bad) or bool(_RECORD_ERRORS)
        hgmma = [r.hgmma for r in results if r.hgmma is not None]
        print(f"sm_{arch}: {len(launches)} launches, {len(results)} configs compiled with triton {triton.__version__} "
              f"in {time.perf_counter() - t0:.0f} s; spills in {sum(1 for r in results if r.spill_stores or r.spill_loads)}; "
              + (f"16-bit dots with HGMMA {sum(hgmma)}/{len(hgmma)}; " if hgmma else "")
              + f"{len(bad)} with problems\n")
    print(f"compile proof: {time.perf_counter() - start:.0f} s in all: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0
