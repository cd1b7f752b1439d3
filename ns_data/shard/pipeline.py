"""The Beam steps of `shard` and the `Shard` transform that chains them (see the package docstring)."""
from __future__ import annotations

from typing import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from ns_data import tfrecord
from ns_data.memory import release_freed_memory
from ns_data.reading import WorkUnit
from ns_data.runner import SumCounts, after_all
from ns_data.shard.manifest import finalize
from ns_data.shard.placement import group_keys, group_starts, place_records
from ns_data.shard.plan import ShardContext, read_rows, row_error_detail, row_reasons
from ns_data.shard.records import copy_feature, shared_features
from ns_data.shard.writing import open_spill_file, write_shard
from ns_data.sources import read_back

NAMESPACE = "ns_data.shard"
ERRORS, COUNTS, RECORDS = "errors", "counts", "records"


def error_row(row: dict, reason: str, detail: str) -> dict:
    """A row of the errors table (contract.IMAGE_ERROR_SCHEMA)."""
    return {"id": row["id"], "source": row["source"], "offset": row["offset"], "reason": reason, "detail": detail}


class ReadSelectionFn(beam.DoFn):
    """One selection row group in; out come its rows that can be written, split by read group, the records each
    group will make, and an error row for every row that cannot be written."""

    def __init__(self, ctx: ShardContext):
        self.ctx = ctx

    def process(self, unit: WorkUnit):
        table = read_rows(unit, self.ctx.columns)
        reasons = row_reasons(table, self.ctx.num_classes)
        invalid = np.flatnonzero(reasons != "")
        if len(invalid):
            yield from self._errors(table.take(pa.array(invalid)).to_pylist(), reasons[invalid])
            table = table.filter(pa.array(reasons == ""))
        keys = group_keys(table, self.ctx.file_groups).dictionary_encode()
        codes = keys.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        copies = table.column("copies").to_numpy()
        for part in np.split(order, bounds) if len(order) else []:
            key = keys.dictionary[int(codes[part[0]])].as_py()
            yield key, table.take(pa.array(part))
            yield beam.pvalue.TaggedOutput(RECORDS, (key, int(copies[part].sum())))

    def _errors(self, rows: list[dict], reasons: np.ndarray):
        counts = {"errors": {}, "records_lost": 0}
        for row, reason in zip(rows, reasons):
            counts["errors"][reason] = counts["errors"].get(reason, 0) + 1
            counts["records_lost"] += max(row["copies"] or 0, 0)
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(row, reason, row_error_detail(
                row, reason, self.ctx.num_classes)))
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


class FetchFn(beam.DoFn):
    """One read group in: reads each source once, in offset order; out come (shard, record) pairs, error rows
    and counts."""

    def __init__(self, ctx: ShardContext):
        self.ctx = ctx
        self.images = Metrics.counter(NAMESPACE, "images_read")
        self.records = Metrics.counter(NAMESPACE, "records_out")
        self.bytes = Metrics.counter(NAMESPACE, "image_bytes_read")
        self.failed = Metrics.counter(NAMESPACE, "images_failed")

    def setup(self):
        self._progress = self.ctx.progress()

    def process(self, group, starts: dict[str, int]):
        key, parts = group
        ctx, opts = self.ctx, self.ctx.options
        table = pa.concat_tables(parts)
        table = table.take(pc.sort_indices(table, [("id", "ascending")]))
        placed = place_records(table, starts[key], ctx.num_shards, opts.seed)
        first_record = np.searchsorted(placed["row"], np.arange(table.num_rows))
        rows = table.to_pylist()
        counts = {"images": 0, "errors": {}, "records_lost": 0}
        spill = open_spill_file(ctx) if ctx.spill else None
        read_order = sorted(range(len(rows)), key=lambda i: (rows[i]["source"], rows[i]["offset"] or 0))
        for source, members in _runs(read_order, rows):
            results = read_back(source, [rows[i]["offset"] for i in members], **ctx.read_settings)
            for i, (data, reason, detail) in zip(members, results):
                row = rows[i]
                if data is None:
                    self.failed.inc()
                    counts["errors"][reason] = counts["errors"].get(reason, 0) + 1
                    counts["records_lost"] += row["copies"]
                    yield beam.pvalue.TaggedOutput(ERRORS, error_row(row, reason, detail))
                    continue
                self.images.inc()
                self.bytes.inc(len(data))
                counts["images"] += 1
                shared = shared_features(row, ctx.num_classes, opts.probabilities)
                for r in range(first_record[i], first_record[i] + row["copies"]):
                    shard = int(placed["shard"][r])
                    if shard in ctx.done:
                        continue
                    parts = tfrecord.example_record_parts(shared + copy_feature(int(placed["copy"][r])),
                                                          "image/encoded", data)
                    if spill is not None:
                        framed = (spill.name, spill.tell(), sum(len(p) for p in parts))
                        spill.writelines(parts)
                    else:
                        framed = b"".join(parts)
                    self.records.inc()
                    yield shard, (int(placed["order"][r]), int(placed["index"][r]), int(row["label"]), framed)
            self._progress.add(len(members))
        if spill is not None:
            spill.close()
        yield beam.pvalue.TaggedOutput(COUNTS, counts)
        release_freed_memory()


def _runs(order: list[int], rows: list[dict]) -> Iterator[tuple[str, list[int]]]:
    """Consecutive rows of one source, for reading it once."""
    members: list[int] = []
    for i in order:
        if members and rows[i]["source"] != rows[members[0]]["source"]:
            yield rows[members[0]]["source"], members
            members = []
        members.append(i)
    if members:
        yield rows[members[0]]["source"], members


class WriteShardFn(beam.DoFn):
    def __init__(self, ctx: ShardContext):
        self.ctx = ctx
        self.shards = Metrics.counter(NAMESPACE, "shards_written")

    def process(self, shard_and_records):
        shard, records = shard_and_records
        info = write_shard(self.ctx, shard, list(records))
        self.shards.inc()
        del records
        release_freed_memory()
        yield info


class Shard(beam.PTransform):
    """Selection work units in; the path of manifest.json out, once every shard is in place."""

    def __init__(self, ctx: ShardContext):
        super().__init__()
        self.ctx = ctx

    def expand(self, units):
        ctx = self.ctx
        selected = units | "ReadSelection" >> beam.ParDo(ReadSelectionFn(ctx)).with_outputs(
            RECORDS, ERRORS, COUNTS, main="rows")
        starts = (selected[RECORDS]
                  | "SumRecordsPerGroup" >> beam.CombinePerKey(sum)
                  | "CollectGroups" >> beam.combiners.ToList()
                  | "GroupStarts" >> beam.Map(group_starts))
        fetched = (selected["rows"]
                   | "GroupBySource" >> beam.GroupByKey()
                   | "Fetch" >> beam.ParDo(FetchFn(ctx), beam.pvalue.AsSingleton(starts)).with_outputs(
                       ERRORS, COUNTS, main="records"))
        written = (fetched["records"]
                   | "GroupByShard" >> beam.GroupByKey()
                   | "WriteShards" >> beam.ParDo(WriteShardFn(ctx)))
        errors = (selected[ERRORS], fetched[ERRORS]) | "AllErrors" >> beam.Flatten()
        counts = ((selected[COUNTS], fetched[COUNTS])
                  | "AllCounts" >> beam.Flatten()
                  | "SumCounts" >> beam.CombineGlobally(SumCounts()))
        return after_all(units.pipeline, finalize, ctx, beam.pvalue.AsList(written), beam.pvalue.AsSingleton(counts),
                         beam.pvalue.AsList(errors))
