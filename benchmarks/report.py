"""Markdown tables and speed-up plots from a pytest-benchmark JSON file.

    python benchmarks/report.py bench-out/bench.json --out bench-out

Per group and case (problem shape): each implementation's median, its
speed-up over every baseline of that case (baseline median / its median; > 1
is faster), and the share of the floor it reaches (floor time / median; the
floor is the work's FLOPs at peak rate or its bytes at peak bandwidth, from
``benchmarks/conftest.py``). On CUDA the median is that of the CUDA-event
times of the rounds (device time) when the file has them, else wall time. Writes ``report.md`` and ``speedup_<group>.png``
(matplotlib, when installed) to ``--out``, and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _rows(data: dict) -> dict:
    """{group: {case: [entry]}} for the benchmarks that were measured."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "case" not in info or not bench.get("stats"):
            continue
        median = info.get("event_median_s", bench["stats"]["median"])
        groups[bench["group"] or "ungrouped"][info["case"]].append(
            dict(impl=info["impl"], role=info.get("role", "setok"), median=median,
                 rounds=bench["stats"]["rounds"], info=info)
        )
    return groups


def _environment(data: dict) -> str:
    info = next((b["extra_info"] for b in data["benchmarks"] if "device" in b.get("extra_info", {})), {})
    versions = ", ".join(f"{name} {info[name]}" for name in ("setok", "torch", "triton", "flash_attn", "xformers") if info.get(name))
    commit = data.get("commit_info", {})
    lines = [
        f"- date: {data.get('datetime', 'unknown')}",
        f"- device: {info.get('device', '?')} ({info.get('device_name', '?')}), {info.get('threads', '?')} threads",
        f"- versions: {versions}; python {data.get('machine_info', {}).get('python_version', '?')}",
        f"- floor peaks: {info.get('peak_flops', 0) / 1e12:.3g} TFLOP/s, {info.get('peak_bytes', 0) / 1e9:.3g} GB/s ({info.get('peak_source', '?')})",
    ]
    if any("event_median_s" in b.get("extra_info", {}) for b in data["benchmarks"]):
        lines.append("- timing: CUDA events around each round (medians of device time)")
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    return "\n".join(lines)


def _speed_table(case: str, entries: list) -> list[str]:
    baselines = sorted(e["impl"] for e in entries if e["role"] == "baseline")
    medians = {e["impl"]: e["median"] for e in entries}
    head = ["impl", "median", *[f"vs {b}" for b in baselines], "% of floor", "rounds"]
    lines = [f"**{case}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in sorted(entries, key=lambda e: (e["role"] != "setok", e["median"])):
        ratios = [f"{medians[b] / e['median']:.2f}x" for b in baselines]
        floor = e["info"].get("floor_s", 0.0)
        share = f"{100 * floor / e['median']:.2g}%" if floor else "-"
        impl = f"**{e['impl']}**" if e["role"] == "setok" else e["impl"]
        lines.append("| " + " | ".join([impl, _fmt_time(e["median"]), *ratios, share, str(e["rounds"])]) + " |")
    model = next((e["info"]["h200_model"] for e in entries if e["info"].get("h200_model")), None)
    return lines + [""] + (_model_lines(model) if model else [])


def _model_lines(model: dict) -> list[str]:
    """The H200 cost model of the case (computed from bytes and FLOPs, not measured), to set the medians against."""
    if "total_s" in model:  # DPC: one forward pipeline
        head = f"H200 model (ESTIMATE: computed, not measured): total {_fmt_time(model['total_s'])}"
    else:
        head = (f"H200 model (computed, not measured): forward {_fmt_time(model['fwd_s'])}, "
                f"forward + backward {_fmt_time(model['fwd_bwd_s'])}")
    lines = [head, "",
             "| kernel | config | bytes | FLOPs | time | bound |", "|---|---|---|---|---|---|"]
    for name, k in model["kernels"].items():
        lines.append(f"| {name} | {k['config']} | {k['bytes']:.3g} | {k['flops']:.3g} | {_fmt_time(k['time_s'])} | {k['bound']} |")
    return lines + [""]


def _memory_table(cases: dict) -> list[str]:
    lines = ["| case | impl | peak RSS (whole process) | RSS before clustering | time |", "|---|---|---|---|---|"]
    for case, entries in cases.items():
        for e in entries:
            i = e["info"]
            lines.append(f"| {case} | {e['impl']} | {i['peak_rss_bytes'] / 2**30:.2f} GiB | {i['rss_before_bytes'] / 2**30:.2f} GiB | {i['seconds']} s |")
    return lines


def markdown(data: dict) -> str:
    out = ["# setok benchmark report", "", _environment(data), ""]
    groups = _rows(data)
    if not groups:
        out.append("No measured benchmarks in this file (was it written with --benchmark-disable?).")
    for group, cases in groups.items():
        out += [f"## {group}", ""]
        memory = all("peak_rss_bytes" in e["info"] for entries in cases.values() for e in entries)
        if memory:
            out += _memory_table(cases) + [""]
        else:
            for case, entries in cases.items():
                out += _speed_table(case, entries)
    return "\n".join(out)


def plot(data: dict, out_dir: Path) -> list[Path]:
    """One PNG per group: speed-up of each setok implementation over each baseline, per case (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for group, cases in _rows(data).items():
        if any("peak_rss_bytes" in e["info"] for entries in cases.values() for e in entries):
            continue  # memory, not speed
        bars = []  # (case, setok impl, baseline, speed-up)
        for case, entries in cases.items():
            base = [e for e in entries if e["role"] == "baseline"]
            for e in (e for e in entries if e["role"] == "setok"):
                bars += [(case, e["impl"], b["impl"], b["median"] / e["median"]) for b in base]
        if not bars:
            continue
        labels = [f"{case}\n{impl} vs {b}" for case, impl, b, _ in bars]
        values = [v for *_, v in bars]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
        ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speed-up over baseline (baseline median / setok median)")
        device = next(iter(cases.values()))[0]["info"].get("device_name", "")
        ax.set_title(f"{group} ({device})")
        fig.tight_layout()
        path = out_dir / f"speedup_{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="file written by pytest --benchmark-json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: next to the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    out_dir = args.out or args.json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(data)
    (out_dir / "report.md").write_text(text + "\n")
    print(text)
    for path in plot(data, out_dir):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
