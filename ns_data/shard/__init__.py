"""`shard`: the selection, with its copies, as globally shuffled TFRecord training shards.

    selection row groups -> rows checked (bad rows become error rows) -> rows keyed by source -> read each
    source once, in offset order -> one record per copy, keyed id#copy -> (shard, order key, tf.Example)
    -> group by shard -> sort -> write, rename

Placement (placement.py): the records of a source group (one container, or a hash bucket of standalone files)
are put in the order of a seeded hash of `id#copy`; record i of the group gets the global index `start + i`,
where `start` counts the records of the groups before it, and goes to shard `index mod N`. So shards differ in
size by at most one record, each is a uniform sample of the whole selection, and the copies of one image fall
on independent, hash-chosen shards. Within a shard records are sorted by a second hash. Image bytes cross one
shuffle (the group by shard); a writer holds one shard in memory, so `--max-shard-bytes` bounds its memory.

Output (contract.SHARDS), complete or absent: shards `train-NNNNN-of-NNNNN.tfrecord` (the original Noisy
Student code reads `train*`), `errors-00000.parquet` when some rows could not be written, and `manifest.json`
last. While a run is in progress `.tmp-shard/` holds its plan and one small JSON per finished shard; a shard is
renamed into place as soon as it is written, so a re-run over an interrupted output writes only the shards that
are missing. The manifest is built from small per-shard infos (records, bytes, records per class) that a
CombineFn (manifest.ShardInfos) combines in the pipeline into columns and per-class totals; only the notes of
shards an interrupted run finished are read back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ns_data.contract import SHARDS
from ns_data.outputs import already_complete
from ns_data.runner import is_local, run_stage
from ns_data.shard.summary import format_summary, inspect_records
from ns_data.shard.pipeline import Shard
from ns_data.shard.plan import prepare
from ns_data.spill import SHUFFLES
from ns_data.stage import OptionsError

# On the local runner, worker processes (one per core) from this many images on; below, one process: Beam's
# worker processes take about 3 s to start, more than they save on a smaller selection (docs/benchmarks.md).
MIN_IMAGES_FOR_WORKERS = 50_000
__all__ = ["ShardOptions", "parse_size", "run_shard", "format_summary", "inspect_records"]


def parse_size(text: str | int) -> int:
    """Bytes from '256MB', '1GiB', '500k' or a plain number."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise OptionsError(f"cannot read {text!r} as a size (e.g. 256MB, 1GiB)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(prefix or " "))


@dataclass(frozen=True)
class ShardOptions:
    """What `ns-data shard` takes; validated once by `validate()`. At most one of the three sizes is given;
    with none, shards are sized to about 256 MiB. How the images are read back (container format, Parquet image
    column) is what `label` recorded in the selection, never asked again."""

    inputs: tuple[str, ...]
    output: str
    num_shards: int | None = None
    records_per_shard: int | None = None
    max_shard_bytes: int | None = None
    num_classes: int | None = None
    probabilities: bool = True
    seed: int = 0
    shuffle: str = "auto"
    overwrite: bool = False
    progress: bool = False

    def validate(self) -> "ShardOptions":
        if not self.inputs:
            raise OptionsError("give at least one SELECTION input")
        sizes = [n for n in ("num_shards", "records_per_shard", "max_shard_bytes") if getattr(self, n) is not None]
        if len(sizes) > 1:
            raise OptionsError("give only one of --num-shards, --records-per-shard, --max-shard-bytes")
        if self.shuffle not in SHUFFLES:
            raise OptionsError(f"--shuffle must be one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")
        for name in sizes + (["num_classes"] if self.num_classes is not None else []):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be at least 1")
        return self

    def placement(self, num_shards: int, num_classes: int | None) -> dict[str, Any]:
        """Everything that decides the shards' bytes besides the input: equal placements over the same input
        give byte-identical shards."""
        return {"num_shards": num_shards, "num_classes": num_classes, "probabilities": self.probabilities,
                "seed": self.seed}


def run_shard(opts: ShardOptions, beam_args: list[str] | None = None, echo=print) -> tuple[dict | None, bool]:
    """Runs the pipeline; returns (the manifest, whether this run wrote it: False when already complete); the
    manifest is None when the run only launched the job (a dry run, a template, --no_wait_until_finish)."""
    ctx = prepare(opts, echo, local_runner=is_local(beam_args))
    if ctx is None:
        echo(already_complete(opts.output))
    else:
        images = ctx.valid_rows if ctx.valid_rows is not None else ctx.inputs.estimated_rows
        workers = None if images >= MIN_IMAGES_FOR_WORKERS else 1
        if not run_stage("Shard", ctx.read_units(), Shard(ctx), beam_args, local_workers=workers, compact=True):
            return None, True
    return SHARDS.check_complete(opts.output), ctx is not None
