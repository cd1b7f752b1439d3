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

import math
import os
import tarfile
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ns_data import fs, tfrecord
from ns_data.images import IMAGE_EXTENSIONS
from ns_data.stage import InputError

UNREADABLE = "unreadable_file"
CORRUPT_RECORD = "corrupt_record"
MISSING_SOURCE = "missing_source"
DUPLICATE_INPUT = "duplicate_input"
MAX_FILES_PER_UNIT = 1024
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
    """A work unit of `label`: some image files, or one container (one row group of a Parquet file)."""

    index: int
    kind: str
    paths: tuple[str, ...]  # absolute URIs
    id_root: str
    row_group: int | None = None
    limit: int | None = None  # read at most this many images (--max-images)
    repeated: bool = False  # named by an earlier input too: every image is a duplicate_input error


@dataclass(frozen=True)
class ImageRecord:
    id: str
    source: str
    offset: int | None
    data: bytes | None = None  # None when `error` is set
    error: str | None = None  # a reason; `detail` says more
    detail: str = ""


def _failed(offsets, reason: str, detail: str) -> ReadBack:
    for _ in offsets:
        yield None, reason, detail


class ImageFormat:
    """An input format: its work units, how a unit is iterated, how images are read back by offset."""

    kind = ""

    def units(self, paths: list[str], id_root: str, files_per_unit: int) -> list[ImageUnit]:
        return [ImageUnit(0, self.kind, (p,), id_root) for p in paths]

    def count(self, unit: ImageUnit, settings: ReadSettings) -> int:
        return sum(1 for _ in self.iterate(unit, settings, with_data=False))

    def iterate(self, unit: ImageUnit, settings: ReadSettings, with_data: bool = True) -> Iterator[ImageRecord]:
        raise NotImplementedError

    def read_back(self, source: str, offsets: list, settings: ReadSettings) -> ReadBack:
        raise NotImplementedError


class Files(ImageFormat):
    kind = "files"

    def units(self, paths, id_root, files_per_unit):
        return [ImageUnit(0, self.kind, tuple(paths[i: i + files_per_unit]), id_root)
                for i in range(0, len(paths), files_per_unit)]

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

    def units(self, paths, id_root, files_per_unit):
        return [ImageUnit(0, self.kind, (p,), id_root, row_group=g)
                for p in paths for g in range(_open(p).num_row_groups)]

    def count(self, unit, settings):
        return _open(unit.paths[0]).metadata.row_group(unit.row_group).num_rows

    def iterate(self, unit, settings, with_data=True):
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        pf = _open(path)
        column = settings.image_column or image_column(pf.schema_arrow, path)
        ids = settings.id_column if settings.id_column in pf.schema_arrow.names else None
        first = sum(pf.metadata.row_group(g).num_rows for g in range(unit.row_group))
        table = pf.read_row_group(unit.row_group, columns=[column] + ([ids] if ids else []))
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


def _root(item: str) -> str:
    """The directory an input's ids are relative to: the directory given, a glob's fixed part, a file's folder."""
    item = fs.absolute(item)
    if fs.is_glob(item):
        return item[: min(item.index(c) for c in fs.GLOB_CHARS if c in item)].rsplit("/", 1)[0]
    return fs.split(item)[0] if fs.is_file(item) else item.rstrip("/")


def plan_units(inputs, settings: ReadSettings = ReadSettings(), max_images: int | None = None,
               min_files_per_unit: int = 16) -> tuple[list[ImageUnit], ReadSettings]:
    """Work units of the inputs in a stable order, and the settings with the Parquet image column resolved.

    Image files go `min_files_per_unit` or more to a unit (a few teacher batches), about 64 units in all, at most
    MAX_FILES_PER_UNIT: enough units to spread and resume, few enough files out.

    Errors (an input with nothing to read, a Parquet input without the image column) come before the run."""
    if settings.format not in ("auto",) + tuple(FORMATS):
        raise InputError(f"unknown input format {settings.format!r}; one of auto, {', '.join(FORMATS)}")
    if not inputs:
        raise InputError("give at least one INPUT")
    listed = []
    for item in inputs:
        files = [fs.absolute(p) for p, _ in fs.list_files(fs.absolute(item))]
        files = [p for p in files if kind_of(p, settings.format)]
        if not files:
            raise InputError(f"no images or image containers found in {item}" + (
                " (pass --input-format for files without a known extension)" if settings.format == "auto" else ""))
        listed.append((_root(item), files))
    roots = sorted({root for root, _ in listed})
    id_root = roots[0] if len(roots) == 1 else fs.common_root(roots)
    settings = _resolve_image_column(settings, [p for _, files in listed for p in files
                                                if kind_of(p, settings.format) == "parquet"])
    total = sum(len(files) for _, files in listed)
    files_per_unit = min(MAX_FILES_PER_UNIT, max(min_files_per_unit, math.ceil(total / 64)))
    units: list[ImageUnit] = []
    seen: set[str] = set()
    for _, files in listed:
        for repeated in (False, True):
            mine = [p for p in files if (p in seen) == repeated]
            for kind, fmt in FORMATS.items():
                paths = [p for p in mine if kind_of(p, settings.format) == kind]
                units += [replace(u, repeated=repeated) for u in fmt.units(paths, id_root, files_per_unit)]
        seen.update(files)
    units = [replace(u, index=i) for i, u in enumerate(units)]
    return (_apply_limit(units, max_images, settings) if max_images is not None else units), settings


def _resolve_image_column(settings: ReadSettings, parquet_files: list[str]) -> ReadSettings:
    """One image column for every Parquet input: the one given (checked), or the one each file suggests."""
    columns = set()
    for path in parquet_files:
        schema = _open(path).schema_arrow
        if settings.image_column is not None and settings.image_column not in schema.names:
            raise InputError(f"{path}: no column '{settings.image_column}' (has: {', '.join(schema.names)})")
        columns.add(settings.image_column or image_column(schema, path))
    if len(columns) > 1:
        raise InputError(f"the Parquet inputs hold images in different columns ({sorted(columns)}); "
                         "pass --image-column")
    return replace(settings, image_column=columns.pop()) if columns else settings


def _apply_limit(units: list[ImageUnit], max_images: int, settings: ReadSettings) -> list[ImageUnit]:
    limited, left = [], max_images
    for unit in units:
        if left <= 0:
            break
        n = FORMATS[unit.kind].count(unit, settings)
        limited.append(replace(unit, limit=min(n, left)))
        left -= n
    return limited


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


def known_total(units: list[ImageUnit]) -> int | None:
    """Images the units hold, when known without reading containers (for progress)."""
    if all(u.limit is not None or u.kind == "files" for u in units):
        return sum(u.limit if u.limit is not None else len(u.paths) for u in units)
    return None


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
