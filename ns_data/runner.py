"""Pipeline options: Beam's own flags pass through; the in-process runner is the default."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

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
