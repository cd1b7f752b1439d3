"""Running a stage's pipeline: the options (Beam's own flags pass through, checked against those Beam declares;
the local runner is the default),
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
import importlib
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions, GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions, TestOptions, _BeamArgumentParser)

from ns_data import lease
from ns_data.memory import compact_heap
from ns_data.stage import OptionsError, no_such_option

LOCAL_RUNNER = "FnApiRunner"


def local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _DeclaredOptions(_BeamArgumentParser):
    """Beam's options as its PipelineOptions classes declare them; a bad value is an OptionsError."""

    def error(self, message):
        raise OptionsError(message)


def _declared_options(beam_args: list[str]) -> _DeclaredOptions:
    """A parser of every option Beam's PipelineOptions classes declare, the chosen runner's included (a runner
    may declare its own class in its module, imported here as Beam imports it to run)."""
    from apache_beam.runners import runner as beam_runner

    name = next((value for arg, value in zip(beam_args, [*beam_args[1:], ""]) if arg == "--runner"), None)
    name = next((a.split("=", 1)[1] for a in beam_args if a.startswith("--runner=")), name)
    if name:
        path = beam_runner._RUNNER_MAP.get(name.lower(), beam_runner._RUNNER_MAP.get(name.lower() + "runner", name))
        if "." in path:
            with contextlib.suppress(ImportError):
                importlib.import_module(path.rsplit(".", 1)[0])
    parser = _DeclaredOptions(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options collects them
    return parser


def check_beam_args(beam_args: list[str], own_options, command: str) -> None:
    """Every argument a stage passes on to Beam is an option Beam (or the chosen runner) declares, or its value;
    anything else is an OptionsError naming the closest option of either kind (`own_options`: the command's)."""
    parser = _declared_options(beam_args)
    _, unknown = parser.parse_known_args(beam_args)
    for arg in unknown:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            beam = [o for action in parser._actions for o in action.option_strings]
            raise no_such_option(name, [*own_options, *beam], command, " (neither its own nor Beam's)")
        raise OptionsError(f"unexpected argument {arg!r} among Beam's options: give the inputs before any option "
                           f"{command} passes on to Beam")


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


def launched_job(options: PipelineOptions, result) -> str | None:
    """What a launch that does not wait leaves running: its job's id, or the template it wrote; None for a
    dry run, which runs nothing."""
    if options.view_as(TestOptions).dry_run:
        return None
    job_id = getattr(result, "job_id", None)
    job = job_id() if callable(job_id) else job_id
    template = options.view_as(GoogleCloudOptions).template_location
    return str(job) if job else f"template {template}" if template else f"{type(result).__name__} of pid {os.getpid()}"


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
        try:
            result = pipeline.run()
            if launch_only(options):
                lease.launched(launched_job(options, result))
                return False
            result.wait_until_finish()
        except BaseException:
            lease.run_failed()  # the run is over: its output's lease goes, its temp dir stays for a rerun
            raise
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


def after_all(pipeline: beam.Pipeline, fn, *args, **side_inputs):
    """Runs `fn(*args, **side_inputs)` once, after every side input is computed: a stage's last step."""
    return (pipeline
            | "FinalizeTrigger" >> beam.Create([None])
            | "Finalize" >> beam.Map(lambda _, *a, **kw: fn(*a, **kw), *args, **side_inputs))
