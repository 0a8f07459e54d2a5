"""torch.compile(backend="fxopt") vs plain torch.compile (inductor), and vs inductor with its own
parameter freezing (``torch._inductor.config.freezing``, which also folds conv + BatchNorm), on a
RepVGG net (branch merging), a ResNet-50-shaped net (BatchNorm folding) and an MLP with LoRA
adapters (adapter merging). All under torch.no_grad(), latencies interleaved (A, B, C, A, B, C,
...) and medians reported, ratios relative to plain inductor (< 1: faster than inductor).

    python benchmarks/bench_backend.py [--repeats 30] [--batch 1]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate

import fxopt
from fxopt.examples import resnet50

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reparam_blocks import Net, RepVGGBlock, randomise_bn  # noqa: E402

from bench_reparam import interleaved_medians  # noqa: E402  (one timing loop for the suite)


class LoRAMLP(nn.Module):
    """``depth`` Linear layers, each with an unmerged rank-``rank`` adapter beside it."""

    def __init__(self, width: int = 512, depth: int = 4, rank: int = 16):
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.lora_A = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(depth))
        self.lora_B = nn.ModuleList(nn.Linear(rank, width, bias=False) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for base, a, b in zip(self.base, self.lora_A, self.lora_B):
            x = torch.relu(base(x) + b(a(x)) * 0.5)
        return x


def models(batch: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    c = 32
    return {
        "RepVGG (branch merging)": (
            randomise_bn(Net(RepVGGBlock(3, c, stride=2), *(RepVGGBlock(c, c) for _ in range(3)))).eval(),
            torch.randn(batch, 3, 64, 64),
        ),
        "ResNet-50 width 16 (BatchNorm folding)": (resnet50(width=16), torch.randn(batch, 3, 96, 96)),
        "MLP + LoRA r=16 (adapter merging)": (LoRAMLP().eval(), torch.randn(batch * 64, 512)),
    }


def compiled(model: nn.Module, x: torch.Tensor, backend: str, freezing: bool = False) -> tuple[Callable, float]:
    """The compiled model (compiled by a first call) and the seconds that compile took. Freezing
    must be on while dynamo traces (it then reads parameters as constants); the option keeps this
    compile's cache entry apart from plain inductor's (dynamo reuses entries of equal backends)."""
    fn = torch.compile(model, backend=backend, options={"freezing": True} if freezing else None)
    start = time.perf_counter()
    with torch._inductor.config.patch(freezing=freezing), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(x)
    return fn, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, (model, x) in models(args.batch).items():
            fx_fn, fx_compile = compiled(model, x, "fxopt")
            ind_fn, ind_compile = compiled(model, x, "inductor")
            frz_fn, frz_compile = compiled(model, x, "inductor", freezing=True)
            verdicts = [fxopt.verify(model, fn, (x,), examples=2).passed for fn in (fx_fn, ind_fn, frz_fn)]
            assert all(verdicts), f"{name}: a compiled model fails verification {verdicts}"
            t_fx, t_ind, t_frz, t_eager = interleaved_medians(
                [lambda: fx_fn(x), lambda: ind_fn(x), lambda: frz_fn(x), lambda: model(x)], args.repeats
            )
            rows.append([
                name, f"{t_fx * 1e3:.3f}", f"{t_ind * 1e3:.3f}", f"{t_frz * 1e3:.3f}", f"{t_eager * 1e3:.3f}",
                f"{t_fx / t_ind:.3f}", f"{t_frz / t_ind:.3f}",
                f"{fx_compile:.1f} / {ind_compile:.1f} / {frz_compile:.1f}",
            ])
    headers = ["model", "fxopt ms", "inductor ms", "inductor+freezing ms", "eager ms", "fxopt / inductor",
               "freezing / inductor", "compile s (fxopt / inductor / freezing)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"medians of {args.repeats} interleaved runs, torch.no_grad()\n")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
