"""Re-parameterization benchmark: per family, the fxopt-optimized net vs the hand-written deploy-time net
(the lower bound) and the training-time net, batch 1 and 8; and optimize() time (verify=False) vs the
family's own hand-written reparameterize(). Runs are interleaved, the order rotated each round (A B C,
B C A, ...): times are medians,
ratios are medians of the per-round ratios (robust to load that drifts during the run).

    python benchmarks/bench_reparam.py [--repeats 30] [--size 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate

import fxopt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reparam_blocks import (  # noqa: E402
    ACBlock, DBBlock, DEConv, MobileOneBlock, Net, RepLKBlock, RepVGGBlock, randomise_bn,
)

PASSES = ["fold_constants", "fold_bn", "reparam_conv"]


def families(c: int) -> dict[str, Callable[[], Net]]:
    return {
        "RepVGG": lambda: Net(RepVGGBlock(3, c, stride=2), RepVGGBlock(c, c), RepVGGBlock(c, c)),
        "ACNet": lambda: Net(ACBlock(3, c, stride=2), ACBlock(c, c), ACBlock(c, c)),
        "DBB": lambda: Net(DBBlock(3, c, stride=2), DBBlock(c, c), DBBlock(c, c)),
        "MobileOne": lambda: Net(MobileOneBlock(3, c, stride=2), MobileOneBlock(c, c, groups=c), MobileOneBlock(c, c, k=1)),
        "RepLKNet": lambda: Net(RepVGGBlock(3, c, stride=2), RepLKBlock(c, large=13, small=5), RepLKBlock(c, 13, 5)),
        "DEConv": lambda: Net(RepVGGBlock(3, c, stride=2), DEConv(c, sum_weights=False), DEConv(c, sum_weights=True)),
    }


def interleaved_times(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each fn per round, running them in turn after a warm-up, the order rotated each
    round (A B C, B C A, C A B, ...): a small net run right after the training net finds the caches
    cold, which in a fixed order cost MobileOne's optimized net 4% against the deploy net."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        for k in range(len(fns)):
            i = (round_ + k) % len(fns)
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each fn, run interleaved."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats)]


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of the per-round ratios of two interleaved series."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--channels", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, build in families(args.channels).items():
        net = randomise_bn(build())
        example = (torch.randn(1, 3, args.size, args.size),)
        optimized = fxopt.optimize(net, example, passes=PASSES)
        assert optimized.report.verification.passed, optimized.report
        deploy = net.deploy()
        t_opt, t_hand = interleaved_medians(
            [lambda: fxopt.optimize(net, example, passes=PASSES, verify=False), net.deploy], max(5, args.repeats // 3)
        )
        latency = {}
        with torch.inference_mode():
            for batch in (1, 8):
                x = torch.randn(batch, 3, args.size, args.size)
                latency[batch] = interleaved_times(
                    [lambda: optimized(x), lambda: deploy(x), lambda: net(x)], args.repeats
                )
        row = [name]
        for batch in (1, 8):
            o, d, t = latency[batch]
            row += [f"{statistics.median(s) * 1e3:.3f}" for s in (o, d, t)]
            row += [f"{median_ratio(o, d):.3f}", f"{median_ratio(t, o):.2f}x"]
        row += [f"{t_opt * 1e3:.1f}", f"{t_hand * 1e3:.1f}"]
        rows.append(row)
    headers = ["family"]
    for batch in (1, 8):
        headers += [f"opt ms b{batch}", f"deploy ms b{batch}", f"train ms b{batch}", f"opt/deploy b{batch}",
                    f"speedup vs train b{batch}"]
    headers += ["optimize ms (verify=False)", "hand reparameterize ms"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size}x{args.size}, "
          f"{args.channels} channels, medians of {args.repeats} interleaved runs\n")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
