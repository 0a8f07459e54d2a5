"""reparam_quant in float32: how often does the per-channel -> per-tensor rewrite change a code?

    python benchmarks/quant_code_flips.py [--seeds 200] [--bits 2 8] [--tokens 512] [--dtype float32]

The rewrite keeps every integer code in real arithmetic (see patterns/reparam_quant.py); in
float32 the LayerNorm output and its product with the quantizer's reciprocal scale are rounded
differently before and after, so an activation within an ulp of a rounding boundary can get the
neighbouring code. For each (seed, bits): a random model Linear -> LayerNorm (uneven affine) ->
1 to 3 Linears is calibrated with ``fxopt.quant.calibrate`` on 4 random batches, then

* ``optimize(passes=["reparam_quant"])`` with validation: is the rewrite committed or rolled back
  (and does whole-model verification pass)? Did it flip a code on the example it was validated
  on, and was it committed anyway?
* the same without validation (always rewritten): codes of ``--tokens`` fresh tokens compared
  with the calibrated model's, all channels;
* the same per-tensor parameters computed in float32 arithmetic instead of float64 rounded once,
  on the same tokens: does the float64 computation remove flips, or only some?
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import fxopt
from fxopt import quant
from fxopt.interpret import run_graph
from fxopt.patterns.reparam_quant import per_tensor_parameters


class LayerNormIntoLinears(nn.Module):
    def __init__(self, dim: int, consumers: int, generator: torch.Generator):
        super().__init__()
        self.embed, self.norm = nn.Linear(8, dim), nn.LayerNorm(dim)
        self.linears = nn.ModuleList(nn.Linear(dim, 4) for _ in range(consumers))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            self.norm.weight.copy_(torch.randn(dim, generator=generator).exp())  # channel ranges differ ~10x
            self.norm.bias.copy_(torch.randn(dim, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.embed(x))
        return sum(linear(y) for linear in self.linears)


@dataclass
class Counts:
    configs: int = 0
    committed: int = 0
    rolled_back: int = 0
    skipped: int = 0
    verification_failed: int = 0
    committed_with_example_flips: int = 0  # validation saw a changed code and let it through
    codes: int = 0
    flips: int = 0  # codes the rewrite (parameters in float64, rounded once) changes
    flips_float32_arithmetic: int = 0  # the same parameters computed in float32
    configs_with_flips: int = 0


def codes_of(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The integer codes of the model's one uniform fake-quantizer, from its output (q - z) * s."""
    values = run_graph(gm, (x,))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in
               (torch.fake_quantize_per_channel_affine, torch.fake_quantize_per_tensor_affine)]
    args = {**dict(zip(("input", "scale", "zero_point"), node.args)), **node.kwargs}
    scale, zero_point = values[args["scale"]], values[args["zero_point"]]
    return (torch.round(values[node].double() / scale.double()) + zero_point).long()


def float32_arithmetic_codes(calibrated: torch.fx.GraphModule, model: LayerNormIntoLinears, x: torch.Tensor,
                             bits: int) -> torch.Tensor:
    """Per-tensor codes with gamma' = gamma * i_c / i and beta' = beta * i_c / i + (z_c - z) / i in float32."""
    scales, zero_points = calibrated.quant0_scale, calibrated.quant0_zero_point
    linears = [(lin.weight.double(), lin.bias.double()) for lin in model.linears]
    reference = per_tensor_parameters(scales, zero_points, model.norm.weight, model.norm.bias, linears, 2**bits - 1)
    assert not isinstance(reference, str), reference
    inv_c, inv = 1.0 / scales.float(), 1.0 / reference.scale
    z_shift = (zero_points - reference.zero_point).float()
    gamma = (model.norm.weight.float() * inv_c / inv).to(x.dtype)
    beta = (model.norm.bias.float() * inv_c / inv + z_shift / inv).to(x.dtype)
    y = F.layer_norm(model.embed(x), model.norm.normalized_shape, gamma, beta, model.norm.eps)
    dequantized = torch.fake_quantize_per_tensor_affine(y, reference.scale, reference.zero_point, 0, 2**bits - 1)
    return (torch.round(dequantized.double() / reference.scale.double()) + reference.zero_point).long()


def measure(seed: int, bits: int, tokens: int, dtype: torch.dtype, counts: Counts) -> None:
    g = torch.Generator().manual_seed(seed)
    dim = int(torch.randint(4, 33, (1,), generator=g))
    model = LayerNormIntoLinears(dim, int(torch.randint(1, 4, (1,), generator=g)), g).to(dtype).eval()
    data = [(torch.randn(2, 16, 8, generator=g) * 2).to(dtype) for _ in range(4)]
    example = data[0]
    calibrated = quant.calibrate(model, (example,), data, bits=bits)

    validated = fxopt.optimize(calibrated, (example,), passes=["reparam_quant"])
    stats = validated.report.passes[0]
    counts.configs += 1
    counts.committed += stats.applied
    counts.rolled_back += len(stats.rolled_back)
    counts.skipped += len(stats.skipped)
    counts.verification_failed += not validated.report.verification.passed

    rewritten = fxopt.optimize(calibrated, (example,), passes=["reparam_quant"], verify=False, keep_class=False)
    example_flipped = bool((codes_of(rewritten, example) != codes_of(calibrated, example)).any())
    counts.committed_with_example_flips += example_flipped and stats.applied > 0
    fresh = (torch.randn(1, tokens, 8, generator=g) * 2).to(dtype)
    before = codes_of(calibrated, fresh)
    flips = int((codes_of(rewritten, fresh) != before).sum())
    with torch.no_grad():
        flips_32 = int((float32_arithmetic_codes(calibrated, model, fresh, bits) != before).sum())
    counts.codes += before.numel()
    counts.flips += flips
    counts.flips_float32_arithmetic += flips_32
    counts.configs_with_flips += flips > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--bits", type=int, nargs=2, default=(2, 8), metavar=("LOW", "HIGH"))
    parser.add_argument("--tokens", type=int, default=512, help="fresh tokens per model whose codes are compared")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for bits in range(args.bits[0], args.bits[1] + 1):
        counts = Counts()
        for seed in range(args.seeds):
            measure(seed, bits, args.tokens, getattr(torch, args.dtype), counts)
        rows.append([bits, counts.configs, counts.committed, counts.rolled_back, counts.skipped,
                     counts.committed_with_example_flips, counts.verification_failed, f"{counts.codes:,}",
                     counts.flips, counts.configs_with_flips, f"{counts.flips / counts.codes:.1e}",
                     counts.flips_float32_arithmetic])
    print(f"reparam_quant on {args.seeds} random calibrated {args.dtype} models per bit width, "
          f"{args.tokens} fresh tokens each")
    print(tabulate(rows, headers=["bits", "models", "committed", "rolled back", "skipped",
                                  "committed with a flip on the example", "verify failed", "codes compared",
                                  "codes flipped", "models with flips", "flip rate", "flipped (float32 arithmetic)"]))


if __name__ == "__main__":
    main()
