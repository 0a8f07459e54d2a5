"""fold_bn vs torch.fx.experimental.optimization.fuse, side by side in one run.

    python benchmarks/bench_fold_bn.py [--repeats 7]

For the ResNet-50-shaped model and for a model whose BatchNorms are functional calls
(timm's BatchNormAct style): wall time of each transformation and the latency of each result,
alternating A, B, A, B and reporting medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.fx.experimental.optimization as fx_opt
from tabulate import tabulate

import fxopt
from fxopt.examples import functional_bn_net, resnet50


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def latency(model, x, iters: int) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - start) / iters


def batch_norm_count(module) -> int:
    return sum(
        1
        for n in module.graph.nodes
        if n.target is torch.nn.functional.batch_norm
        or (n.op == "call_module" and isinstance(module.get_submodule(n.target), torch.nn.modules.batchnorm._BatchNorm))
    )


def bench(name: str, model, x, repeats: int, iters: int) -> list:
    fxopt_times, fuse_times, fxopt_lat, fuse_lat, orig_lat = [], [], [], [], []
    for _ in range(repeats):
        # the generated module, like fuse()'s GraphModule
        ours, t = timed(lambda: fxopt.optimize(model, (x,), passes=["fold_bn"], verify=False, keep_class=False))
        fxopt_times.append(t)
        theirs, t = timed(lambda: fx_opt.fuse(model))
        fuse_times.append(t)
    for _ in range(repeats):
        fxopt_lat.append(latency(ours, x, iters))
        fuse_lat.append(latency(theirs, x, iters))
        orig_lat.append(latency(model, x, iters))
    med = statistics.median
    return [
        name,
        f"{med(fxopt_times) * 1e3:.0f} / {med(fuse_times) * 1e3:.0f}",
        f"{med(fxopt_times) / med(fuse_times):.2f}",
        f"{med(fxopt_lat) * 1e3:.2f} / {med(fuse_lat) * 1e3:.2f} / {med(orig_lat) * 1e3:.2f}",
        f"{med(fxopt_lat) / med(fuse_lat):.3f}",
        f"{batch_norm_count(ours)} / {batch_norm_count(theirs)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [
        bench("ResNet-50 (1x3x224x224)", resnet50(), torch.randn(1, 3, 224, 224), args.repeats, args.iters),
        bench("functional BN net (1x3x128x128)", functional_bn_net(), torch.randn(1, 3, 128, 128), args.repeats, args.iters),
    ]
    headers = [
        "model", "transform ms fxopt / fuse", "ratio", "latency ms fxopt / fuse / original",
        "latency ratio fxopt/fuse", "BatchNorms left fxopt / fuse",
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} alternating runs")
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
