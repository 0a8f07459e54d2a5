"""Leaf-by-leaf comparison of a candidate's outputs against a float64 oracle.

Three runs of the same computation are compared: the *oracle* (the reference
model converted to float64, fed float64 inputs), the *reference* (the original
model in its own dtype) and the *candidate* (the rewritten model, same dtype as
the reference). The reference's distance from the oracle measures how much
rounding error the original computation makes; the candidate may make a few
times as much, and no more. No tolerance is chosen by hand.

Criterion, for every floating-point (or complex) tensor leaf, with c the
candidate's leaf, r the reference's leaf and o the oracle's leaf, all three
converted to float64 (complex128) before any arithmetic:

* e_ref = max |r - o| over the positions where o is finite
  (|r - o| counts as +inf where r is NaN; e_ref = 0 if there is no such position);
  when a *perturbed oracle* p is given (the float64 model with every parameter moved
  by up to half a unit in the last place of its own dtype, see ``perturb``), e_ref is
  that plus e_par = max |p - o|. A rewrite that folds parameters rounds each new
  parameter once, so the candidate's error is the rounding of its activations (whose
  scale e_ref measures) plus the effect of its parameters' rounding (whose scale e_par
  measures): the two add, so their bounds add. e_par matters where the reference's own
  error does not show the model's sensitivity to its parameters: a bf16 Linear whose
  products cancel while it accumulates in higher precision, or a deep float32 network
  whose randomized BatchNorms amplify errors (timm's lcnetv2 at inputs of magnitude
  4e3: e_ref 3.8, e_par 3.2, and the same model with its float32 parameters moved by
  one ulp errs by 9 to 31 from the oracle, the candidate by 18);
* (rtol, atol) = tolerance_floor(r.dtype), torch.testing's defaults;
* at every position where o is finite:
      |c - o| <= oracle_factor(n) * e_ref + atol + rtol * |o|
  where n is the number of such positions and oracle_factor(n) = ORACLE_FACTOR for
  n >= 100, ORACLE_FACTOR * sqrt(100 / n) below (e_ref is the largest of n random
  rounding errors: with few of them it is a noisy estimate of the reference's
  rounding scale, e.g. one error can be 4x smaller than another 16% of the time)
  (a NaN in c fails, since NaN compares false);
* at every position where o is not finite: c is not finite, and c == o where
  o is +inf or -inf (where o is NaN, c may be NaN or either infinity); except
  where r is finite there: then float64 and the model's dtype took different
  kernel paths through a non-finite value (a NaN weight times a zero of the
  padding, which float32 kernels skip), the oracle has no value to offer, and c
  must be finite like r.

The leaf passes iff all of the above hold. Besides, the three leaves must have
the same shape, and c must have r's dtype.

Integer and bool tensor leaves pass iff c equals r exactly (the oracle's
integer results, e.g. an argmax, may legitimately differ from the reference's
through rounding, so the reference is the authority there). Non-tensor leaves
(ints, None, strings, ...) pass iff c == r. The output structures (containers,
keys, lengths) of the three runs must be the same.

Reported errors: abs = max |x - o| and rel = abs / max |o|, both over the
positions where o is finite, for x = c (candidate_*) and x = r (reference_*);
when o is zero there, rel = abs. A NaN error is reported as +inf. For integer
and bool leaves the candidate's errors are measured against the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

ORACLE_FACTOR: float = 4.0
"""How many times the reference's own rounding error (vs. the float64 oracle)
the candidate may make. Above 1 because a correct rewrite rounds at different
places (reassociated sums, folded constants) and so may land a little further
from the oracle than the reference does."""

SMALL_LEAF: int = 100
"""Leaves with fewer finite elements than this get a proportionally larger factor."""


def oracle_factor(n: int) -> float:
    """The factor on the reference's error for a leaf with ``n`` finite elements (see the criterion)."""
    return ORACLE_FACTOR * math.sqrt(SMALL_LEAF / n) if 0 < n < SMALL_LEAF else ORACLE_FACTOR


# torch.testing.assert_close's default (rtol, atol) per dtype.
_DTYPE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex32: (1e-3, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}

_ROOT = "output"


@dataclass(frozen=True)
class LeafError:
    """How far one output leaf of the candidate and of the reference lie from the oracle."""

    path: str
    dtype: torch.dtype | None
    candidate_abs: float
    candidate_rel: float
    reference_abs: float
    reference_rel: float
    passed: bool
    message: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        dtype = str(self.dtype).removeprefix("torch.") if self.dtype is not None else "-"
        line = (
            f"{verdict} {self.path} [{dtype}]: candidate abs {self.candidate_abs:.3g} "
            f"rel {self.candidate_rel:.3g}, reference abs {self.reference_abs:.3g} "
            f"rel {self.reference_rel:.3g}"
        )
        return f"{line} ({self.message})" if self.message else line


def tolerance_floor(dtype: torch.dtype) -> tuple[float, float]:
    """Return torch.testing's default (rtol, atol) for dtype; (0, 0), i.e. exact, for other dtypes.

    Float dtypes torch.testing has no default for (float8 variants) also get (0, 0),
    as in torch.testing; their rounding is still allowed for through the oracle term.
    """
    return _DTYPE_TOLERANCES.get(dtype, (0.0, 0.0))


def perturb(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` in float64, each element moved by a random fraction of half an ulp of its own dtype."""
    wide = tensor.detach().to(torch.float64)
    if not tensor.is_floating_point():
        return tensor
    half_ulp = torch.finfo(tensor.dtype).eps / 2
    noise = torch.rand(wide.shape, generator=generator, dtype=torch.float64) * 2 - 1
    return wide * (1 + half_ulp * noise.to(wide.device))


def compare(oracle: Any, reference: Any, candidate: Any, perturbed: Any = None) -> list[LeafError]:
    """Compare three output structures leaf by leaf; one LeafError per reference leaf.

    Leaves missing from one structure, or present only in the candidate or the
    oracle, give failing LeafErrors with a message; see the module docstring
    for the criterion.
    """
    oracle_leaves, oracle_spec = _leaves_by_path(oracle)
    perturbed_leaves = _leaves_by_path(perturbed)[0] if perturbed is not None else {}
    reference_leaves, reference_spec = _leaves_by_path(reference)
    candidate_leaves, candidate_spec = _leaves_by_path(candidate)
    errors = []
    for side, leaves, spec in (
        ("candidate", candidate_leaves, candidate_spec),
        ("oracle", oracle_leaves, oracle_spec),
    ):
        if leaves.keys() == reference_leaves.keys() and spec != reference_spec:
            message = f"{side}'s container types differ from the reference's"
            errors.append(_structure_error(_ROOT, message))
    for path, ref in reference_leaves.items():
        if path not in candidate_leaves:
            errors.append(_structure_error(path, "missing from the candidate's output", ref))
        elif path not in oracle_leaves:
            errors.append(_structure_error(path, "missing from the oracle's output", ref))
        else:
            errors.append(
                _compare_leaf(path, oracle_leaves[path], ref, candidate_leaves[path], perturbed_leaves.get(path))
            )
    for side, leaves in (("candidate", candidate_leaves), ("oracle", oracle_leaves)):
        for path in sorted(leaves.keys() - reference_leaves.keys()):
            message = f"in the {side}'s output but not in the reference's"
            errors.append(_structure_error(path, message))
    return errors


def max_errors(errors: list[LeafError]) -> tuple[float, float]:
    """Return the candidate's largest (abs, rel) error over errors; (0, 0) for none."""
    worst_abs = max((e.candidate_abs for e in errors), default=0.0)
    worst_rel = max((e.candidate_rel for e in errors), default=0.0)
    return worst_abs, worst_rel


def _leaves_by_path(tree: Any) -> tuple[dict[str, Any], pytree.TreeSpec]:
    """Flatten tree into {"output[...]": leaf} and its spec."""
    leaves_with_paths, spec = pytree.tree_flatten_with_path(tree)
    leaves = {_ROOT + pytree.keystr(key_path): leaf for key_path, leaf in leaves_with_paths}
    return leaves, spec


def _structure_error(path: str, message: str, reference: Any = None) -> LeafError:
    """A failing LeafError for a leaf that cannot be compared; nothing was measured."""
    dtype = reference.dtype if isinstance(reference, torch.Tensor) else None
    return LeafError(path, dtype, math.inf, math.inf, math.nan, math.nan, False, message)


def _compare_leaf(path: str, oracle: Any, reference: Any, candidate: Any, perturbed: Any = None) -> LeafError:
    """Compare one leaf of each structure, dispatching on the kind of the reference's leaf."""
    mismatch = _leaf_mismatch(oracle, reference, candidate)
    if mismatch:
        return _structure_error(path, mismatch, reference)
    if not isinstance(reference, torch.Tensor):
        return _compare_values(path, reference, candidate)
    if reference.is_floating_point() or reference.is_complex():
        return _compare_float_leaf(path, oracle, reference, candidate, perturbed)
    return _compare_exact_leaf(path, oracle, reference, candidate)


def _leaf_mismatch(oracle: Any, reference: Any, candidate: Any) -> str:
    """Why the leaves cannot be compared value by value (kind, shape, dtype); empty if they can."""
    reference_is_tensor = isinstance(reference, torch.Tensor)
    for side, leaf in (("candidate", candidate), ("oracle", oracle)):
        if isinstance(leaf, torch.Tensor) != reference_is_tensor:
            kinds = f"{type(leaf).__name__} where the reference gives {type(reference).__name__}"
            return f"{side} gives {kinds}"
    if not reference_is_tensor:
        return ""
    for side, leaf in (("candidate", candidate), ("oracle", oracle)):
        if leaf.shape != reference.shape:
            return f"{side} shape {tuple(leaf.shape)} != reference shape {tuple(reference.shape)}"
    if candidate.dtype != reference.dtype:
        return f"candidate dtype {candidate.dtype} != reference dtype {reference.dtype}"
    return ""


def _compare_values(path: str, reference: Any, candidate: Any) -> LeafError:
    """Non-tensor leaves (ints, None, strings) must simply be equal."""
    passed = bool(reference == candidate)
    message = "" if passed else f"candidate {candidate!r} != reference {reference!r}"
    error = 0.0 if passed else math.inf
    return LeafError(path, None, error, error, 0.0, 0.0, passed, message)


def _as_wide(tensor: torch.Tensor) -> torch.Tensor:
    """tensor in float64 (complex128 for complex) on the CPU, where all three leaves can meet."""
    wide = torch.complex128 if tensor.is_complex() else torch.float64
    return tensor.detach().to(device="cpu", dtype=wide)


def _compare_float_leaf(
    path: str, oracle: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor, perturbed: Any = None
) -> LeafError:
    """Apply the oracle criterion of the module docstring to one floating-point leaf."""
    o, r, c = _as_wide(oracle), _as_wide(reference), _as_wide(candidate)
    finite = torch.isfinite(o)
    all_finite = bool(finite.all())

    def finite_part(t: torch.Tensor) -> torch.Tensor:
        return t if all_finite else t[finite]  # masking copies: skip it in the common case

    o_finite = finite_part(o)
    reference_err = _nan_to_inf((finite_part(r) - o_finite).abs())
    candidate_err = (finite_part(c) - o_finite).abs()  # NaN kept: it must fail the <= test
    e_ref = _max_or_zero(reference_err)
    if isinstance(perturbed, torch.Tensor) and perturbed.shape == oracle.shape:
        sensitivity = (finite_part(_as_wide(perturbed)) - o_finite).abs()
        e_ref += _max_or_zero(torch.nan_to_num(sensitivity, nan=0.0, posinf=0.0))
    rtol, atol = tolerance_floor(reference.dtype)
    bound = oracle_factor(o_finite.numel()) * e_ref + atol + rtol * o_finite.abs()
    within_bound = bool((candidate_err <= bound).all())
    nonfinite_ok = all_finite or _nonfinite_positions_match(o[~finite], r[~finite], c[~finite])
    scale = _max_or_zero(o_finite.abs()) or 1.0  # all-zero oracle: report abs as rel
    candidate_abs = _max_or_zero(_nan_to_inf(candidate_err))
    message = _float_leaf_message(within_bound, nonfinite_ok, candidate_err, e_ref)
    return LeafError(
        path,
        reference.dtype,
        candidate_abs,
        candidate_abs / scale,
        e_ref,
        e_ref / scale,
        within_bound and nonfinite_ok,
        message,
    )


def _nonfinite_positions_match(o: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> bool:
    """Where the oracle is inf/NaN, the candidate must be non-finite like it (equal where it is
    ±inf), or finite where the reference is finite (the oracle took another kernel path there)."""
    reference_finite = torch.isfinite(r)
    if not bool(torch.isfinite(c[reference_finite]).all()):
        return False
    o, c = o[~reference_finite], c[~reference_finite]
    infinite = torch.isinf(o)
    return bool((~torch.isfinite(c)).all()) and bool((c[infinite] == o[infinite]).all())


def _float_leaf_message(
    within_bound: bool, nonfinite_ok: bool, candidate_err: torch.Tensor, e_ref: float
) -> str:
    """Say which part of the criterion failed, and whether the reference left it unbounded."""
    reasons = []
    if math.isinf(e_ref):
        # Passing here only means "no NaN"; the reader should know the leaf was barely checked.
        reasons.append("reference is inf/NaN where the oracle is finite: bound is infinite")
    if bool(candidate_err.isnan().any()):
        reasons.append("candidate is NaN where the oracle is finite")
    elif not within_bound:
        reasons.append("candidate error exceeds the oracle bound")
    if not nonfinite_ok:
        reasons.append("candidate differs where the oracle is inf/NaN")
    return "; ".join(reasons)


def _compare_exact_leaf(
    path: str, oracle: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor
) -> LeafError:
    """Integer and bool leaves: the candidate must reproduce the reference bit for bit."""
    r, c, o = _as_wide(reference), _as_wide(candidate), _as_wide(oracle)
    passed = bool(torch.equal(reference.cpu(), candidate.cpu()))
    scale = _max_or_zero(o.abs()) or 1.0
    candidate_abs = _max_or_zero((c - r).abs())
    reference_abs = _max_or_zero((r - o).abs())
    message = "" if passed else "integer/bool leaf differs from the reference"
    return LeafError(
        path,
        reference.dtype,
        candidate_abs,
        candidate_abs / scale,
        reference_abs,
        reference_abs / scale,
        passed,
        message,
    )


def _nan_to_inf(errors: torch.Tensor) -> torch.Tensor:
    """A NaN error is an unbounded error."""
    return errors.nan_to_num(nan=math.inf, posinf=math.inf)


def _max_or_zero(values: torch.Tensor) -> float:
    """Largest value of a real tensor, 0.0 when it is empty."""
    return float(values.max()) if values.numel() else 0.0
