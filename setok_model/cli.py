"""``setok``: cluster maps of images, backend report, quick benchmark.

- ``setok tokenize [IMAGE...]``: DPC-kNN clustering of each image's patch
  features, drawn as a cluster map (one colour per concept, centres marked),
  with the token count and the time per stage. Without IMAGE, the bundled
  sample photo. Features are a training-free patch descriptor (colour, colour
  spread, edge energy, position) unless ``--tower`` names a local Hugging Face
  vision model (SigLIP, CLIP, ...).
- ``setok info``: which backends run here and why the others do not.
- ``setok bench``: a quick timing of the main ops on this machine.

Only ``setok_kernels`` is imported up front: the model package and
transformers load when a command needs them.
"""

from __future__ import annotations

import argparse
import colorsys
import importlib
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "coffee.jpg"
# patches per image above which tokenize refuses (--max-patches raises it): the
# clustering is quadratic in the patches, and a thin strip resized to the short
# side would otherwise run for minutes
DEFAULT_MAX_PATCHES = 4096


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall time per named stage; synchronises CUDA so a stage owns its kernels."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        _sync(self.device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3
        return out

    def summary(self) -> str:
        return ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.ms.items())


# ------------------------------------------------------------------ features


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise CliError(f"no such image: {path}") from None
    except Image.DecompressionBombError as exc:
        raise CliError(f"{path} is too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CliError(f"cannot read {path} as an image: {exc}") from None


def patch_grid(size: tuple[int, int], patch: int, short_side: int) -> tuple[int, int]:
    """``(gh, gw)``: the patch grid of an image of ``size = (w, h)`` resized to ``short_side``."""
    w, h = size
    scale = short_side / min(w, h)
    return max(1, round(h * scale / patch)), max(1, round(w * scale / patch))


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) of sRGB values in [0, 1], shape (..., 3): distances there follow perception."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / torch.tensor([0.9505, 1.0, 1.0890])
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)


def _standardise(t: torch.Tensor) -> torch.Tensor:
    """Per channel across patches: zero mean; one common scale so the group keeps its internal ratios."""
    t = t - t.mean(0)
    return t / t.pow(2).mean().sqrt().clamp(min=1e-6)


# Weights of the descriptor groups (each standardised first). Colour
# dominates; spread and edges separate smooth from textured surfaces of one
# colour; position keeps distant same-coloured regions apart. The overall
# scale sets the distances against DPC's fixed score threshold (0.5): about a
# dozen concepts on an everyday photo with k = 16.
_GROUP_WEIGHTS = dict(colour=3.0, layout=1.5, spread=1.2, edges=1.2, position=1.5)


def patch_descriptors(image, patch: int, short_side: int):
    """Training-free patch features: ``(feats (N, C) float32, grid (gh, gw))``, N = gh * gw.

    Per patch: mean L*a*b* colour, the colour of its four quadrants (layout
    inside the patch), colour standard deviation, mean horizontal and vertical
    luminance gradient magnitude, and the (row, column) position.
    """
    import numpy as np

    if patch < 2:
        raise ValueError(f"patch must be >= 2 pixels (its quadrants and spread need 2 x 2), got {patch}")
    gh, gw = patch_grid(image.size, patch, short_side)
    resized = image.resize((gw * patch, gh * patch))
    rgb = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    lab = _srgb_to_lab(rgb)  # (H, W, 3)
    tiles = lab.view(gh, patch, gw, patch, 3).permute(0, 2, 1, 3, 4)  # (gh, gw, p, p, 3)
    half = patch // 2
    quads = [tiles[:, :, i : i + half, j : j + half].mean((2, 3)) for i in (0, half) for j in (0, half)]
    lum = lab[..., 0]
    gx = (lum[:, 1:] - lum[:, :-1]).abs()
    gy = (lum[1:] - lum[:-1]).abs()
    gx = torch.nn.functional.pad(gx, (0, 1)).view(gh, patch, gw, patch).mean((1, 3))
    gy = torch.nn.functional.pad(gy, (0, 0, 0, 1)).view(gh, patch, gw, patch).mean((1, 3))
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    groups = dict(
        colour=tiles.mean((2, 3)),
        layout=torch.cat(quads, -1),
        spread=tiles.std((2, 3)),
        edges=torch.stack([gx, gy], -1),
        # one scale for both axes: a patch step costs the same either way
        position=torch.stack([rows, cols], -1) / max(gh, gw),
    )
    parts = [_GROUP_WEIGHTS[name] * _standardise(g.reshape(gh * gw, -1)) for name, g in groups.items()]
    return torch.cat(parts, -1), (gh, gw)


def tower_features(model_dir: Path, image, device: torch.device):
    """Patch features of a local Hugging Face vision model: ``(feats (N, C), grid (g, g))``.

    Loads with ``AutoModel``; a two-tower model (CLIP, SigLIP) contributes its
    vision tower. Uses the saved image processor when there is one, else
    resizes to the configured size with mean = std = 0.5. A leading CLS token
    (N = g * g + 1) is dropped.
    """
    try:
        from transformers import AutoImageProcessor, AutoModel
    except ImportError as exc:
        raise CliError(f"--tower needs transformers: {exc}") from None
    if not model_dir.is_dir():
        raise CliError(f"--tower: no such model directory: {model_dir}")
    try:
        model = AutoModel.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CliError(f"--tower: cannot load a model from {model_dir}: {exc}") from None
    model = getattr(model, "vision_model", model).to(device).eval()
    cfg = model.config
    size, patch = cfg.image_size, cfg.patch_size
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    except (OSError, ValueError):
        import numpy as np

        arr = np.asarray(image.resize((size, size)), dtype=np.float32) / 255.0
        pixels = (torch.from_numpy(arr).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.inference_mode():
        hidden = model(pixel_values=pixels.to(device, next(model.parameters()).dtype)).last_hidden_state[0]
    g = pixels.shape[-1] // patch
    if hidden.shape[0] == g * g + 1:
        hidden = hidden[1:]
    if hidden.shape[0] != g * g:
        raise CliError(f"--tower: {hidden.shape[0]} output tokens do not form a {g} x {g} patch grid")
    return hidden.float(), (g, g)


# ------------------------------------------------------------------ drawing


def _palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours: hues spaced by the golden ratio, two lightness levels."""
    colours = []
    for i in range(n):
        hue = (i * 0.6180339887) % 1.0
        r, g, b = colorsys.hls_to_rgb(hue, 0.5 if i % 2 == 0 else 0.65, 0.85)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def draw_cluster_map(image, labels: torch.Tensor, centers: Sequence[int], grid: tuple[int, int], title: str):
    """The photo beside its cluster map: each cluster a colour over the photo, borders, centres ringed."""
    import numpy as np
    from PIL import Image, ImageDraw

    gh, gw = grid
    w, h = image.size
    lab = labels.view(gh, gw).cpu().numpy()
    colours = np.array(_palette(int(lab.max()) + 1), dtype=np.float32)
    # nearest-neighbour upsampling of the patch grid to the photo
    ys = np.minimum(np.arange(h) * gh // h, gh - 1)
    xs = np.minimum(np.arange(w) * gw // w, gw - 1)
    per_pixel = lab[ys[:, None], xs[None, :]]
    photo = np.asarray(image, dtype=np.float32)
    overlay = 0.5 * photo + 0.5 * colours[per_pixel]
    border = np.zeros((h, w), dtype=bool)
    border[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
    border[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
    overlay[border] = 20.0
    header = 22
    canvas = Image.new("RGB", (2 * w, h + header), "white")
    canvas.paste(image, (0, header))
    canvas.paste(Image.fromarray(overlay.astype(np.uint8)), (w, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 5), title, fill="black")
    radius = max(3, min(w / gw, h / gh) * 0.35)
    for c in centers:
        cy, cx = (c // gw + 0.5) * h / gh + header, w + (c % gw + 0.5) * w / gw
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill="white", outline="black", width=2)
    return canvas


# ------------------------------------------------------------------ commands


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device: unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device: {name!r} is not supported; expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _output_dir(out: str, targets: Sequence[Path]) -> Path:
    """``--out`` as a writable directory, created if needed, and no target that is not a file."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {out}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: the directory is not writable")
    clash = [str(t) for t in targets if t.exists() and not t.is_file()]
    if clash:
        raise CliError(f"--out {out}: {', '.join(clash)} exist and are not files")
    return out_dir


def _save_atomically(canvas, target: Path) -> None:
    """Write next to the target, then rename: an interrupted save leaves no partial PNG."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        canvas.save(partial, format="PNG")
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot write {target}: {exc}") from None


def _check_images(paths: Sequence[Path], args) -> None:
    """Every input decodes and gives at most --max-patches patches: checked before any output is written."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CliError(f"no such image: {', '.join(missing)}")
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise CliError(f"several inputs would write the same map: {', '.join(s + '_clusters.png' for s in twice)}")
    if args.tower:
        return  # the tower fixes its own input size and grid
    for path in paths:
        gh, gw = patch_grid(_open_image(path).size, args.patch, args.size)
        if gh * gw > args.max_patches:
            raise CliError(
                f"{path}: {gh * gw} patches ({gh} x {gw} at --size {args.size}, --patch {args.patch}) exceed "
                f"--max-patches {args.max_patches}; raise --max-patches or lower --size"
            )


def cmd_tokenize(args) -> int:
    import setok_kernels

    device = _device(args.device)
    try:
        setok_kernels._backends.normalize_backend(args.backend, arg="--backend")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    paths = [Path(p) for p in args.images] or [SAMPLE_IMAGE]
    _check_images(paths, args)
    out_dir = _output_dir(args.out, [Path(args.out) / f"{p.stem}_clusters.png" for p in paths])
    # torch's custom-op dispatch imports torch._dynamo on a process's first call (~1 s on
    # 2 cores): timed on its own, so that "cluster" is the clustering
    setup = StageTimer(device)
    setup("torch setup", importlib.import_module, "torch._dynamo")
    print(f"one-time: {setup.summary()} (torch._dynamo, imported by torch's custom-op dispatch)", file=sys.stderr)
    for path in paths:
        timer = StageTimer(device)
        image = timer("load", _open_image, path)
        if args.tower:
            feats, grid = timer("features", tower_features, Path(args.tower), image, device)
        else:
            feats, grid = timer("features", patch_descriptors, image, args.patch, args.size)
        if not bool(torch.isfinite(feats).all()):
            raise CliError(f"{path}: the {'--tower' if args.tower else 'patch'} features hold NaN or Inf")
        x = feats.to(device)[None]
        n = x.shape[1]
        k = min(args.k, n)  # a tiny image has fewer patches than k: use them all
        try:
            result = timer(
                "cluster",
                setok_kernels.dpc_cluster,
                x,
                k=k,
                threshold=args.threshold,
                min_clusters=args.min_clusters,
                max_clusters=args.max_clusters,
                backend=args.backend,
            )
        except (ValueError, TypeError, setok_kernels.BackendUnavailableError) as exc:
            raise CliError(str(exc)) from None
        num = int(result.num_clusters[0])
        centers = result.centers[0, :num].tolist()
        title = f"{path.name}: {n} patches ({grid[0]} x {grid[1]}) -> {num} tokens"
        canvas = timer("draw", draw_cluster_map, image, result.labels[0], centers, grid, title)
        target = out_dir / f"{path.stem}_clusters.png"
        timer("save", _save_atomically, canvas, target)
        print(f"{path}: {n} patches -> {num} tokens | {timer.summary()} | {target}")
    return 0


def cmd_info(args) -> int:
    from setok_kernels import info

    return info.main(args.rest)


def _bench_rows(device: torch.device):
    """(name, backend, callable) for one moderate shape per op; inputs built here, outside the timing."""
    import setok_kernels as sk

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, N, C = (32, 729, 1152) if device.type == "cuda" else (4, 576, 256)
    x = torch.randn(B, N, C, generator=gen).to(device, dtype)
    k, min_clusters = 64, 64
    clusters = sk.dpc_cluster(x, k=k, min_clusters=min_clusters)
    packing = sk.pack_clusters(clusters.labels, clusters.num_clusters)
    packed = x.reshape(B * N, C)[packing.perm]
    H, D = 2, (2048 if device.type == "cuda" else 128)
    q = torch.randn(B * N, H, D, generator=gen).to(device, dtype)
    max_len = int(packing.max_seqlen)
    rows = []
    for backend in ("native", "triton", "reference"):
        if backend == "triton" and device.type != "cuda":
            continue  # the Triton interpreter is for tests, not timings
        rows.append((f"dpc_cluster B={B} N={N} C={C} k={k}", backend,
                     lambda b=backend: sk.dpc_cluster(x, k=k, min_clusters=min_clusters, backend=b, validate=False)))
    rows.append((f"pack_clusters B={B} N={N}", "auto", lambda: sk.pack_clusters(clusters.labels, clusters.num_clusters, validate=False)))
    rows.append((f"segment_mean T={B * N} C={C}", "auto", lambda: sk.segment_mean(packed, packing.cu_seqlens, validate=False)))
    for backend in ("triton", "flash_attn", "xformers", "torch", "reference"):
        if backend == "triton" and device.type != "cuda":
            continue
        rows.append((f"varlen_attention T={B * N} H={H} D={D}", backend,
                     lambda b=backend: sk.varlen_attention(q, q, q, packing.cu_seqlens, max_seqlen_q=max_len, backend=b, validate=False)))
    return rows


def cmd_bench(args) -> int:
    from setok_kernels import BackendUnavailableError

    device = _device(args.device)
    rows = _bench_rows(device)
    results = []
    for i, (name, backend, fn) in enumerate(rows, 1):
        print(f"\r[{i}/{len(rows)}] {name} ({backend})".ljust(78), end="", file=sys.stderr, flush=True)
        try:
            fn()  # warm-up: compiles, autotunes, fills caches
        except BackendUnavailableError as exc:
            results.append((name, backend, None, str(exc).split(": ", 2)[-1]))
            continue
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        results.append((name, backend, statistics.median(times), ""))
    print("\r".ljust(79), end="\r", file=sys.stderr)
    print(f"setok bench on {device.type} (torch {torch.__version__}), median of {args.repeats} after 1 warm-up")
    width = max(len(r[0]) for r in results)
    fastest = {}
    for name, _, ms, _ in results:
        if ms is not None:
            fastest[name] = min(ms, fastest.get(name, math.inf))
    print(f"{'op':<{width}}  {'backend':<10} {'median ms':>10}  {'/ fastest':>9}")
    for name, backend, ms, why in results:
        if ms is None:
            print(f"{name:<{width}}  {backend:<10} {'-':>10}  {'':>9}  unavailable: {why}")
        else:
            print(f"{name:<{width}}  {backend:<10} {ms:>10.2f}  {ms / fastest[name]:>8.2f}x")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``setok: error: ...`` and exit status 2, like every other error."""

    def error(self, message):
        print(f"setok: error: {self.prog.removeprefix('setok ')}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("must not be NaN")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="setok", description="SeTok visual tokenization: fast DPC-kNN clustering and ragged attention.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tok = sub.add_parser("tokenize", help="cluster images into concept tokens and draw the cluster maps")
    tok.add_argument("images", nargs="*", metavar="IMAGE", help=f"image files (default: the bundled {SAMPLE_IMAGE.name})")
    tok.add_argument("--out", default="setok-out", help="directory for the PNG cluster maps (default: setok-out)")
    tok.add_argument("--tower", metavar="PATH", help="local Hugging Face vision model directory (SigLIP, CLIP, ...) for the features")
    tok.add_argument("--k", type=_at_least(1), default=16, help="neighbours in the density estimate (default 16)")
    tok.add_argument("--threshold", type=_threshold, default=0.5, help="score threshold of a cluster centre (default 0.5)")
    tok.add_argument("--min-clusters", type=_at_least(1), default=8, help="clusters when no token passes the threshold (default 8)")
    tok.add_argument("--max-clusters", type=_at_least(1), default=None, help="cap on the clusters per image (default: none)")
    tok.add_argument("--patch", type=_at_least(2), default=16, help="patch size in pixels of the built-in features (default 16)")
    tok.add_argument("--size", type=_at_least(1), default=384, help="short side in pixels the image is resized to (default 384)")
    tok.add_argument("--max-patches", type=_at_least(1), default=DEFAULT_MAX_PATCHES,
                     help=f"refuse an image with more patches than this (default {DEFAULT_MAX_PATCHES}; the clustering is quadratic in them)")
    tok.add_argument("--backend", default=None, help="clustering backend: auto, triton, native, reference (default: $SETOK_BACKEND or auto)")
    tok.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tok.set_defaults(run=cmd_tokenize)

    info = sub.add_parser("info", help="versions, devices, and which backends run here (and why not)", add_help=False)
    info.add_argument("rest", nargs=argparse.REMAINDER)
    info.set_defaults(run=cmd_info)

    bench = sub.add_parser("bench", help="quick timing of the main ops on this machine")
    bench.add_argument("--repeats", type=_at_least(1), default=5, help="timed calls per op (default 5)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (printed by _Parser.error) and --help
        return exc.code
    try:
        return args.run(args)
    except CliError as exc:
        message = str(exc)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        message = f"out of memory ({type(exc).__name__}): lower --size or --max-patches"
    print(f"setok: error: {args.command}: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
