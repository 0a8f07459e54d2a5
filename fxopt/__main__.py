"""``python -m fxopt``: the demo (optimize a built-in ResNet-50-shaped model and print the report)."""

from __future__ import annotations

import sys
import time

import torch

import fxopt
from fxopt.examples import EXAMPLES


def demo(name: str = "resnet50") -> None:
    torch.manual_seed(0)
    model = EXAMPLES[name]()
    inputs = (torch.randn(1, 3, 224, 224),)
    start = time.perf_counter()
    result = fxopt.optimize(model, inputs)
    print(result.report)
    print(f"optimize took {time.perf_counter() - start:.1f} s (verification included)")
    print("passes available:")
    for pass_name, description in fxopt.list_passes().items():
        print(f"  {pass_name:16s} {description}")


if __name__ == "__main__":
    demo(*sys.argv[1:2])
