"""Complete-or-absent output directories, shared by every stage.

A stage writes its files into `OUTPUT/.tmp-<stage>-<run>/`, moves them into OUTPUT when all are written, and
writes `stats.json` last: a directory with `stats.json` is complete; one with data files but no `stats.json`
holds an unfinished run. Nothing is replaced unless the user says --overwrite.
"""
from __future__ import annotations

import glob
import json
import os
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

STATS_FILE = "stats.json"


class OutputExists(ValueError):
    """The output directory already holds a result (or an unfinished run) and --overwrite was not given."""


def _leftovers(output: str, stage: str, patterns: tuple[str, ...]) -> list[str]:
    tmp = f".tmp-{stage}-"
    files = [m.path for pattern in patterns + (f"{tmp}*/*",)
             for m in FileSystems.match([FileSystems.join(output, pattern)])[0].metadata_list]
    tmp_dirs = {FileSystems.split(f)[0] for f in files if tmp in f}
    if "://" not in output:
        tmp_dirs.update(glob.glob(os.path.join(output, f"{tmp}*")))
    return [f for f in files if tmp not in f] + sorted(tmp_dirs)


def prepare_output(output: str, stage: str, patterns: tuple[str, ...], overwrite: bool) -> tuple[str, str]:
    """Checks and clears `output` for a new run; returns (run id, temp dir) with the temp dir created."""
    stats = FileSystems.join(output, STATS_FILE)
    old = _leftovers(output, stage, patterns)
    exists = FileSystems.exists(stats)
    if (exists or old) and not overwrite:
        state = f"a complete {stage} output" if exists else "files of an unfinished run"
        raise OutputExists(f"{output} already holds {state}; pass --overwrite to replace it")
    if exists:
        FileSystems.delete([stats])  # first: the output is now marked incomplete
    if old:
        FileSystems.delete(old)
    run_id = uuid.uuid4().hex[:12]
    tmp_dir = FileSystems.join(output, f".tmp-{stage}-{run_id}")
    FileSystems.mkdirs(tmp_dir)
    return run_id, tmp_dir


def publish(output: str, tmp_dir: str, written: list[str], stats: dict, names: list[str] | None = None) -> str:
    """Moves the written files into `output` (under `names`, default their own), then writes stats.json."""
    text = json.dumps(stats, indent=1, sort_keys=True)
    names = names or [FileSystems.split(p)[1] for p in written]
    FileSystems.rename(list(written), [FileSystems.join(output, n) for n in names])
    tmp_stats = FileSystems.join(tmp_dir, STATS_FILE)
    with FileSystems.create(tmp_stats) as f:
        f.write(text.encode())
    FileSystems.rename([tmp_stats], [FileSystems.join(output, STATS_FILE)])
    FileSystems.delete([tmp_dir])
    return FileSystems.join(output, STATS_FILE)


def read_stats(output: str) -> dict:
    with FileSystems.open(FileSystems.join(output, STATS_FILE)) as f:
        return json.loads(f.read())


class SumDictsFn(beam.CombineFn):
    """Adds up dicts of counters."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, element):
        for key, value in element.items():
            acc[key] = acc.get(key, 0) + value
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc
