"""`label`: run the un-noised teacher over unlabeled images and write the pseudo-label table `balance` reads.

    input patterns -> sources.PlanUnits (listing, Parquet footers, work units: inside the pipeline) -> units
    without a marker -> LabelUnitFn: read, decode ahead in threads, the teacher's eval transform, the teacher
    in batches -> the unit's labels and errors files, then its marker -> once all are done, the units' files
    merged into output files of about TARGET_FILE_BYTES -> finalize (the units' counts combined in the pipeline)

The launcher lists nothing (sources.plan_inputs checks each input with a bounded listing), and the job holds
the patterns and options only, so launching costs the same for a hundred images or a billion.

A unit is the grain of work and of resume: its files and marker are written in the run's temp dir as soon as
the unit is done, named by a digest of the unit's key (`unit-<digest>.labels.parquet`,
`unit-<digest>~<labeled>~<reason>=<n>,....json`: the marker's name carries its counts). Units are a function of
the listing, not of --batch-size nor of the workers, so a killed run started again with the same command (any
--batch-size) labels only the units without a marker, found by listing the temp dir (in groups by the prefix
of the units' names, name_prefixes, so that no worker holds every unit's name). The run's
fingerprint holds the input patterns, not the files they match: the first run records its listing's count of
units and bytes in the temp dir (`outputs.check_listing`), and a resumed run whose listing differs stops with an error
before it labels anything (a changed file of the same size is not seen). The model is built once per worker
process (in `setup`). Output, complete or absent (contract.LABELS): `labels-NNNNN.parquet`,
`errors-NNNNN.parquet` where images failed, `stats.json` last. Each output file holds units in the order of
their digests, a row group each, and is about 64 MB: the units of a name-prefix group fill files of their own,
and the groups' leftovers are packed together (pack_rests), so there is at most one file per 64 MB of the run's
rows and one more, never an empty one. The teacher's identity (with its class names) is
in stats.json, once; every file's footer holds it in brief (contract.footer_teacher: model, class count, the
identity's digest), whatever the number of classes. Each row carries its image's content fingerprint, the
length and CRC32C of the bytes labeled (contract.CONTENT_FIELDS), which `shard` checks against the bytes it
reads back.
"""
from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from ns_data import contract, fs
from ns_data.images import DEFAULT_MAX_PIXELS, DecodeError
from ns_data.outputs import COMPLETE, RESUME, StageOutput, check_listing
from ns_data.progress import Progress
from ns_data.runner import SumCounts, add_counts, after_all
from ns_data.sources import ImageRecord, ImageUnit, PlanUnits, ReadSettings, plan_inputs, read_unit
from ns_data.stage import OptionsError

NAMESPACE = "ns_data.label"


@dataclass(frozen=True)
class LabelOptions:
    """What `ns-data label` takes; validated once by `validate()`."""

    inputs: tuple[str, ...]
    output: str
    teacher: str
    checkpoint: str | None = None
    random_weights: bool = False
    pretrained: bool = False  # timm's weights for the model, from the Hugging Face hub cache
    num_classes: int | None = None
    class_names: str | None = None  # a file naming the classes (display only; recorded in the teacher identity)
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
    overwrite: bool = False
    progress: bool = False
    # Approximate: JPEGs decoded at a reduced scale (DCT scaling) before the resize; changes labels a little,
    # recorded in the teacher's identity (`decode`). See ns_data.preprocess.
    fast_decode: bool = False

    def validate(self) -> "LabelOptions":
        if not self.inputs:
            raise OptionsError("give at least one INPUT")
        for name in ("batch_size", "topk", "max_pixels", "decode_threads"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_images is not None and self.max_images < 1:
            raise OptionsError("--max-images must be at least 1")
        if self.pretrained and self.checkpoint is not None:
            raise OptionsError("--pretrained and --checkpoint both give the teacher's weights: give one")
        if self.pretrained and self.random_weights:
            raise OptionsError("--pretrained and --random-weights both give the teacher's weights: give one")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise OptionsError(f"--precision must be fp32, bf16 or fp16, got {self.precision}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise OptionsError("--crop-pct must be in (0, 1]")
        for name in ("mean", "std"):
            if getattr(self, name) is not None and len(getattr(self, name)) != 3:
                raise OptionsError(f"--{name} takes three numbers (R, G, B)")
        return self

    @property
    def read_settings(self) -> ReadSettings:
        return ReadSettings(self.input_format, self.image_column, self.id_column)

    def decisive(self) -> dict[str, Any]:
        """The options that decide the rows (with the teacher's identity and the inputs): the fingerprint's."""
        # The class names' file is not: its names are in the teacher's identity, which the fingerprint holds.
        skip = {"inputs", "output", "overwrite", "progress", "batch_size", "decode_threads", "device", "class_names"}
        if not self.fast_decode:  # absent when off: the exact path keeps the fingerprints it always had
            skip.add("fast_decode")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def teacher_spec(self):
        from ns_data.teacher import TeacherSpec, exported_teacher

        model, checkpoint, num_classes, overrides = self.teacher, self.checkpoint, self.num_classes, {}
        exported = exported_teacher(self.teacher)
        if exported:  # a student exported by `ns-train export`: model name and preprocessing travel with it
            if self.pretrained:
                raise OptionsError(f"--pretrained takes a timm model name; {self.teacher} holds its own weights")
            model, checkpoint = exported["model"], self.teacher
            num_classes = num_classes or exported["num_classes"]
            overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in exported["preprocessing"].items()}
        overrides |= {k: getattr(self, k) for k in ("input_size", "crop_pct", "interpolation", "mean", "std")
                      if getattr(self, k) is not None}
        return TeacherSpec(model=model, checkpoint=checkpoint, random_weights=self.random_weights,
                           pretrained=self.pretrained, num_classes=num_classes, device=self.device,
                           precision=self.precision, channels_last=self.channels_last, preprocessing=tuple(sorted(overrides.items())))


@dataclass(frozen=True)
class LabelContext:
    """What the workers and the last step share: small whatever the number of inputs (they travel with the
    job): no file or unit of the inputs is in it."""

    options: LabelOptions
    settings: ReadSettings  # with the Parquet image column resolved
    teacher: dict[str, Any]  # identity: model, weights' digest, preprocessing, precision, num_classes, class names
    output: StageOutput
    resumed: bool  # an interrupted run with the same fingerprint is being finished
    run_id: str
    started: float

    def progress(self) -> Progress:
        # The number of images is not known before the pipeline has listed (and read) the inputs: counts only.
        return Progress(self.run_id, "label", None, self.options.progress, unit="images",
                        shared_dir=self.output.tmp_dir)

    def schema(self) -> pa.Schema:
        return contract.pseudo_label_schema(self.options.probs,
                                            {contract.TEACHER: contract.footer_teacher(self.teacher),
                                             contract.INPUT: self.settings.as_metadata()})


TARGET_FILE_BYTES = 64 * 2**20  # units' files are merged into output files of about this size


def unit_marker(name: str, counts: dict) -> str:
    """The marker of a done unit; its name carries the unit's counts, so that one listing finds them all."""
    errors = ",".join(f"{reason}={n}" for reason, n in sorted(counts["errors"].items()))
    return f"unit-{name}~{counts['labeled']}~{errors}.json"


def parse_marker(filename: str) -> tuple[str, dict]:
    """(unit name, {"labeled": n, "errors": {reason: n}}) from a marker's file name."""
    name, labeled, errors = filename[len("unit-"): -len(".json")].split("~")
    pairs = (e.rsplit("=", 1) for e in errors.split(",") if e)
    return name, {"labeled": int(labeled), "errors": {reason: int(n) for reason, n in pairs}}


def unit_marker_pattern(prefix: str = "") -> str:
    return f"unit-{prefix}*~*.json"


def unit_file(name: str, kind: str) -> str:
    return f"unit-{name}.{kind}.parquet"


GROUP_UNITS = 4096  # the units' markers and files are listed and planned in groups of about this many at most


def name_prefixes(units: int) -> list[str]:
    """Prefixes of the units' names (hex digests) that split them into groups of at most about GROUP_UNITS,
    each listed and planned on its own, so that no worker holds every unit's name: [""] (one group) up to
    GROUP_UNITS units, 16 prefixes up to 16 times that, 256 beyond (293K units: groups of about 1,150)."""
    digits = 0
    while units > GROUP_UNITS * 16 ** digits:
        digits += 1
    return [format(i, f"0{digits}x") for i in range(16 ** digits)] if digits else [""]


def finished_units(prefix: str, tmp_dir: str):
    """(unit name, its counts) for every unit with a marker whose name starts with `prefix`: one listing."""
    for path in fs.list_dir(tmp_dir, unit_marker_pattern(prefix)):
        yield parse_marker(fs.name(path))


def _add_pairs(pairs) -> tuple[int, int]:
    units = nbytes = 0
    for u, n in pairs:
        units += u
        nbytes += n
    return units, nbytes


# ------------------------------------------------------------------------------------------- the work


class LabelUnitFn(beam.DoFn):
    """One work unit in: its images labeled, its files and marker written in the temp dir; its counts out.

    Images are decoded and transformed by a small thread pool up to two batches ahead of the teacher, so that
    decoding overlaps the forward pass (Pillow and torch release the GIL)."""

    def __init__(self, ctx: LabelContext):
        self.ctx = ctx
        self.read = Metrics.counter(NAMESPACE, "images_read")
        self.labeled = Metrics.counter(NAMESPACE, "images_labeled")
        self.rejected = Metrics.counter(NAMESPACE, "images_rejected")
        self.units = Metrics.counter(NAMESPACE, "units_done")

    def setup(self):
        from ns_data.preprocess import Preprocessor
        from ns_data.teacher import build_model, check_same_weights

        opts = self.ctx.options
        self.spec = opts.teacher_spec()
        self.model = build_model(self.spec)
        check_same_weights(self.spec, self.ctx.teacher)
        self.preprocess = Preprocessor(self.ctx.teacher["preprocessing"], opts.max_pixels, opts.fast_decode,
                                       self.spec.channels_last, self.spec.device)
        self.pool = ThreadPoolExecutor(max_workers=opts.decode_threads)
        self.progress = self.ctx.progress()

    def teardown(self):
        self.pool.shutdown(wait=False)

    def _prepare(self, record: ImageRecord):
        try:
            return self.preprocess(record.data)
        except DecodeError as err:
            return err

    def process(self, unit: ImageUnit):
        from ns_data.teacher import predict

        opts = self.ctx.options
        labeled: list[ImageRecord] = []
        predictions: list[dict[str, np.ndarray]] = []
        errors: list[ImageRecord] = []
        batch: list[tuple[ImageRecord, Any]] = []
        pending: collections.deque = collections.deque()

        def run_batch():
            images = self.preprocess.batch([t for _, t in batch])
            predictions.append(predict(self.model, images, self.spec, opts.topk, opts.probs))
            labeled.extend(r for r, _ in batch)
            self.progress.add(len(batch))
            batch.clear()

        def take():
            record, future = pending.popleft()
            result = future.result()
            if isinstance(result, DecodeError):
                errors.append(dataclasses.replace(record, data=None, error=result.reason, detail=str(result)))
                self.progress.add(0, errors=1)
                return
            batch.append((dataclasses.replace(record, data=None, content=contract.content_fingerprint(record.data)),
                          result))
            if len(batch) == opts.batch_size:
                run_batch()

        for record in read_unit(unit, self.ctx.settings):
            self.read.inc()
            if record.error:
                errors.append(record)
                self.progress.add(0, errors=1)
                continue
            pending.append((record, self.pool.submit(self._prepare, record)))
            while len(pending) > 2 * opts.batch_size:
                take()
        while pending:
            take()
        if batch:
            run_batch()
        counts = self._write(unit, labeled, predictions, errors)
        self.labeled.inc(counts["labeled"])
        self.rejected.inc(sum(counts["errors"].values()))
        self.units.inc()
        yield counts | {"units": 1}

    def _write(self, unit: ImageUnit, labeled, predictions, errors) -> dict:
        """The unit's files, then its marker (so a marker means the unit is complete)."""
        out = self.ctx.output
        counts = {"labeled": len(labeled), "errors": dict(collections.Counter(r.error for r in errors))}
        if labeled:
            _write_table(out.tmp(unit_file(unit.name, "labels")), labels_table(labeled, predictions, self.ctx.schema()))
        if errors:
            _write_table(out.tmp(unit_file(unit.name, "errors")), errors_table(errors))
        fs.write_json(out.tmp(unit_marker(unit.name, counts)), counts | {"key": unit.key})
        return counts


def _write_table(path: str, table: pa.Table) -> None:
    with fs.create(path) as f:
        pq.write_table(table, f)


def labels_table(records: list[ImageRecord], predictions: list[dict[str, np.ndarray]], schema: pa.Schema
                 ) -> pa.Table:
    """Labeled images and the teacher's batched predictions as a table of the pseudo-label schema."""
    pred = {k: np.concatenate([p[k] for p in predictions]) for k in predictions[0]}
    columns = {"id": pa.array([r.id for r in records], pa.string()),
               "source": pa.array([r.source for r in records], pa.string()),
               "offset": pa.array([r.offset for r in records], pa.int64()),
               "content_bytes": pa.array([r.content[0] for r in records], pa.int64()),
               "content_crc32c": pa.array([r.content[1] for r in records], pa.int64())}
    for field in schema:
        if field.name in columns:
            continue
        values = pred[field.name]
        if pa.types.is_list(field.type):  # every row has the same length (k, or the number of classes)
            k = values.shape[1]
            offsets = pa.array(np.arange(0, len(values) * k + 1, k, dtype=np.int32))
            columns[field.name] = pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), field.type.value_type))
        else:
            columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=schema)


def errors_table(errors: list[ImageRecord]) -> pa.Table:
    return pa.Table.from_pylist([{"id": r.id, "source": r.source, "offset": r.offset, "reason": r.error,
                                  "detail": r.detail} for r in errors], schema=contract.IMAGE_ERROR_SCHEMA)


MARKERS = "markers"  # plan_merges' output of how many unit markers a group holds
REST = "rest"  # plan_merges' output of a group's last files, short of TARGET_FILE_BYTES (pack_rests packs them)
RESTS = "z"  # the prefix of the files pack_rests plans: after every name prefix (hex digits) in name order


def plan_merges(prefix: str, tmp_dir: str, _counts: dict):
    """Once every unit is done, for the units whose names start with `prefix`: (kind, prefix, number, unit
    files) of each output file, the units' files in the order of their names, closed once they reach
    TARGET_FILE_BYTES; as the REST output, (kind, prefix, unit files, bytes) of the files left over, and as the
    MARKERS output, how many markers the group has. Three listings of the temp dir (markers, and each kind's
    files with their sizes)."""
    markers = dict(finished_units(prefix, tmp_dir))
    yield beam.pvalue.TaggedOutput(MARKERS, len(markers))
    for kind in ("labels", "errors"):
        sizes = dict(fs.match(fs.join(tmp_dir, unit_file(prefix + "*", kind))))
        group, nbytes, number = [], 0, 0
        for name in sorted(markers):
            rows = markers[name]["labeled"] if kind == "labels" else sum(markers[name]["errors"].values())
            if not rows:
                continue
            path = fs.join(tmp_dir, unit_file(name, kind))
            group.append(path)
            nbytes += sizes[path]
            if nbytes >= TARGET_FILE_BYTES:
                yield kind, prefix, number, group
                group, nbytes, number = [], 0, number + 1
        if group:
            yield beam.pvalue.TaggedOutput(REST, (kind, prefix, group, nbytes))


def pack_rests(rests: list[tuple[str, str, list[str], int]]):
    """The groups' leftover files packed, in the order of their prefixes, into output files closed once they
    reach TARGET_FILE_BYTES: all groups together write at most one file short of it per kind, never an empty
    one. At most one leftover per group (256 groups at the most), each under TARGET_FILE_BYTES of files."""
    for kind in ("labels", "errors"):
        group, nbytes, number = [], 0, 0
        for _, _, paths, size in sorted(r for r in rests if r[0] == kind):
            group += paths
            nbytes += size
            if nbytes >= TARGET_FILE_BYTES:
                yield kind, RESTS, number, group
                group, nbytes, number = [], 0, number + 1
        if group:
            yield kind, RESTS, number, group


def merged_file(kind: str, prefix: str, number: int) -> str:
    return f"merged-{kind}-{prefix}-{number:06d}.parquet"


def merge_files(plan: tuple[str, str, int, list[str]], tmp_dir: str) -> tuple[str, str, int, str]:
    """One output file from units' files, each unit's table a row group of it (one unit in memory at a time);
    returns (kind, prefix, number, its path)."""
    kind, prefix, number, paths = plan
    path = fs.join(tmp_dir, merged_file(kind, prefix, number))
    with fs.create(path) as f:
        writer = None
        for unit_path in paths:
            with fs.open_read(unit_path) as source:
                table = pq.read_table(source)
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table, row_group_size=max(1, table.num_rows))
        writer.close()
    return kind, prefix, number, path


def finalize(ctx: LabelContext, counts_this_run: dict, counts_before: dict, units: int, markers: int,
             merged: list[tuple[str, str, int, str]]) -> str:
    """Moves the merged files into place under their final names (numbered per kind in the order of the units'
    names), then writes stats.json. The counts are combined in the pipeline: those of the units this run
    labeled, and those of the units an interrupted run finished (from the names of their markers, listed when
    the run began)."""
    if markers != units:
        raise RuntimeError(f"internal check failed: {markers} of {units} units are done")
    out, total = ctx.output, {"labeled": 0, "errors": {}}
    for counts in (counts_this_run, counts_before):
        add_counts(total, {"labeled": counts.get("labeled", 0), "errors": counts.get("errors", {})})
    moves = []
    for kind, name in (("labels", contract.LABELS.data_name), ("errors", contract.LABELS.errors_name)):
        paths = [path for k, _, _, path in sorted(merged) if k == kind]
        moves += [(path, name(number)) for number, path in enumerate(paths)]
    errors = sum(total["errors"].values())
    read_now = counts_this_run.get("labeled", 0) + sum(counts_this_run.get("errors", {}).values())
    seconds = time.time() - ctx.started
    stats = {
        "images_read": total["labeled"] + errors,
        "labeled": total["labeled"],
        "errors": errors,
        "errors_by_reason": dict(sorted(total["errors"].items())),
        "units": units,
        "resumed_units": units - counts_this_run.get("units", 0),
        "images_read_this_run": read_now,
        "teacher": ctx.teacher,
        "input": ctx.settings.as_metadata(),
        "options": dataclasses.asdict(ctx.options) | {"inputs": list(ctx.options.inputs)},
        "wall_seconds": round(seconds, 3),
        "images_per_second": round(read_now / max(seconds, 1e-9), 2),
    }
    return out.publish(moves, stats)


class Label(beam.PTransform):
    """Every work unit of the run in; the path of the written stats.json out, once everything is in place.

    Units with a marker (done by an interrupted run) are skipped; the listing is checked against the one the
    run's first pass recorded before any unit is labeled. The units' markers and files are listed in groups by
    the prefix of their names (name_prefixes), each on its own worker."""

    def __init__(self, ctx: LabelContext):
        super().__init__()
        self.ctx = ctx

    def expand(self, units):
        tmp_dir = self.ctx.output.tmp_dir
        checked = (units
                   | "Sizes" >> beam.Map(lambda u: (1, u.nbytes))
                   | "Listing" >> beam.CombineGlobally(_add_pairs)
                   | "CheckListing" >> beam.Map(check_listing, tmp_dir))
        prefixes = (units.pipeline
                    | "Trigger" >> beam.Create([None])
                    | "NamePrefixes" >> beam.FlatMap(lambda _, units: name_prefixes(units),
                                                     beam.pvalue.AsSingleton(checked))
                    | "SpreadPrefixes" >> beam.Reshuffle())
        finished = prefixes | "ListFinished" >> beam.FlatMap(finished_units, tmp_dir)
        counts_before = (finished
                         | "FinishedCounts" >> beam.Map(lambda named: named[1])
                         | "SumFinished" >> beam.CombineGlobally(SumCounts()))
        pending = ({"unit": units | "ByName" >> beam.Map(lambda u: (u.name, u)),
                    "done": finished | "FinishedNames" >> beam.Map(lambda named: (named[0], None))}
                   | "JoinFinished" >> beam.CoGroupByKey()
                   | "SkipFinished" >> beam.FlatMap(lambda joined: [] if joined[1]["done"] else joined[1]["unit"]))
        counts = (pending
                  | "LabelUnits" >> beam.ParDo(LabelUnitFn(self.ctx))
                  | "SumCounts" >> beam.CombineGlobally(SumCounts()))
        planned = prefixes | "PlanMerges" >> beam.FlatMap(plan_merges, tmp_dir, beam.pvalue.AsSingleton(counts)
                                                           ).with_outputs(MARKERS, REST, main="plans")
        markers = planned[MARKERS] | "SumMarkers" >> beam.CombineGlobally(sum)
        rests = (planned[REST]
                 | "AllRests" >> beam.combiners.ToList()
                 | "PackRests" >> beam.FlatMap(pack_rests))
        merged = ((planned.plans, rests)
                  | "AllMerges" >> beam.Flatten()
                  | "SpreadMerges" >> beam.Reshuffle()
                  | "Merge" >> beam.Map(merge_files, tmp_dir))
        return after_all(units.pipeline, finalize, self.ctx, beam.pvalue.AsSingleton(counts),
                         beam.pvalue.AsSingleton(counts_before), beam.pvalue.AsSingleton(checked),
                         beam.pvalue.AsSingleton(markers), beam.pvalue.AsList(merged))


# ------------------------------------------------------------------------------------------- running


def prepare(opts: LabelOptions) -> tuple[LabelContext, PlanUnits] | None:
    """Everything checked before any image is read: options, teacher, inputs (at a cost that does not grow with
    them), the output's state; returns the run's context and the transform that plans its units inside the
    pipeline. None when the output is already complete for these inputs and options."""
    from ns_data.teacher import check_teacher

    opts.validate()
    teacher = check_teacher(opts.teacher_spec(), opts.class_names)
    if opts.fast_decode:
        from ns_data.preprocess import decode_identity

        teacher["decode"] = decode_identity(teacher["preprocessing"])
    patterns, id_root, settings = plan_inputs(opts.inputs, opts.read_settings)
    fingerprint = fs.fingerprint([], [p.pattern for p in patterns], id_root, opts.decisive(), teacher,
                                 settings.as_metadata())
    output = StageOutput(opts.output, "label", contract.LABELS.marker,
                         (contract.LABELS.data_pattern, contract.LABELS.errors_pattern), fingerprint)
    state = output.begin(opts.overwrite)
    if state == COMPLETE:
        return None
    ctx = LabelContext(options=opts, settings=settings, teacher=teacher, output=output, resumed=state == RESUME,
                       run_id=uuid.uuid4().hex[:12], started=time.time())
    return ctx, PlanUnits(patterns, id_root, settings, opts.max_images)


def run_label(opts: LabelOptions, beam_args: list[str] | None = None, echo=print) -> tuple[dict | None, bool]:
    """Runs the pipeline; returns (stats, whether this run wrote them: False when already complete); stats are
    None when the run only launched the job (a dry run, a template, --no_wait_until_finish)."""
    from ns_data.outputs import already_complete, resuming
    from ns_data.runner import pipeline_options, run_stage

    pipeline_options(beam_args)  # an option the runner refuses is refused before the output is touched
    prepared = prepare(opts)
    if prepared is None:
        echo(already_complete(opts.output))
    else:
        ctx, plan = prepared
        if ctx.resumed:
            echo(resuming(opts.output, "label") + ": units with a marker are kept")
        if not run_stage("Label", plan, Label(ctx), beam_args, local_workers=1):  # torch, decoding: every core
            return None, True
    return fs.read_json(fs.join(opts.output, contract.LABELS.marker)), prepared is not None


def format_summary(stats: dict, output: str) -> str:
    teacher = stats["teacher"]
    lines = [f"label: {stats['images_read']:,} images read = {stats['labeled']:,} labeled + "
             f"{stats['errors']:,} errors, {stats['images_per_second']:,.1f} images/s "
             f"({stats['wall_seconds']:,.1f} s)",
             f"  teacher: {teacher['model']} ({teacher['num_classes']:,} classes"
             + (f", names from {teacher['class_names_from']}" if teacher.get("class_names_from") else "")
             + f", {teacher['precision']})"]
    if teacher.get("decode"):
        lines.append(f"  decode: fast, approximate (--fast-decode: JPEGs decoded at a reduced scale, at least "
                     f"{teacher['decode']['min_side']} px a side)")
    if teacher.get("pretrained"):
        lines.append(f"  weights: {teacher['checkpoint']} (sha256 {teacher['checkpoint_sha256'][:12]})")
    if stats.get("resumed_units"):
        lines.append(f"  resumed: {stats['resumed_units']:,} of {stats['units']:,} units were done by an "
                     f"interrupted run; {stats['images_read_this_run']:,} images read in this one")
    if stats["errors"]:
        lines.append("  errors: " + ", ".join(f"{r} {n:,}" for r, n in stats["errors_by_reason"].items()))
    lines.append(f"output: {output} (stats.json, labels-*.parquet" + (", errors-*.parquet)" if stats["errors"]
                                                                        else ")"))
    return "\n".join(lines)
