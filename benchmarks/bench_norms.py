"""ln_to_rmsnorm: latency of the original vs the rewritten model, eager and torch.compile, in one run.

    python benchmarks/bench_norms.py [--repeats 15] [--iters 5]

GPT-2-small-shaped (12 x 768, tied head) and ViT-S-shaped (12 x 384, patch 16) transformers with
random weights and short sequences. The four variants are timed alternately (A, B, C, D, A, ...)
and medians reported. The baseline is the same captured graph with no pass applied
(``optimize(passes=[])``), so the ratio isolates the rewrite from the removal of HF's Python
overhead. The rewritten model's norms run the LayerNorm kernel on a zero-mean stream
(fxopt.codegen lowers zero_mean_rms_norm so).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from tabulate import tabulate

import fxopt


def gpt2_small() -> tuple[torch.nn.Module, tuple]:
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, 50257, (1, 32)),)


def vit_small() -> tuple[torch.nn.Module, tuple]:
    config = transformers.ViTConfig(image_size=112, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                    num_attention_heads=6, intermediate_size=1536)
    return transformers.ViTForImageClassification(config).eval(), (torch.randn(1, 3, 112, 112),)


def latency(model, inputs: tuple, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(*inputs)
    return (time.perf_counter() - start) / iters * 1e3


def bench(name: str, model, inputs: tuple, repeats: int, iters: int) -> list:
    captured = fxopt.optimize(model, inputs, passes=[], verify=False)
    rewritten = fxopt.optimize(model, inputs, passes=["ln_to_rmsnorm"])
    assert rewritten.report.passes[0].applied == 1, str(rewritten.report)
    variants = {"eager": captured, "eager ln_to_rmsnorm": rewritten,
                "compiled": torch.compile(captured), "compiled ln_to_rmsnorm": torch.compile(rewritten)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():  # compile and warm up
            m(*inputs), m(*inputs)
        for _ in range(repeats):
            for key, m in variants.items():
                times[key].append(latency(m, inputs, iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    return [name, med["eager"], med["eager ln_to_rmsnorm"], med["eager ln_to_rmsnorm"] / med["eager"],
            med["compiled"], med["compiled ln_to_rmsnorm"], med["compiled ln_to_rmsnorm"] / med["compiled"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [bench(name, *build(), args.repeats, args.iters)
            for name, build in (("GPT-2-small, 32 tokens", gpt2_small), ("ViT-S/16, 112 px (50 tokens)", vit_small))]
    headers = ["model", "eager ms", "rewritten ms", "ratio", "compiled ms", "compiled rewritten ms", "ratio"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} x {args.iters} runs")
    print(tabulate(rows, headers=headers, floatfmt=".3f"))


if __name__ == "__main__":
    main()
