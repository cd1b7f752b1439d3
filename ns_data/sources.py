"""Where unlabeled images come from: image files, TFRecords of tf.Example, webdataset tars, Parquet bytes columns.

One class per input format holds both halves of it: how `label` iterates a work unit of it, and how `shard`
reads an image back from its `source` and `offset`. Every image gets:

| format   | id (below the id root)                      | offset                          |
|----------|---------------------------------------------|---------------------------------|
| files    | the file's path                             | null                            |
| tfrecord | the container's path + '#' + record number  | byte offset of the record       |
| tar      | the container's path + '/' + member name    | byte offset of the member's data|
| parquet  | the `id` column if present, else the container's path + '#' + row | row index     |

The id root is the input's root (the directory given, the fixed part of a glob, a file's directory) when
there is one input or all share one root; with several roots, it is their longest common parent, so
`label a/ b/` names `a/x.jpg` and `b/x.jpg` apart. The same file named twice (`label a/ a/`) is read once;
its second appearance is reported as a `duplicate_input` error. `source` is the absolute URI of the file or
container. A container that cannot be read, or a damaged record, becomes an error record, never a stopped run.
"""
from __future__ import annotations

import hashlib
import math
import os
import tarfile
from dataclasses import dataclass, replace
from typing import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from ns_data import fs, tfrecord
from ns_data.images import IMAGE_EXTENSIONS
from ns_data.stage import InputError

UNREADABLE = "unreadable_file"
CORRUPT_RECORD = "corrupt_record"
MISSING_SOURCE = "missing_source"
DUPLICATE_INPUT = "duplicate_input"
MIN_FILES_PER_UNIT = 128  # four teacher batches at the default --batch-size
MAX_FILES_PER_UNIT = 1024
LAUNCH_CHECK_FILES = 1000  # files the launcher lists per input to check it holds images
ReadBack = Iterator[tuple[bytes | None, str | None, str]]  # (bytes, None, "") or (None, reason, detail)


@dataclass(frozen=True)
class ReadSettings:
    """How label reads its inputs; recorded in its output (contract.INPUT) so `shard` reads them back alike."""

    format: str = "auto"  # auto (by extension) or one of FORMATS for every input file
    image_column: str | None = None  # Parquet inputs: the image-bytes column (resolved before the run)
    id_column: str = "id"  # Parquet inputs: the id column, used when present

    def as_metadata(self) -> dict:
        return {"format": self.format, "image_column": self.image_column, "id_column": self.id_column}

    @classmethod
    def from_metadata(cls, meta: dict | None) -> "ReadSettings":
        return cls(**{k: v for k, v in (meta or {}).items() if k in ("format", "image_column", "id_column")})


@dataclass(frozen=True)
class ImageUnit:
    """A work unit of `label`: some image files, or one container (one row group of a Parquet file).

    `key` says which files of the listing it holds (the same for a killed run and its rerun); `name`, a digest
    of it, names its files and marker."""

    key: str
    kind: str
    paths: tuple[str, ...]  # absolute URIs
    id_root: str
    row_group: int | None = None
    limit: int | None = None  # read at most this many images (--max-images)
    repeated: bool = False  # named by an earlier input too: every image is a duplicate_input error
    nbytes: int = 0  # bytes of the listing this unit accounts for (a Parquet file's on its first row group)

    @property
    def name(self) -> str:
        return hashlib.blake2b(self.key.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    id: str
    source: str
    offset: int | None
    data: bytes | None = None  # None when `error` is set
    error: str | None = None  # a reason; `detail` says more
    detail: str = ""
    content: tuple[int, int] | None = None  # contract.content_fingerprint(data), kept when `data` is let go


def _failed(offsets, reason: str, detail: str) -> ReadBack:
    for _ in offsets:
        yield None, reason, detail


class ImageFormat:
    """An input format: its work units, how a unit is iterated, how images are read back by offset."""

    kind = ""

    def count(self, unit: ImageUnit, settings: ReadSettings) -> int:
        return sum(1 for _ in self.iterate(unit, settings, with_data=False))

    def iterate(self, unit: ImageUnit, settings: ReadSettings, with_data: bool = True) -> Iterator[ImageRecord]:
        raise NotImplementedError

    def read_back(self, source: str, offsets: list, settings: ReadSettings) -> ReadBack:
        raise NotImplementedError


class Files(ImageFormat):
    kind = "files"

    def count(self, unit, settings):
        return len(unit.paths)

    def iterate(self, unit, settings, with_data=True):
        for path in unit.paths:
            rid = fs.relative_to(path, unit.id_root)
            try:
                data = fs.read_bytes(path) if with_data else None
            except Exception as err:  # noqa: BLE001 - an unreadable file is data, not a crash
                yield ImageRecord(rid, path, None, error=UNREADABLE, detail=str(err))
                continue
            yield ImageRecord(rid, path, None, data)

    def read_back(self, source, offsets, settings):
        data = fs.read_bytes(source)
        for _ in offsets:
            yield data, None, ""


class TFRecord(ImageFormat):
    kind = "tfrecord"

    def iterate(self, unit, settings, with_data=True):
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        index = 0
        try:
            with fs.open_read(path) as f:
                for offset, record in tfrecord.read_records(f):
                    rid = f"{name}#{index}"
                    index += 1
                    if not with_data:
                        yield ImageRecord(rid, path, offset)
                        continue
                    data, reason, detail = self._image(record, offset)
                    yield ImageRecord(rid, path, offset, data, reason, detail)
        except tfrecord.CorruptRecord as err:
            yield ImageRecord(f"{name}#{index}", path, None, error=CORRUPT_RECORD, detail=str(err))
        except Exception as err:  # noqa: BLE001
            yield ImageRecord(f"{name}#{index}", path, None, error=UNREADABLE, detail=str(err))

    @staticmethod
    def _image(record: bytes, offset: int) -> tuple[bytes | None, str | None, str]:
        try:
            encoded = tfrecord.parse_example(record).get("image/encoded")
        except Exception as err:  # noqa: BLE001
            return None, CORRUPT_RECORD, f"not a tf.Example at byte {offset}: {err}"
        if not encoded:
            return None, CORRUPT_RECORD, f"no image/encoded in the record at byte {offset}"
        return encoded[0], None, ""

    def read_back(self, source, offsets, settings):
        with fs.open_read(source) as f:
            for offset in offsets:
                try:
                    yield self._image(tfrecord.read_record_at(f, offset), offset)
                except (tfrecord.CorruptRecord, ValueError, OSError) as err:
                    yield None, CORRUPT_RECORD, f"at byte {offset}: {type(err).__name__}: {err}"


class Tar(ImageFormat):
    """webdataset / img2dataset tars: KEY.jpg beside KEY.json and KEY.txt; only image members are images."""

    kind = "tar"

    def iterate(self, unit, settings, with_data=True):
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        try:
            with fs.open_read(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or os.path.splitext(member.name)[1].lower() not in IMAGE_EXTENSIONS:
                        continue
                    data = tar.extractfile(member).read() if with_data else None
                    yield ImageRecord(f"{name}/{member.name}", path, member.offset_data, data)
        except Exception as err:  # noqa: BLE001 - a damaged tar ends here, with what was read so far kept
            yield ImageRecord(f"{name}/", path, None, error=UNREADABLE, detail=f"{type(err).__name__}: {err}")

    def read_back(self, source, offsets, settings):
        with fs.open_read(source) as f:
            for offset in offsets:
                try:
                    f.seek(offset - tarfile.BLOCKSIZE)  # a member's header block sits right before its data
                    info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
                    data = f.read(info.size)
                    if len(data) < info.size:
                        yield None, CORRUPT_RECORD, f"tar member at byte {offset} is truncated"
                    else:
                        yield data, None, ""
                except (tarfile.TarError, ValueError, OSError) as err:
                    yield None, CORRUPT_RECORD, f"at byte {offset}: {type(err).__name__}: {err}"


class Parquet(ImageFormat):
    kind = "parquet"

    def count(self, unit, settings):
        if unit.row_group is None:
            return super().count(unit, settings)
        return _open(unit.paths[0]).metadata.row_group(unit.row_group).num_rows

    def iterate(self, unit, settings, with_data=True):
        """A row group's images; a file whose footer, image column or row group cannot be read is one error
        record (`row_group` None: the planning found it unreadable)."""
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        try:
            pf = _open(path)
            column = settings.image_column or image_column(pf.schema_arrow, path)
            if column not in pf.schema_arrow.names:
                raise InputError(f"{path}: no column '{column}' (has: {', '.join(pf.schema_arrow.names)})")
            if unit.row_group is None:
                raise InputError(f"{path}: cannot read its row groups")
            ids = settings.id_column if settings.id_column in pf.schema_arrow.names else None
            first = sum(pf.metadata.row_group(g).num_rows for g in range(unit.row_group))
            table = pf.read_row_group(unit.row_group, columns=[column] + ([ids] if ids else []))
        except Exception as err:  # noqa: BLE001 - an unreadable container is an error record, not a crash
            where = "" if unit.row_group is None else f"row-group-{unit.row_group}"
            yield ImageRecord(f"{name}#{where}", path, None, error=UNREADABLE, detail=f"{type(err).__name__}: {err}")
            return
        values = table.column(column).to_pylist()
        keys = table.column(ids).to_pylist() if ids else [None] * len(values)
        for i, (data, key) in enumerate(zip(values, keys)):
            row = first + i
            rid = str(key) if key is not None else f"{name}#{row}"
            if data is None:
                yield ImageRecord(rid, path, row, error=CORRUPT_RECORD, detail=f"null {column}")
            else:
                yield ImageRecord(rid, path, row, data)

    def read_back(self, source, offsets, settings):
        pf = _open(source)
        column = settings.image_column or image_column(pf.schema_arrow, source)
        ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = np.searchsorted(ends, np.asarray(offsets), side="right")
        values: dict[int, bytes | None] = {}
        for g in np.unique(groups):
            if g >= len(ends):
                continue
            first = int(ends[g - 1]) if g else 0
            wanted = [r for r, rg in zip(offsets, groups) if rg == g]
            taken = pf.read_row_group(int(g), columns=[column]).column(column).take([r - first for r in wanted])
            values.update(zip(wanted, taken.to_pylist()))
        for row in offsets:
            data = values.get(row)
            yield (data, None, "") if data is not None else (None, CORRUPT_RECORD, f"no {column} bytes at row {row}")


FORMATS: dict[str, ImageFormat] = {f.kind: f for f in (Files(), TFRecord(), Tar(), Parquet())}
_KIND_ORDER = {kind: n for n, kind in enumerate(FORMATS)}
_EXTENSION_KIND = {".tfrecord": "tfrecord", ".tfrecords": "tfrecord", ".tfr": "tfrecord", ".tar": "tar",
                   ".parquet": "parquet", **{ext: "files" for ext in IMAGE_EXTENSIONS}}


def kind_of(path: str, input_format: str) -> str | None:
    """The format of an input file: the one given for all, else by its extension (None: not an input)."""
    if input_format != "auto":
        return input_format
    return _EXTENSION_KIND.get(os.path.splitext(path)[1].lower())


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path if fs.is_local(path) else fs.open_read(path))
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: cannot read as Parquet: {err}") from err


def image_column(schema: pa.Schema, path: str) -> str:
    """The image-bytes column: one named image/image_bytes/jpg/png/bytes, or the only binary one."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    for name in ("image", "image_bytes", "jpg", "png", "bytes"):
        if name in binary:
            return name
    if len(binary) == 1:
        return binary[0]
    raise InputError(f"{path}: cannot tell which column holds image bytes (binary columns: {binary}); "
                     "pass --image-column")


# ------------------------------------------------------------------------------------------- planning
# The launcher only turns each INPUT into a pattern and checks it cheaply (`plan_inputs`); listing the files,
# reading Parquet footers and forming work units happen inside the pipeline (`PlanUnits`), so neither the launch
# nor the job grows with the corpus.


@dataclass(frozen=True)
class InputPattern:
    """One INPUT as the pipeline lists it: everything below a directory, a glob, or one file."""

    index: int  # position among the inputs: a file named by two inputs belongs to the first
    pattern: str  # absolute


@dataclass(frozen=True)
class Listed:
    """An input file found by the pipeline's listing."""

    path: str
    size: int
    kind: str
    input_index: int
    repeated: bool = False  # named by an earlier input too


def _root(item: str) -> str:
    """The directory an input's ids are relative to: the directory given, a glob's fixed part, a file's folder."""
    item = fs.absolute(item)
    if fs.is_glob(item):
        return item[: min(item.index(c) for c in fs.GLOB_CHARS if c in item)].rsplit("/", 1)[0]
    return fs.split(item)[0] if fs.is_file(item) else item.rstrip("/")


def _pattern(item: str) -> str:
    item = fs.absolute(item)
    return item if fs.is_glob(item) or fs.is_file(item) else fs.join(item.rstrip("/"), "**")


def plan_inputs(inputs, settings: ReadSettings = ReadSettings()
                ) -> tuple[tuple[InputPattern, ...], str, ReadSettings]:
    """The inputs' patterns, their id root, and the settings with the Parquet image column resolved, checked at
    a cost that does not grow with the inputs: each pattern lists at most LAUNCH_CHECK_FILES files, and one
    Parquet footer (the first Parquet file seen) gives or checks the image column.

    An input whose first LAUNCH_CHECK_FILES files hold no image or container is an error here; past that, the
    pipeline's listing decides (an input with only other files then adds no rows). Parquet files that lack the
    column are error rows of the run (`unreadable_file`)."""
    if settings.format not in ("auto",) + tuple(FORMATS):
        raise InputError(f"unknown input format {settings.format!r}; one of auto, {', '.join(FORMATS)}")
    if not inputs:
        raise InputError("give at least one INPUT")
    patterns, roots, parquet = [], set(), None
    for index, item in enumerate(inputs):
        pattern = _pattern(item)
        found = FileSystems.match([pattern], limits=[LAUNCH_CHECK_FILES])[0].metadata_list
        kinds = [(m.path, kind_of(m.path, settings.format)) for m in found]
        kinds = [(p, k) for p, k in kinds if k]
        if not kinds and len(found) < LAUNCH_CHECK_FILES:
            raise InputError(f"no images or image containers found in {item}" + (
                " (pass --input-format for files without a known extension)" if settings.format == "auto" else ""))
        parquet = parquet or next((fs.absolute(p) for p, k in kinds if k == "parquet"), None)
        patterns.append(InputPattern(index, pattern))
        roots.add(_root(item))
    roots = sorted(roots)
    id_root = roots[0] if len(roots) == 1 else fs.common_root(roots)
    if parquet is not None:
        schema = _open(parquet).schema_arrow
        if settings.image_column is not None and settings.image_column not in schema.names:
            raise InputError(f"{parquet}: no column '{settings.image_column}' (has: {', '.join(schema.names)})")
        settings = replace(settings, image_column=settings.image_column or image_column(schema, parquet))
    return tuple(patterns), id_root, settings


def list_input(pattern: InputPattern, input_format: str) -> Iterator[tuple[str, tuple[int, int, str]]]:
    """(path, (input index, size, kind)) of the input files a pattern matches."""
    for m in FileSystems.match([pattern.pattern])[0].metadata_list:
        kind = kind_of(m.path, input_format)
        if kind:
            yield fs.absolute(m.path), (pattern.index, m.size_in_bytes, kind)


def mark_repeats(element) -> Iterator[Listed]:
    """A file found by several inputs: the first input's, then a repeat for each other input."""
    path, found = element
    found = sorted(found)
    for n, (index, nbytes, kind) in enumerate(found):
        yield Listed(path, nbytes, kind, index, repeated=n > 0)


def files_per_unit(total_files: int) -> int:
    """Image files go MIN_FILES_PER_UNIT or more to a unit, about 64 units in all, at most MAX_FILES_PER_UNIT:
    enough units to spread and resume, few enough files out. Not a function of --batch-size."""
    return min(MAX_FILES_PER_UNIT, max(MIN_FILES_PER_UNIT, math.ceil(total_files / 64)))


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def file_bucket(entry: Listed, total_files: int) -> tuple[str, tuple[str, int]]:
    """(unit key, (path, size)) of a loose image file: its bucket is a hash of its path into as many buckets as the
    listing's count of loose files asks, so units do not depend on the order of the listing nor on workers."""
    buckets = max(1, math.ceil(total_files / files_per_unit(total_files)))
    repeated = "/repeated" if entry.repeated else ""
    return f"files/{_digest(entry.path) % buckets:06d}-of-{buckets:06d}{repeated}", (entry.path, entry.size)


def files_unit(element, id_root: str) -> ImageUnit:
    key, files = element
    files = sorted(files)
    return ImageUnit(key, "files", tuple(p for p, _ in files), id_root, repeated=key.endswith("/repeated"),
                     nbytes=sum(n for _, n in files))


def container_units(entry: Listed, id_root: str, settings: ReadSettings) -> list[ImageUnit]:
    """A TFRecord or tar: one unit. A Parquet file: one unit per row group (its footer read here); one unit that
    reads as an error record when the footer or the image column is not there."""
    key = f"{entry.kind}/{entry.path}" + ("/repeated" if entry.repeated else "")
    unit = ImageUnit(key, entry.kind, (entry.path,), id_root, repeated=entry.repeated, nbytes=entry.size)
    if entry.kind != "parquet":
        return [unit]
    try:
        pf = _open(entry.path)
        column = settings.image_column or image_column(pf.schema_arrow, entry.path)
        if column not in pf.schema_arrow.names:
            raise InputError(f"{entry.path}: no column '{column}'")
        groups = pf.num_row_groups
    except Exception:  # noqa: BLE001 - read again by the unit, which makes the reason its error record
        return [unit]
    return [replace(unit, key=f"{key}#{g}", row_group=g, nbytes=entry.size if g == 0 else 0) for g in range(groups)]


def order_key(entry: Listed) -> tuple:
    """The inputs' order for --max-images: input by input, its own files before its repeats, by format, by path."""
    return entry.input_index, entry.repeated, _KIND_ORDER[entry.kind], entry.path


def limited_units(entries: list[Listed], max_images: int, id_root: str, settings: ReadSettings
                  ) -> Iterator[ImageUnit]:
    """--max-images: units holding the first `max_images` images of the inputs in `order_key` order (files are
    one image each; containers are counted through). Among the first `max_images` files listed (the most that
    can be needed unless containers are empty)."""
    entries = sorted(entries, key=order_key)
    group = max(MIN_FILES_PER_UNIT, min(MAX_FILES_PER_UNIT, max_images // 64))
    units: list[ImageUnit] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        if entry.kind == "files":
            run = [entry]
            while (len(run) < group and i + len(run) < len(entries) and entries[i + len(run)].kind == "files"
                   and entries[i + len(run)].repeated == entry.repeated):
                run.append(entries[i + len(run)])
            units.append(ImageUnit("", "files", tuple(e.path for e in run), id_root, repeated=entry.repeated,
                                   nbytes=sum(e.size for e in run)))
            i += len(run)
        else:
            units += container_units(entry, id_root, settings)
            i += 1
    left = max_images
    for n, unit in enumerate(units):
        if left <= 0:
            return
        count = FORMATS[unit.kind].count(unit, settings)
        yield replace(unit, key=f"limited/{n:06d}", limit=min(count, left))
        left -= count


class PlanUnits(beam.PTransform):
    """The run's work units from its input patterns, inside the pipeline: the patterns are listed (a file named
    by two inputs is labeled once and reported once more as `duplicate_input`), loose image files grouped by a
    hash of their path into buckets sized by the listing's count, containers one unit each (a Parquet file one
    per row group). Units are a function of the listing only: the same for a killed run and its rerun."""

    def __init__(self, patterns: tuple[InputPattern, ...], id_root: str, settings: ReadSettings,
                 max_images: int | None = None):
        super().__init__()
        self.patterns, self.id_root, self.settings, self.max_images = patterns, id_root, settings, max_images

    def expand(self, pbegin):
        listed = (pbegin
                  | "Patterns" >> beam.Create(list(self.patterns))
                  | "List" >> beam.FlatMap(list_input, self.settings.format)
                  | "ByPath" >> beam.GroupByKey()
                  | "MarkRepeats" >> beam.FlatMap(mark_repeats))
        return listed | "FormUnits" >> FormUnits(self.id_root, self.settings, self.max_images)


class FormUnits(beam.PTransform):
    """The work units of the listed files (`Listed`), whatever the order they come in."""

    def __init__(self, id_root: str, settings: ReadSettings, max_images: int | None = None):
        super().__init__()
        self.id_root, self.settings, self.max_images = id_root, settings, max_images

    def expand(self, listed):
        if self.max_images is not None:
            return (listed
                    | "FirstListed" >> beam.combiners.Top.Smallest(self.max_images, key=order_key)
                    | "LimitedUnits" >> beam.FlatMap(limited_units, self.max_images, self.id_root, self.settings))
        loose = listed | "LooseFiles" >> beam.Filter(lambda e: e.kind == "files")
        count = loose | "CountFiles" >> beam.combiners.Count.Globally()
        file_units = (loose
                      | "Bucket" >> beam.Map(file_bucket, beam.pvalue.AsSingleton(count))
                      | "GroupBuckets" >> beam.GroupByKey()
                      | "FileUnits" >> beam.Map(files_unit, self.id_root))
        container = (listed
                     | "Containers" >> beam.Filter(lambda e: e.kind != "files")
                     | "ContainerUnits" >> beam.FlatMap(container_units, self.id_root, self.settings))
        return (file_units, container) | "Units" >> beam.Flatten()


def read_unit(unit: ImageUnit, settings: ReadSettings) -> Iterator[ImageRecord]:
    """The unit's images (or error records), at most `unit.limit` of them."""
    fmt = FORMATS[unit.kind]
    records = fmt.iterate(unit, settings, with_data=not unit.repeated)
    for n, record in enumerate(records):
        if unit.limit is not None and n >= unit.limit:
            return
        if unit.repeated and not record.error:
            record = replace(record, error=DUPLICATE_INPUT, detail="named by an earlier input too; labeled once")
        yield record


# ------------------------------------------------------------------------------------------- reading back


def read_back(source: str, offsets: list[int | None], image_column: str | None = None,
              input_format: str = "auto") -> ReadBack:
    """(bytes, None, "") or (None, reason, detail) for each image of `source` at `offsets` (as `label` wrote
    them; ascending), opening the source once and reading forward through it."""
    settings = ReadSettings(format=input_format, image_column=image_column)
    kind = "files" if offsets and offsets[0] is None else kind_of(source, input_format)
    if kind not in FORMATS:
        return _failed(offsets, UNREADABLE, f"{source}: not a file of a known input format")
    return _guarded(source, offsets, FORMATS[kind].read_back, settings)


def _guarded(source: str, offsets: list, read, settings: ReadSettings) -> ReadBack:
    done = 0
    try:
        if not fs.exists(source):
            yield from _failed(offsets, MISSING_SOURCE, f"{source} does not exist")
            return
        for result in read(source, offsets, settings):
            done += 1
            yield result
    except Exception as err:  # noqa: BLE001 - an unreadable source is data: its images become error rows
        yield from _failed(offsets[done:], UNREADABLE, f"{type(err).__name__}: {err}")
