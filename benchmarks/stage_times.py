"""Where a local run's time goes: runs an `ns-data` command and prints, for each bundle Beam's FnApiRunner
executes, when it started (seconds since this script started) and how long it took, with the fused stage's name;
and when the pipeline started and ended. What is left of the command's wall time is start-up (interpreter,
imports, checking the inputs) and the end (the summary, leaving).

    .venv/bin/python benchmarks/stage_times.py balance benchmarks/data/pseudo-labels-10000000r-1000c-8f-s0 \\
        --output /tmp/out --per-class 13000 --overwrite --no-progress --direct_num_workers 2

Bundles shorter than --min-seconds (default 0.05) are left out. It wraps a private method of Beam's runner
(`FnApiRunner._execute_bundle`, Beam 2.77), so it is a profiling aid, not part of the product.
"""
from __future__ import annotations

import sys
import time

START = time.perf_counter()


def main(argv: list[str]) -> None:
    min_seconds = 0.05
    if argv[:1] == ["--min-seconds"]:
        min_seconds, argv = float(argv[1]), argv[2:]
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from ns_data.cli import main as ns_data

    execute, run_pipeline = fn_runner.FnApiRunner._execute_bundle, fn_runner.FnApiRunner.run_pipeline

    def timed_bundle(self, context, bundle_context_manager, *args, **kwargs):
        began = time.perf_counter()
        try:
            return execute(self, context, bundle_context_manager, *args, **kwargs)
        finally:
            took = time.perf_counter() - began
            if took >= min_seconds:
                print(f"{began - START:8.2f} {took:7.2f} s  {bundle_context_manager.stage.name[:100]}",
                      file=sys.stderr)

    def timed_pipeline(self, *args, **kwargs):
        print(f"{time.perf_counter() - START:8.2f}          pipeline starts", file=sys.stderr)
        try:
            return run_pipeline(self, *args, **kwargs)
        finally:
            print(f"{time.perf_counter() - START:8.2f}          pipeline ends", file=sys.stderr)

    fn_runner.FnApiRunner._execute_bundle = timed_bundle
    fn_runner.FnApiRunner.run_pipeline = timed_pipeline
    try:
        ns_data.main(argv, prog_name="ns-data")
    finally:
        print(f"{time.perf_counter() - START:8.2f}          command ends", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
