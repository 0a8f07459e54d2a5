"""Scale: optimize() on synthetic graphs of 1k to 100k nodes (benchmarks/scale_models.py).

For each family and size (and a ResNet-50, whose layers are large and few), in a fresh process (so
peak memory is that run's own): optimize time with
verify=False, time per graph node, and the peak extra memory of optimize (peak RSS during the call
minus RSS before it) as a multiple of the model's own tensor bytes, with inplace=False and True.

    python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--channels 32]
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


def measure(family: str, nodes: int, channels: int, inplace: bool) -> dict:
    """One run, in this process: build, optimize once, report."""
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
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # a first call on a tiny model imports what optimize imports lazily: not the big model's cost
    warm = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1)).eval()
    fxopt.optimize(warm, (torch.randn(1, 1, 2, 2),), verify=False)
    before = _rss_bytes()
    _reset_peak()
    start = time.perf_counter()
    result = fxopt.optimize(model, inputs, verify=False, inplace=inplace)
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    graph_nodes = result.report.passes[0].nodes_before if result.report.passes else 0
    return {
        "family": family, "nodes": graph_nodes, "inplace": inplace, "seconds": seconds,
        "us_per_node": seconds / max(graph_nodes, 1) * 1e6, "model_mb": model_bytes / 2**20,
        "extra_mb": (peak - before) / 2**20, "extra_x_model": (peak - before) / model_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,3000,10000,30000,100000")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--families", default="resnet50,deep_residual,wide_branchy")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # family,nodes,channels,inplace: run in this process
    args = parser.parse_args()
    if args.one:
        family, nodes, channels, inplace = args.one.split(",")
        print(json.dumps(measure(family, int(nodes), int(channels), inplace == "1")))
        return
    from tabulate import tabulate

    rows = []
    for family in args.families.split(","):
        for nodes in [0] if family == "resnet50" else (int(n) for n in args.sizes.split(",")):
            for inplace in (0, 1):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", f"{family},{nodes},{args.channels},{inplace}"],
                    capture_output=True, text=True, check=True, cwd=HERE,
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
