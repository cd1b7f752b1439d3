"""Where unlabeled images come from: image files, TFRecords of tf.Example, webdataset tars, Parquet bytes columns.

Each image gets a stable `id`, its `source` (the file, or the container holding it) and `offset` (byte offset of
the record in a TFRecord, of the member's data in a tar, the row index in a Parquet file; null for a file):

| kind     | id                                  | offset                    |
|----------|-------------------------------------|---------------------------|
| files    | path relative to the input root     | null                      |
| tfrecord | container relative path + '#' + n   | byte offset of record n   |
| tar      | container relative path + '/' + member name | byte offset of the member's data |
| parquet  | the `id` column if present, else container relative path + '#' + row | row index |

The input root is the directory given, the fixed part of a glob, or a file's directory. A container that cannot
be read, or a damaged record, becomes an error row, never a stopped run.
"""
from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from ns_data import tfrecord
from ns_data.images import IMAGE_EXTENSIONS
from ns_data.fs import GLOB_CHARS
from ns_data.stage import InputError

KINDS = ("files", "tfrecord", "tar", "parquet")
_EXTENSION_KIND = {".tfrecord": "tfrecord", ".tfrecords": "tfrecord", ".tfr": "tfrecord", ".tar": "tar",
                   ".parquet": "parquet", **{ext: "files" for ext in IMAGE_EXTENSIONS}}
UNREADABLE = "unreadable_file"
CORRUPT_RECORD = "corrupt_record"
FILES_PER_UNIT = 64


@dataclass(frozen=True)
class ImageUnit:
    """A work unit of the label stage: a few image files, or one container (one row group for Parquet)."""

    kind: str
    paths: tuple[str, ...]
    root: str
    row_group: int | None = None
    limit: int | None = None  # read at most this many images (--max-images)


@dataclass(frozen=True)
class ImageRecord:
    id: str
    source: str
    offset: int | None
    data: bytes | None = None  # None when `error` is set
    error: str | None = None  # a reason; `detail` says more
    detail: str = ""


def _kind_of(path: str, input_format: str) -> str | None:
    if input_format != "auto":
        return input_format
    return _EXTENSION_KIND.get(os.path.splitext(path)[1].lower())


def _list(item: str) -> tuple[str, list[str]]:
    """(root, files) named by a path, a glob or a directory."""
    if "://" not in item and os.path.isdir(item):
        files = [p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True) if os.path.isfile(p)]
        return item, files
    if GLOB_CHARS & set(item):
        root = item[: min(item.index(c) for c in GLOB_CHARS if c in item)].rsplit("/", 1)[0] or "."
        return root, [m.path for m in FileSystems.match([item])[0].metadata_list]
    if FileSystems.exists(item):
        return FileSystems.split(item)[0], [item]
    return "", []


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if root and path.startswith(root) else path.rsplit("/", 1)[-1]


def plan_units(inputs, input_format: str = "auto", max_images: int | None = None,
               files_per_unit: int = FILES_PER_UNIT) -> list[ImageUnit]:
    """Work units for the inputs, in a stable order; with max_images, only enough units for that many images."""
    if input_format not in ("auto",) + KINDS:
        raise InputError(f"unknown input format {input_format!r}; one of auto, {', '.join(KINDS)}")
    units: list[ImageUnit] = []
    seen: set[str] = set()
    for item in inputs:
        root, files = _list(item)
        files = sorted(f for f in files if f not in seen)
        kinds = {f: _kind_of(f, input_format) for f in files}
        files = [f for f in files if kinds[f]]
        if not files:
            raise InputError(f"no images or image containers found in {item}"
                             + ("" if input_format != "auto" else " (pass --input-format for files without a "
                                                                   "known extension)"))
        seen.update(files)
        images = [f for f in files if kinds[f] == "files"]
        for i in range(0, len(images), files_per_unit):
            units.append(ImageUnit("files", tuple(images[i: i + files_per_unit]), root))
        for f in files:
            if kinds[f] == "parquet":
                try:
                    groups = pq.ParquetFile(f if "://" not in f else FileSystems.open(f)).num_row_groups
                except (OSError, pa.ArrowInvalid) as err:
                    raise InputError(f"{f}: cannot read as Parquet: {err}") from err
                units.extend(ImageUnit("parquet", (f,), root, row_group=g) for g in range(groups))
            elif kinds[f] in ("tfrecord", "tar"):
                units.append(ImageUnit(kinds[f], (f,), root))
    return _apply_limit(units, max_images) if max_images is not None else units


def _apply_limit(units: list[ImageUnit], max_images: int) -> list[ImageUnit]:
    limited, left = [], max_images
    for unit in units:
        if left <= 0:
            break
        n = _count(unit)
        limited.append(ImageUnit(unit.kind, unit.paths, unit.root, unit.row_group, limit=min(n, left)))
        left -= n
    return limited


def _count(unit: ImageUnit) -> int:
    """Images in a unit, cheaply where possible (only used for --max-images)."""
    if unit.kind == "files":
        return len(unit.paths)
    if unit.kind == "parquet":
        return pq.ParquetFile(unit.paths[0]).metadata.row_group(unit.row_group).num_rows
    return sum(1 for _ in read_unit(unit, image_column=None, id_column=None, with_data=False))


def read_unit(unit: ImageUnit, image_column: str | None, id_column: str | None,
              with_data: bool = True) -> Iterator[ImageRecord]:
    """The unit's images (or error records), at most `unit.limit` of them."""
    reader = {"files": _read_files, "tfrecord": _read_tfrecord, "tar": _read_tar, "parquet": _read_parquet}
    it = reader[unit.kind](unit, image_column=image_column, id_column=id_column, with_data=with_data)
    for n, record in enumerate(it):
        if unit.limit is not None and n >= unit.limit:
            return
        yield record


def _read_files(unit: ImageUnit, with_data: bool, **_) -> Iterator[ImageRecord]:
    for path in unit.paths:
        rid = _relative(path, unit.root)
        try:
            with FileSystems.open(path) as f:
                data = f.read() if with_data else b""
        except Exception as err:  # noqa: BLE001 - an unreadable file is data, not a crash
            yield ImageRecord(rid, path, None, error=UNREADABLE, detail=str(err))
            continue
        yield ImageRecord(rid, path, None, data)


def _read_tfrecord(unit: ImageUnit, with_data: bool, **_) -> Iterator[ImageRecord]:
    path = unit.paths[0]
    name = _relative(path, unit.root)
    index = 0
    try:
        with FileSystems.open(path) as f:
            for offset, record in tfrecord.read_records(f):
                rid = f"{name}#{index}"
                index += 1
                if not with_data:
                    yield ImageRecord(rid, path, offset)
                    continue
                try:
                    encoded = tfrecord.parse_example(record).get("image/encoded")
                except Exception as err:  # noqa: BLE001
                    yield ImageRecord(rid, path, offset, error=CORRUPT_RECORD, detail=f"not a tf.Example: {err}")
                    continue
                if not encoded:
                    yield ImageRecord(rid, path, offset, error=CORRUPT_RECORD, detail="no image/encoded feature")
                    continue
                yield ImageRecord(rid, path, offset, encoded[0])
    except tfrecord.CorruptRecord as err:
        yield ImageRecord(f"{name}#{index}", path, None, error=CORRUPT_RECORD, detail=str(err))
    except Exception as err:  # noqa: BLE001
        yield ImageRecord(f"{name}#{index}", path, None, error=UNREADABLE, detail=str(err))


def _read_tar(unit: ImageUnit, with_data: bool, **_) -> Iterator[ImageRecord]:
    path = unit.paths[0]
    name = _relative(path, unit.root)
    try:
        with FileSystems.open(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or os.path.splitext(member.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                rid = f"{name}/{member.name}"
                data = tar.extractfile(member).read() if with_data else None
                yield ImageRecord(rid, path, member.offset_data, data)
    except Exception as err:  # noqa: BLE001 - a damaged tar ends here, with what was read so far kept
        yield ImageRecord(f"{name}/", path, None, error=UNREADABLE, detail=f"{type(err).__name__}: {err}")


def _read_parquet(unit: ImageUnit, image_column: str | None, id_column: str | None, **_) -> Iterator[ImageRecord]:
    path = unit.paths[0]
    name = _relative(path, unit.root)
    pf = pq.ParquetFile(path if "://" not in path else FileSystems.open(path))
    column = image_column or _image_column(pf.schema_arrow, path)
    ids = id_column if id_column in pf.schema_arrow.names else None
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


def _image_column(schema: pa.Schema, path: str) -> str:
    """The image-bytes column: the only binary one, or one named image/image_bytes/jpg/png."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    for name in ("image", "image_bytes", "jpg", "png", "bytes"):
        if name in binary:
            return name
    if len(binary) == 1:
        return binary[0]
    raise InputError(f"{path}: cannot tell which column holds image bytes (binary columns: {binary}); "
                     "pass --image-column")


def check_parquet_columns(units: list[ImageUnit], image_column: str | None) -> None:
    """Before the run: every Parquet input has the image column (a clear error otherwise)."""
    for path in sorted({u.paths[0] for u in units if u.kind == "parquet"}):
        schema = pq.read_schema(path if "://" not in path else FileSystems.open(path))
        if image_column is None:
            _image_column(schema, path)
        elif image_column not in schema.names:
            raise InputError(f"{path}: no column '{image_column}' (has: {', '.join(schema.names)})")


# ------------------------------------------------------------------------------------------- reading back

MISSING_SOURCE = "missing_source"


def container_kind(path: str) -> str:
    """tfrecord, tar or parquet: by extension, else by the file's first bytes (for inputs named otherwise)."""
    kind = _EXTENSION_KIND.get(os.path.splitext(path)[1].lower())
    if kind in ("tfrecord", "tar", "parquet"):
        return kind
    with FileSystems.open(path) as f:
        head = f.read(512)
    if head[:4] == b"PAR1":
        return "parquet"
    if head[257:262] == b"ustar":
        return "tar"
    return "tfrecord"


def read_back(source: str, offsets: list[int | None], image_column: str | None = None,
              input_format: str = "auto") -> Iterator[tuple[bytes | None, str | None, str]]:
    """(bytes, None, "") or (None, reason, detail) for each image of `source` at `offsets` (as `label` wrote
    them; ascending), opening the source once and reading forward through it."""
    try:
        if not FileSystems.exists(source):
            raise FileNotFoundError(source)
        if offsets and offsets[0] is None:  # a standalone image file
            with FileSystems.open(source) as f:
                data = f.read()
            for _ in offsets:
                yield data, None, ""
            return
        kind = container_kind(source)
        if kind == "parquet":
            yield from _parquet_rows(source, offsets, image_column)
            return
        with FileSystems.open(source) as f:
            for offset in offsets:
                yield _record_at(f, kind, offset)
    except FileNotFoundError as err:
        for _ in offsets:
            yield None, MISSING_SOURCE, str(err)
    except Exception as err:  # noqa: BLE001 - an unreadable source is data: its images become error rows
        for _ in offsets:
            yield None, UNREADABLE, f"{type(err).__name__}: {err}"


def _record_at(f, kind: str, offset: int) -> tuple[bytes | None, str | None, str]:
    try:
        if kind == "tfrecord":
            encoded = tfrecord.parse_example(tfrecord.read_record_at(f, offset)).get("image/encoded")
            if not encoded:
                return None, CORRUPT_RECORD, f"no image/encoded in the record at byte {offset}"
            return encoded[0], None, ""
        f.seek(offset - tarfile.BLOCKSIZE)  # a member's header block sits right before its data
        info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
        data = f.read(info.size)
        if len(data) < info.size:
            return None, CORRUPT_RECORD, f"tar member at byte {offset} is truncated"
        return data, None, ""
    except (tfrecord.CorruptRecord, tarfile.TarError, ValueError, OSError) as err:
        return None, CORRUPT_RECORD, f"at byte {offset}: {type(err).__name__}: {err}"


def _parquet_rows(source: str, rows: list[int], image_column: str | None):
    pf = pq.ParquetFile(source if "://" not in source else FileSystems.open(source))
    column = image_column or _image_column(pf.schema_arrow, source)
    ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    groups = np.searchsorted(ends, np.asarray(rows), side="right")
    values: dict[int, bytes | None] = {}
    for g in np.unique(groups):
        if g >= len(ends):
            continue
        first = int(ends[g - 1]) if g else 0
        wanted = [r for r, rg in zip(rows, groups) if rg == g]
        taken = pf.read_row_group(int(g), columns=[column]).column(column).take([r - first for r in wanted])
        values.update(zip(wanted, taken.to_pylist()))
    for row in rows:
        data = values.get(row)
        yield (data, None, "") if data is not None else (None, CORRUPT_RECORD, f"no {column} bytes at row {row}")
