"""Differential fuzzing at scale: `python benchmarks/fuzz.py N [--seed S]`.

Draws N random valid models (tests/fuzz_models.py), optimizes each with the default pipeline
(verify=False) and checks the result with fxopt.verify against the float64 oracle. Prints every
failure as it is found (recipe, verdict, report), then how often each pass applied, and the time per model.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fxopt  # noqa: E402
from fuzz_models import fuzz_models, grows, snapshot, unchanged  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="number of models")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args()

    failures: list[str] = []
    applied: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    times: list[float] = []

    @settings(max_examples=args.n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_models())
    def run(case):
        model, inputs, recipe = case
        start = time.perf_counter()
        try:
            before = snapshot(model)
            result = fxopt.optimize(model, inputs, verify=False)
            verdict = fxopt.verify(model, result, inputs)
            changed = unchanged(model, before)
            if not verdict.passed or changed:
                failures.append(f"WRONG: {recipe}\n{changed or verdict}\n{result.report}")
                print(failures[-1], end="\n\n", flush=True)
            if grows(model, result):  # the default pipeline never grows a model, except by biases
                failures.append(f"LARGER: {recipe}\n{grows(model, result)}\n{result.report}")
                print(failures[-1], end="\n\n", flush=True)
            for p in result.report.passes:
                applied[p.name] += p.applied
                skipped.update(p.skip_reasons())
        except Exception:  # noqa: BLE001 - a crash on a valid model is a failure too
            failures.append(f"CRASH: {recipe}\n{traceback.format_exc(limit=4)}")
            print(failures[-1], end="\n\n", flush=True)
        times.append(time.perf_counter() - start)
        if len(times) % 500 == 0:
            print(f"... {len(times)} models, {len(failures)} failures", flush=True)

    if args.seed is not None:
        from hypothesis import seed

        run = seed(args.seed)(run)
    wall = time.perf_counter()
    run()
    wall = time.perf_counter() - wall

    n = len(times)
    print(f"{n} models, {len(failures)} failures, {wall:.1f} s wall, {wall / max(n, 1) * 1e3:.1f} ms per model "
          f"(optimize + verify {sum(times) / max(n, 1) * 1e3:.1f} ms); 10,000 models ~ {wall / max(n, 1) * 1e4 / 60:.1f} min")
    print("rewrites applied per pass:", dict(applied))
    print("skip reasons:")
    for reason, count in skipped.most_common():
        print(f"  {count:6d}  {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
