"""ln_to_rmsnorm and ln_to_crmsnorm: latency of the original vs the rewritten models, eager and
torch.compile, in one run.

    python benchmarks/bench_norms.py [--repeats 15] [--iters 5]

GPT-2-small-shaped (12 x 768, tied head) and ViT-S-shaped (12 x 384, patch 16) transformers with
random weights (128 tokens; 224 px, 197 tokens by default). All variants are timed alternately (A, B, C, ..., A, ...) and
medians of the per-round ratios to the original reported. The baseline is the same captured graph
with no pass applied (``optimize(passes=[])``), so the ratios isolate the rewrite from the removal
of HF's Python overhead. The ln_to_rmsnorm model's norms run on a zero-mean stream with
fxopt.runtime.zero_mean_rms_norm: torch's LayerNorm kernel in eager mode, the RMSNorm under
torch.compile (whichever is faster there; on that input both compute the RMSNorm); the ln_to_crmsnorm model keeps a d - 1
channel stream (767 and 383 here), normalizes it with a composite CRMSNorm (several kernels in
eager mode, one fused kernel compiled), and the Linears reading each norm take d - 1 inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from tabulate import tabulate

import fxopt


def gpt2_small(tokens: int) -> tuple[torch.nn.Module, tuple]:
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, 50257, (1, tokens)),)


def vit_small(image_size: int) -> tuple[torch.nn.Module, tuple]:
    config = transformers.ViTConfig(image_size=image_size, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                    num_attention_heads=6, intermediate_size=1536)
    return transformers.ViTForImageClassification(config).eval(), (torch.randn(1, 3, image_size, image_size),)


def latency(model, inputs: tuple, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(*inputs)
    return (time.perf_counter() - start) / iters * 1e3


REWRITES = ("ln_to_rmsnorm", "ln_to_crmsnorm")


def bench(name: str, model, inputs: tuple, repeats: int, iters: int) -> list[list]:
    # generated modules (keep_class=False): the kept class would keep HF's nn.LayerNorm modules
    models = {"original": fxopt.optimize(model, inputs, passes=[], verify=False, keep_class=False)}
    for rewrite in REWRITES:
        models[rewrite] = fxopt.optimize(model, inputs, passes=[rewrite], keep_class=False)
        assert models[rewrite].report.passes[0].applied == 1, str(models[rewrite].report)
    variants = {(key, mode): m if mode == "eager" else torch.compile(m)
                for key, m in models.items() for mode in ("eager", "compiled")}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():  # compile and warm up
            m(*inputs), m(*inputs)
        order = list(variants.items())
        for round_ in range(repeats):  # the order rotated each round, so no variant always follows another
            for key, m in order[round_ % len(order):] + order[:round_ % len(order)]:
                times[key].append(latency(m, inputs, iters))

    def ratio(key: str, mode: str) -> float:
        return statistics.median(t / base for t, base in zip(times[key, mode], times["original", mode]))

    def faster(key: str, mode: str) -> float:  # a sign test: how often the variant beat the original
        return sum(t < base for t, base in zip(times[key, mode], times["original", mode])) / repeats

    med = {k: statistics.median(v) for k, v in times.items()}
    return [[name if key == "original" else "", key, med[key, "eager"], ratio(key, "eager"),
             med[key, "compiled"], ratio(key, "compiled"), faster(key, "compiled")] for key in models]


def norm_kernels(tokens: int, width: int, repeats: int) -> list:
    """The residual add + norm alone, compiled, at a model's shape: the most ln_to_rmsnorm can save
    per norm under torch.compile (the LayerNorm's mean is the work it removes)."""
    weight, bias = torch.randn(width), torch.randn(width)

    def add_layer_norm(x, r):
        return F.layer_norm(x + r, (width,), weight, bias, 1e-5)

    def add_rms_norm(x, r):
        return F.rms_norm(x + r, (width,), weight, 1e-5) + bias

    x, r = torch.randn(tokens, width), torch.randn(tokens, width)
    kernels = [torch.compile(add_layer_norm), torch.compile(add_rms_norm)]
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for k in kernels:
            k(x, r), k(x, r)
        for _ in range(repeats):
            for k, t in zip(kernels, times):
                t.append(latency(k, (x, r), 50))
    ln, rms = (statistics.median(t) for t in times)
    ratio = statistics.median(b / a for a, b in zip(*times))
    return [f"({tokens}, {width})", ln * 1e3, rms * 1e3, ratio]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="GPT-2's sequence length")
    parser.add_argument("--image-size", type=int, default=224, help="ViT's input height and width")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = ((f"GPT-2-small, {args.tokens} tokens", lambda: gpt2_small(args.tokens)),
              (f"ViT-S/16, {args.image_size} px ({(args.image_size // 16) ** 2 + 1} tokens)",
               lambda: vit_small(args.image_size)))
    rows = [row for name, build in models for row in bench(name, *build(), args.repeats, args.iters)]
    headers = ["model", "variant", "eager ms", "eager ratio", "compiled ms", "compiled ratio", "compiled: rounds faster"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} x {args.iters} runs")
    print(tabulate(rows, headers=headers, floatfmt=".3f"))
    kernels = [norm_kernels(args.tokens, 768, args.repeats),
               norm_kernels((args.image_size // 16) ** 2 + 1, 384, args.repeats)]
    print("\nresidual add + norm alone, compiled (GPT-2 and ViT shapes; 25 such norms per model):")
    print(tabulate(kernels, headers=["shape", "add + layer_norm us", "add + rms_norm us", "rms / layer_norm"],
                   floatfmt=".3f"))


if __name__ == "__main__":
    main()
