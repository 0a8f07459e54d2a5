"""The ``fxopt`` command: list passes, optimize a model and save it, re-verify a saved model, demo.

    fxopt passes
    fxopt optimize SPEC --example-shape 1,3,224,224 [--dtype float32] [--passes a,b] [--out DIR] [--examples N]
    fxopt verify DIR [--examples N]
    fxopt demo [EXAMPLE]

SPEC is ``package.module:factory`` (a callable taking no arguments that returns the nn.Module,
ready for inference, i.e. after ``.eval()``; the current directory is importable) or the name of
a built-in example (``fxopt.examples``). ``optimize --out DIR`` writes what ``fxopt.save`` writes
plus ``source.json``: the spec, seed and example input shapes, and a fingerprint of the model's
weights, which ``fxopt verify DIR`` uses to rebuild the source model and check the saved one
against it. The factory is called after ``torch.manual_seed(seed)``, so random weights come out
the same; beyond that it must be deterministic (same weights on every call), which ``verify``
checks with the fingerprint.

Exit status: 0 success, 1 verification failed, 2 a usage or input error (the message says what to
change).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import fxopt
from fxopt.errors import CaptureError, FxoptError, VerificationError
from fxopt.examples import EXAMPLES
from fxopt.pattern import get_pass, registered_passes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SOURCE_FILE = "source.json"
_FORMAT = 1


class UsageError(Exception):
    """A mistake in what the user asked for: printed without a traceback, exit status 2."""


@dataclass
class InputSpec:
    """One forward() argument: a random tensor of this shape and dtype."""

    shape: list[int]
    dtype: str


@dataclass
class Source:
    """What ``source.json`` records: enough to rebuild the source model and its example inputs."""

    spec: str
    seed: int
    inputs: list[InputSpec]
    int_high: int
    weights_sha256: str
    passes: list[str] | None
    format: int = _FORMAT


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); return the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's own usage errors (status 2) and --help (0)
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except VerificationError as error:  # the result is not returned, so nothing is saved
        print(error.report)
        _status(f"not saved: the optimized model failed verification\n{error.verification}")
        return EXIT_FAILED
    except (UsageError, FxoptError) as error:
        hint = (
            "\n(the fxopt command passes neither leaf_modules nor autowrap_functions: call fxopt.optimize from "
            "Python for those)" if isinstance(error, CaptureError) else ""
        )
        print(f"fxopt: error: {error}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (``fxopt passes | head``): nothing left to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is quiet too
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxopt",
        description="Make a trained PyTorch model cheaper without changing what it computes.",
        epilog="Exit status: 0 ok, 1 verification failed, 2 usage or input error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    passes = commands.add_parser("passes", help="list the passes (name, in the default pipeline?, description)")
    passes.set_defaults(run=_passes)

    optimize = commands.add_parser(
        "optimize",
        help="optimize a model, verify it, print the report and save it",
        description="Optimize the model SPEC builds, verify it against a float64 oracle, print the report and, "
        "with --out, save it (fxopt.save) with what `fxopt verify` needs to re-check it.",
    )
    optimize.add_argument(
        "spec",
        metavar="SPEC",
        help="package.module:factory, a callable with no arguments returning the model ready for inference "
        "(call .eval() in it; it must be deterministic: it is called after torch.manual_seed(--seed)), "
        f"or a built-in example: {', '.join(EXAMPLES)}",
    )
    optimize.add_argument(
        "--example-shape", action="append", required=True, type=_shape, metavar="D0,D1,...",
        help="shape of a random example input; repeat once per forward() argument",
    )
    optimize.add_argument(
        "--dtype", action="append", type=_dtype, metavar="DTYPE",
        help="dtype of the example inputs (default float32): once for all, or once per --example-shape",
    )
    optimize.add_argument("--int-high", type=int, default=2, help="integer inputs are drawn from [0, INT_HIGH)")
    optimize.add_argument("--passes", type=_pass_names, help="comma-separated passes to run in order (default: the default pipeline)")
    optimize.add_argument("--out", type=Path, metavar="DIR", help="save the result here (module.py, weights, source.json)")
    optimize.add_argument("--examples", type=_positive, help="also verify the result on N examples, with progress")
    optimize.add_argument("--seed", type=int, default=0, help="torch.manual_seed before calling the factory (default 0)")
    optimize.set_defaults(run=_optimize)

    verify = commands.add_parser(
        "verify",
        help="re-check a model saved by `fxopt optimize --out DIR` against its source model",
        description="Rebuild the source model from DIR/source.json (same factory, same seed), load the saved model "
        "and compare them with fxopt.verify.",
    )
    verify.add_argument("directory", type=Path, metavar="DIR")
    verify.add_argument("--examples", type=_positive, default=5, help="number of examples (default 5)")
    verify.set_defaults(run=_verify)

    demo = commands.add_parser("demo", help="optimize a built-in ResNet-50-shaped model and print the report")
    demo.add_argument("example", nargs="?", default="resnet50", choices=list(EXAMPLES))
    demo.set_defaults(run=_demo)
    return parser


# -- argument types: argparse turns their ValueError/ArgumentTypeError into a usage message -------


def _shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write sizes separated by commas, e.g. 1,3,224,224") from None
    if any(size < 0 for size in shape):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative size")
    return shape


def _dtype(text: str) -> str:
    if not isinstance(getattr(torch, text, None), torch.dtype):
        names = sorted(n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype) and not n.startswith("_"))
        hint = difflib.get_close_matches(text, names, n=1)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch dtype" + (f"; did you mean {hint[0]!r}?" if hint else f"; one of {', '.join(names)}")
        )
    return text


def _pass_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        try:
            get_pass(name)
        except FxoptError as error:  # it names the registered passes
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- commands -------------------------------------------------------------------------------------


def _passes(args: argparse.Namespace) -> int:
    rows = [[p.name, "yes" if p.default else "no", p.description] for p in registered_passes()]
    print(tabulate(rows, headers=["pass", "default", "description"], tablefmt="simple", maxcolwidths=[None, None, 80]))
    return EXIT_OK


def _optimize(args: argparse.Namespace) -> int:
    inputs = _input_specs(args.example_shape, args.dtype or ["float32"])
    source = Source(args.spec, args.seed, inputs, args.int_high, "", args.passes)
    model = build_model(source)
    example_inputs = example_tensors(source)
    source.weights_sha256 = weights_fingerprint(model)
    _status(f"optimizing {args.spec} ({'passes ' + ', '.join(args.passes) if args.passes else 'default passes'}), "
            "validating every rewrite ...")
    start = time.perf_counter()
    result = fxopt.optimize(model, example_inputs, passes=args.passes, keep_class=False)  # saved as source
    print(result.report)
    _status(f"optimize took {time.perf_counter() - start:.1f} s")
    if args.examples:
        verification = fxopt.verify(model, result, example_inputs, examples=args.examples, progress=_progress)
        print(verification)
    if args.examples and not verification.passed:
        _status("not saved: the optimized model failed verification (see above)")
        return EXIT_FAILED
    if args.out is not None:
        fxopt.save(result, args.out)
        (args.out / SOURCE_FILE).write_text(json.dumps(asdict(source), indent=2) + "\n")
        _status(f"saved to {args.out} (check it again with: fxopt verify {args.out})")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    source = read_source(args.directory)
    model = build_model(source)
    if weights_fingerprint(model) != source.weights_sha256:
        raise UsageError(
            f"{source.spec} built different weights than when {args.directory} was saved: the factory is not "
            "deterministic (it must build the same weights after torch.manual_seed), or its code or checkpoint "
            "changed since; the saved model cannot be checked against it"
        )
    saved = fxopt.load(args.directory)
    _status(f"verifying {args.directory} against {source.spec} on {args.examples} examples ...")
    result = fxopt.verify(model, saved, example_tensors(source), examples=args.examples, progress=_progress)
    print(result)
    return EXIT_OK if result.passed else EXIT_FAILED


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = EXAMPLES[args.example]()
    inputs = (torch.randn(1, 3, 224, 224),)
    start = time.perf_counter()
    result = fxopt.optimize(model, inputs)
    print(result.report)
    print(f"optimize took {time.perf_counter() - start:.1f} s (verification included)")
    print("passes available:")
    for pass_name, description in fxopt.list_passes().items():
        print(f"  {pass_name:16s} {description}")
    return EXIT_OK


# -- the source model and its inputs ------------------------------------------------------------------


def build_model(source: Source) -> torch.nn.Module:
    """Call the factory SPEC names after torch.manual_seed(seed); refuse a model in training mode."""
    factory = resolve_factory(source.spec)
    torch.manual_seed(source.seed)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's factory failing is an input error
        raise UsageError(f"calling {source.spec} raised {type(error).__name__}: {error}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{source.spec} returned a {type(model).__name__}, not a torch.nn.Module")
    training = [f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules() if m.training]
    if training:
        raise UsageError(
            f"{source.spec} returned a model in training mode: {', '.join(training[:3])}"
            f"{f' and {len(training) - 3} more' if len(training) > 3 else ''}. BatchNorm then uses batch statistics and Dropout random "
            "masks, so fxopt would fold none of them and verification would compare random outputs. fxopt "
            "optimizes for inference: return model.eval() from the factory"
        )
    return model


def resolve_factory(spec: str) -> Callable[[], Any]:
    """``package.module:attr.path`` (importable from the current directory) or a built-in example."""
    if ":" not in spec:
        if spec in EXAMPLES:
            return EXAMPLES[spec]
        close = difflib.get_close_matches(spec, EXAMPLES, n=1)
        raise UsageError(
            f"{spec!r} is neither package.module:factory nor a built-in example"
            + (f"; did you mean {close[0]!r}?" if close else f" ({', '.join(EXAMPLES)})")
        )
    module_name, _, attr_path = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a module beside the user is found
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"cannot import {module_name!r} (from {spec!r}): {error}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [name for name in dir(obj) if not name.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            raise UsageError(
                f"{spec!r}: {getattr(obj, '__name__', module_name)} has no attribute {part!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not a callable that builds the model")
    return obj


def _input_specs(shapes: list[list[int]], dtypes: list[str]) -> list[InputSpec]:
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise UsageError(f"{len(dtypes)} --dtype for {len(shapes)} --example-shape: give one for all, or one per shape")
    return [InputSpec(shape, dtype) for shape, dtype in zip(shapes, dtypes)]


def example_tensors(source: Source) -> tuple[torch.Tensor, ...]:
    """The example inputs: normal floats, integers in [0, int_high), from a generator seeded by seed."""
    generator = torch.Generator().manual_seed(source.seed)
    tensors = []
    for spec in source.inputs:
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point or dtype.is_complex:
            tensors.append(torch.randn(spec.shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.randint(0, source.int_high, spec.shape, generator=generator).to(dtype))
    return tuple(tensors)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every state_dict entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_source(directory: Path) -> Source:
    path = directory / SOURCE_FILE
    if not path.exists():
        raise UsageError(
            f"{directory} has no {SOURCE_FILE}: it was not written by `fxopt optimize --out`; "
            "check a model saved with fxopt.save from Python with fxopt.verify(model, fxopt.load(dir), inputs)"
        )
    try:
        data = json.loads(path.read_text())
        inputs = [InputSpec(**spec) for spec in data.pop("inputs")]
        return Source(inputs=inputs, **data)
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(f"{path} is not a valid {SOURCE_FILE} ({type(error).__name__}: {error})") from None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(example: int, total: int) -> None:
    _status(f"  verifying example {example}/{total} ...")
