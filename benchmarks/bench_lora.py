"""merge_lora vs PEFT's merge_and_unload on a GPT-2-small-shaped model with r=16 LoRA on attention and MLP.

Merge time and peak memory are measured in a fresh process each (peak RSS above the RSS before merging),
alternating PEFT, fxopt, fxopt inplace=True, fxopt with no pass (capture + codegen: the floor every fxopt
pass pays) and torch.export alone (the capture: symbolic_trace cannot trace PEFT's layers) for --rounds rounds; medians, and the median of per-round ratios to PEFT. Latency of the unmerged,
PEFT-merged and fxopt-merged models is measured side by side, alternating, medians.
Run: python benchmarks/bench_lora.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import resource
import statistics
import time
import warnings

import torch

ROUNDS, SEQ = 15, 128


def build() -> tuple[torch.nn.Module, tuple]:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(use_cache=False))  # 12 layers, 768 wide, vocab 50257: random weights
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)
    return get_peft_model(base, config).eval(), (torch.randint(0, 50257, (1, SEQ)),)


def merge(model: torch.nn.Module, inputs: tuple, how: str) -> torch.nn.Module:
    import fxopt

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if how == "peft":
            return model.merge_and_unload()
        if how == "torch_export":  # the capture alone: symbolic_trace cannot trace PEFT's layers
            return torch.export.export(model, inputs, strict=False)
        passes = [] if how == "fxopt_no_pass" else ["merge_lora"]
        return fxopt.optimize(model, inputs, passes=passes, verify=False, inplace=how == "fxopt_inplace")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _measure_merge(how: str, queue: mp.Queue) -> None:
    model, inputs = build()
    import fxopt  # noqa: F401  (import cost is not merge cost)

    before = _rss_mib()
    start = time.perf_counter()
    merge(model, inputs, how)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((seconds, peak - before, before))


def merge_cost(how: str) -> tuple[float, float, float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure_merge, args=(how, queue))
    process.start()
    process.join()  # the result is three numbers: the queue cannot fill up before it is read
    if process.exitcode != 0:
        raise RuntimeError(f"measuring the {how} merge failed in its process (exit code {process.exitcode})")
    return queue.get()


def latencies(models: dict[str, torch.nn.Module], inputs: tuple) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(*inputs)  # warm-up
        for _ in range(ROUNDS):
            for name, model in models.items():  # alternate, so drift hits every model alike
                start = time.perf_counter()
                model(*inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


MERGES = ("peft", "fxopt", "fxopt_inplace", "fxopt_no_pass", "torch_export")


def merge_table(rounds: int) -> None:
    costs: dict[str, list[tuple[float, float, float]]] = {how: [] for how in MERGES}
    for _ in range(rounds):
        for how in MERGES:  # alternate, so drift hits every method alike
            costs[how].append(merge_cost(how))
    print("\n| merge | time (s) | time / PEFT | peak RSS above start (MiB) | model RSS at start (MiB) |")
    print("|---|---|---|---|---|")
    for how, runs in costs.items():
        ratio = statistics.median(run[0] / peft[0] for run, peft in zip(runs, costs["peft"]))
        seconds, extra, before = (statistics.median(run[i] for run in runs) for i in range(3))
        print(f"| {how} | {seconds:.2f} | {ratio:.2f}x | {extra:.0f} | {before:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the merge-cost processes")
    args = parser.parse_args()
    print(f"GPT-2-small shape, LoRA r=16 on c_attn/c_proj/c_fc, input (1, {SEQ}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fxopt_no_pass = capture + codegen only; torch_export = capture only")
    merge_table(args.rounds)
    model, inputs = build()
    peft_merged = merge(copy.deepcopy(model), inputs, "peft")
    fxopt_merged = merge(model, inputs, "fxopt")
    with torch.no_grad():
        difference = (fxopt_merged(*inputs).logits - peft_merged(*inputs).logits).abs().max().item()
    ms = latencies({"unmerged": model, "peft_merged": peft_merged, "fxopt_merged": fxopt_merged}, inputs)
    print(f"\n| model | latency (median of {ROUNDS}, ms) | / unmerged |")
    print("|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / ms['unmerged']:.2f}x |")
    print(f"\nfxopt / peft merged latency ratio: {ms['fxopt_merged'] / ms['peft_merged']:.3f}")
    print(f"max |fxopt - peft| logits: {difference:.2e}")


if __name__ == "__main__":
    main()
