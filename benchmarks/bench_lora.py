"""merge_lora vs PEFT's merge_and_unload on a GPT-2-small-shaped model with r=16 LoRA on attention and MLP.

Merge time and peak memory are measured in a fresh process each (peak RSS above the RSS before merging);
latency of the unmerged, PEFT-merged and fxopt-merged models is measured side by side, alternating, medians.
Run: python benchmarks/bench_lora.py
"""

from __future__ import annotations

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
        return fxopt.optimize(model, inputs, passes=["merge_lora"], verify=False, inplace=how == "fxopt_inplace")


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
    result = queue.get()
    process.join()
    return result


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


def main() -> None:
    print(f"GPT-2-small shape, LoRA r=16 on c_attn/c_proj/c_fc, input (1, {SEQ}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("\nmerge            time (s)   peak RSS above start (MiB)   model RSS at start (MiB)")
    for how in ("peft", "fxopt", "fxopt_inplace"):
        seconds, extra, before = merge_cost(how)
        print(f"{how:15s}  {seconds:8.2f}   {extra:26.0f}   {before:24.0f}")
    model, inputs = build()
    peft_merged = merge(copy.deepcopy(model), inputs, "peft")
    fxopt_merged = merge(model, inputs, "fxopt")
    with torch.no_grad():
        difference = (fxopt_merged(*inputs).logits - peft_merged(*inputs).logits).abs().max().item()
    ms = latencies({"unmerged": model, "peft_merged": peft_merged, "fxopt_merged": fxopt_merged}, inputs)
    print(f"\nlatency (median of {ROUNDS}, ms)")
    for name, value in ms.items():
        print(f"{name:15s}  {value:8.2f}   {value / ms['unmerged']:.2f}x unmerged")
    print(f"fxopt / peft merged latency ratio: {ms['fxopt_merged'] / ms['peft_merged']:.3f}")
    print(f"max |fxopt - peft| logits: {difference:.2e}")


if __name__ == "__main__":
    main()
