"""`balance`: the exact, deterministic per-class selection of Noisy Student as one Beam pipeline.

Passes over the input (each reads only the columns it needs, in Arrow record batches):

1. scan: validate id/label/confidence, hash ids, count candidates per (class, confidence bin), send the
   hashes of valid rows to buckets to find repeated ids, and keep the candidates' keys (row, order key, id
   hash) in a file of the temp dir, which the later passes read instead of the input;
2. duplicates (only when an id repeats): decide which copy of a repeated id is kept;
3. refine (only for bins that hold kept rows and exceed `unit_rows`): finer counts, so no sort unit is large;
4. route: send the keys of rows that can be kept to their sort unit; each unit is sorted and ranked;
5. write: join the ranks back to the full rows per row group, write selection and error files;
6. finalize: move the files in place and write stats.json last.

Only small key arrays cross a shuffle, and on the local runner they go through spill files (ns_data.spill), so
memory is bounded by the options, not by the rows; pass-through columns are read from the input where they are
written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from ns_data import contract, fs, spill
from ns_data import selection as sel
from ns_data.hashing import hash_ids
from ns_data.memory import release_freed_memory
from ns_data.outputs import COMPLETE, RESUME, StageOutput, already_complete
from ns_data.progress import Progress
from ns_data.reading import ReadUnits, TableInputs, WorkUnit, iter_batches, resolve_inputs
from ns_data.runner import SumCounts, after_all
from ns_data.stage import OptionsError

NAMESPACE = "ns_data.balance"
# On the local runner, worker processes (one per core) from this many input rows on; below, one process. Beam's
# worker processes take about 2 s to start and stop and double the memory; on 2 cores they gained nothing at 10M
# rows and 1.3x at 20M-30M (docs/benchmarks.md).
MIN_ROWS_FOR_WORKERS = 15_000_000
# The input's required columns, and the columns it must not have (balance writes them).
INPUT_CHECKS = (contract.KEY_COLUMNS, tuple(f.name for f in contract.SELECTION_FIELDS) + (contract.REASON,))


@dataclass(frozen=True)
class BalanceOptions:
    """What `ns-data balance` takes; validated once by `validate()`."""

    inputs: tuple[str, ...]
    output: str
    per_class: int = 130_000
    min_confidence: float = 0.3
    upsample: bool = True
    seed: int = 0
    num_classes: int | None = None
    overwrite: bool = False
    batch_rows: int = 131_072
    unit_rows: int = 262_144
    dedup_bucket_rows: int = 4_000_000
    shuffle: str = "auto"
    progress: bool = False

    def validate(self) -> "BalanceOptions":
        if not self.inputs:
            raise OptionsError("give at least one INPUT")
        if not self.output:
            raise OptionsError("--output is required")
        if self.per_class < 1:
            raise OptionsError(f"--per-class must be at least 1, got {self.per_class}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise OptionsError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if not 0 <= self.seed < 2**64:
            raise OptionsError(f"--seed must be in [0, 2**64), got {self.seed}")
        if self.num_classes is not None and not 1 <= self.num_classes <= sel.MAX_LABEL + 1:
            raise OptionsError(f"--num-classes must be in [1, 2**31], got {self.num_classes}")
        if self.shuffle not in spill.SHUFFLES:
            raise OptionsError(f"--shuffle must be one of {', '.join(spill.SHUFFLES)}, got {self.shuffle!r}")
        for name in ("batch_rows", "unit_rows", "dedup_bucket_rows"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be at least 1")
        return self

    def rule(self) -> dict[str, Any]:
        """The options that decide the result (recorded in stats.json and the output's metadata)."""
        return {"per_class": self.per_class, "min_confidence": self.min_confidence, "upsample": self.upsample,
                "seed": self.seed, "num_classes": self.num_classes}


@dataclass(frozen=True)
class RunContext:
    """What the pipeline's steps share: options, the inputs as given, totals, where temporary files go. No list
    of files or work units: the pipeline makes those (reading.ReadUnits)."""

    options: BalanceOptions
    inputs: TableInputs
    schema: pa.Schema
    output: StageOutput
    run_id: str
    spill: bool  # keys cross the shuffles through spill files in the temp dir (ns_data.spill)
    total_rows: int  # the input's rows: as the label markers count them, else estimated (reading.TableInputs)
    # The teacher's identity (class names) as the input records it (reading.resolve_inputs), for stats.json; only
    # the last step's copy of the context holds it (Balance.expand), and `schema` has it in brief.
    teacher: dict | None = None

    def progress(self, stage: str) -> Progress:
        return Progress(self.run_id, stage, self.inputs.marker_rows, self.options.progress,
                        shared_dir=self.output.tmp_dir)

    def read_units(self) -> ReadUnits:
        """The transform that makes the work units in the pipeline."""
        return ReadUnits(self.inputs, contract.LABELS, *INPUT_CHECKS, listing_dir=self.output.tmp_dir)

    def dedup_buckets(self, rows: int) -> int:
        """Buckets for `rows` input rows (counted in the pipeline from the units' footers)."""
        return max(1, -(-rows // self.options.dedup_bucket_rows))

    def keys_path(self, unit: WorkUnit) -> str:
        """The scan's file of a unit's candidate keys."""
        return self.output.tmp(f"spill/keys-{unit.index:06d}.arrow")

    def sender(self, task: str) -> spill.Sender:
        """Where one task's keys go: its own spill file (named after the task), or Beam's shuffle."""
        return spill.Sender(self.output.tmp(f"spill/{task}.arrow") if self.spill else None)


# ------------------------------------------------------------------------------------------- helpers


def split_by(keys: np.ndarray, *arrays):
    """(key, arrays restricted to that key) for each distinct key, in key order; one sort, no per-key scans.
    Keys that fit in 16 bits (work units, buckets) are sorted as such: numpy's stable sort is then a radix sort,
    7-18x faster than on 64-bit keys (docs/benchmarks.md)."""
    narrow = len(keys) and keys.min() >= 0 and keys.max() < 2**16
    order = np.argsort(keys.astype(np.uint16) if narrow else keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(keys)]
    for a, b in zip(starts, ends):
        yield keys[a], [x[order[a:b]] for x in arrays]


def _unit_losers(losers: dict, unit: WorkUnit) -> np.ndarray:
    """Row indexes (in the unit) of the rows rejected as duplicate ids."""
    pos = losers["positions"]
    lo, hi = np.searchsorted(pos, [unit.index << 32, (unit.index + 1) << 32])
    return (pos[lo:hi] - (unit.index << 32)).astype(np.int64)


def _candidates(ctx: RunContext, unit: WorkUnit, losers: dict, stage: str):
    """(rows, order keys, id hashes) of a unit's candidates, batch by batch, from the scan's file; without the
    copies of repeated ids that lost."""
    if not unit.num_rows:  # an empty row group: the scan wrote no file
        return
    progress = ctx.progress(stage)
    loser_rows = _unit_losers(losers, unit)
    reader = spill.open_file(ctx.keys_path(unit))
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        rows, s, hashes = (batch.column(c).to_numpy() for c in ("row", "key", "hash"))
        if len(loser_rows):
            won = ~np.isin(rows, loser_rows)
            rows, s, hashes = rows[won], s[won], hashes[won]
        yield rows, s, hashes
    progress.add(unit.num_rows)


def _key_batches(ctx: RunContext, unit: WorkUnit, losers: dict | None, stage: str, columns=None):
    """(first row, batch, KeyBatch) over a unit, with duplicate losers marked."""
    progress = ctx.progress(stage)
    loser_rows = _unit_losers(losers, unit) if losers is not None else np.zeros(0, np.int64)
    for start, batch in iter_batches(unit, columns or sel.value_columns(ctx.schema.names), ctx.options.batch_rows):
        kb = sel.read_keys(batch, ctx.options.num_classes)
        if len(loser_rows):
            lo, hi = np.searchsorted(loser_rows, [start, start + batch.num_rows])
            kb.reason[loser_rows[lo:hi] - start] = sel.DUPLICATE
        yield start, batch, kb
        progress.add(batch.num_rows)


class SparseCountsFn(beam.CombineFn):
    """Sums sparse histograms given as (keys, counts) arrays."""

    def create_accumulator(self):
        return sel.SparseCounts()

    def add_input(self, acc, element):
        return acc.add(*element)

    def merge_accumulators(self, accs):
        out = sel.SparseCounts()
        for acc in accs:
            out.add(*acc.compact())
        return out

    def extract_output(self, acc):
        return acc.compact()


# ------------------------------------------------------------------------------------------- pass 1


class _TrimmingDoFn(beam.DoFn):
    """A DoFn that hands freed memory back to the OS after each bundle (see ns_data.memory)."""

    def finish_bundle(self):
        release_freed_memory()


class ScanFn(_TrimmingDoFn):
    """Validates rows, counts candidates per level-1 bin, sends valid ids' hashes to dedup buckets."""

    HASHES = "hashes"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.rows = Metrics.counter(NAMESPACE, "rows_read")

    def process(self, unit: WorkUnit, rows: int):
        opts = self.ctx.options
        buckets = np.uint64(self.ctx.dedup_buckets(rows))
        keys = spill.Sender(self.ctx.keys_path(unit))
        unit_hashes = []
        for start, _, kb in _key_batches(self.ctx, unit, None, "scan"):
            self.rows.inc(len(kb.reason))
            valid = kb.reason == 0
            hashes = hash_ids(kb.ids.filter(pa.array(valid)), opts.seed)
            unit_hashes.append(hashes)
            cand = sel.is_candidate(kb, opts.min_confidence)
            s = sel.order_keys(kb.labels[cand], kb.confidence[cand])
            row_hash = np.zeros(len(valid), np.uint64)
            row_hash[valid] = hashes
            keys.send(0, pa.record_batch({"row": (start + np.flatnonzero(cand)).astype(np.uint32), "key": s,
                                          "hash": row_hash[cand]}))
            yield sel.sum_counts(sel.level1_keys(s))
        keys.close()
        # The unit's hashes go to their buckets at once: one batch per bucket, whatever the batch size.
        sender = self.ctx.sender(f"scan-{unit.index:06d}")
        hashes = np.concatenate(unit_hashes) if unit_hashes else np.zeros(0, np.uint64)
        for b, (part,) in split_by(hashes % buckets, hashes):
            sender.send(int(b), pa.record_batch({"hash": part}))
        for bucket, part in sender.finish():
            yield beam.pvalue.TaggedOutput(self.HASHES, (bucket, part))


def repeated_hashes(bucket_and_parts) -> list[np.ndarray]:
    """Hashes that occur more than once in one bucket (repeated ids, and the rare hash collision)."""
    _, parts = bucket_and_parts
    hashes = np.sort(spill.column(spill.receive(parts), "hash", np.uint64))
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    return [repeated] if len(repeated) else []


def _union(arrays: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64)


# ------------------------------------------------------------------------------------------- pass 2


class DuplicateRowsFn(beam.DoFn):
    """Emits the valid rows whose id hash repeats, with what decides which copy is kept."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def process(self, unit: WorkUnit, repeated: np.ndarray):
        if not len(repeated):
            return
        opts = self.ctx.options
        for start, batch in iter_batches(unit, None, opts.batch_rows):
            kb = sel.read_keys(batch, opts.num_classes)
            hashes = hash_ids(kb.ids, opts.seed)
            rows = np.flatnonzero((kb.reason == 0) & np.isin(hashes, repeated))
            for i in rows:
                content = batch.slice(int(i), 1).to_pylist()[0]
                digest = hashlib.sha256(repr(sorted(content.items())).encode()).hexdigest()
                yield int(hashes[i]), (content["id"], -float(kb.confidence[i]), int(kb.labels[i]), digest,
                                       (unit.index << 32) + start + int(i))


def losing_copies(hash_and_rows) -> list[tuple[int, int, float]]:
    """Of rows sharing an id, keep the most confident, then lowest label, then smallest content digest.

    Rows equal in all of these are equal in content, so which of them is kept does not change the output.
    Returns (position, label, confidence) of the others.
    """
    _, rows = hash_and_rows
    by_id: dict[str, list] = {}
    for row in rows:
        by_id.setdefault(row[0], []).append(row[1:])
    losers = []
    for copies in by_id.values():
        copies.sort()
        losers.extend((pos, label, -neg_conf) for neg_conf, label, _, pos in copies[1:])
    return losers


def collect_losers(losers: list[tuple[int, int, float]]) -> dict:
    losers = sorted(losers)
    return {
        "positions": np.array([p for p, _, _ in losers], np.int64),
        "labels": np.array([lab for _, lab, _ in losers], np.int64),
        "confidence": np.array([c for _, _, c in losers], np.float32),
    }


# ------------------------------------------------------------------------------------------- pass 3


def make_level1(hist, losers: dict, opts: BalanceOptions) -> sel.Level:
    """Level-1 bins from the scan's counts, less the duplicate copies that were rejected."""
    keys, counts = hist
    cand = losers["confidence"] >= np.float32(opts.min_confidence)
    if cand.any():
        lost = sel.level1_keys(sel.order_keys(losers["labels"][cand], losers["confidence"][cand]))
        keys, counts = sel.sum_counts(np.concatenate([keys, lost]),
                                      np.concatenate([counts, -np.ones(len(lost), np.int64)]))
        keys, counts = keys[counts > 0], counts[counts > 0]
    return sel.level1(keys, counts, opts.per_class, opts.unit_rows)


class RefineFn(beam.DoFn):
    """Counts the rows of refined bins one level finer (level 2: exact confidence; 3: id hash prefix)."""

    def __init__(self, ctx: RunContext, depth: int):
        self.ctx = ctx
        self.depth = depth

    def process(self, unit: WorkUnit, parent: sel.Level, losers: dict):
        refined = parent.refined_keys
        if not len(refined):
            return
        for _, s, hashes in _candidates(self.ctx, unit, losers, f"refine-{self.depth + 1}"):
            probe = sel.level1_keys(s) if self.depth == 1 else s
            inside = np.isin(probe, refined)
            if not inside.any():
                continue
            keys = s[inside] if self.depth == 1 else sel.level3_keys(refined, s[inside], hashes[inside])
            yield sel.sum_counts(keys)


# ------------------------------------------------------------------------------------------- pass 4


class RouteFn(_TrimmingDoFn):
    """Sends the sort keys of rows that can be kept to their sort unit."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def process(self, unit: WorkUnit, plan: sel.Plan, repeated: np.ndarray, losers: dict):
        sender = self.ctx.sender(f"route-{unit.index:06d}")
        # The unit's candidates at once (20 bytes a row): one batch per sort unit, whatever the batch size.
        parts = list(_candidates(self.ctx, unit, losers, "route"))
        if parts:
            rows, s, hashes = (np.concatenate([p[i] for p in parts]) for i in range(3))
            group = sel.assign_groups(plan, s, hashes)
            kept = np.flatnonzero(group >= 0)
            group, s, hashes, rows = group[kept], s[kept], hashes[kept], rows[kept]
            inv = (s & np.uint64(0xFFFFFFFF)).astype(np.uint32)
            sort_unit = plan.group_unit[group]
            # Ids are needed only to order rows whose hashes collide (the repeated set holds all such hashes):
            # then the unit's ids are read, and the row's index in `kept_ids` goes along (-1 for the others).
            collide = np.isin(hashes, repeated) if len(repeated) else np.zeros(len(kept), bool)
            tie_index = np.where(collide, np.arange(len(kept)), -1)
            if collide.any():
                unit_ids = pa.concat_arrays([b.column("id") for _, b in iter_batches(
                    unit, ["id"], self.ctx.options.batch_rows)])
                kept_ids = unit_ids.take(pa.array(rows))
            for u, (r, g, c, h, t) in split_by(sort_unit, rows, group, inv, hashes, tie_index):
                if (t >= 0).any():
                    tie_ids = pc.if_else(pa.array(t >= 0), kept_ids.take(pa.array(np.maximum(t, 0))), "")
                else:
                    tie_ids = pa.nulls(len(t), pa.string())
                sender.send(int(u), pa.record_batch(
                    {"row": r, "key": plan.unit_keys(u, g, c), "hash": h, "tie_id": tie_ids}))
        for u, part in sender.finish():
            yield u, (unit.index, part)


class RankFn(_TrimmingDoFn):
    """Sorts one unit, gives ranks, keeps the first per_class of each class; emits ranks per work unit."""

    MIN_CONF = "min_conf"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def process(self, unit_and_parts, plan: sel.Plan):
        unit, parts = unit_and_parts
        parts = list(parts)
        batches = spill.receive(part for _, part in parts)
        pos = np.concatenate([np.zeros(0, np.int64)] + [
            (np.int64(wu) << np.int64(32)) + b.column("row").to_numpy().astype(np.int64)
            for (wu, _), b in zip(parts, batches)])
        keys = spill.column(batches, "key", np.uint32)
        hashes = spill.column(batches, "hash", np.uint64)
        tie_ids = pa.concat_arrays([b.column("tie_id") for b in batches]) if batches else None
        tie_ids = None if tie_ids is None or tie_ids.null_count == len(tie_ids) else tie_ids.fill_null("")
        order, group, rank = sel.rank_unit(plan, unit, keys, hashes, tie_ids)
        keep = rank < plan.per_class
        order, group, rank = order[keep], group[keep], rank[keep]
        pos = pos[order]
        labels = plan.group_label[group]
        last = np.flatnonzero(rank == plan.selected_for(labels) - 1)
        _, inv = plan.from_unit_keys(unit, keys[order[last]])
        for label, c in zip(labels[last], sel.conf_from_inv(inv)):
            yield beam.pvalue.TaggedOutput(self.MIN_CONF, (int(label), float(c)))
        # Per work unit, one uint64 per row: row index << 32 | rank (sorting it sorts by row).
        packed = ((pos & 0xFFFFFFFF).astype(np.uint64) << np.uint64(32)) | rank.astype(np.uint64)
        sender = self.ctx.sender(f"rank-{unit:06d}")
        for wu, (rows,) in split_by(pos >> np.int64(32), packed):
            sender.send(int(wu), pa.record_batch({"packed": rows}))
        yield from sender.finish()


# ------------------------------------------------------------------------------------------- pass 5


class WriteFn(_TrimmingDoFn):
    """Writes one work unit's selected rows (+ rank, copies) and rejected rows (+ reason) to temp files, each
    only when it has rows."""

    COUNTS = "counts"

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.selected = Metrics.counter(NAMESPACE, "selected_rows")
        self.copies = Metrics.counter(NAMESPACE, "total_copies")
        self.rejected = {r: Metrics.counter(NAMESPACE, f"rejected_{r}") for r in sel.REASONS}

    def process(self, keyed, plan: sel.Plan, losers: dict):
        _, joined = keyed
        unit = joined["unit"][0]
        packed = np.sort(spill.column(spill.receive(joined["ranks"]), "packed", np.uint64))
        rows = (packed >> np.uint64(32)).astype(np.int64)
        rank = (packed & np.uint64(0xFFFFFFFF)).astype(np.int32)

        opts = self.ctx.options
        schema = self.ctx.schema.with_metadata(_output_metadata(self.ctx))
        sel_schema = contract.selection_schema(schema)
        err_schema = contract.row_error_schema(schema)
        sel_path = self.ctx.output.tmp(contract.SELECTION.data_name(unit.index))
        err_path = self.ctx.output.tmp(contract.SELECTION.errors_name(unit.index))
        counts = {"input_rows": 0, "below_min_confidence": 0, "candidates": 0, "selected_rows": 0,
                  "total_copies": 0, "rejected": {}}
        writers = _LazyWriters()
        for start, batch, kb in _key_batches(self.ctx, unit, losers, "write", columns=schema.names):
            n = batch.num_rows
            counts["input_rows"] += n
            valid = kb.reason == 0
            cand = sel.is_candidate(kb, opts.min_confidence)
            counts["candidates"] += int(cand.sum())
            counts["below_min_confidence"] += int((valid & ~cand).sum())
            lo, hi = np.searchsorted(rows, [start, start + n])
            if hi > lo:
                take = rows[lo:hi] - start
                copies = sel.copies_for(rank[lo:hi], plan.selected_for(kb.labels[take]), plan.per_class,
                                        plan.upsample)
                out = pa.RecordBatch.from_arrays(
                    list(batch.take(pa.array(take)).columns) + [pa.array(rank[lo:hi]), pa.array(copies)],
                    schema=sel_schema)
                writers.write(sel_path, sel_schema, out)
                counts["selected_rows"] += int(hi - lo)
                counts["total_copies"] += int(copies.sum())
            bad = np.flatnonzero(~valid)
            if len(bad):
                reasons = np.array(sel.REASONS, dtype=object)[kb.reason[bad] - 1]
                for r, c in zip(*np.unique(reasons, return_counts=True)):
                    counts["rejected"][r] = counts["rejected"].get(r, 0) + int(c)
                    self.rejected[r].inc(int(c))
                out = pa.RecordBatch.from_arrays(
                    list(batch.take(pa.array(bad)).columns) + [pa.array(reasons, pa.string())],
                    schema=err_schema)
                writers.write(err_path, err_schema, out)
        yield from writers.close()
        self.selected.inc(counts["selected_rows"])
        self.copies.inc(counts["total_copies"])
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)


class _LazyWriters:
    """Parquet files opened at their first batch: a unit that keeps or rejects nothing writes no file."""

    def __init__(self):
        self.open: dict[str, tuple[Any, pq.ParquetWriter]] = {}

    def write(self, path: str, schema: pa.Schema, batch: pa.RecordBatch) -> None:
        if path not in self.open:
            sink = fs.create(path)
            self.open[path] = (sink, parquet_writer(sink, schema))
        self.open[path][1].write_batch(batch)

    def close(self) -> list[str]:
        """The paths written, closed."""
        for sink, writer in self.open.values():
            writer.close()
            sink.close()
        return sorted(self.open)


def parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    """Dictionary encoding only for string columns other than `id` (paths repeat; ids and numbers do not):
    encoding every column costs 3x the write time for nothing."""
    strings = [f.name for f in schema if f.name != "id" and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
    return pq.ParquetWriter(sink, schema, use_dictionary=strings)


def _output_metadata(ctx: RunContext) -> dict:
    """The input's metadata (the teacher in brief: reading.TableInputs) and the rule's options."""
    return dict(ctx.schema.metadata or {}) | contract.encode_metadata({contract.RULE: ctx.options.rule()})


# ------------------------------------------------------------------------------------------- pass 6


def build_stats(ctx: RunContext, plan: sel.Plan, counts: dict, min_conf: list[tuple[int, float]],
                files: list[str]) -> dict:
    opts = ctx.options
    rejected = {r: counts["rejected"][r] for r in sel.REASONS if counts.get("rejected", {}).get(r)}
    expected = int(plan.class_selected.sum())
    if counts.get("selected_rows", 0) != expected or counts.get("candidates", 0) != int(
            plan.class_candidates.sum()):
        raise RuntimeError(
            f"internal check failed: wrote {counts.get('selected_rows', 0)} rows, planned {expected}; "
            "did the input change during the run?")
    mins = dict(min_conf)
    per_class_copies = sel.copies_total(plan.class_selected, opts.per_class, opts.upsample)
    classes = {
        str(int(label)): {"candidates": int(c), "selected": int(s), "copies": int(k),
                          "min_confidence_selected": mins.get(int(label))}
        for label, c, s, k in zip(plan.class_labels, plan.class_candidates, plan.class_selected, per_class_copies)
    }
    return {
        "input_rows": counts.get("input_rows", 0),
        "rejected_rows": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "below_min_confidence": counts.get("below_min_confidence", 0),
        "candidates": counts.get("candidates", 0),
        "not_kept": counts.get("candidates", 0) - expected,
        "selected_rows": counts.get("selected_rows", 0),
        "total_copies": counts.get("total_copies", 0),
        "options": dataclasses.asdict(opts) | {"inputs": list(opts.inputs)},
        "input_files": sorted({fs.absolute(path) for path in files}),  # valid from any working directory
        "teacher": ctx.teacher,  # as the input records it (class names): once, here
        "classes": classes,
    }


def finalize(ctx: RunContext, written: list[str], plan: sel.Plan, counts: dict, min_conf: list,
             files: list[str]) -> str:
    """Moves files from the temp dir into the output, numbered from 0 in unit order (the units that wrote no file
    leave no gap), then writes stats.json: the output is complete."""
    data = sorted(p for p in written if fs.name(p).startswith(contract.SELECTION.data_prefix + "-"))
    errors = sorted(set(written) - set(data))
    moves = [(path, contract.SELECTION.data_name(i)) for i, path in enumerate(data)]
    moves += [(path, contract.SELECTION.errors_name(i)) for i, path in enumerate(errors)]
    return ctx.output.publish(moves, build_stats(ctx, plan, counts, min_conf, files))


# ------------------------------------------------------------------------------------------- pipeline


class Balance(beam.PTransform):
    """Work units in; the path of the written stats.json out (one element, once everything is in place)."""

    def __init__(self, ctx: RunContext):
        super().__init__()
        self.ctx = ctx

    def expand(self, units):
        ctx = dataclasses.replace(self.ctx, teacher=None)  # the workers' copy: the teacher is finalize's alone
        opts = ctx.options
        as_single = beam.pvalue.AsSingleton
        rows = (units
                | "UnitRows" >> beam.Map(lambda u: u.num_rows)
                | "SumRows" >> beam.CombineGlobally(sum))
        scanned = units | "Scan" >> beam.ParDo(ScanFn(ctx), as_single(rows)).with_outputs(ScanFn.HASHES,
                                                                                           main="hist")
        repeated = (
            scanned[ScanFn.HASHES]
            | "GroupHashBuckets" >> beam.GroupByKey()
            | "FindRepeatedHashes" >> beam.FlatMap(repeated_hashes)
            | "CollectRepeated" >> beam.combiners.ToList()
            | "UnionRepeated" >> beam.Map(_union))
        losers = (
            units
            | "ReadDuplicateRows" >> beam.ParDo(DuplicateRowsFn(ctx), as_single(repeated))
            | "GroupDuplicates" >> beam.GroupByKey()
            | "PickLosers" >> beam.FlatMap(losing_copies)
            | "CollectLosers" >> beam.combiners.ToList()
            | "IndexLosers" >> beam.Map(collect_losers))
        level1 = (scanned["hist"]
                  | "SumLevel1" >> beam.CombineGlobally(SparseCountsFn())
                  | "PlaceLevel1" >> beam.Map(make_level1, as_single(losers), opts))
        level2 = (units
                  | "CountLevel2" >> beam.ParDo(RefineFn(ctx, 1), as_single(level1), as_single(losers))
                  | "SumLevel2" >> beam.CombineGlobally(SparseCountsFn())
                  | "PlaceLevel2" >> beam.Map(
                      lambda h, parent: sel.level2(parent, h[0], h[1], opts.per_class, opts.unit_rows),
                      as_single(level1)))
        level3 = (units
                  | "CountLevel3" >> beam.ParDo(RefineFn(ctx, 2), as_single(level2), as_single(losers))
                  | "SumLevel3" >> beam.CombineGlobally(SparseCountsFn())
                  | "PlaceLevel3" >> beam.Map(
                      lambda h, parent: sel.level3(parent, h[0], h[1], opts.per_class), as_single(level2)))
        plan = level3 | "Plan" >> beam.Map(
            lambda l3, l1, l2: sel.finish_plan([l1, l2, l3], opts.per_class, opts.unit_rows, opts.upsample),
            as_single(level1), as_single(level2))
        ranked = (
            units
            | "Route" >> beam.ParDo(RouteFn(ctx), as_single(plan), as_single(repeated), as_single(losers))
            | "GroupSortUnits" >> beam.GroupByKey()
            | "Rank" >> beam.ParDo(RankFn(ctx), as_single(plan)).with_outputs(RankFn.MIN_CONF, main="ranks"))
        written = (
            {"unit": units | "KeyUnits" >> beam.Map(lambda u: (u.index, u)), "ranks": ranked["ranks"]}
            | "JoinRanks" >> beam.CoGroupByKey()
            | "Write" >> beam.ParDo(WriteFn(ctx), as_single(plan), as_single(losers)).with_outputs(
                WriteFn.COUNTS, main="files"))
        counts = written[WriteFn.COUNTS] | "SumCounts" >> beam.CombineGlobally(SumCounts())
        files = (units
                 | "UnitFiles" >> beam.FlatMap(lambda u: u.paths)
                 | "DistinctFiles" >> beam.Distinct()
                 | "CollectInputFiles" >> beam.combiners.ToList())
        return after_all(units.pipeline, finalize, self.ctx, beam.pvalue.AsList(written["files"]), as_single(plan),
                         as_single(counts), beam.pvalue.AsList(ranked[RankFn.MIN_CONF]), as_single(files))


def prepare(opts: BalanceOptions, echo=print, local_runner: bool = True) -> RunContext | None:
    """Everything checked before the run: options, inputs and their schema, the output's state.
    None when the output is already complete for these inputs and options."""
    opts.validate()
    inputs, _, identity, teacher = resolve_inputs(opts.inputs, contract.LABELS, "labeled", *INPUT_CHECKS)
    fingerprint = fs.fingerprint(identity, opts.rule())
    output = StageOutput(opts.output, "balance", contract.SELECTION.marker,
                         (contract.SELECTION.data_pattern, contract.SELECTION.errors_pattern), fingerprint)
    state = output.begin(opts.overwrite)
    if state == COMPLETE:
        return None
    if state == RESUME:  # the passes keep no finished work: an interrupted run starts over
        echo(f"balance: restarting the interrupted run in {opts.output}")
        output.begin(overwrite=True)
    return RunContext(options=opts, inputs=inputs, schema=inputs.schema, output=output,
                      run_id=uuid.uuid4().hex[:12], spill=spill.use_files(opts.shuffle, local_runner, opts.output),
                      total_rows=inputs.estimated_rows, teacher=teacher)


def run_balance(opts: BalanceOptions, beam_args: list[str] | None = None, echo=print) -> tuple[dict | None, bool]:
    """Runs the pipeline; returns (stats, whether this run wrote them: False when already complete); stats are
    None when the run only launched the job (a dry run, a template, --no_wait_until_finish)."""
    from ns_data.runner import is_local, run_stage

    ctx = prepare(opts, echo, is_local(beam_args))
    if ctx is None:
        echo(already_complete(opts.output))
    else:
        workers = None if ctx.total_rows >= MIN_ROWS_FOR_WORKERS else 1
        if not run_stage("Balance", ctx.read_units(), Balance(ctx), beam_args, local_workers=workers, compact=True):
            return None, True
    return fs.read_json(fs.join(opts.output, contract.SELECTION.marker)), ctx is not None
