"""Running a stage's pipeline: the options (Beam's own flags pass through; the in-process runner is the default),
the counters its steps add up, and the step that runs once all work is done."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindows

# Beam's DirectRunner first tries to download the Prism runner; FnApiRunner runs in this process, offline.
LOCAL_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
    options = PipelineOptions(list(beam_args or []))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    return options


def is_local(beam_args: list[str] | None) -> bool:
    runner = pipeline_options(beam_args).view_as(StandardOptions).runner
    return runner.split(".")[-1] in StandardOptions.LOCAL_RUNNERS


def make_pipeline(beam_args: list[str] | None) -> beam.Pipeline:
    return beam.Pipeline(options=pipeline_options(beam_args))


def run_stage(name: str, units, stage: beam.PTransform, beam_args: list[str] | None) -> None:
    """Runs one stage's pipeline: its work units, spread over workers, into the stage's transform."""
    with make_pipeline(beam_args) as pipeline:
        spread = pipeline | "WorkUnits" >> beam.Create(list(units)) | "SpreadUnits" >> beam.Reshuffle()
        _ = spread | name >> stage


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
