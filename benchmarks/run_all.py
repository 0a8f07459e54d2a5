"""The benchmark suite in one command: every benchmark, one Markdown report, PNG plots.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results]

Each benchmark runs in its own process (they measure ratios side by side inside one run, see each
script's docstring); their tables are gathered in OUT/README.md under the machine they ran on, and
OUT/*.png plots the ratio columns of every table and the scale figures (time per node and peak
extra memory against graph size). Plots need matplotlib (`pip install matplotlib`); without it
the report is written and the plots are skipped. Benchmarks whose optional dependencies are
missing (transformers, peft) are reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# name -> (script and arguments, quick arguments, modules it needs)
BENCHMARKS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "fold_bn vs torch.fx fuse": (["bench_fold_bn.py"], ["--repeats", "3"], []),
    "conv re-parameterization": (["bench_reparam.py"], ["--repeats", "10"], []),
    "LoRA merging vs PEFT": (["bench_lora.py"], [], ["transformers", "peft"]),
    "LayerNorm to RMSNorm": (["bench_norms.py"], ["--repeats", "5"], ["transformers"]),
    "torch.compile backend": (["bench_backend.py"], [], []),
    "error against the float64 oracle": (["bench_error.py"], ["--examples", "2"], []),
    "scale": (["bench_scale.py"], ["--sizes", "1000,3000,10000"], []),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def missing(modules: list[str]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The GitHub-style Markdown tables in a benchmark's output, as (headers, rows)."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            headers = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            found.append((headers, rows))
        else:
            i += 1
    return found


def _number(cell: str) -> float | None:
    match = re.match(r"^\s*([-+]?\d*\.?\d+(?:e[-+]?\d+)?)\s*x?\s*$", cell)
    return float(match.group(1)) if match else None


def plot_ratios(name: str, headers: list[str], rows: list[list[str]], path: Path) -> bool:
    """A bar chart of the table's ratio columns (headers with '/' or 'ratio'), one group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [j for j, h in enumerate(headers) if ("/" in h or "ratio" in h.lower())
               and any(_number(r[j]) is not None for r in rows if j < len(r))]
    if not columns:
        return False
    labels = [" ".join(r[:2]) if len(r) > 1 and _number(r[1]) is None else r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) * len(columns)), 4))
    width = 0.8 / len(columns)
    for k, j in enumerate(columns):
        values = [(_number(r[j]) if j < len(r) else None) or 0.0 for r in rows]
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=headers[j])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_scale(headers: list[str], rows: list[list[str]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = {h: j for j, h in enumerate(headers)}
    if not {"family", "graph nodes", "inplace", "us/node", "extra / model"} <= col.keys():
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for family in sorted({r[col["family"]] for r in rows}):
        for inplace in ("no", "yes"):
            mine = [r for r in rows if r[col["family"]] == family and r[col["inplace"]] == inplace]
            nodes = [float(r[col["graph nodes"]]) for r in mine]
            label = f"{family}, inplace={inplace}"
            left.plot(nodes, [float(r[col["us/node"]]) for r in mine], marker="o", label=label)
            right.plot(nodes, [float(r[col["extra / model"]]) for r in mine], marker="o", label=label)
    for ax, title in ((left, "optimize time per graph node (us)"), (right, "peak extra memory / model size")):
        ax.set_xscale("log")
        ax.set_xlabel("graph nodes")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a few minutes)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", help="comma-separated benchmark script names, e.g. bench_error.py")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401

        can_plot = True
    except ImportError:
        can_plot = False
    report = [f"# fxopt benchmarks\n\nMachine: {machine()}. Run: {time.strftime('%Y-%m-%d %H:%M')}"
              f"{' (--quick)' if args.quick else ''}. Figures are ratios measured side by side in one run.\n"]
    for name, (command, quick, needs) in BENCHMARKS.items():
        script = command[0]
        if args.only and script not in args.only.split(","):
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        absent = missing(needs)
        if not (HERE / script).exists() or absent:
            why = f"needs {', '.join(absent)}" if absent else f"{script} is not there"
            report.append(f"## {name}\n\nskipped: {why}\n")
            continue
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(HERE / script), *command[1:], *(quick if args.quick else [])],
                             capture_output=True, text=True, cwd=HERE)
        seconds = time.perf_counter() - start
        section = [f"## {name}\n", f"`python benchmarks/{' '.join([script, *command[1:], *(quick if args.quick else [])])}`"
                   f" ({seconds:.0f} s)\n"]
        if run.returncode != 0:
            section.append(f"FAILED (exit {run.returncode}):\n\n```\n{run.stderr[-2000:]}\n```\n")
        found = tables(run.stdout)
        section.append(run.stdout.strip() + "\n" if found else f"```\n{run.stdout.strip()[-3000:]}\n```\n")
        for k, (headers, rows) in enumerate(found):
            png = args.out / f"{Path(script).stem}{'_' + str(k) if k else ''}.png"
            if can_plot and (plot_scale(headers, rows, png) if script == "bench_scale.py"
                             else plot_ratios(name, headers, rows, png)):
                section.append(f"![{name}]({png.name})\n")
        report.append("\n".join(section))
    if not can_plot:
        report.append("Plots skipped: matplotlib is not installed (`pip install matplotlib`).\n")
    (args.out / "README.md").write_text("\n".join(report))
    print(f"wrote {args.out / 'README.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
