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

Every file listed is an image or an error record. Local inputs are listed by walking the directories
(`match_input`): links are followed, and a dangling link, a link loop, a directory that cannot be listed, a
FIFO/socket/device and a name that is not UTF-8 (escaped `\\xNN` for its id) are listed with a reason that
becomes their error record; object stores are listed by Beam's FileSystems.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import math
import os
import re
import stat
import tarfile
from dataclasses import dataclass, replace
from typing import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from ns_data import fs, tfrecord
from ns_data.images import IMAGE_EXTENSIONS
from ns_data.reading import open_parquet
from ns_data.stage import InputError

UNREADABLE = "unreadable_file"
CORRUPT_RECORD = "corrupt_record"
MISSING_SOURCE = "missing_source"
DUPLICATE_INPUT = "duplicate_input"
DANGLING_LINK = "dangling_link"
SYMLINK_LOOP = "symlink_loop"
UNREADABLE_DIRECTORY = "unreadable_directory"
NOT_A_REGULAR_FILE = "not_a_regular_file"
NON_UTF8_NAME = "non_utf8_name"
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
    faults: tuple[tuple[str, str, str], ...] = ()  # (path, reason, detail): paths the listing found unusable

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
        faults = {path: (reason, detail) for path, reason, detail in unit.faults}
        for path in unit.paths:
            rid = fs.relative_to(path, unit.id_root)
            if path in faults:
                yield ImageRecord(rid, path, None, error=faults[path][0], detail=faults[path][1])
                continue
            try:
                data = _read_file(path) if with_data else None
            except _NotUsable as err:
                yield ImageRecord(rid, path, None, error=err.reason, detail=err.detail)
                continue
            except Exception as err:  # noqa: BLE001 - an unreadable file is data, not a crash
                yield ImageRecord(rid, path, None, error=UNREADABLE, detail=str(err))
                continue
            yield ImageRecord(rid, path, None, data)

    def read_back(self, source, offsets, settings):
        try:
            data = _read_file(source)
        except _NotUsable as err:  # e.g. replaced by a FIFO since it was labeled: never read, never blocks
            yield from _failed(offsets, err.reason, err.detail)
            return
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
                for offset, record, damage in tfrecord.scan_records(f):
                    rid = f"{name}#{index}"
                    index += 1
                    if damage:
                        yield ImageRecord(rid, path, offset, error=CORRUPT_RECORD, detail=damage)
                    elif not with_data:
                        yield ImageRecord(rid, path, offset)
                    else:
                        data, reason, detail = self._image(record, offset)
                        yield ImageRecord(rid, path, offset, data, reason, detail)
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
                    if member.isdir() or os.path.splitext(member.name)[1].lower() not in IMAGE_EXTENSIONS:
                        continue
                    if not member.isfile():  # a link or device with an image's name: no bytes of its own
                        yield ImageRecord(f"{name}/{member.name}", path, member.offset_data,
                                          error=NOT_A_REGULAR_FILE, detail=f"tar member of type {member.type!r}")
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
        return open_parquet(unit.paths[0]).metadata.row_group(unit.row_group).num_rows

    def iterate(self, unit, settings, with_data=True):
        """A row group's images; a file whose footer, image column or row group cannot be read is one error
        record (`row_group` None: the planning found it unreadable)."""
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        try:
            pf = open_parquet(path)
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
        pf = open_parquet(source)
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
    reason: str = ""  # the listing found it unusable (an error row of kind files): why
    detail: str = ""


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
        if _plain_local(item) and os.path.lexists(item) and not os.path.isdir(item):
            for _, _, reason, detail in _walk(fs.absolute(item), frozenset()):
                if reason:  # an INPUT that is a FIFO, a dangling link...: said now, as a missing file is
                    raise InputError(detail)
        pattern = _pattern(item)
        found = list(itertools.islice(match_input(pattern), LAUNCH_CHECK_FILES))
        kinds = [(p, input_kind(p, reason, settings.format)) for p, _, reason, _ in found]
        kinds = [(p, k) for p, k in kinds if k]  # an unusable file is kind files: never taken for a footer
        if not kinds and len(found) < LAUNCH_CHECK_FILES:
            raise InputError(f"no images or image containers found in {item}" + (
                " (pass --input-format for files without a known extension)" if settings.format == "auto" else ""))
        parquet = parquet or next((fs.absolute(p) for p, k in kinds if k == "parquet"), None)
        patterns.append(InputPattern(index, pattern))
        roots.add(_root(item))
    roots = sorted(roots)
    id_root = roots[0] if len(roots) == 1 else fs.common_root(roots)
    if parquet is not None:
        schema = open_parquet(parquet).schema_arrow
        if settings.image_column is not None and settings.image_column not in schema.names:
            raise InputError(f"{parquet}: no column '{settings.image_column}' (has: {', '.join(schema.names)})")
        settings = replace(settings, image_column=settings.image_column or image_column(schema, parquet))
    return tuple(patterns), id_root, settings


# A local listing walks the directories itself (os.scandir), so that nothing below an input is dropped without
# a row: links to files and directories are followed, and what cannot be used is an entry with a reason (its
# error row). Object stores have no links, FIFOs or permissions on prefixes: FileSystems.match lists them.
Found = tuple[str, int, str, str]  # (path, size, reason, detail); reason "" for a regular file to read


class _NotUsable(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _plain_local(path: str) -> bool:
    return not path.startswith("file://") and fs.is_local(path)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "file of another type"


def _path_fault(path: str, err: OSError) -> tuple[str, str]:
    """The reason and detail of a path that stat or open refused."""
    if err.errno == errno.ELOOP:
        return SYMLINK_LOOP, f"{path}: the symbolic links loop; not followed"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return DANGLING_LINK, f"{path}: links to {os.readlink(path)}, which does not exist"
    return UNREADABLE, f"{path}: {err.strerror or err}"


def _read_file(path: str) -> bytes:
    """A file's bytes. A local file is read only when it is a regular file (checked before opening it, and on
    the opened file): a FIFO, socket or device is never read, so it cannot block the run."""
    if not _plain_local(path):
        return fs.read_bytes(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _NotUsable(NOT_A_REGULAR_FILE, f"{path}: a {_file_type(st.st_mode)}; not opened")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise _NotUsable(*_path_fault(path, err)) from err
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotUsable(NOT_A_REGULAR_FILE, f"{path}: a {_file_type(mode)}; not read")
        return f.read()


@dataclass(frozen=True)
class Subdir:
    """A directory `_walk(..., split=True)` found and did not enter: `_walk(path, above, levels)` lists it."""

    path: str
    above: frozenset
    levels: int | None


def _walk(path: str, above: frozenset, levels: int | None = None, split: bool = False) -> Iterator[Found | Subdir]:
    """Everything at and below `path` that is not a directory, following links, at most `levels` directories
    down (None: all); `above` holds the (device, inode) of the directories above it, so a link back to one of
    them is a `symlink_loop` entry, not a walk without end. A directory that cannot be listed is one
    `unreadable_directory` entry. Only the open directories of the current branch are held, whatever the number
    of files. With `split`, the directories directly in `path` are not entered but yielded as `Subdir`s (what
    walking each of them yields is what this walk would have yielded below it)."""
    try:
        st = os.stat(path)
    except OSError as err:
        yield (path, 0, *_path_fault(path, err))
        return
    if stat.S_ISREG(st.st_mode):
        yield path, st.st_size, "", ""
        return
    if not stat.S_ISDIR(st.st_mode):
        yield path, 0, NOT_A_REGULAR_FILE, f"{path}: a {_file_type(st.st_mode)}; not opened"
        return
    if levels == 0:
        return
    key = (st.st_dev, st.st_ino)
    if key in above:
        yield path, 0, SYMLINK_LOOP, (f"{path}: links back to a directory above it ({os.path.realpath(path)}); "
                                      "not followed")
        return
    inside = above | {key}
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                below = None if levels is None else levels - 1
                if split and below != 0 and _is_dir(entry):
                    yield Subdir(entry.path, inside, below)
                else:
                    yield from _walk(entry.path, inside, below)
    except OSError as err:
        yield path, 0, UNREADABLE_DIRECTORY, f"{path}: {err.strerror or err}; nothing below it was listed"


def _is_dir(entry: os.DirEntry) -> bool:
    """A directory, following links; False for a path stat refuses (walked in place, where it is an entry)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _escaped(path: str) -> str:
    """A path whose name is not UTF-8 (os.fsdecode's surrogateescape), its undecodable bytes written \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _local_match(pattern: str, branch: Subdir | None = None, split: bool = False) -> Iterator[Found | Subdir]:
    """What a local pattern (as `_pattern` makes them) matches, as Beam's glob matches it (FileSystem's
    translation: `*` within a name, `**` across directories), with faults as entries. A directory fault is kept
    when the pattern reaches below that directory. A path that is not UTF-8 is a `non_utf8_name` entry under its
    escaped path (`_escaped`): it cannot be an id or a source of the Parquet output as it is.

    `branch` (a `Subdir` an earlier call yielded) walks only that directory; `split` yields the directories
    directly in the walk's start as `Subdir`s instead of entering them (`_walk`). Walking every `Subdir` yielded
    gives what one whole walk gives."""
    wanted = None
    if not fs.is_glob(pattern):
        start = Subdir(pattern, frozenset(), None)
    else:
        prefix = re.match(r"^[^[*?]*", pattern).group(0)
        top = (prefix if prefix.endswith("/") else os.path.dirname(prefix)).rstrip("/")
        matches = re.compile(FileSystem.translate_pattern(pattern)).match
        deep = "**" in pattern

        def wanted(entry: Found) -> bool:
            path, reason = entry[0], entry[2]
            if matches(path):
                return True
            return reason in (UNREADABLE_DIRECTORY, SYMLINK_LOOP) and (path + "/").startswith(prefix) and (
                deep or path.count("/") < pattern.count("/"))

        levels = None if deep else pattern.count("/") - top.count("/")  # no deeper than the pattern reaches
        start = Subdir(top or "/", frozenset(), levels)
    branch = branch or start
    for entry in _walk(branch.path, branch.above, branch.levels, split):
        if isinstance(entry, Subdir):
            yield entry
            continue
        if wanted is not None and not wanted(entry):
            continue
        path, size, reason, detail = entry
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            path, size = _escaped(path), 0
            reason, detail = NON_UTF8_NAME, f"{path}: the name is not UTF-8 (its bytes shown as \\xNN); not read"
        yield path, size, reason, detail


@dataclass(frozen=True)
class Prefix:
    """An object-store prefix (ending in '/') that `_store_match(..., split=True)` found and did not list."""

    path: str


LIST_PAGE = 1000  # objects per listing request (GCS's most)


def _store_match(pattern: str, branch: Prefix | None = None, split: bool = False) -> Iterator[Found | Prefix]:
    """What an object-store pattern matches, as Beam's FileSystem.match matches it (every object below the
    pattern's fixed part, kept when the translated glob matches its path), streamed: a page of the listing is
    held at a time, never the whole listing (FileSystem.match returns a list, and GcsIO.list_files keeps a set of
    every name it has yielded). `branch` lists only below that prefix; `split` lists one level of a GCS prefix
    (objects directly in it) and yields the prefixes directly below it as `Prefix`es, but none too deep to hold
    a match. A filesystem with directories other than the local one is matched by FileSystems.match."""
    if pattern.endswith("/"):
        pattern += "*"  # as FileSystem.match does
    filesystem = FileSystems.get_filesystem(pattern)
    if not fs.is_glob(pattern) or filesystem.has_dirs():  # one object: an existence check and its metadata
        for m in FileSystems.match([pattern])[0].metadata_list:
            yield m.path, m.size_in_bytes, "", ""
        return
    matches = re.compile(FileSystem.translate_pattern(pattern)).match
    # a match has at most this many '/': `**` crosses any number, `?` and `[...]` may stand for one
    deepest = None if "**" in pattern else pattern.count("/") + pattern.count("?") + pattern.count("[")
    start = branch.path if branch else re.match(r"^[^[*?]*", pattern).group(0)
    if filesystem.scheme() == "gs":
        listing = _gcs_list(filesystem, start, split)
    else:  # the filesystem's own listing: as much a stream as it makes it
        listing = ((m.path, m.size_in_bytes) for m in filesystem._list(start))
    for item in listing:
        if isinstance(item, Prefix):
            if deepest is None or item.path.count("/") <= deepest:
                yield item
        elif matches(item[0]):
            yield item[0], item[1], "", ""


_GCS_CLIENTS: dict = {}


def _gcs_list(filesystem, prefix: str, split: bool) -> Iterator[tuple[str, int] | Prefix]:
    """(path, size) of the objects below a gs:// prefix, page by page, through the storage client Beam's GCS
    filesystem made (its private `_gcsIO`: the only way to the client, its credentials and its retry policy).
    With `split`, the listing asks for one level (delimiter '/') and yields the prefixes below it too."""
    from apache_beam.io.gcp import gcsio

    key = os.environ.get("STORAGE_EMULATOR_HOST")  # the client is made for one endpoint
    if key not in _GCS_CLIENTS:
        _GCS_CLIENTS[key] = filesystem._gcsIO()
    gcs = _GCS_CLIENTS[key]
    bucket, name = gcsio.parse_gcs_path(prefix, object_optional=True)
    blobs = gcs.client.list_blobs(gcs.client.bucket(bucket), prefix=name, delimiter="/" if split else None,
                                  page_size=LIST_PAGE, retry=gcs._storage_client_retry)
    for page in blobs.pages:
        for blob in page:
            yield f"gs://{bucket}/{blob.name}", blob.size
        if split:
            for sub in page.prefixes:
                yield Prefix(f"gs://{bucket}/{sub}")
        blobs.prefixes.clear()  # the client gathers every page's prefixes there: held one page at a time


def match_input(pattern: str) -> Iterator[Found]:
    """(path, size, reason, detail) of every file a pattern matches; reason "" for a file to read. A stream:
    listing and walking hold a page or the open directories of one branch, whatever the number of files."""
    yield from (_local_match if _plain_local(pattern) else _store_match)(pattern)


def input_kind(path: str, reason: str, input_format: str) -> str | None:
    """The format of a listed path (None: not an input). A path the listing found unusable is an error row of a
    files unit (never opened as a container): when its name is an input's, or when it is a directory fault."""
    kind = kind_of(path, input_format)
    if not reason:
        return kind
    return "files" if kind or reason in (UNREADABLE_DIRECTORY, SYMLINK_LOOP) else None


@dataclass(frozen=True)
class Branch:
    """A part of an input's listing: the whole pattern (`at` None), or what it matches below a directory or
    prefix an earlier split found."""

    pattern: InputPattern
    at: Subdir | Prefix | None = None


BRANCHES = "branches"
SPLIT_LEVELS = 2  # directory or prefix levels listed one at a time, their sub-directories spread to workers


def list_branch(branch: Branch, input_format: str, split: bool = False):
    """(path, (input index, size, kind, reason, detail)) of the input files a branch matches; with `split`, the
    branch's sub-directories or sub-prefixes come out as `Branch`es in the BRANCHES output instead."""
    pattern = branch.pattern.pattern
    match = _local_match if _plain_local(pattern) else _store_match
    for item in match(pattern, branch.at, split):
        if isinstance(item, (Subdir, Prefix)):
            yield beam.pvalue.TaggedOutput(BRANCHES, Branch(branch.pattern, item))
            continue
        path, size, reason, detail = item
        kind = input_kind(path, reason, input_format)
        if kind:
            yield fs.absolute(path), (branch.pattern.index, size, kind, reason, detail)


class ListInputs(beam.PTransform):
    """(path, (input index, size, kind, reason, detail)) of the files the input patterns match, listed by the
    workers in parallel and as streams: each pattern's top directory (or prefix) is listed one level at a time
    for SPLIT_LEVELS levels, the directories found there are elements spread over the workers (a Reshuffle),
    and each is then walked (or listed) whole, a directory branch (or a page) at a time. What comes out is what
    one walk of each pattern (`match_input`) finds, faults included."""

    def __init__(self, patterns: tuple[InputPattern, ...], input_format: str, split_levels: int = SPLIT_LEVELS):
        super().__init__()
        self.patterns, self.input_format, self.split_levels = patterns, input_format, split_levels

    def expand(self, pbegin):
        branches = pbegin | "Patterns" >> beam.Create([Branch(p) for p in self.patterns])
        found = []
        for level in range(self.split_levels):
            listed = branches | f"Split{level}" >> beam.FlatMap(list_branch, self.input_format, True).with_outputs(
                BRANCHES, main="files")
            found.append(listed.files)
            branches = listed[BRANCHES] | f"Spread{level}" >> beam.Reshuffle()
        found.append(branches | "Walk" >> beam.FlatMap(list_branch, self.input_format))
        return found | "Listed" >> beam.Flatten()


def mark_repeats(element) -> Iterator[Listed]:
    """A file found by several inputs: the first input's, then a repeat for each other input."""
    path, found = element
    found = sorted(set(found))  # a path an object-store listing gave twice to the same input is one entry
    for n, (index, nbytes, kind, reason, detail) in enumerate(found):
        yield Listed(path, nbytes, kind, index, repeated=n > 0, reason=reason, detail=detail)


def files_per_unit(total_files: int) -> int:
    """Image files go MIN_FILES_PER_UNIT or more to a unit, about 64 units in all, at most MAX_FILES_PER_UNIT:
    enough units to spread and resume, few enough files out. Not a function of --batch-size."""
    return min(MAX_FILES_PER_UNIT, max(MIN_FILES_PER_UNIT, math.ceil(total_files / 64)))


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def file_bucket(entry: Listed, total_files: int) -> tuple[str, tuple[str, int, str, str]]:
    """(unit key, (path, size)) of a loose image file: its bucket is a hash of its path into as many buckets as the
    listing's count of loose files asks, so units do not depend on the order of the listing nor on workers."""
    buckets = max(1, math.ceil(total_files / files_per_unit(total_files)))
    repeated = "/repeated" if entry.repeated else ""
    return (f"files/{_digest(entry.path) % buckets:06d}-of-{buckets:06d}{repeated}",
            (entry.path, entry.size, entry.reason, entry.detail))


def files_unit(element, id_root: str) -> ImageUnit:
    key, files = element
    files = sorted(files)
    return ImageUnit(key, "files", tuple(f[0] for f in files), id_root, repeated=key.endswith("/repeated"),
                     nbytes=sum(f[1] for f in files), faults=tuple((p, r, d) for p, _, r, d in files if r))


def container_units(entry: Listed, id_root: str, settings: ReadSettings) -> list[ImageUnit]:
    """A TFRecord or tar: one unit. A Parquet file: one unit per row group (its footer read here); one unit that
    reads as an error record when the footer or the image column is not there."""
    key = f"{entry.kind}/{entry.path}" + ("/repeated" if entry.repeated else "")
    unit = ImageUnit(key, entry.kind, (entry.path,), id_root, repeated=entry.repeated, nbytes=entry.size)
    if entry.kind != "parquet":
        return [unit]
    try:
        pf = open_parquet(entry.path)
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
                                   nbytes=sum(e.size for e in run),
                                   faults=tuple((e.path, e.reason, e.detail) for e in run if e.reason)))
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
                  | "List" >> ListInputs(self.patterns, self.settings.format)
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
