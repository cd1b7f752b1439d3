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


def no_such_option(name: str, candidates, command: str, kinds: str = "") -> OptionsError:
    """The error for an option `command` does not declare, naming the closest of `candidates`: the same spelling
    with dashes for underscores (or the other way round) first, else the closest by difflib."""
    import difflib

    candidates = sorted(set(candidates))
    same = [c for c in candidates if c.replace("_", "-") == name.replace("_", "-")]
    close = same or difflib.get_close_matches(name, candidates, n=1)
    hint = f": did you mean {close[0]}?" if close else ""
    return OptionsError(f"{command}: no such option {name}{kinds}{hint}")
