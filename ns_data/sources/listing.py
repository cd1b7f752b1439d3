"""The listing: the input files each INPUT names, every one of them an image, a container or an error row.

An INPUT is turned into a pattern (`input_pattern`: everything below a directory, a glob, or one file) and its
ids are relative to its root (`input_root`). Local patterns are listed by walking the directories
(`match_input`): links are followed, and a dangling link, a link loop, a directory that cannot be listed, a
FIFO/socket/device and a name that is not UTF-8 (escaped `\\xNN` for its id) are listed with a reason that
becomes their error record. Object stores have no links, FIFOs or permissions on prefixes: they are listed
through their filesystem's listing, page by page (`_store_match`). The same file named by several inputs is the
first input's; each other appearance is marked repeated (`mark_repeats`), and reported as a `duplicate_input`
error.

Inside the pipeline (`ListInputs`) the listing is spread over the workers and held in no one place: each
pattern's top directory (or prefix) is listed one level at a time for SPLIT_LEVELS levels, every directory (or
prefix) found there is an element of its own (`Branch`) after a Reshuffle, and each is then walked (listed) as a
stream. A walk holds the open directories of one branch and a listing one page of 1,000 objects, whatever the
number of files; what the branches find together is what one walk of the pattern (`match_input`) finds.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from ns_data import fs
from ns_data.sources.base import (DANGLING_LINK, NON_UTF8_NAME, NOT_A_REGULAR_FILE, SYMLINK_LOOP, UNREADABLE,
                                  UNREADABLE_DIRECTORY)
from ns_data.sources.registry import kind_of
from ns_data.stage import InputError

Found = tuple[str, int, str, str]  # (path, size, reason, detail); reason "" for a regular file to read


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


class NotUsable(Exception):
    """A path that cannot be read as a file: its reason and detail make its error record."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def plain_local(path: str) -> bool:
    return not path.startswith("file://") and fs.is_local(path)


def file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "file of another type"


def path_fault(path: str, err: OSError) -> tuple[str, str]:
    """The reason and detail of a path that stat or open refused."""
    if err.errno == errno.ELOOP:
        return SYMLINK_LOOP, f"{path}: the symbolic links loop; not followed"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return DANGLING_LINK, f"{path}: links to {os.readlink(path)}, which does not exist"
    return UNREADABLE, f"{path}: {err.strerror or err}"


def input_root(item: str) -> str:
    """The directory an input's ids are relative to: the directory given, a glob's fixed part, a file's folder."""
    item = fs.absolute(item)
    if fs.is_glob(item):
        return item[: min(item.index(c) for c in fs.GLOB_CHARS if c in item)].rsplit("/", 1)[0]
    return fs.split(item)[0] if fs.is_file(item) else item.rstrip("/")


def input_pattern(item: str) -> str:
    item = fs.absolute(item)
    return item if fs.is_glob(item) or fs.is_file(item) else fs.join(item.rstrip("/"), "**")


def check_input_file(item: str) -> None:
    """An INPUT that names a local path which is not a directory must be a file to read: a FIFO, a dangling
    link... is an InputError now, as a missing file is."""
    if plain_local(item) and os.path.lexists(item) and not os.path.isdir(item):
        for _, _, reason, detail in _walk(fs.absolute(item), frozenset()):
            if reason:
                raise InputError(detail)


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
        yield (path, 0, *path_fault(path, err))
        return
    if stat.S_ISREG(st.st_mode):
        yield path, st.st_size, "", ""
        return
    if not stat.S_ISDIR(st.st_mode):
        yield path, 0, NOT_A_REGULAR_FILE, f"{path}: a {file_type(st.st_mode)}; not opened"
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
    """What a local pattern (as `input_pattern` makes them) matches, as Beam's glob matches it (FileSystem's
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

        def in_glob(entry: Found) -> bool:
            path, reason = entry[0], entry[2]
            if matches(path):
                return True
            return reason in (UNREADABLE_DIRECTORY, SYMLINK_LOOP) and (path + "/").startswith(prefix) and (
                deep or path.count("/") < pattern.count("/"))

        levels = None if deep else pattern.count("/") - top.count("/")  # no deeper than the pattern reaches
        start, wanted = Subdir(top or "/", frozenset(), levels), in_glob
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
    yield from (_local_match if plain_local(pattern) else _store_match)(pattern)


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
# directories or prefixes listed by elements of their own
SPREAD = Metrics.counter("ns_data.label", "listing_branches")


def list_branch(branch: Branch, input_format: str, split: bool = False):
    """(path, (input index, size, kind, reason, detail)) of the input files a branch matches; with `split`, the
    branch's sub-directories or sub-prefixes come out as `Branch`es in the BRANCHES output instead."""
    pattern = branch.pattern.pattern
    match = _local_match if plain_local(pattern) else _store_match
    for item in match(pattern, branch.at, split):
        if isinstance(item, (Subdir, Prefix)):
            SPREAD.inc()
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
