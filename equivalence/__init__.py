"""Equivalence checking: a rewrite must compute what the original computes, up to rounding."""

from .inputs import input_strategy
from .oracle import ORACLE_FACTOR, LeafError, compare, tolerance_floor
from .verify import VerificationResult, verify
from .bisect import BisectResult, Culprit, bisect
from .check import CheckReport, check_pass
from .prove import MatchProof, ProofResult, prove

__all__ = [
    "ORACLE_FACTOR",
    "BisectResult",
    "CheckReport",
    "Culprit",
    "LeafError",
    "MatchProof",
    "ProofResult",
    "VerificationResult",
    "bisect",
    "check_pass",
    "compare",
    "input_strategy",
    "prove",
    "tolerance_floor",
    "verify",
]
