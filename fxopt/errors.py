"""Errors fxopt raises: each says what went wrong, where, and what the user can do."""

from __future__ import annotations


class FxoptError(Exception):
    """Base class of fxopt's errors."""


class CaptureError(FxoptError):
    """Neither capture frontend could turn the model into a graph."""


class UnknownPassError(FxoptError, KeyError):
    """A pass name that no registered pass has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InputError(FxoptError, TypeError):
    """example_inputs do not fit the model."""


class VerificationError(FxoptError):
    """``optimize`` made a model that does not compute what the original computes, or whose check
    could not run: it is not returned. ``report`` says what each pass did; ``verification`` holds
    the errors and the counterexample (``verification.save_counterexample(path)`` saves it)."""

    def __init__(self, message: str, report: object, verification: object):
        super().__init__(message)
        self.report = report
        self.verification = verification


class SaveError(FxoptError):
    """A module that cannot be saved as source plus safetensors, or a saved folder that does not load."""
