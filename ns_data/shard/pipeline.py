"""The Beam steps of `shard` and the `Shard` transform that chains them (see the package docstring)."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from ns_data import spill, tfrecord
from ns_data.contract import SOURCE_CHANGED, content_changed
from ns_data.memory import release_freed_memory
from ns_data.reading import WorkUnit
from ns_data.runner import SumCounts, after_all
from ns_data.shard.manifest import ShardInfos, finalize
from ns_data.shard.placement import group_keys, group_starts, place_records
from ns_data.shard.plan import (ShardContext, add_totals, count_unit, make_plan, read_rows, row_error_detail,
                                row_reasons)
from ns_data.shard.records import copy_feature, shared_features
from ns_data.shard.writing import open_spill_file, read_shard_info, write_shard
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

    def process(self, unit: WorkUnit, plan: dict):
        ctx = self.ctx.planned(plan)
        table = read_rows(unit, ctx.columns)
        reasons = row_reasons(table, ctx.num_classes)
        invalid = np.flatnonzero(reasons != "")
        if len(invalid):
            yield from self._errors(table.take(pa.array(invalid)).to_pylist(), reasons[invalid])
            table = table.filter(pa.array(reasons == ""))
        keys = group_keys(table, ctx.file_groups).dictionary_encode()
        codes = keys.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        copies = table.column("copies").to_numpy()
        sender = spill.Sender(ctx.spill_path(f"rows-{unit.index:06d}"))
        for part in np.split(order, bounds) if len(order) else []:
            key = keys.dictionary[int(codes[part[0]])].as_py()
            sender.send(key, table.take(pa.array(part)).combine_chunks().to_batches()[0])
            yield beam.pvalue.TaggedOutput(RECORDS, (key, int(copies[part].sum())))
        yield from sender.finish()

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

    def process(self, group, starts: dict[str, int], plan: dict):
        key, parts = group
        ctx, opts = self.ctx.planned(plan), self.ctx.options
        table = pa.Table.from_batches(spill.receive(parts))
        table = table.take(pc.sort_indices(table, [("id", "ascending")]))
        placed = place_records(table, starts[key], ctx.num_shards, opts.seed)
        first_record = np.searchsorted(placed["row"], np.arange(table.num_rows))
        rows = table.to_pylist()
        counts = {"images": 0, "errors": {}, "records_lost": 0}
        data_file = open_spill_file(ctx) if ctx.spill else None
        spilled = []  # (shard, order, index, label, offset, length) of the records in data_file
        read_order = sorted(range(len(rows)), key=lambda i: (rows[i]["source"], rows[i]["offset"] or 0))
        for source, members in _runs(read_order, rows):
            results = read_back(source, [rows[i]["offset"] for i in members], **ctx.read_settings)
            for i, (data, reason, detail) in zip(members, results):
                row = rows[i]
                if data is not None and (changed := content_changed(row, data)):
                    data, reason, detail = None, SOURCE_CHANGED, changed
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
                    self.records.inc()
                    record = (int(placed["order"][r]), int(placed["index"][r]), int(row["label"]))
                    if data_file is not None:
                        spilled.append((shard, *record, data_file.tell(), sum(len(p) for p in parts)))
                        data_file.writelines(parts)
                    else:
                        yield shard, (*record, b"".join(parts))
            self._progress.add(len(members))
        if data_file is not None:
            data_file.close()
            yield from _send_references(ctx, data_file.name, spilled)
        yield beam.pvalue.TaggedOutput(COUNTS, counts)
        release_freed_memory()


REFERENCE_COLUMNS = ("order", "index", "label", "offset", "length")


def _send_references(ctx: ShardContext, data_file: str, spilled: list[tuple]):
    """The references to a fetch task's spilled records, one batch per shard, through a spill file of their own:
    (shard, (data file, batch or reference))."""
    if not spilled:
        return
    columns = list(zip(*spilled))
    types = (pa.int64(), pa.uint64(), pa.int64(), pa.int64(), pa.int64(), pa.int64())
    table = pa.table({name: pa.array(values, t) for name, values, t in
                      zip(("shard",) + REFERENCE_COLUMNS, columns, types)})
    sender = spill.Sender(data_file[:-len(".bin")] + "-refs.arrow")
    for shard in pc.unique(table.column("shard")).to_pylist():
        part = table.filter(pc.equal(table.column("shard"), shard)).drop_columns(["shard"])
        sender.send(shard, part.combine_chunks().to_batches()[0])
    for shard, item in sender.finish():
        yield shard, (data_file, item)


def spilled_records(items: list[tuple]) -> list[tuple]:
    """(order, index, label, (data file, offset, length)) of the records sent as (data file, batch or reference)."""
    records = []
    for (data_file, _), batch in zip(items, spill.receive(item for _, item in items)):
        columns = [batch.column(c).to_pylist() for c in REFERENCE_COLUMNS]
        records += [(o, i, label, (data_file, off, n)) for o, i, label, off, n in zip(*columns)]
    return records


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

    def process(self, shard_and_records, plan: dict):
        shard, records = shard_and_records
        records = spilled_records(list(records)) if self.ctx.spill else list(records)
        info = write_shard(self.ctx.planned(plan), shard, records)
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
        ctx = dataclasses.replace(self.ctx, teacher=None)  # the workers' copy: the teacher is finalize's alone
        if ctx.plan() is not None:
            plan = units.pipeline | "Plan" >> beam.Create([ctx.plan()])
        else:  # the selection counted here, before any row is read for writing
            plan = (units
                    | "CountSelection" >> beam.Map(count_unit, ctx.columns, ctx.num_classes)
                    | "SumSelection" >> beam.CombineGlobally(add_totals)
                    | "Plan" >> beam.Map(make_plan, ctx.options, ctx.record_bytes, ctx.output))
        plan = beam.pvalue.AsSingleton(plan)
        selected = units | "ReadSelection" >> beam.ParDo(ReadSelectionFn(ctx), plan).with_outputs(
            RECORDS, ERRORS, COUNTS, main="rows")
        starts = (selected[RECORDS]
                  | "SumRecordsPerGroup" >> beam.CombinePerKey(sum)
                  | "CollectGroups" >> beam.combiners.ToList()
                  | "GroupStarts" >> beam.Map(group_starts))
        fetched = (selected["rows"]
                   | "GroupBySource" >> beam.GroupByKey()
                   | "Fetch" >> beam.ParDo(FetchFn(ctx), beam.pvalue.AsSingleton(starts), plan).with_outputs(
                       ERRORS, COUNTS, main="records"))
        written = (fetched["records"]
                   | "GroupByShard" >> beam.GroupByKey()
                   | "WriteShards" >> beam.ParDo(WriteShardFn(ctx), plan))
        resumed = (units.pipeline  # the shards an interrupted run finished: their notes, read in parallel
                   | "ResumedTrigger" >> beam.Create([None])
                   | "ResumedShards" >> beam.FlatMap(lambda _, p: sorted(p["done"]), plan)
                   | "SpreadResumed" >> beam.Reshuffle()
                   | "ReadResumedNotes" >> beam.Map(lambda shard, p: read_shard_info(ctx.planned(p), shard), plan))
        infos = ((written, resumed)
                 | "AllShardInfos" >> beam.Flatten()
                 | "CombineShardInfos" >> beam.CombineGlobally(ShardInfos()))
        errors = (selected[ERRORS], fetched[ERRORS]) | "AllErrors" >> beam.Flatten()
        counts = ((selected[COUNTS], fetched[COUNTS])
                  | "AllCounts" >> beam.Flatten()
                  | "SumCounts" >> beam.CombineGlobally(SumCounts()))
        files = (units
                 | "UnitFiles" >> beam.FlatMap(lambda u: u.paths)
                 | "DistinctFiles" >> beam.Distinct()
                 | "CollectInputFiles" >> beam.combiners.ToList())
        return after_all(units.pipeline, _finalize, self.ctx, beam.pvalue.AsSingleton(infos),
                         beam.pvalue.AsSingleton(counts), beam.pvalue.AsList(errors), beam.pvalue.AsSingleton(files),
                         plan)


def _finalize(ctx: ShardContext, infos, counts: dict, errors: list[dict], files: list[str], plan: dict) -> str:
    """finalize, with the run's plan and the input files the pipeline listed (the context carries none)."""
    return finalize(dataclasses.replace(ctx.planned(plan), files=tuple(sorted(files))), infos, counts, errors)
