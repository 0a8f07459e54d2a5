"""Model-zoo acceptance harness: fxopt.optimize on real architectures, each checked against a float64
oracle and compared with the existing tools.

The models (benchmarks/zoo_models.py): the smallest variant of every timm family, every torchvision
classifier, and a few transformers models from small configs, all with seeded random weights and
randomized norm statistics and affines, at a small input size they accept. Each model runs in its
own process (forked from this one, or ``--spawn``: a fresh ``python zoo.py --worker NAME``) with a
timeout, and comes back as one row:

- status: ``ok``; ``capture error`` (fxopt.CaptureError); ``crash`` (any other exception from
  optimize() or from running its result, last traceback line kept); ``wrong`` (the result's max
  abs error against a float64 copy of the original exceeds 4x the float32 original's own error
  plus 1e-5 * max|oracle|, at the example's shape or at another one); ``returned after failed
  verification`` (report.verification did not pass but a model came back); ``failed verification
  (not returned)`` (optimize raised fxopt.VerificationError: the row then says whether the same
  rewrites made with verify=False disagree with the oracle on this harness's inputs); ``timeout``
  (with the phase it was in); ``model error`` (the model itself could not be built or run: not fxopt's);
  ``harness error`` (a bug here).
- what each pass applied and skipped (reason counts); aten op counts of one forward (convolution,
  batch_norm, layer_norm, total; counted by a TorchDispatchMode, so any module counts, the kept
  class included) for the original, the result, and the tools;
- whether the result is the user's class, and runs (and matches) at batch 3 and another size;
- eager latency at batch 8 (torch.no_grad, one thread): result / original and result / the best
  existing tool, as medians of per-round ratios of interleaved rounds (bench_reparam's
  ``interleaved_times``). The tool is timm's ``reparameterize_model`` where some submodule has
  ``fuse`` / ``reparameterize`` / ``switch_to_deploy`` (timm's own test), PEFT's
  ``merge_and_unload`` for a PEFT model, otherwise ``torch.fx.experimental.optimization.fuse``
  ("n/a" where it cannot trace); ``fuse`` is also run everywhere for its BatchNorm count;
- optimize() wall time (verify=True, keep_class=True: the defaults).

Targets checked per row (misses are printed and listed in the summary): no crash, wrong or
failed verification; conv and batch_norm counts <= timm's reparameterize_model and
latency within 1.02x of it (timm models with reparameterization methods); batch_norm count <= what
fx ``fuse`` leaves, and every BatchNorm left accounted for by a fold_bn skip reason; latency within
1.02x of the original; the result is the user's class and runs at another batch size and size.

    python benchmarks/zoo.py                                  # the whole sweep (191 models: about an hour)
    python benchmarks/zoo.py --ci --strict                    # the CI subset, under 10 minutes on 2 cores
    python benchmarks/zoo.py --models timm:repvgg_a0,tv:resnet18 --timeout 120 --latency-rounds 15
    python benchmarks/zoo.py --worker timm:repvgg_a0          # one model in this process: one JSON line

Writes benchmarks/results/zoo.md (``--out``), zoo.json beside it (every row, every field) and
zoo.log (the models' own warnings). Exit status 0 whatever the rows say (it is a benchmark), 2 when
the harness itself failed, and with ``--strict`` 1 when any row is a crash, wrong, or failed
verification (returned or not).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_reparam import interleaved_times, median_ratio  # noqa: E402
from zoo_models import CI_MODELS, all_models, float_leaves, describe_size, parameters, prepare, resolve  # noqa: E402

Row = dict[str, Any]
REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's reparameterize_model calls
# what --strict (CI) fails on: fxopt broke a contract. A model optimize refused with a VerificationError
# kept the contract (nothing unverified is returned) and is listed with the target misses instead.
STRICT_STATUSES = ("crash", "wrong", "returned after failed verification")
LATENCY_BATCH = 8
LATENCY_TARGET = 1.02
MIN_CALL_SECONDS = 0.02  # one timed call loops the forward until about this long: tiny models are noise otherwise


# --------------------------------------------------------------------------------------------- measuring

def _verification_error_class() -> type[BaseException]:
    """fxopt.VerificationError: optimize() raises it when its own whole-model check fails (earlier
    versions returned the model with report.verification failed: both are handled)."""
    import fxopt

    return getattr(fxopt, "VerificationError", None) or type("NoSuchError", (Exception,), {})


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops one forward executes (below autograd, after composite decompositions)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: nn.Module, args: tuple) -> dict[str, int]:
    with torch.no_grad(), _OpCounter() as counter:
        model(*args)
    ops = counter.ops

    def total(word: str) -> int:
        return sum(n for name, n in ops.items() if word in name)

    return {"convolution": total("convolution"), "batch_norm": total("batch_norm"),
            "layer_norm": total("layer_norm"), "total": sum(ops.values())}


def _double(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _run(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return float_leaves(model(*args))


def _max_abs_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
        return math.inf  # a different output structure is as wrong as it gets
    return max((float((o.double() - r).abs().max()) for o, r in zip(out, ref) if o.numel()), default=0.0)


def oracle_check(original: nn.Module, oracle: nn.Module, result: nn.Module, args: tuple) -> dict[str, Any]:
    """The result's error and the float32 original's own error against the float64 oracle; wrong when
    the result's exceeds 4x the original's plus 1e-5 * max|oracle|."""
    ref = _run(oracle, _double(args))
    scale = max((float(r.abs().max()) for r in ref if r.numel()), default=0.0)
    original_error = _max_abs_error(_run(original, args), ref)
    result_error = _max_abs_error(_run(result, args), ref)
    tolerance = 4 * original_error + 1e-5 * scale
    return {"original_error": original_error, "result_error": result_error, "tolerance": tolerance,
            "max_abs_oracle": scale, "wrong": not result_error <= tolerance}  # NaN is wrong too


def has_timm_reparam(model: nn.Module) -> bool:
    # timm's reparameterize_model walks the children and acts on any with one of these attributes
    return any(hasattr(m, a) for m in model.modules() if m is not model for a in REPARAM_METHODS)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _last_line(error: BaseException) -> str:
    """The exception line of a traceback: its type and the first line of its message (messages such
    as a VerificationError's carry a whole report: that goes to the row's traceback)."""
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message}"[:800]


def _traceback(error: BaseException) -> str:
    """The last frames and the whole message (capped)."""
    frames = "".join(traceback.format_tb(error.__traceback__)[-6:])
    return frames + f"{type(error).__name__}: {str(error)[:4000]}"


def _pass_rows(report: Any) -> dict[str, Any]:
    return {
        p.name: {"matched": p.matched, "applied": p.applied, "skipped": dict(p.skip_reasons()),
                 "skipped_nodes": sorted({node for node, _ in p.skipped}),
                 "rolled_back": [[str(node), str(error)[:300]] for node, error in p.rolled_back]}
        for p in report.passes
    }


def _bn_explained(passes: dict[str, Any]) -> int:
    """How many BatchNorms the report gives a reason for leaving: fold_bn's and fold_repbn's skipped
    nodes (a skip is recorded on the pattern's anchor: the BatchNorm, or the conv/Linear after it)."""
    return sum(len(passes[p]["skipped_nodes"]) for p in ("fold_bn", "fold_repbn") if p in passes)


def _tools(model: nn.Module, extra: dict[str, Callable[[nn.Module], nn.Module]]) -> dict[str, Any]:
    """The existing tools' results on copies of the model (None where a tool does not apply or fails)."""
    from torch.fx.experimental.optimization import fuse

    built: dict[str, Any] = {}
    # the model's own tools (PEFT's merge_and_unload) change it in place: they get a copy
    candidates: dict[str, Callable[[nn.Module], nn.Module]] = {
        name: (lambda m, tool=tool: tool(copy.deepcopy(m))) for name, tool in extra.items()}
    if has_timm_reparam(model):
        from timm.utils.model import reparameterize_model

        candidates["timm reparameterize_model"] = reparameterize_model  # copies the model itself
    candidates["fx fuse"] = fuse  # copies too
    for name, tool in candidates.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = (tool(model).eval(), None)
        except Exception as error:  # noqa: BLE001 - a tool that fails is "n/a", with why
            built[name] = (None, _last_line(error)[:300])
    return built


def measure(name: str, rounds: int, phase: Callable[[str], None]) -> Row:
    """One model's row (the worker's whole job)."""
    import fxopt

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    row: Row = {"model": name, "status": None}
    phase("build")
    try:
        prepared = prepare(name)
    except Exception as error:  # noqa: BLE001 - the model's own failure, not fxopt's
        return {**row, "status": "model error", "error": _last_line(error), "traceback": _traceback(error)}
    model, args = prepared.model, prepared.inputs(2, prepared.size)
    row.update(params=parameters(model), input=describe_size(prepared.size), notes=prepared.notes,
               model_class=type(model).__name__)
    phase("count original ops")
    ops = {"original": count_ops(model, args)}
    row["ops"] = ops
    phase("float64 oracle")
    try:
        oracle = copy.deepcopy(model).double()
        _run(oracle, _double(args))
    except Exception as error:  # noqa: BLE001 - some models refuse float64: judged by fxopt's verify only
        oracle = None
        row["oracle_error"] = _last_line(error)[:300]

    phase("optimize")
    start = time.perf_counter()
    try:
        result = fxopt.optimize(model, args)
    except fxopt.CaptureError as error:
        row["optimize_s"] = time.perf_counter() - start
        return {**row, "status": "capture error", "error": str(error)[:2000]}
    except _verification_error_class() as error:
        row["optimize_s"] = time.perf_counter() - start
        row.update(status="failed verification (not returned)", phase="optimize", error=_last_line(error),
                   traceback=_traceback(error))
        _triage(row, error, model, oracle, args, prepared.inputs(3, prepared.other_size or prepared.size), phase)
        return row
    except Exception as error:  # noqa: BLE001 - every other failure of optimize is a crash
        row["optimize_s"] = time.perf_counter() - start
        return {**row, "status": "crash", "phase": "optimize", "error": _last_line(error),
                "traceback": _traceback(error)}
    row["optimize_s"] = time.perf_counter() - start
    report = result.report
    row["frontend"] = report.frontend
    row["passes"] = _pass_rows(report)
    row["report_notes"] = [str(n)[:300] for n in report.notes]
    row["result_class"] = type(result).__name__
    row["kept_class"] = type(result) is type(model)
    row["kept_class_fallback"] = report.kept_class.fallback if report.kept_class is not None else None
    verification = report.verification
    row["verification"] = None if verification is None else {
        "passed": bool(verification.passed), "max_abs_error": float(verification.max_abs_error),
        "exception": getattr(verification, "exception", None)}

    phase("check the result")
    try:
        if oracle is not None:
            row["oracle"] = oracle_check(model, oracle, result, args)
        ops["result"] = count_ops(result, args)
    except Exception as error:  # noqa: BLE001 - a result that does not run on the example is a crash
        return {**row, "status": "crash", "phase": "running the result on the example", "error": _last_line(error),
                "traceback": _traceback(error)}
    row["bn_left"] = ops["result"]["batch_norm"]
    row["bn_unexplained"] = max(0, row["bn_left"] - _bn_explained(row["passes"]))

    phase("another shape")
    other_size = prepared.other_size if prepared.other_size is not None else prepared.size
    other_args = prepared.inputs(3, other_size)
    other: Row = {"input": f"batch 3, {describe_size(other_size)}", "size_changed": prepared.other_size is not None}
    try:
        if oracle is not None:
            check = oracle_check(model, oracle, result, other_args)
            other.update(ok=not check["wrong"], result_error=check["result_error"], tolerance=check["tolerance"],
                         original_error=check["original_error"], max_abs_oracle=check["max_abs_oracle"])
        else:
            error_ = _max_abs_error(_run(result, other_args), _run(model, other_args))
            other.update(ok=error_ <= 1e-4, result_error=error_, tolerance=1e-4)
    except Exception as error:  # noqa: BLE001 - recorded as a target miss, not a crash
        other.update(ok=False, error=_last_line(error)[:300])
    row["other_shape"] = other

    phase("tools")
    tools = _tools(model, prepared.tools)
    row["tools"] = {}
    for tool_name, (tool_model, error) in tools.items():
        entry: Row = {"ok": tool_model is not None, "error": error}
        if tool_model is not None:
            try:
                entry["ops"] = count_ops(tool_model, args)
                if oracle is not None:
                    entry["oracle"] = oracle_check(model, oracle, tool_model, args)
            except Exception as error_:  # noqa: BLE001 - the tool's result fails: n/a
                entry.update(ok=False, error=_last_line(error_)[:300])
                tools[tool_name] = (None, entry["error"])
        row["tools"][tool_name] = entry
    best = next((t for t in ("timm reparameterize_model", "peft merge_and_unload", "fx fuse")
                 if t in tools and tools[t][0] is not None), None)
    row["best_tool"] = best

    phase("latency")
    row["latency"] = latency(model, result, tools[best][0] if best else None, prepared.inputs(LATENCY_BATCH, prepared.size),
                             rounds)

    wrong = row.get("oracle", {}).get("wrong") or (oracle is not None and not other.get("ok", True)
                                                  and "error" not in other)
    if wrong:
        row["status"] = "wrong"
    elif verification is not None and not verification.passed:
        row["status"] = "returned after failed verification"
    else:
        row["status"] = "ok"
    return row


def _triage(row: Row, error: Exception, model: nn.Module, oracle: nn.Module | None, args: tuple,
            other_args: tuple, phase: Callable[[str], None]) -> None:
    """optimize() refused its result: what its report says, and whether the same rewrites, made
    with verify=False, disagree with our oracle on our inputs (or only on fxopt's own examples)."""
    import fxopt

    report, check = getattr(error, "report", None), getattr(error, "verification", None)
    if report is not None:
        row["passes"] = _pass_rows(report)
    if check is not None:
        row["verification"] = {"passed": bool(check.passed), "max_abs_error": float(check.max_abs_error),
                               "exception": getattr(check, "exception", None)}
        inputs = [t for t in (check.counterexample or ()) if isinstance(t, torch.Tensor)]
        if inputs:
            row["verification"]["counterexample_max_abs"] = max(float(t.abs().max()) for t in inputs)
    if oracle is None:
        return
    phase("triage: optimize(verify=False)")
    try:
        unverified = fxopt.optimize(model, args, verify=False)
        row["unverified"] = {"example": oracle_check(model, oracle, unverified, args)}
        row["unverified"]["other"] = oracle_check(model, oracle, unverified, other_args)
    except Exception as error_:  # noqa: BLE001 - triage only
        row["unverified"] = {"error": _last_line(error_)[:300]}


def latency(original: nn.Module, result: nn.Module, tool: nn.Module | None, args: tuple, rounds: int) -> Row:
    """Eager latency at LATENCY_BATCH: medians of per-round ratios of interleaved, rotated rounds.
    A result that fails at this batch size gives {"error": ...} (a target miss, not a harness
    failure); a tool that fails is left out."""
    with torch.no_grad():
        for which, m in (("result", result), ("tool", tool)):
            if m is None:
                continue
            try:
                m(*args)
            except Exception as error:  # noqa: BLE001 - see the docstring
                if which == "result":
                    return {"batch": LATENCY_BATCH, "error": f"the result fails at batch {LATENCY_BATCH}: "
                                                             f"{_last_line(error)[:300]}"}
                tool = None
        models = [original, result] + ([tool] if tool is not None else [])
        original(*args)
        start = time.perf_counter()
        original(*args)
        once = time.perf_counter() - start
        loops = max(1, min(50, math.ceil(MIN_CALL_SECONDS / max(once, 1e-6))))

        def call(m: nn.Module) -> Callable[[], None]:
            def run() -> None:
                for _ in range(loops):
                    m(*args)
            return run

        times = interleaved_times([call(m) for m in models], rounds)
    out: Row = {"batch": LATENCY_BATCH, "rounds": rounds, "loops": loops,
                "ms": [1e3 * sorted(t)[len(t) // 2] / loops for t in times],
                "result/original": median_ratio(times[1], times[0])}
    out["result/tool"] = median_ratio(times[1], times[2]) if tool is not None else None
    return out


# --------------------------------------------------------------------------------------------- isolation

def _worker_main(name: str, rounds: int) -> int:
    """--worker: one model in this process, phases on stderr, the row as one JSON line on stdout."""
    def phase(what: str) -> None:
        print(f"phase: {what}", file=sys.stderr, flush=True)

    row = _guarded(name, rounds, phase)
    print(json.dumps(row, default=str), flush=True)
    return 0


def _guarded(name: str, rounds: int, phase: Callable[[str], None]) -> Row:
    try:
        return measure(name, rounds, phase)
    except Exception as error:  # noqa: BLE001 - a bug here, reported as such
        return {"model": name, "status": "harness error", "error": _last_line(error),
                "traceback": _traceback(error)}


def _forked_child(conn: Any, name: str, rounds: int, log: str) -> None:
    # the models' own prints and warnings go to the log, not into the table on stdout
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"\n===== {name}\n".encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    row = _guarded(name, rounds, lambda what: conn.send(("phase", what)))
    conn.send(("row", json.loads(json.dumps(row, default=str))))
    conn.close()


def run_forked(name: str, rounds: int, timeout: float, log: Path) -> Row:
    """The model in a child forked from this process (torch, timm, fxopt already imported: no
    start-up cost per model), killed after ``timeout`` seconds."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_forked_child, args=(sender, name, rounds, str(log)), daemon=True)
    child.start()
    sender.close()
    deadline, phase = time.monotonic() + timeout, "start"
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not receiver.poll(left):
                child.kill()
                child.join()
                return {"model": name, "status": "timeout", "phase": phase, "error": f"over {timeout:.0f} s in {phase}"}
            try:
                kind, value = receiver.recv()
            except EOFError:  # died without a row: a segfault, or killed for memory
                child.join()
                return {"model": name, "status": "crash", "phase": phase,
                        "error": f"the worker died with exit code {child.exitcode} during {phase}"}
            if kind == "row":
                child.join(30)
                return value
            phase = value
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
            child.join()


def run_spawned(name: str, rounds: int, timeout: float, log: Path) -> Row:
    """The model in a fresh ``python zoo.py --worker NAME`` (slower to start; nothing shared)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--latency-rounds", str(rounds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        phases = [line[7:] for line in stderr.splitlines() if line.startswith("phase: ")]
        phase = phases[-1] if phases else "start"
        return {"model": name, "status": "timeout", "phase": phase, "error": f"over {timeout:.0f} s in {phase}"}
    with open(log, "a") as f:
        f.write(f"\n===== {name}\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        phases = [line[7:] for line in done.stderr.splitlines() if line.startswith("phase: ")]
        return {"model": name, "status": "crash", "phase": phases[-1] if phases else "start",
                "error": f"the worker exited {done.returncode} without a row: {_tail(done.stderr, 3)}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------- targets

def misses(row: Row) -> list[tuple[str, str]]:
    """(kind, detail) for every target the row misses."""
    status = row["status"]
    if status == "failed verification (not returned)":
        return [(status, _refusal_text(row))]
    if status not in ("ok", "wrong", "returned after failed verification"):
        return [(status, row.get("error", ""))]
    found: list[tuple[str, str]] = []
    if status == "wrong":
        o = row.get("oracle", {})
        found.append(("wrong", f"at {row['input']}: result error {o.get('result_error', 0):.3g}, tolerance "
                               f"{o.get('tolerance', 0):.3g} (original's own error {o.get('original_error', 0):.3g}, "
                               f"max|oracle| {o.get('max_abs_oracle', 0):.3g}); at {row['other_shape']['input']}: "
                               f"{_other_text(row['other_shape'])}"))
    if status == "returned after failed verification":
        v = row["verification"]
        found.append((status, f"max abs err {v['max_abs_error']:.3g}" + (f", {v['exception']}" if v["exception"] else "")))
    if not row["kept_class"]:
        found.append(("not the user's class", f"{row['result_class']}: {row.get('kept_class_fallback') or ''}"[:300]))
    if not row["other_shape"].get("ok"):
        found.append(("fails or mismatches at another shape", f"{row['other_shape']['input']}: "
                                                              f"{_other_text(row['other_shape'])}"))
    lat = row["latency"]
    if "error" in lat:
        found.append((f"fails at batch {LATENCY_BATCH}", lat["error"]))
        lat = {"result/original": 0.0, "result/tool": None}
    if lat["result/original"] > LATENCY_TARGET:
        found.append(("slower than the original", f"{lat['result/original']:.3f}x"))
    after, tools = row["ops"]["result"], row["tools"]
    timm_tool = tools.get("timm reparameterize_model")
    if timm_tool is not None:
        if not timm_tool["ok"]:
            found.append(("timm reparameterize_model failed", timm_tool["error"] or ""))
        else:
            for op in ("convolution", "batch_norm"):
                if after[op] > timm_tool["ops"][op]:
                    found.append((f"more {op} than timm reparameterize_model",
                                  f"{after[op]} vs {timm_tool['ops'][op]}"))
            if row["best_tool"] == "timm reparameterize_model" and (lat["result/tool"] or 0) > LATENCY_TARGET:
                found.append(("slower than timm reparameterize_model", f"{lat['result/tool']:.3f}x"))
    peft_tool = tools.get("peft merge_and_unload")
    if peft_tool is not None and row["best_tool"] == "peft merge_and_unload" and (lat["result/tool"] or 0) > LATENCY_TARGET:
        found.append(("slower than peft merge_and_unload", f"{lat['result/tool']:.3f}x"))
    fuse = tools.get("fx fuse")
    if fuse is not None and fuse["ok"] and after["batch_norm"] > fuse["ops"]["batch_norm"]:
        found.append(("more batch_norm than fx fuse", f"{after['batch_norm']} vs {fuse['ops']['batch_norm']}"))
    if row.get("bn_unexplained"):
        found.append(("BatchNorm left without a skip reason",
                      f"{row['bn_left']} left, {row['bn_left'] - row['bn_unexplained']} skips in fold_bn/fold_repbn"))
    return found


def _refusal_text(row: Row) -> str:
    v = row.get("verification") or {}
    text = f"fxopt's check: max abs err {v.get('max_abs_error', float('nan')):.3g}"
    if "counterexample_max_abs" in v:
        text += f" on an input with max|x| {v['counterexample_max_abs']:.3g}"
    if v.get("exception"):
        text += f", {v['exception']}"
    triage = row.get("unverified")
    if triage and "error" in triage:
        text += f"; optimize(verify=False) raises {triage['error']}"
    elif triage:
        for where, check in triage.items():
            verdict = "WRONG" if check["wrong"] else "within tolerance"
            text += (f"; verify=False result on our {where} input: {verdict} (error {check['result_error']:.3g}, "
                     f"tolerance {check['tolerance']:.3g}, max|oracle| {check['max_abs_oracle']:.3g})")
    return text


def _other_text(other: Row) -> str:
    if "error" in other:
        return f"raises {other['error']}"
    text = f"result error {other.get('result_error', 0):.3g}, tolerance {other.get('tolerance', 0):.3g}"
    if "original_error" in other:
        text += f" (original's own error {other['original_error']:.3g}, max|oracle| {other['max_abs_oracle']:.3g})"
    return text


# --------------------------------------------------------------------------------------------- output

STATUSES = ("ok", "capture error", "crash", "wrong", "returned after failed verification",
            "failed verification (not returned)", "timeout", "model error", "harness error")


def totals(rows: list[Row]) -> str:
    counts = Counter(r["status"] for r in rows)
    return f"{len(rows)} models: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s] or s in STATUSES[:4])


def _arrow(row: Row, op: str) -> str:
    ops = row.get("ops", {})
    if "original" not in ops or "result" not in ops:
        return "-"
    text = f"{ops['original'][op]}→{ops['result'][op]}"
    refs = []
    for short, tool in (("timm", "timm reparameterize_model"), ("fuse", "fx fuse")):
        entry = row.get("tools", {}).get(tool)
        if entry is not None:
            refs.append(f"{short} {entry['ops'][op]}" if entry["ok"] else f"{short} n/a")
    return text + (f" ({', '.join(refs)})" if refs and op in ("convolution", "batch_norm") else "")


def _applied(row: Row) -> str:
    passes = row.get("passes", {})
    return ", ".join(f"{p} {v['applied']}" for p, v in passes.items() if v["applied"]) or "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", f"**{totals(rows)}**", ""]
    cols = ["model", "status", "params", "input", "optimize s", "conv (tools)", "batch_norm (tools)", "layer_norm",
            "aten ops", "applied", "class kept", "other shape", "lat/orig", "lat/tool", "tool", "misses"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lat = r.get("latency") or {}
        other = r.get("other_shape")
        cells = [
            r["model"], r["status"], f"{r['params']:,}" if "params" in r else "-", r.get("input", "-"),
            f"{r['optimize_s']:.1f}" if "optimize_s" in r else "-", _arrow(r, "convolution"),
            _arrow(r, "batch_norm"), _arrow(r, "layer_norm"), _arrow(r, "total"), _applied(r),
            "-" if "kept_class" not in r else ("yes" if r["kept_class"] else f"no ({r['result_class']})"),
            "-" if other is None else (("ok" if other.get("ok") else "FAIL") + f" ({other['input']}"
                                       + ("" if other["size_changed"] else ", batch only") + ")"),
            _ratio(lat.get("result/original")), _ratio(lat.get("result/tool")), r.get("best_tool") or "-",
            str(len(r.get("misses", []))),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "## Target misses", ""]
    for kind, items in grouped_misses(rows).items():
        lines.append(f"- **{kind}** ({len(items)}): " + "; ".join(f"{m} ({d})" if d else m for m, d in items))
    lines += ["", "## Details", ""]
    for r in rows:
        detail = _details(r)
        if detail:
            lines += [f"### {r['model']}", "", *detail, ""]
    return "\n".join(lines) + "\n"


def _details(r: Row) -> list[str]:
    out = []
    if r.get("error"):
        out.append(f"- error ({r.get('phase', '')}): `{r['error'][:1500]}`")
    if r.get("traceback"):
        out += ["", "```", "\n".join(r["traceback"].splitlines()[:30]), "```"]
    for name, p in r.get("passes", {}).items():
        for reason, n in p["skipped"].items():
            out.append(f"- {name} skipped {n}x: {reason}")
        for node, error in p["rolled_back"]:
            out.append(f"- {name} rolled back at {node}: {error}")
    if r.get("kept_class_fallback"):
        out.append(f"- kept class fallback: {r['kept_class_fallback'][:500]}")
    for tool, entry in r.get("tools", {}).items():
        if not entry["ok"]:
            out.append(f"- {tool}: n/a ({entry['error']})")
    if r.get("oracle_error"):
        out.append(f"- float64 oracle failed: {r['oracle_error']}")
    for note in r.get("notes", []):
        out.append(f"- input: {note}")
    return out


def grouped_misses(rows: list[Row]) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        for kind, detail in r.get("misses", []):
            groups.setdefault(kind, []).append((r["model"], detail))
    return groups


def _header(args: argparse.Namespace, seconds: float, done: int, total: int) -> str:
    from run_all import machine

    which = "--ci subset" if args.ci else ("--models" if args.models else "whole sweep")
    return (f"# fxopt model zoo ({which}, {done}/{total} models, {seconds:.0f} s)\n\n{machine()}; one thread per "
            f"model; latency at batch {LATENCY_BATCH}, {args.latency_rounds} interleaved rounds; per-model timeout "
            f"{args.timeout:.0f} s. Ops: original→result (timm reparameterize_model, fx fuse). Generated by "
            "`python benchmarks/zoo.py`; every field of every row is in the JSON beside this file.")


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help=f"the fixed subset of {len(CI_MODELS)} models")
    parser.add_argument("--models", help="comma-separated names (timm:NAME, tv:NAME, hf:NAME, or an unambiguous NAME)")
    parser.add_argument("--timeout", type=float, help="seconds per model (default 60 with --ci, else 300)")
    parser.add_argument("--latency-rounds", type=int, help="interleaved rounds (default 12 with --ci, else 20)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "zoo.md", help="the Markdown summary")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any crash, wrong or failed verification")
    parser.add_argument("--spawn", action="store_true", help="a fresh interpreter per model instead of a fork")
    parser.add_argument("--refresh-timm", action="store_true", help="recount timm's smallest variant per family")
    parser.add_argument("--worker", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.timeout = args.timeout or (60.0 if args.ci else 300.0)
    args.latency_rounds = args.latency_rounds or (12 if args.ci else 20)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: configs and random weights only
    torch.set_num_threads(1)
    if args.worker:
        return _worker_main(args.worker, args.latency_rounds)

    if args.models:
        try:
            names = [resolve(n.strip()) for n in args.models.split(",") if n.strip()]
        except ValueError as error:
            parser.error(str(error))
    elif args.ci:
        names = list(CI_MODELS)
    else:
        names = all_models(refresh=args.refresh_timm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".log")
    log.write_text("")
    run = run_spawned if args.spawn else run_forked
    if not args.spawn:  # import what the workers use once, before forking
        import fxopt  # noqa: F401
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    rows: list[Row] = []
    started = time.perf_counter()
    print(f"{len(names)} models, timeout {args.timeout:.0f} s each, {args.latency_rounds} latency rounds", flush=True)
    for i, name in enumerate(names, 1):
        t = time.perf_counter()
        row = run(name, args.latency_rounds, args.timeout, log)
        row["seconds"] = time.perf_counter() - t
        row["misses"] = misses(row)
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: {row['status']} ({row['seconds']:.1f} s)"
              + (f" - {row['error'][:200]}" if row.get("error") else ""), flush=True)
        elapsed = time.perf_counter() - started
        args.out.write_text(markdown(rows, _header(args, elapsed, i, len(names))))  # a partial sweep is kept
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    elapsed = time.perf_counter() - started

    print(f"\ntarget misses ({sum(len(r['misses']) for r in rows)} in {sum(bool(r['misses']) for r in rows)} rows):")
    for kind, items in grouped_misses(rows).items():
        print(f"  {kind} ({len(items)}):")
        for model, detail in items:
            print(f"    {model}: {detail[:300]}")
    print(f"\n{totals(rows)}; {elapsed:.0f} s. Written: {args.out}, {args.out.with_suffix('.json')}")
    if any(r["status"] == "harness error" for r in rows):
        return 2
    if args.strict and any(r["status"] in STRICT_STATUSES for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
