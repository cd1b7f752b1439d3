"""Running a stage's pipeline: the options (Beam's own flags pass through; the local runner is the default),
the counters its steps add up, and the step that runs once all work is done.

The local runner is Beam's FnApiRunner (Beam's DirectRunner would first try to download the Prism runner). By
default balance and shard run one worker process per core (`--direct_running_mode multi_processing
--direct_num_workers N`, N = the cores this process may use) on inputs large enough to pay for their start, label
one process (its model and decoding threads use every core); `--direct_num_workers N` sets the number, 1 runs
everything in this process. The stages' outputs
do not depend on the number of workers. `--direct_running_mode multi_threading` with more than one worker is
refused: Beam's multi-threaded local runner lost elements between balance's steps (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions, GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions, TestOptions)
from apache_beam.transforms.window import GlobalWindows

from ns_data.memory import compact_heap
from ns_data.stage import OptionsError

LOCAL_RUNNER = "FnApiRunner"


def local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pipeline_options(beam_args: list[str] | None, local_workers: int | None = None) -> PipelineOptions:
    """Beam's options from the command line; on the local runner, `local_workers` processes (default: one per
    core) unless the command line says otherwise."""
    options = PipelineOptions(list(beam_args or []))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    direct = options.view_as(DirectOptions)
    given = {a.split("=")[0].lstrip("-") for a in beam_args or []}
    if "direct_num_workers" not in given:
        direct.direct_num_workers = local_workers or local_cores()
    if "direct_running_mode" not in given:
        direct.direct_running_mode = "multi_processing" if direct.direct_num_workers != 1 else "in_memory"
    if runs_locally(options) and direct.direct_running_mode == "multi_threading" and direct.direct_num_workers != 1:
        raise OptionsError("--direct_running_mode multi_threading is not supported: Beam's multi-threaded local "
                           "runner lost elements between steps in balance runs (docs/benchmarks.md); leave the "
                           "default, worker processes")
    return options


def is_local(beam_args: list[str] | None) -> bool:
    return runs_locally(pipeline_options(beam_args))


def runs_locally(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner.split(".")[-1] in StandardOptions.LOCAL_RUNNERS


def launch_only(options: PipelineOptions) -> bool:
    """Whether the run only builds or submits the job (a dry run, a template, --no_wait_until_finish)."""
    return bool(options.view_as(TestOptions).dry_run or options.view_as(GoogleCloudOptions).template_location
                or options.view_as(StandardOptions).no_wait_until_finish)


def launched(output: str) -> str:
    return f"job launched; {output} is complete when the job has written its marker"


def run_stage(name: str, source, stage: beam.PTransform, beam_args: list[str] | None,
              local_workers: int | None = None, compact: bool = False) -> bool:
    """Runs one stage's pipeline: its work units, spread over workers, into the stage's transform; True once it
    has run to completion, False when the run only launched it (launch_only). `source` is the work units (a
    list, carried by the job) or a PTransform that makes them inside the pipeline from its start (the job then
    carries only what the transform holds: the way to keep it the same size whatever the input). On the local
    runner one worker process per core starts, but no more than `local_workers` (1 when the stage judges the
    input too small to pay for their start) and than there are units in a list, unless the command line says;
    `compact`: the local run uses a compact heap (ns_data.memory.compact_heap), for stages that move Arrow data,
    not models."""
    local_workers = local_workers or local_cores()
    if not isinstance(source, beam.PTransform):
        source = list(source)
        local_workers = min(local_workers, len(source))
        source = beam.Create(source)
    options = pipeline_options(beam_args, max(1, local_workers))
    pipeline = beam.Pipeline(options=options)
    spread = pipeline | "WorkUnits" >> source | "SpreadUnits" >> beam.Reshuffle()
    _ = spread | name >> stage
    with compact_heap() if compact and runs_locally(options) else contextlib.nullcontext():
        result = pipeline.run()
        if launch_only(options):
            return False
        result.wait_until_finish()
    return True


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
