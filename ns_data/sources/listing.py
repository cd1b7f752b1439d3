"""The listing: the input files each INPUT names, every one of them an image, a container or an error row.

An INPUT is turned into a pattern (`input_pattern`: everything below a directory, a glob, or one file) and its
ids are relative to its root (`input_root`). Local patterns are listed by walking the directories
(`match_input`): links are followed, and a dangling link, a link loop, a directory that cannot be listed, a
FIFO/socket/device and a name that is not UTF-8 (escaped `\\xNN` for its id) are listed with a reason that
becomes their error record. Object stores have no links, FIFOs or permissions on prefixes: Beam's FileSystems
lists them. The same file named by several inputs is the first input's; each other appearance is marked
repeated (`mark_repeats`), and reported as a `duplicate_input` error.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

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


def _walk(path: str, above: frozenset, levels: int | None = None) -> Iterator[Found]:
    """Everything at and below `path` that is not a directory, following links, at most `levels` directories
    down (None: all); `above` holds the (device, inode) of the directories above it, so a link back to one of
    them is a `symlink_loop` entry, not a walk without end. A directory that cannot be listed is one
    `unreadable_directory` entry. Only the open directories of the current branch are held, whatever the number
    of files."""
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
                yield from _walk(entry.path, inside, None if levels is None else levels - 1)
    except OSError as err:
        yield path, 0, UNREADABLE_DIRECTORY, f"{path}: {err.strerror or err}; nothing below it was listed"


def _escaped(path: str) -> str:
    """A path whose name is not UTF-8 (os.fsdecode's surrogateescape), its undecodable bytes written \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _local_match(pattern: str) -> Iterator[Found]:
    """What a local pattern (as `input_pattern` makes them) matches, as Beam's glob matches it (FileSystem's
    translation: `*` within a name, `**` across directories), with faults as entries. A directory fault is kept
    when the pattern reaches below that directory. A path that is not UTF-8 is a `non_utf8_name` entry under its
    escaped path (`_escaped`): it cannot be an id or a source of the Parquet output as it is."""
    if not fs.is_glob(pattern):
        found: Iterator[Found] = _walk(pattern, frozenset())
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
        found = (e for e in _walk(top or "/", frozenset(), levels) if wanted(e))
    for path, size, reason, detail in found:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            path, size = _escaped(path), 0
            reason, detail = NON_UTF8_NAME, f"{path}: the name is not UTF-8 (its bytes shown as \\xNN); not read"
        yield path, size, reason, detail


def match_input(pattern: str) -> Iterator[Found]:
    """(path, size, reason, detail) of every file a pattern matches; reason "" for a file to read."""
    if plain_local(pattern):
        yield from _local_match(pattern)
        return
    for m in FileSystems.match([pattern])[0].metadata_list:
        yield m.path, m.size_in_bytes, "", ""


def input_kind(path: str, reason: str, input_format: str) -> str | None:
    """The format of a listed path (None: not an input). A path the listing found unusable is an error row of a
    files unit (never opened as a container): when its name is an input's, or when it is a directory fault."""
    kind = kind_of(path, input_format)
    if not reason:
        return kind
    return "files" if kind or reason in (UNREADABLE_DIRECTORY, SYMLINK_LOOP) else None


def list_input(pattern: InputPattern, input_format: str) -> Iterator[tuple[str, tuple[int, int, str, str, str]]]:
    """(path, (input index, size, kind, reason, detail)) of the input files a pattern matches."""
    for path, size, reason, detail in match_input(pattern.pattern):
        kind = input_kind(path, reason, input_format)
        if kind:
            yield fs.absolute(path), (pattern.index, size, kind, reason, detail)


def mark_repeats(element) -> Iterator[Listed]:
    """A file found by several inputs: the first input's, then a repeat for each other input."""
    path, found = element
    found = sorted(found)
    for n, (index, nbytes, kind, reason, detail) in enumerate(found):
        yield Listed(path, nbytes, kind, index, repeated=n > 0, reason=reason, detail=detail)
