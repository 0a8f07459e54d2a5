"""fxopt: graph-level compiler passes on torch.fx that make a trained model cheaper without
changing what it computes, with every rewrite checked against a float64 oracle."""

from .capture import capture
from .draw import draw
from .driver import optimize
from .errors import CaptureError, FxoptError, InputError, SaveError, UnknownPassError, VerificationError
from .pattern import Match, Pass, Pattern, Skip, list_passes, register
from .report import PassReport, Report
from .rewriter import Rewriter
from .saving import load, save

from . import patterns  # noqa: E402,F401  (registers the pass library)
from . import quant  # noqa: E402,F401
from .equivalence import bisect, verify  # noqa: E402

__all__ = [
    "optimize", "verify", "bisect", "list_passes", "save", "load", "capture", "draw", "register", "Pass", "Pattern", "Match", "Skip",
    "Rewriter", "Report", "PassReport", "CaptureError", "FxoptError", "InputError", "SaveError",
    "UnknownPassError", "VerificationError",
]
