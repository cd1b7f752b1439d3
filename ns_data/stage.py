"""The errors of every stage: what a user can fix (an option out of range, a missing input, an output in the
way) is a `StageError`, raised before any work starts; both command lines print it as one line, without a
traceback. No Beam here: the trainer imports these too.
"""
from __future__ import annotations


class StageError(ValueError):
    """A user's error, reported before work starts as one line."""


class OptionsError(StageError):
    """An option out of its range."""


class InputError(StageError):
    """A missing input, or one that does not fit the contract."""


class OutputExists(StageError):
    """The output directory holds something this run must not replace without --overwrite."""
