"""The one filesystem layer: listing, opening, creating, renaming and deleting files on any filesystem Beam knows.

Every stage and both shard readers go through these functions, so a `gs://` (or any registered) path takes the
same code as a local one. The only local-only paths are the ones that need a real file descriptor (the spill
files of `shard`), and they ask `is_local`, never the spelling of the path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import BinaryIO, Iterable

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

GLOB_CHARS = frozenset("*?[")


def is_local(path: str) -> bool:
    """Whether `path` lives on the local filesystem (a plain path, or a file:// URI)."""
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def is_glob(path: str) -> bool:
    return bool(GLOB_CHARS & set(path))


def absolute(path: str) -> str:
    """An absolute URI for `path`: valid from any working directory (local paths are made absolute)."""
    return os.path.abspath(path) if is_local(path) and not path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)


def split(path: str) -> tuple[str, str]:
    return FileSystems.split(path)


def name(path: str) -> str:
    return FileSystems.split(path)[1]


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def match(pattern: str) -> list[tuple[str, int]]:
    """(path, size) of the files matching a glob (`**` crosses directories), sorted by path."""
    return sorted((m.path, m.size_in_bytes) for m in FileSystems.match([pattern])[0].metadata_list)


def is_file(path: str) -> bool:
    """A file (locally), or an object (object stores, where `exists` is true for objects only)."""
    return os.path.isfile(path) if is_local(path) else exists(path)


def list_files(item: str) -> list[tuple[str, int]]:
    """(path, size) of the files an input names: a glob, a file, or everything below a directory; sorted."""
    if is_glob(item):
        return match(item)
    if is_file(item):
        return match(item)
    return match(join(item.rstrip("/"), "**"))


def list_dir(directory: str, pattern: str) -> list[str]:
    """Paths of the files directly in `directory` whose names match `pattern` (e.g. 'labels-*.parquet')."""
    return [p for p, _ in match(join(directory, pattern))]


def size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def open_read(path: str) -> BinaryIO:
    """A binary, seekable read stream, never decompressed (a `.gz` source is bytes like any other)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def create(path: str) -> BinaryIO:
    """A binary write stream; parent directories are made as needed."""
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def mkdirs(path: str) -> None:
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    elif not exists(path):
        FileSystems.mkdirs(path)


def rename(sources: list[str], destinations: list[str]) -> None:
    if sources:
        FileSystems.rename(list(sources), list(destinations))


def delete(paths: Iterable[str]) -> None:
    """Deletes files; paths that do not exist are ignored."""
    paths = [p for p in paths if exists(p)]
    if paths:
        FileSystems.delete(paths)


def dir_exists(directory: str) -> bool:
    """Whether a directory exists (local), or any object lies below the prefix (object stores have no dirs)."""
    return os.path.isdir(directory) if is_local(directory) else bool(match(join(directory, "**")))


def delete_dir(directory: str) -> None:
    """Deletes a directory and everything below it (on object stores: every object below the prefix)."""
    if is_local(directory):
        shutil.rmtree(directory, ignore_errors=True)
    else:
        delete(p for p, _ in match(join(directory, "**")))


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_atomic(path: str, data: bytes) -> None:
    """Writes under a temporary name beside `path`, then renames: readers see all of it or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with create(tmp) as f:
        f.write(data)
    if exists(path):
        delete([path])
    rename([tmp], [path])


def write_json(path: str, value) -> None:
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode())


def fingerprint(files: Iterable[tuple[str, int]], *values) -> str:
    """A digest of files (path, size) and any JSON-able values: equal when the inputs and options are."""
    digest = hashlib.sha256()
    for path, nbytes in files:
        digest.update(f"{path}\0{nbytes}\n".encode())
    digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def common_root(paths: list[str]) -> str:
    """The longest common parent of absolute URIs: '/' for local paths on different branches, '' when they
    share nothing (two schemes or buckets' schemes differ)."""
    parts = [p.rstrip("/").split("/") for p in paths]
    common = []
    for segments in zip(*parts):
        if len(set(segments)) != 1:
            break
        common.append(segments[0])
    if common == [""]:
        return "/"
    root = "/".join(common)
    return "" if root.endswith(":") or root.endswith(":/") else root


def relative_to(path: str, root: str) -> str:
    """`path` below `root`, without a leading slash; the whole path when it is not below it."""
    if root in ("", "/"):
        return path.lstrip("/") if root == "/" else path
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path
