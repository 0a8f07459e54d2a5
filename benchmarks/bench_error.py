"""Error against the float64 oracle, per model and dtype: the original model's own rounding error
next to the optimized model's, on the same random inputs (fxopt.verify's examples).

A rewrite that is exact in real arithmetic should leave the error where the original's rounding put
it: the ratio optimized / original is what to read (about 1; fxopt.verify fails a model whose error
goes past its dtype-aware bound).

    python benchmarks/bench_error.py [--examples 5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate

import fxopt
from fxopt.examples import functional_bn_net, resnet50

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reparam_blocks import DBBlock, MobileOneBlock, Net, RepVGGBlock, randomise_bn  # noqa: E402
from transformer_blocks import ViT  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def models() -> dict[str, tuple[Callable[[], nn.Module], tuple, list[str] | None]]:
    """name -> (build, example inputs in float32, passes)."""
    image = (torch.randn(2, 3, 32, 32),)
    return {
        "ResNet-50 (width 16), default": (lambda: resnet50(width=16), image, None),
        "functional-BN net, default": (lambda: functional_bn_net(width=16), image, None),
        "RepVGG/DBB/MobileOne net, reparam": (
            lambda: randomise_bn(Net(RepVGGBlock(3, 16, stride=2), DBBlock(16, 16), MobileOneBlock(16, 16))),
            image, None),
        "ViT (LayerScale, cls), ln_to_rmsnorm": (
            lambda: ViT(d=32, depth=2, image=16).eval(), (torch.randn(2, 3, 16, 16),),
            ["ln_to_rmsnorm", "fold_norm_affine"]),
    }


def measure(build: Callable[[], nn.Module], inputs: tuple, passes: list[str] | None, dtype: torch.dtype,
            examples: int) -> list[str]:
    torch.manual_seed(0)
    model = build().to(dtype)
    inputs = tuple(x.to(dtype) for x in inputs)
    try:
        result = fxopt.optimize(model, inputs, passes=passes, verify=False)
        verdict = fxopt.verify(model, result, inputs, examples=examples)
    except Exception as error:  # noqa: BLE001 - e.g. a kernel this CPU build lacks for the dtype
        return [f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:60]})", "", "", ""]
    original = max((e.reference_rel for e in verdict.errors), default=0.0)
    optimized = max((e.candidate_rel for e in verdict.errors), default=0.0)
    ratio = optimized / original if original else float("nan")
    return [f"{original:.3g}", f"{optimized:.3g}", f"{ratio:.2f}", "passed" if verdict.passed else "FAILED"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, (build, inputs, passes) in models().items():
        for dtype in DTYPES:
            rows.append([name, str(dtype).removeprefix("torch."), *measure(build, inputs, passes, dtype, args.examples)])
            print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["model, passes", "dtype", "original rel. error", "optimized rel. error",
                                  "optimized / original", "fxopt.verify"], tablefmt="github"))


if __name__ == "__main__":
    main()
