"""Equivalence checking: a rewrite must compute what the original computes, up to rounding."""

from .inputs import input_strategy
from .oracle import ORACLE_FACTOR, LeafError, compare, tolerance_floor
from .verify import VerificationResult, verify

__all__ = [
    "ORACLE_FACTOR",
    "LeafError",
    "VerificationResult",
    "compare",
    "input_strategy",
    "tolerance_floor",
    "verify",
]
