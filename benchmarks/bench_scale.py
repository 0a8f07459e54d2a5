"""Scale: optimize() on synthetic graphs of 1k to 100k nodes (benchmarks/scale_models.py).

For each family and size (and a ResNet-50, whose layers are large and few), in a fresh process (so
peak memory is that run's own): optimize time with
verify=False, time per graph node, and the peak extra memory of optimize (peak RSS during the call
minus RSS before it) as a multiple of the model's own tensor bytes, with inplace=False and True.

    python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--channels 32] [--keep-class 0|1]

``--stages deep_residual,10000`` instead shows where the Python memory goes (tracemalloc: tensor
storage is not counted), stage by stage of one optimize() call, per graph node, beside the floor
torch.fx itself sets: symbolic_trace alone, and compiling a GraphModule's generated code.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> None:
    """Start the kernel's peak-RSS count (VmHWM) afresh (Linux: clear_refs with 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _build(family: str, nodes: int, channels: int) -> tuple:
    """The model and its inputs, after a first optimize() of a tiny model (it imports what optimize
    imports lazily: not the big model's cost)."""
    import torch

    import fxopt
    from scale_models import NODES_PER_BLOCK, deep_residual, example, wide_branchy

    torch.set_num_threads(1)
    if family == "resnet50":  # a real model: large layers, few nodes
        from fxopt.examples import resnet50

        model, inputs = resnet50(), (torch.randn(1, 3, 224, 224),)
    else:
        build = {"deep_residual": deep_residual, "wide_branchy": wide_branchy}[family]
        model = build(max(1, nodes // NODES_PER_BLOCK[family]), channels)
        inputs = example(channels)
    warm = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1)).eval()
    fxopt.optimize(warm, (torch.randn(1, 1, 2, 2),), verify=False)
    return model, inputs


def measure(family: str, nodes: int, channels: int, inplace: bool, keep_class: str = "") -> dict:
    """One run, in this process: build, optimize once, report."""
    import fxopt

    model, inputs = _build(family, nodes, channels)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    before = _rss_bytes()
    _reset_peak()
    start = time.perf_counter()
    options = {"keep_class": keep_class == "1"} if keep_class else {}  # "": optimize's default
    result = fxopt.optimize(model, inputs, verify=False, inplace=inplace, **options)
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    graph_nodes = result.report.passes[0].nodes_before if result.report.passes else 0
    return {
        "family": family, "nodes": graph_nodes, "inplace": inplace, "seconds": seconds,
        "us_per_node": seconds / max(graph_nodes, 1) * 1e6, "model_mb": model_bytes / 2**20,
        "extra_mb": (peak - before) / 2**20, "extra_x_model": (peak - before) / model_bytes,
    }


# fxopt.driver's stage functions, each measured as it returns (wrapped there: the run is optimize's own)
_STAGES = ("capture", "canonicalize", "snapshot", "Rewriter", "apply_pass", "keep_class_of", "finalize")


def stages(family: str, nodes: int, channels: int, inplace: bool, keep_class: str) -> None:
    """Python memory held after each stage of one optimize() and its peak during it, per graph node."""
    import gc
    import tracemalloc

    import torch
    from tabulate import tabulate

    import fxopt
    import fxopt.driver as driver

    model, inputs = _build(family, nodes, channels)
    rows: list[tuple[str, int | None, int]] = []  # stage, held after it, peak during it (above the start)
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]

    def above_start() -> tuple[int, int]:
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        return held - start, peak - start

    traced_gm = torch.fx.symbolic_trace(model)
    rows.append(("fx: symbolic_trace alone", *above_start()))
    source = traced_gm.code
    del traced_gm
    gc.collect()
    start = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    compile(source, "<fx code>", "exec")
    rows.append(("fx: compiling its generated code", None, above_start()[1]))
    del source
    gc.collect()
    start = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()

    def traced(name: str, stage):
        def run(*args, **kwargs):
            value = stage(*args, **kwargs)
            rows.append((f"{name} {args[1].name}" if name == "apply_pass" else name, *above_start()))
            return value

        return run

    originals = {name: getattr(driver, name) for name in _STAGES}
    try:
        for name, stage in originals.items():
            setattr(driver, name, traced(name, stage))
        options = {"keep_class": keep_class == "1"} if keep_class else {}  # "": optimize's default
        result = fxopt.optimize(model, inputs, verify=False, inplace=inplace, **options)
    finally:
        for name, stage in originals.items():
            setattr(driver, name, stage)
    gc.collect()
    rows.append(("the result alone (optimize returned)", *above_start()))
    n = result.report.passes[0].nodes_before
    print(f"{family}, {n} graph nodes, inplace={inplace}, keep_class={keep_class or 'default'}: "
          "Python memory above the start (tracemalloc; tensor storage is not counted)")
    table = [[name, "" if held is None else f"{held / 2**20:.1f}", "" if held is None else f"{held / n:.0f}",
              f"{peak / 2**20:.1f}", f"{peak / n:.0f}"] for name, held, peak in rows]
    print(tabulate(table, headers=["stage", "held after MB", "B/node", "peak during MB", "B/node"], tablefmt="github"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,3000,10000,30000,100000")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--families", default="resnet50,deep_residual,wide_branchy")
    parser.add_argument("--keep-class", choices=["0", "1"], default="", help="default: optimize's default")
    parser.add_argument("--stages", help="family,nodes: where optimize's Python memory goes, by stage")
    parser.add_argument("--inplace", action="store_true", help="with --stages")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # family,nodes,channels,inplace,keep_class: run here
    args = parser.parse_args()
    if args.stages:
        family, nodes = args.stages.split(",")
        stages(family, int(nodes), args.channels, args.inplace, args.keep_class)
        return
    if args.one:
        family, nodes, channels, inplace, keep_class = args.one.split(",")
        print(json.dumps(measure(family, int(nodes), int(channels), inplace == "1", keep_class)))
        return
    from tabulate import tabulate

    rows = []
    for family in args.families.split(","):
        for nodes in [0] if family == "resnet50" else (int(n) for n in args.sizes.split(",")):
            for inplace in (0, 1):
                one = f"{family},{nodes},{args.channels},{inplace},{args.keep_class}"
                out = subprocess.run(
                    [sys.executable, __file__, "--one", one], capture_output=True, text=True, check=True, cwd=HERE
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append([r["family"], r["nodes"], "yes" if r["inplace"] else "no", f"{r['seconds']:.2f}",
                             f"{r['us_per_node']:.0f}", f"{r['model_mb']:.1f}", f"{r['extra_mb']:.1f}",
                             f"{r['extra_x_model']:.2f}"])
                print(rows[-1], flush=True)
    print(tabulate(rows, headers=["family", "graph nodes", "inplace", "optimize s", "us/node", "model MB",
                                  "peak extra MB", "extra / model"], tablefmt="github"))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
