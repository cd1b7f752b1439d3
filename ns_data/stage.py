"""What every stage's pipeline shares: its errors, its counters, and the step that runs once all work is done.

Errors a user can fix (an option out of range, a missing input, an output in the way) are `StageError`s,
raised before any work starts; both command lines print them as one line, without a traceback.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows


class StageError(ValueError):
    """A user's error, reported before work starts as one line."""


class OptionsError(StageError):
    """An option out of its range."""


class InputError(StageError):
    """A missing input, or one that does not fit the contract."""


class OutputExists(StageError):
    """The output directory holds something this run must not replace without --overwrite."""


def add_counts(total: dict, counts: dict) -> dict:
    """Adds nested dicts of counters into `total` ({"labeled": 3, "errors": {"not_an_image": 1}})."""
    for key, value in counts.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


class SumCounts(beam.CombineFn):
    """Adds up nested dicts of counters."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, element):
        return add_counts(acc, element)

    def merge_accumulators(self, accs):
        out: dict = {}
        for acc in accs:
            add_counts(out, acc)
        return out

    def extract_output(self, acc):
        return acc


def in_global_window(out):
    """What finish_bundle emits must carry its window (these pipelines have only the global one)."""
    if isinstance(out, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
    return GlobalWindows.windowed_value(out)


def after_all(pipeline: beam.Pipeline, fn, *args, **side_inputs):
    """Runs `fn(*args, **side_inputs)` once, after every side input is computed: a stage's last step."""
    return (pipeline
            | "FinalizeTrigger" >> beam.Create([None])
            | "Finalize" >> beam.Map(lambda _, *a, **kw: fn(*a, **kw), *args, **side_inputs))
