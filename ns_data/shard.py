"""`shard`: the selection, with its copies, as globally shuffled TFRecord training shards.

    selection row groups -> rows keyed by source -> read each source once, in offset order -> one record
    per copy, keyed id#copy -> (shard, order key, tf.Example) -> group by shard -> sort -> write, rename

Placement: the records of a source group (one container, or a hash bucket of standalone files) are put in
the order of a seeded hash of `id#copy`; record i of the group gets the global index `start + i`, where
`start` counts the records of the groups before it, and goes to shard `index mod N`. So shards differ in size
by at most one record, each is a uniform sample of the whole selection, and the copies of one image fall on
independent, hash-chosen shards. Within a shard records are sorted by a second hash. Image bytes cross one
shuffle (the group by shard); a writer holds one shard in memory, so `--max-shard-bytes` bounds its memory.

Output, complete or absent: shards `train-NNNNN-of-NNNNN.tfrecord` (the original Noisy Student code reads
`train*`), `errors-00000.parquet` when some images could not be read, and `manifest.json` last. While a run is
in progress `.tmp-shard/` holds its plan and one small JSON per finished shard; a shard is renamed into place
as soon as it is written, so a re-run over an interrupted output writes only the shards that are missing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from ns_data import tfrecord
from ns_data.hashing import hash_ids
from ns_data.memory import release_freed_memory
from ns_data.outputs import OutputExists, SumDictsFn
from ns_data.progress import Progress
from ns_data.reading import InputError, WorkUnit, expand_inputs, inspect_inputs, open_parquet
from ns_data.soft_labels import dense_probabilities
from ns_data.sources import read_back

NAMESPACE = "ns_data.shard"
MANIFEST = "manifest.json"
TMP_DIR = ".tmp-shard"
PLAN = "plan.json"
FORMAT = "ns-data shards v1"
REQUIRED = ("id", "label", "confidence")
OTHER_REQUIRED = ("source", "offset", "copies")
FILES_PER_GROUP = 1024  # standalone image files read by one task
ORDER_SALT = 0x5EED_0DE5  # seeds the within-shard order apart from the placement hash
SAMPLE_ROWS = 64
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("offset", pa.int64()),
                          ("reason", pa.string()), ("detail", pa.string())])
LABEL_OUT_OF_RANGE = "label_out_of_range"
SHUFFLES = ("auto", "beam", "files")


class ShardOptionsError(ValueError):
    """An option out of its range: reported before any work starts."""


def parse_size(text: str | int) -> int:
    """Bytes from '256MB', '1GiB', '500k' or a plain number."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise ShardOptionsError(f"cannot read {text!r} as a size (e.g. 256MB, 1GiB)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(prefix or " "))


@dataclass(frozen=True)
class ShardOptions:
    """What `ns-data shard` takes; validated once by `validate()`. At most one of the three sizes is given;
    with none, shards are sized to about 256 MiB."""

    inputs: tuple[str, ...]
    output: str
    num_shards: int | None = None
    records_per_shard: int | None = None
    max_shard_bytes: int | None = None
    num_classes: int | None = None
    probabilities: bool = True
    seed: int = 0
    image_column: str | None = None
    shuffle: str = "auto"
    overwrite: bool = False
    progress: bool = False

    def validate(self) -> "ShardOptions":
        if not self.inputs:
            raise ShardOptionsError("give at least one SELECTION input")
        sizes = [n for n in ("num_shards", "records_per_shard", "max_shard_bytes") if getattr(self, n) is not None]
        if len(sizes) > 1:
            raise ShardOptionsError("give only one of --num-shards, --records-per-shard, --max-shard-bytes")
        if self.shuffle not in SHUFFLES:
            raise ShardOptionsError(f"--shuffle must be one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")
        for name in sizes + (["num_classes"] if self.num_classes is not None else []):
            if getattr(self, name) < 1:
                raise ShardOptionsError(f"--{name.replace('_', '-')} must be at least 1")
        return self

    def placement(self, num_shards: int, num_classes: int | None) -> dict[str, Any]:
        """Everything that decides the shards' bytes: equal placements give byte-identical shards."""
        return {"num_shards": num_shards, "num_classes": num_classes, "probabilities": self.probabilities,
                "seed": self.seed, "image_column": self.image_column}


@dataclass(frozen=True)
class ShardContext:
    options: ShardOptions
    units: tuple[WorkUnit, ...]
    columns: tuple[str, ...]  # selection columns read
    num_shards: int
    num_classes: int | None
    file_groups: int
    total_rows: int
    total_records: int
    fingerprint: str
    files: tuple[str, ...]
    done: frozenset[int]  # shards already in place from an interrupted run with the same plan
    spill: bool  # records go through spill files in the temp dir; only references cross the Beam shuffle
    teacher: dict | None  # the teacher's identity as `label` recorded it in the selection
    run_id: str
    started: float

    @property
    def tmp_dir(self) -> str:
        return FileSystems.join(self.options.output, TMP_DIR)

    def shard_name(self, shard: int) -> str:
        return shard_name(shard, self.num_shards)

    def progress(self) -> Progress:
        return Progress(self.run_id, "shard", self.total_rows, self.options.progress, unit="images")

    @property
    def spill_dir(self) -> str:
        return FileSystems.join(self.tmp_dir, "spill")


def shard_name(shard: int, num_shards: int) -> str:
    return f"train-{shard:05d}-of-{num_shards:05d}.tfrecord"


# ------------------------------------------------------------------------------------------- records


def group_keys(table: pa.Table, file_groups: int) -> pa.Array:
    """Which read task a selected row belongs to: its container, or a hash bucket of standalone files."""
    source = table.column("source").combine_chunks()
    buckets = hash_ids(source, seed=0) % np.uint64(file_groups)
    files = pc.binary_join_element_wise("files/", pa.array(buckets.astype(np.int64)).cast(pa.string()), "")
    return pc.if_else(table.column("offset").combine_chunks().is_null(), files,
                      pc.binary_join_element_wise("container/", source, ""))


def place_records(table: pa.Table, start: int, num_shards: int, seed: int) -> dict[str, np.ndarray]:
    """Every copy of every row of one group: its row, copy number, shard and within-shard order key.

    Rows must be sorted by id (the order the placement is defined in, whatever order the input had)."""
    copies = table.column("copies").to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(copies)), copies)
    copy = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
    keys = pc.binary_join_element_wise(table.column("id").combine_chunks().take(pa.array(rows)),
                                       pa.array(copy).cast(pa.string()), "#")
    position = np.empty(len(rows), dtype=np.int64)
    position[np.argsort(hash_ids(keys, seed), kind="stable")] = np.arange(len(rows))
    index = start + position
    return {"row": rows, "copy": copy, "index": index, "shard": index % num_shards,
            "order": hash_ids(keys, seed ^ ORDER_SALT)}


def example_features(row: dict[str, Any], num_classes: int | None, probabilities: bool) -> dict[str, Any]:
    """A row's tf.Example features but the image and the copy number, which are added per record: the
    original Noisy Student names plus id and the sparse label."""
    features: dict[str, Any] = {"label": int(row["label"]), "prob": float(row["confidence"]), "id": row["id"]}
    if row.get("topk_classes") is not None:
        features["topk_classes"] = [int(c) for c in row["topk_classes"]]
        features["topk_probs"] = [float(p) for p in row["topk_probs"]]
    if probabilities:
        if row.get("probs") is not None:
            features["probabilities"] = [float(p) for p in row["probs"]]
        else:
            classes = features.get("topk_classes", [features["label"]])
            probs = features.get("topk_probs", [features["prob"]])
            features["probabilities"] = dense_probabilities(classes, probs, num_classes).tolist()
    return features


# ------------------------------------------------------------------------------------------- steps


class ReadSelectionFn(beam.DoFn):
    """One selection row group in; its rows out, split by read group, and the records each group will make."""

    RECORDS = "records"

    def __init__(self, ctx: ShardContext):
        self.ctx = ctx

    def process(self, unit: WorkUnit):
        table = open_parquet(unit.path).read_row_group(unit.row_group, columns=list(self.ctx.columns))
        keys = group_keys(table, self.ctx.file_groups).dictionary_encode()
        codes = keys.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        copies = table.column("copies").to_numpy()
        for part in np.split(order, bounds) if len(order) else []:
            key = keys.dictionary[int(codes[part[0]])].as_py()
            yield key, table.take(pa.array(part))
            yield beam.pvalue.TaggedOutput(self.RECORDS, (key, int(copies[part].sum())))


def group_starts(counts: list[tuple[str, int]]) -> dict[str, int]:
    """Global index of each group's first record: groups in key order, records counted before them."""
    starts, total = {}, 0
    for key, n in sorted(counts):
        starts[key] = total
        total += n
    return starts


class FetchFn(beam.DoFn):
    """One read group in: reads each source once, in offset order; out come (shard, record) pairs, error rows
    and counts."""

    ERRORS = "errors"
    COUNTS = "counts"

    def __init__(self, ctx: ShardContext):
        self.ctx = ctx
        self.images = Metrics.counter(NAMESPACE, "images_read")
        self.records = Metrics.counter(NAMESPACE, "records_out")
        self.bytes = Metrics.counter(NAMESPACE, "image_bytes_read")
        self.failed = Metrics.counter(NAMESPACE, "images_failed")

    def setup(self):
        self._progress = self.ctx.progress()

    def _spill_file(self):
        """A spill file of its own for this task (local runs): records are appended, references emitted."""
        os.makedirs(self.ctx.spill_dir, exist_ok=True)
        return open(os.path.join(self.ctx.spill_dir, f"{uuid.uuid4().hex}.bin"), "wb")

    def process(self, group, starts: dict[str, int]):
        key, parts = group
        ctx, opts = self.ctx, self.ctx.options
        table = pa.concat_tables(parts)
        table = table.take(pc.sort_indices(table, [("id", "ascending")]))
        placed = place_records(table, starts[key], ctx.num_shards, opts.seed)
        first_record = np.searchsorted(placed["row"], np.arange(table.num_rows))
        rows = table.to_pylist()
        counts: dict[str, int] = {}
        spill = self._spill_file() if ctx.spill else None
        read_order = sorted(range(len(rows)), key=lambda i: (rows[i]["source"], rows[i]["offset"] or 0))
        for source, members in _runs(read_order, rows):
            results = read_back(source, [rows[i]["offset"] for i in members], opts.image_column)
            for i, (data, reason, detail) in zip(members, results):
                row = rows[i]
                if data is not None and ctx.num_classes is not None and not 0 <= row["label"] < ctx.num_classes:
                    data, reason, detail = None, LABEL_OUT_OF_RANGE, f"label {row['label']} >= {ctx.num_classes}"
                if data is None:
                    self.failed.inc()
                    counts[f"error:{reason}"] = counts.get(f"error:{reason}", 0) + 1
                    counts["records_lost"] = counts.get("records_lost", 0) + row["copies"]
                    yield beam.pvalue.TaggedOutput(self.ERRORS, {
                        "id": row["id"], "source": row["source"], "offset": row["offset"],
                        "reason": reason, "detail": detail})
                    continue
                self.images.inc()
                self.bytes.inc(len(data))
                counts["images"] = counts.get("images", 0) + 1
                shared = tfrecord.serialized_features(example_features(row, ctx.num_classes, opts.probabilities))
                for r in range(first_record[i], first_record[i] + row["copies"]):
                    shard = int(placed["shard"][r])
                    if shard in ctx.done:
                        continue
                    copy = int(placed["copy"][r])
                    parts = tfrecord.example_record_parts(shared + _copy_feature(copy), "image/encoded", data)
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
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)
        release_freed_memory()


@functools.lru_cache(maxsize=1024)
def _copy_feature(copy: int) -> bytes:
    return tfrecord.serialized_features({"copy": copy})


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


def write_shard(ctx: ShardContext, shard: int, records: list[tuple]) -> dict[str, Any]:
    """Writes one shard in order-key order under a temporary name, notes its counts, renames it into place.

    A record is (order key, global index, label, framed bytes or (spill file, offset, length))."""
    records.sort(key=lambda r: (r[0], r[1]))
    name = ctx.shard_name(shard)
    tmp_path = FileSystems.join(ctx.tmp_dir, name)
    size, classes = 0, {}
    for record in records:
        classes[str(record[2])] = classes.get(str(record[2]), 0) + 1
    if ctx.spill:
        size = _copy_spilled(tmp_path, [r[3] for r in records])
    else:
        with FileSystems.create(tmp_path) as f:
            for *_, framed in records:
                f.write(framed)
                size += len(framed)
    info = {"name": name, "records": len(records), "bytes": size, "classes": classes}
    with FileSystems.create(FileSystems.join(ctx.tmp_dir, f"{name}.json")) as f:
        f.write(json.dumps(info).encode())
    FileSystems.rename([tmp_path], [FileSystems.join(ctx.options.output, name)])
    return info


def _copy_spilled(path: str, pieces: list[tuple[str, int, int]]) -> int:
    """Concatenates byte ranges of spill files into a new local file, in the kernel where it can
    (copy_file_range: the bytes never pass through Python)."""
    kernel_copy = hasattr(os, "copy_file_range")  # Linux; elsewhere through a buffer
    sources: dict[str, int] = {}
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size = 0
    try:
        for source, offset, length in pieces:
            if source not in sources:
                sources[source] = os.open(source, os.O_RDONLY)
            done = 0
            while done < length:
                if kernel_copy:
                    n = os.copy_file_range(sources[source], out, length - done, offset + done)
                else:
                    n = os.write(out, os.pread(sources[source], length - done, offset + done))
                if n <= 0:
                    raise OSError(f"{source}: spill file ends before byte {offset + length}")
                done += n
            size += length
    finally:
        os.close(out)
        for fd in sources.values():
            os.close(fd)
    return size


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


# ------------------------------------------------------------------------------------------- finish


def _read_json(path: str) -> dict:
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def _write_json(path: str, tmp_path: str, value: dict) -> None:
    with FileSystems.create(tmp_path) as f:
        f.write(json.dumps(value, indent=1, sort_keys=True).encode())
    FileSystems.rename([tmp_path], [path])


def finalize(_, ctx: ShardContext, _written: list[dict], counts: dict, errors: list[dict]) -> str:
    """Writes empty shards for any shard no record reached, the errors table, then manifest.json.

    `_written` (this run's shard infos) only makes this step wait for every writer: the infos are read back from
    the sidecars, which also hold the shards an interrupted run finished."""
    opts, out = ctx.options, ctx.options.output
    infos = []
    for shard in range(ctx.num_shards):
        sidecar = FileSystems.join(ctx.tmp_dir, f"{ctx.shard_name(shard)}.json")
        if not FileSystems.exists(sidecar):
            write_shard(ctx, shard, [])
        infos.append(_read_json(sidecar))
    if errors:
        errors = sorted(errors, key=lambda e: e["id"])
        tmp_errors = FileSystems.join(ctx.tmp_dir, "errors-00000.parquet")
        with FileSystems.create(tmp_errors) as f:
            pq.write_table(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), f)
        FileSystems.rename([tmp_errors], [FileSystems.join(out, "errors-00000.parquet")])
    classes: dict[str, int] = {}
    for info in infos:
        for label, n in info.pop("classes").items():  # per-shard histograms stay out: shards x classes
            classes[label] = classes.get(label, 0) + n
    by_reason = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("error:")}
    seconds = time.time() - ctx.started
    total_bytes = sum(i["bytes"] for i in infos)
    manifest = {
        "format": FORMAT,
        "shards": infos,
        "num_shards": ctx.num_shards,
        "records": sum(i["records"] for i in infos),
        "bytes": total_bytes,
        "unique_images": counts.get("images", 0),
        "classes": dict(sorted(classes.items(), key=lambda kv: int(kv[0]))),
        "errors": sum(by_reason.values()),
        "errors_by_reason": by_reason,
        "records_lost_to_errors": counts.get("records_lost", 0),
        "features": feature_description(ctx.num_classes, opts.probabilities),
        "num_classes": ctx.num_classes,
        "teacher": ctx.teacher,
        "placement": opts.placement(ctx.num_shards, ctx.num_classes),
        "options": dataclasses.asdict(opts) | {"inputs": list(opts.inputs)},
        "input": {"files": list(ctx.files), "rows": ctx.total_rows, "records": ctx.total_records,
                  "fingerprint": ctx.fingerprint},
        "resumed_shards": len(ctx.done),
        "wall_seconds": round(seconds, 3),
        "megabytes_per_second": round(total_bytes / 1e6 / max(seconds, 1e-9), 2),
    }
    path = FileSystems.join(out, MANIFEST)
    _write_json(path, FileSystems.join(ctx.tmp_dir, MANIFEST), manifest)
    FileSystems.delete([ctx.tmp_dir])
    return path


def feature_description(num_classes: int | None, probabilities: bool) -> dict[str, str]:
    features = {
        "image/encoded": "bytes: the image file's bytes, as read from its source (not re-encoded)",
        "label": "int64: the teacher's class",
        "prob": "float: the teacher's confidence in `label`",
        "id": "bytes: the image id; the record key is id#copy",
        "copy": "int64: which copy of the image this record is (0 .. copies-1)",
        "topk_classes": "int64 list: the teacher's top-k classes, most probable first",
        "topk_probs": "float list: their probabilities",
    }
    if probabilities:
        features["probabilities"] = (f"float[{num_classes}]: the dense soft label (the teacher's full vector "
                                     "when the selection has `probs`, else the top-k with the remaining mass "
                                     "spread evenly)")
    return features


class Shard(beam.PTransform):
    """Selection work units in; the path of manifest.json out, once every shard is in place."""

    def __init__(self, ctx: ShardContext):
        super().__init__()
        self.ctx = ctx

    def expand(self, units):
        ctx = self.ctx
        selected = units | "ReadSelection" >> beam.ParDo(ReadSelectionFn(ctx)).with_outputs(
            ReadSelectionFn.RECORDS, main="rows")
        starts = (selected[ReadSelectionFn.RECORDS]
                  | "SumRecordsPerGroup" >> beam.CombinePerKey(sum)
                  | "CollectGroups" >> beam.combiners.ToList()
                  | "GroupStarts" >> beam.Map(group_starts))
        fetched = (selected["rows"]
                   | "GroupBySource" >> beam.GroupByKey()
                   | "Fetch" >> beam.ParDo(FetchFn(ctx), beam.pvalue.AsSingleton(starts)).with_outputs(
                       FetchFn.ERRORS, FetchFn.COUNTS, main="records"))
        written = (fetched["records"]
                   | "GroupByShard" >> beam.GroupByKey()
                   | "WriteShards" >> beam.ParDo(WriteShardFn(ctx)))
        counts = fetched[FetchFn.COUNTS] | "SumCounts" >> beam.CombineGlobally(SumDictsFn())
        return (units.pipeline
                | "FinalizeTrigger" >> beam.Create([None])
                | "Finalize" >> beam.Map(finalize, ctx, beam.pvalue.AsList(written), beam.pvalue.AsSingleton(counts),
                                         beam.pvalue.AsList(fetched[FetchFn.ERRORS])))


# ------------------------------------------------------------------------------------------- planning


def selection_files(inputs: tuple[str, ...]) -> list[str]:
    """Parquet files of the selection: a balance output directory gives its selection-*.parquet only."""
    files: set[str] = set()
    for item in inputs:
        if "://" in item or not item.endswith(".parquet"):
            found = FileSystems.match([FileSystems.join(item, "selection-*.parquet")])[0].metadata_list
            if found:
                files.update(m.path for m in found)
                continue
        files.update(expand_inputs([item]))
    return sorted(files)


def fingerprint(files: list[str]) -> str:
    """Digest of the inputs' names, sizes and Parquet footers (row counts, column statistics): it changes
    when the selection does, and costs one footer read per file."""
    digest = hashlib.sha256()
    for path in files:
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        meta = open_parquet(path).metadata.to_dict()
        digest.update(json.dumps([FileSystems.split(path)[1], size, meta], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _balance_stats(inputs: tuple[str, ...]) -> dict | None:
    if len(inputs) != 1 or inputs[0].endswith(".parquet"):
        return None
    path = FileSystems.join(inputs[0], "stats.json")
    return _read_json(path) if FileSystems.exists(path) else None


def _num_classes(opts: ShardOptions, schema: pa.Schema, stats: dict | None) -> int | None:
    if opts.num_classes is not None:
        return opts.num_classes
    meta = schema.metadata or {}
    if b"ns_data.teacher" in meta:
        return json.loads(meta[b"ns_data.teacher"]).get("num_classes")
    if b"ns_data.balance" in meta:
        return json.loads(meta[b"ns_data.balance"]).get("num_classes")
    return (stats or {}).get("options", {}).get("num_classes")


def _total_records(units: list[WorkUnit], stats: dict | None) -> int:
    rows = sum(u.num_rows for u in units)
    if stats and stats.get("selected_rows") == rows and "total_copies" in stats:
        return int(stats["total_copies"])
    return sum(int(pc.sum(open_parquet(u.path).read_row_group(u.row_group, columns=["copies"])
                          .column("copies")).as_py() or 0) for u in units)


def sample_rows(units: list[WorkUnit], columns: list[str], n: int = SAMPLE_ROWS) -> list[dict]:
    """About n rows spread evenly over the selection's row groups."""
    picked = [units[i] for i in np.linspace(0, len(units) - 1, min(len(units), 16)).astype(int)] if units else []
    per_unit = max(1, n // max(1, len(picked)))
    rows = []
    for unit in dict.fromkeys(picked):
        table = open_parquet(unit.path).read_row_group(unit.row_group, columns=columns)
        idx = np.unique(np.linspace(0, table.num_rows - 1, min(per_unit, table.num_rows)).astype(int))
        rows += table.take(pa.array(idx)).to_pylist() if table.num_rows else []
    return rows


def check_sample(rows: list[dict], image_column: str | None) -> float:
    """Reads the sampled images; their mean size in bytes. Fails early when none of them can be read (wrong
    paths, a selection made on another machine), rather than writing shards of nothing but errors."""
    sizes, failures = [], []
    for row in rows:
        data, reason, detail = next(read_back(row["source"], [row["offset"]], image_column))
        (sizes.append(len(data)) if data is not None else failures.append(f"{row['source']}: {reason} ({detail})"))
    if rows and not sizes:
        raise InputError(f"none of {len(rows)} sampled selected images could be read; first: {failures[0]}")
    return float(np.mean(sizes)) if sizes else 0.0


def resolve_num_shards(opts: ShardOptions, total_records: int, record_bytes: float) -> int:
    if opts.num_shards is not None:
        n = opts.num_shards
    elif opts.records_per_shard is not None:
        n = math.ceil(total_records / opts.records_per_shard)
    else:
        limit = opts.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        n = math.ceil(total_records * record_bytes * 1.1 / limit)  # 10% room: image sizes vary
    if opts.num_shards is not None and n > total_records:
        raise ShardOptionsError(f"--num-shards {n} is more than the {total_records:,} records to write")
    return max(1, min(n, total_records))


def _output_state(opts: ShardOptions, placement: dict, print_fn) -> tuple[str, frozenset[int]]:
    """'complete', 'resume' (with the shards already in place) or 'new'; clears the output when allowed."""
    out = opts.output
    manifest_path = FileSystems.join(out, MANIFEST)
    plan_path = FileSystems.join(out, TMP_DIR, PLAN)
    if FileSystems.exists(manifest_path):
        manifest = _read_json(manifest_path)
        same = manifest.get("placement") == placement["placement"] and (
            manifest.get("input", {}).get("fingerprint") == placement["fingerprint"])
        if same and not opts.overwrite:
            return "complete", frozenset()
        if not opts.overwrite:
            raise OutputExists(f"{out} holds shards of other inputs or options; pass --overwrite to replace them")
    elif FileSystems.exists(plan_path) and not opts.overwrite:
        if _read_json(plan_path) != placement:
            raise OutputExists(f"{out} holds an unfinished run with other inputs or options; "
                               "pass --overwrite to replace it")
        done = []
        num_shards = placement["placement"]["num_shards"]
        for shard in range(num_shards):
            name = shard_name(shard, num_shards)
            if (FileSystems.exists(FileSystems.join(out, TMP_DIR, f"{name}.json"))
                    and FileSystems.exists(FileSystems.join(out, name))):
                done.append(shard)
        print_fn(f"shard: finishing an interrupted run in {out}: {len(done)} of {num_shards} shards already written")
        return "resume", frozenset(done)
    old = [m.path for pattern in ("train-*.tfrecord", "errors-*.parquet", MANIFEST, f"{TMP_DIR}/*")
           for m in FileSystems.match([FileSystems.join(out, pattern)])[0].metadata_list]
    if old and not opts.overwrite:
        raise OutputExists(f"{out} already holds shard files; pass --overwrite to replace them")
    if old:
        FileSystems.delete([p for p in old if p.endswith(MANIFEST)])  # first: no longer marked complete
        FileSystems.delete([p for p in old if not p.endswith(MANIFEST)])
    return "new", frozenset()


def prepare(opts: ShardOptions, print_fn=print, local_runner: bool = True) -> ShardContext | None:
    """Everything checked before any image is read; None when the output is already complete."""
    opts.validate()
    files = selection_files(opts.inputs)
    schema, units = inspect_inputs(files, REQUIRED)
    for name in OTHER_REQUIRED:
        if name not in schema.names:
            raise InputError(f"{files[0]}: missing column '{name}': is this a selection from `ns-data balance`?")
    optional = [c for c in ("topk_classes", "topk_probs", "probs") if c in schema.names]
    columns = REQUIRED + OTHER_REQUIRED + tuple(optional)
    stats = _balance_stats(opts.inputs)
    num_classes = _num_classes(opts, schema, stats)
    if opts.probabilities and num_classes is None and "probs" not in schema.names:
        raise ShardOptionsError("the number of classes is not recorded in the selection: pass --num-classes "
                                "(or --no-probabilities)")
    total_rows = sum(u.num_rows for u in units)
    total_records = _total_records(units, stats)
    if total_records == 0:
        raise InputError("the selection has no rows: nothing to shard")
    record_bytes = check_sample(sample_rows(units, list(columns)), opts.image_column)
    record_bytes += 4 * (num_classes or 0) * opts.probabilities + 200
    num_shards = resolve_num_shards(opts, total_records, record_bytes)
    placement = {"placement": opts.placement(num_shards, num_classes), "fingerprint": fingerprint(files)}
    state, done = _output_state(opts, placement, print_fn)
    if state == "complete":
        return None
    tmp_dir = FileSystems.join(opts.output, TMP_DIR)
    spill = opts.shuffle == "files" or (opts.shuffle == "auto" and local_runner)
    if spill and "://" in opts.output:
        raise ShardOptionsError("--shuffle files needs a local --output (spill files are read back at random)")
    spill_dir = FileSystems.join(tmp_dir, "spill")
    if FileSystems.exists(spill_dir):  # an interrupted run's spill files: never read again
        FileSystems.delete([spill_dir])
    if state == "new":
        if not FileSystems.exists(tmp_dir):
            FileSystems.mkdirs(tmp_dir)
        _write_json(FileSystems.join(tmp_dir, PLAN), FileSystems.join(tmp_dir, PLAN + ".tmp"), placement)
    teacher = (schema.metadata or {}).get(b"ns_data.teacher")
    return ShardContext(options=opts, units=tuple(units), columns=columns, num_shards=num_shards,
                        num_classes=num_classes, file_groups=max(1, total_rows // FILES_PER_GROUP),
                        total_rows=total_rows, total_records=total_records, fingerprint=placement["fingerprint"],
                        files=tuple(files), done=done, spill=spill, teacher=json.loads(teacher) if teacher else None,
                        run_id=uuid.uuid4().hex[:12], started=time.time())


def run_shard(opts: ShardOptions, beam_args: list[str] | None = None, print_fn=print) -> tuple[dict, bool]:
    """Runs the pipeline; returns (the manifest, whether this run wrote it) - False when already complete."""
    from ns_data.runner import is_local, run_stage

    ctx = prepare(opts, print_fn, local_runner=is_local(beam_args))
    if ctx is not None:
        run_stage("Shard", ctx.units, Shard(ctx), beam_args)
    return _read_json(FileSystems.join(opts.output, MANIFEST)), ctx is not None


# ------------------------------------------------------------------------------------------- reporting


def read_manifest(directory: str) -> dict:
    path = FileSystems.join(directory, MANIFEST)
    if not FileSystems.exists(path):
        hint = " (an interrupted run: re-run `ns-data shard` to finish it)" if FileSystems.exists(
            FileSystems.join(directory, TMP_DIR)) else ""
        raise FileNotFoundError(f"{directory} is not a complete shard set: no {MANIFEST}{hint}")
    return _read_json(path)


def format_summary(manifest: dict, output: str) -> str:
    records = np.array([s["records"] for s in manifest["shards"]])
    classes = np.array(list(manifest["classes"].values()) or [0])
    lines = [
        f"shard: {manifest['records']:,} records of {manifest['unique_images']:,} images in "
        f"{manifest['num_shards']:,} shards, {manifest['bytes'] / 1e6:,.1f} MB"
        + (f", {manifest['megabytes_per_second']:,.1f} MB/s ({manifest['wall_seconds']:,.1f} s)"
           if manifest.get("wall_seconds") else ""),
        f"  records per shard: min {records.min():,}  max {records.max():,}",
        f"  classes: {len(manifest['classes']):,}, records per class: min {classes.min():,}  "
        f"max {classes.max():,}",
    ]
    if manifest["errors"]:
        lines.append(f"  errors: {manifest['errors']:,} images ({manifest['records_lost_to_errors']:,} records) "
                     "could not be read: " + ", ".join(f"{r} {n:,}" for r, n in manifest["errors_by_reason"].items()))
    if manifest.get("resumed_shards"):
        lines.append(f"  {manifest['resumed_shards']:,} shards were kept from an interrupted run")
    lines.append(f"output: {output} ({MANIFEST}, train-*.tfrecord" + (", errors-00000.parquet)" if manifest["errors"]
                                                                      else ")"))
    return "\n".join(lines)


def inspect_records(directory: str, manifest: dict, count: int) -> Iterator[str]:
    """A few records of the first non-empty shard, decoded: what a trainer will see."""
    import io

    from PIL import Image

    shard = next((s["name"] for s in manifest["shards"] if s["records"]), None)
    if shard is None or count == 0:
        return
    yield f"first {count} records of {shard}:"
    with FileSystems.open(FileSystems.join(directory, shard)) as f:
        for n, (_, data) in enumerate(tfrecord.read_records(f)):
            if n >= count:
                break
            features = tfrecord.parse_example(data)
            image = features["image/encoded"][0]
            try:
                with Image.open(io.BytesIO(image)) as img:
                    picture = f"{img.format} {img.width}x{img.height}"
            except Exception as err:  # noqa: BLE001 - shown, not fatal
                picture = f"undecodable ({type(err).__name__})"
            topk = ", ".join(f"{c}:{p:.3f}" for c, p in zip(features.get("topk_classes", [])[:3],
                                                          features.get("topk_probs", [])[:3]))
            yield (f"  {features['id'][0].decode()}#{features['copy'][0]}  label {features['label'][0]}  "
                   f"prob {features['prob'][0]:.3f}  top {topk or '-'}  image {picture}, {len(image):,} bytes")
