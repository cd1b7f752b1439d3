"""`label`: run the un-noised teacher over unlabeled images and write the pseudo-label table `balance` reads.

    work units -> read images -> decode + teacher's eval transform -> RunInference (keyed by image) -> rows
                       |                  |
                       +------------------+--> errors (id, source, offset, reason, detail)

One model per worker process (RunInference loads it once, in setup). Output, complete or absent:
`labels-NNNNN.parquet` (DESIGN.md's pseudo-label table, the teacher's identity in the schema metadata),
`errors-NNNNN.parquet` where images failed, and `stats.json` last.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from ns_data.images import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from ns_data.outputs import SumDictsFn, prepare_output, publish, read_stats
from ns_data.progress import Progress
from ns_data.sources import ImageRecord, ImageUnit, check_parquet_columns, plan_units, read_unit

NAMESPACE = "ns_data.label"
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("offset", pa.int64()),
                          ("reason", pa.string()), ("detail", pa.string())])


class LabelOptionsError(ValueError):
    """An option out of its range: reported before any work starts."""


@dataclass(frozen=True)
class LabelOptions:
    """What `ns-data label` takes; validated once by `validate()`."""

    inputs: tuple[str, ...]
    output: str
    teacher: str
    checkpoint: str | None = None
    random_weights: bool = False
    num_classes: int | None = None
    input_format: str = "auto"
    image_column: str | None = None
    id_column: str = "id"
    max_images: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = True
    topk: int = 10
    probs: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    input_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    decode_threads: int = 2
    rows_per_file: int = 100_000
    overwrite: bool = False
    progress: bool = False

    def validate(self) -> "LabelOptions":
        if not self.inputs:
            raise LabelOptionsError("give at least one INPUT")
        for name in ("batch_size", "topk", "max_pixels", "rows_per_file", "decode_threads"):
            if getattr(self, name) < 1:
                raise LabelOptionsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_images is not None and self.max_images < 1:
            raise LabelOptionsError("--max-images must be at least 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise LabelOptionsError(f"--precision must be fp32, bf16 or fp16, got {self.precision}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise LabelOptionsError("--crop-pct must be in (0, 1]")
        for name in ("mean", "std"):
            if getattr(self, name) is not None and len(getattr(self, name)) != 3:
                raise LabelOptionsError(f"--{name} takes three numbers (R, G, B)")
        return self

    def teacher_spec(self):
        from ns_data.teacher import TeacherSpec, exported_teacher

        model, checkpoint, num_classes, overrides = self.teacher, self.checkpoint, self.num_classes, {}
        exported = exported_teacher(self.teacher)
        if exported:  # a student exported by `ns-train export`: model name and preprocessing travel with it
            model, checkpoint = exported["model"], self.teacher
            num_classes = num_classes or exported["num_classes"]
            overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in exported["preprocessing"].items()}
        overrides |= {k: getattr(self, k) for k in ("input_size", "crop_pct", "interpolation", "mean", "std")
                      if getattr(self, k) is not None}
        return TeacherSpec(model=model, checkpoint=checkpoint, random_weights=self.random_weights,
                           num_classes=num_classes, device=self.device, precision=self.precision,
                           channels_last=self.channels_last, preprocessing=tuple(sorted(overrides.items())))


@dataclass(frozen=True)
class LabelContext:
    options: LabelOptions
    units: tuple[ImageUnit, ...]
    teacher: dict[str, Any]  # identity: model, checkpoint digest, preprocessing, precision
    tmp_dir: str
    run_id: str
    started: float

    def progress(self) -> Progress:
        return Progress(self.run_id, "label", _known_total(self.units), self.options.progress, unit="images")

    def schema(self) -> pa.Schema:
        fields = [("id", pa.string()), ("source", pa.string()), ("offset", pa.int64()), ("label", pa.int32()),
                  ("confidence", pa.float32()), ("topk_classes", pa.list_(pa.int32())),
                  ("topk_probs", pa.list_(pa.float32())), ("entropy", pa.float32())]
        if self.options.probs:
            fields.append(("probs", pa.list_(pa.float32())))
        return pa.schema(fields, metadata={b"ns_data.teacher": json.dumps(self.teacher, sort_keys=True).encode()})


# ------------------------------------------------------------------------------------------- steps


def _in_global_window(out):
    """What finish_bundle emits must carry its window (this pipeline has only the global one)."""
    if isinstance(out, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
    return GlobalWindows.windowed_value(out)


class ReadImagesFn(beam.DoFn):
    """A work unit's images as ImageRecords; unreadable files and damaged records to the errors output."""

    ERRORS = "errors"

    def __init__(self, ctx: LabelContext):
        self.ctx = ctx
        self.read = Metrics.counter(NAMESPACE, "images_read")

    def process(self, unit: ImageUnit):
        opts = self.ctx.options
        progress = self.ctx.progress()
        for record in read_unit(unit, opts.image_column, opts.id_column):
            self.read.inc()
            if record.error:
                progress.add(0, errors=1)
                yield beam.pvalue.TaggedOutput(self.ERRORS, record)
            else:
                yield record


class PreprocessFn(beam.DoFn):
    """Decode (any mode to RGB, EXIF orientation, pixel limit), then the teacher's eval transform.

    Images are decoded by a small thread pool a couple of batches ahead of the element being emitted, so that
    decoding overlaps the teacher's forward pass on the same worker (Pillow and torch release the GIL).
    """

    ERRORS = "errors"

    def __init__(self, ctx: LabelContext):
        self.ctx = ctx
        self.transform = None
        self.pool = None
        self.pending = None
        self.errors = Metrics.counter(NAMESPACE, "images_rejected")

    @property
    def ahead(self) -> int:
        return 2 * self.ctx.options.batch_size

    def setup(self):
        from ns_data.teacher import make_transform

        self.transform = make_transform(self.ctx.teacher["preprocessing"])
        self.pool = ThreadPoolExecutor(max_workers=self.ctx.options.decode_threads)

    def teardown(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)

    def start_bundle(self):
        self.pending = collections.deque()

    def _prepare(self, record: ImageRecord):
        try:
            return self.transform(decode_image(record.data, self.ctx.options.max_pixels))
        except DecodeError as err:
            return err

    def _emit(self, record: ImageRecord, result):
        if isinstance(result, DecodeError):
            self.errors.inc()
            self.ctx.progress().add(0, errors=1)
            return beam.pvalue.TaggedOutput(self.ERRORS, dataclasses.replace(
                record, data=None, error=result.reason, detail=str(result)))
        return (record.id, record.source, record.offset), result

    def process(self, record: ImageRecord):
        self.pending.append((record, self.pool.submit(self._prepare, record)))
        while len(self.pending) > self.ahead or (self.pending and self.pending[0][1].done()):
            record, future = self.pending.popleft()
            yield self._emit(record, future.result())

    def finish_bundle(self):
        while self.pending:
            record, future = self.pending.popleft()
            yield _in_global_window(self._emit(record, future.result()))


class ToRowFn(beam.DoFn):
    """(key, prediction) -> an output row; counts labeled images and shows progress."""

    def __init__(self, ctx: LabelContext):
        self.ctx = ctx
        self.labeled = Metrics.counter(NAMESPACE, "images_labeled")

    def process(self, keyed):
        (image_id, source, offset), pred = keyed
        self.labeled.inc()
        self.ctx.progress().add(1)
        yield {"id": image_id, "source": source, "offset": offset, **pred}


class WriteFn(beam.DoFn):
    """Writes rows (labels or errors) to Parquet files in the temp dir, one per `rows_per_file` rows or bundle;
    yields their paths, and counts on the side."""

    COUNTS = "counts"

    def __init__(self, ctx: LabelContext, kind: str):
        self.ctx = ctx
        self.kind = kind
        self.rows = None

    def start_bundle(self):
        self.rows = []

    def process(self, row):
        self.rows.append(row)
        if len(self.rows) >= self.ctx.options.rows_per_file:
            yield from self._flush()

    def finish_bundle(self):
        for out in self._flush():
            yield _in_global_window(out)

    def _flush(self):
        rows, self.rows = self.rows, []
        if not rows:
            return
        if self.kind == "labels":
            table = labels_table(rows, self.ctx.schema())
            counts = {"labeled": table.num_rows}
        else:
            table = pa.Table.from_pylist([{"id": r.id, "source": r.source, "offset": r.offset, "reason": r.error,
                                           "detail": r.detail} for r in rows], schema=ERROR_SCHEMA)
            reasons, n = np.unique(np.array([r.error for r in rows], dtype=object), return_counts=True)
            counts = {f"error:{r}": int(c) for r, c in zip(reasons, n)}
        # Named by content, so that a retried bundle rewrites the same file instead of adding one.
        first = min(r["id"] if isinstance(r, dict) else r.id for r in rows)
        path = FileSystems.join(self.ctx.tmp_dir, f"{self.kind}-{_digest(first)}.parquet")
        with FileSystems.create(path) as f:
            pq.write_table(table, f)
        yield path
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def labels_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows of predictions as an Arrow table of the pseudo-label schema."""
    columns = {}
    for field in schema:
        values = [r[field.name] for r in rows]
        if pa.types.is_list(field.type):  # every row has the same length (k, or the number of classes)
            matrix = np.stack(values)
            k = matrix.shape[1]
            offsets = pa.array(np.arange(0, len(values) * k + 1, k, dtype=np.int32))
            columns[field.name] = pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel(), field.type.value_type))
        else:
            columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=schema)


def finalize(_, ctx: LabelContext, written: list[str], counts: dict) -> str:
    errors = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("error:")}
    labeled = counts.get("labeled", 0)
    seconds = time.time() - ctx.started
    stats = {
        "images_read": labeled + sum(errors.values()),
        "labeled": labeled,
        "errors": sum(errors.values()),
        "errors_by_reason": errors,
        "teacher": ctx.teacher,
        "options": dataclasses.asdict(ctx.options) | {"inputs": list(ctx.options.inputs)},
        "wall_seconds": round(seconds, 3),
        "images_per_second": round((labeled + sum(errors.values())) / max(seconds, 1e-9), 2),
    }
    names = []
    for kind in ("labels", "errors"):
        mine = sorted(p for p in written if FileSystems.split(p)[1].startswith(kind + "-"))
        names += [f"{kind}-{i:05d}.parquet" for i in range(len(mine))]
    ordered = sorted(p for p in written if FileSystems.split(p)[1].startswith("labels-")) + sorted(
        p for p in written if FileSystems.split(p)[1].startswith("errors-"))
    return publish(ctx.options.output, ctx.tmp_dir, ordered, stats, names)


class Label(beam.PTransform):
    """Image work units in; the path of the written stats.json out, once everything is in place."""

    def __init__(self, ctx: LabelContext):
        super().__init__()
        self.ctx = ctx

    def expand(self, units):
        from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

        from ns_data.teacher import TeacherModelHandler

        ctx, opts = self.ctx, self.ctx.options
        handler = KeyedModelHandler(TeacherModelHandler(opts.teacher_spec(), opts.batch_size, opts.topk,
                                                        opts.probs))
        read = units | "ReadImages" >> beam.ParDo(ReadImagesFn(ctx)).with_outputs(ReadImagesFn.ERRORS,
                                                                                  main="images")
        prepared = read["images"] | "Preprocess" >> beam.ParDo(PreprocessFn(ctx)).with_outputs(
            PreprocessFn.ERRORS, main="tensors")
        rows = (prepared["tensors"]
                | "Teacher" >> RunInference(handler)
                | "ToRows" >> beam.ParDo(ToRowFn(ctx)))
        errors = (read[ReadImagesFn.ERRORS], prepared[PreprocessFn.ERRORS]) | "AllErrors" >> beam.Flatten()
        labels_written = rows | "WriteLabels" >> beam.ParDo(WriteFn(ctx, "labels")).with_outputs(
            WriteFn.COUNTS, main="files")
        errors_written = errors | "WriteErrors" >> beam.ParDo(WriteFn(ctx, "errors")).with_outputs(
            WriteFn.COUNTS, main="files")
        files = (labels_written["files"], errors_written["files"]) | "AllFiles" >> beam.Flatten()
        counts = ((labels_written[WriteFn.COUNTS], errors_written[WriteFn.COUNTS]) | "AllCounts" >> beam.Flatten()
                  | "SumCounts" >> beam.CombineGlobally(SumDictsFn()))
        return (units.pipeline
                | "FinalizeTrigger" >> beam.Create([None])
                | "Finalize" >> beam.Map(finalize, ctx, beam.pvalue.AsList(files), beam.pvalue.AsSingleton(counts)))


def _known_total(units) -> int | None:
    """Images to label, when known without reading containers (for progress)."""
    if all(u.limit is not None or u.kind == "files" for u in units):
        return sum(u.limit if u.limit is not None else len(u.paths) for u in units)
    return None


def prepare(opts: LabelOptions) -> LabelContext:
    """Everything checked before any image is read: options, teacher, inputs, output directory."""
    from ns_data.teacher import check_teacher

    opts.validate()
    teacher = check_teacher(opts.teacher_spec())
    units = plan_units(opts.inputs, opts.input_format, opts.max_images)
    check_parquet_columns(units, opts.image_column)
    run_id, tmp_dir = prepare_output(opts.output, "label", ("labels-*.parquet", "errors-*.parquet"),
                                     opts.overwrite)
    return LabelContext(options=opts, units=tuple(units), teacher=teacher, tmp_dir=tmp_dir, run_id=run_id,
                        started=time.time())


def run_label(opts: LabelOptions, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline and returns the stats (read back from stats.json)."""
    from ns_data.runner import run_stage

    ctx = prepare(opts)
    run_stage("Label", ctx.units, Label(ctx), beam_args)
    return read_stats(opts.output)


def format_summary(stats: dict, output: str) -> str:
    lines = [f"label: {stats['images_read']:,} images read = {stats['labeled']:,} labeled + "
             f"{stats['errors']:,} errors, {stats['images_per_second']:,.1f} images/s "
             f"({stats['wall_seconds']:,.1f} s)",
             f"  teacher: {stats['teacher']['model']} ({stats['teacher']['num_classes']} classes, "
             f"{stats['teacher']['precision']})"]
    if stats["errors"]:
        lines.append("  errors: " + ", ".join(f"{r} {n:,}" for r, n in stats["errors_by_reason"].items()))
    lines.append(f"output: {output} (stats.json, labels-*.parquet" + (", errors-*.parquet)" if stats["errors"]
                                                                        else ")"))
    return "\n".join(lines)
