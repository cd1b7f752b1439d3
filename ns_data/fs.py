"""The one filesystem layer: listing, opening, creating, renaming and deleting files on any filesystem Beam knows.

Every stage and both shard readers go through these functions, so a `gs://` (or any registered) path takes the
same code as a local one. The only local-only paths are the ones that need a real file descriptor (the spill
files of `shard`), and they ask `is_local`, never the spelling of the path.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from typing import BinaryIO, Iterable

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
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


def match_some(pattern: str, limit: int) -> list[tuple[str, int]]:
    """(path, size) of at most `limit` files matching a glob, in the filesystem's listing order: the listing
    stops once it has them."""
    return [(m.path, m.size_in_bytes) for m in FileSystems.match([pattern], [limit])[0].metadata_list]


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
    """A binary write stream; parent directories are made as needed. Locally, a full device is an OSError that
    names the file (see `no_space`)."""
    if is_local(path):
        local = _local(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        return LocalWriter(local)
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def no_space(err: OSError, path: str) -> OSError:
    """`err`, or for a full device (ENOSPC, which the kernel reports without a file name) the same error naming
    `path` and what to do: `[Errno 28] No space left on device ...: 'PATH'`."""
    if err.errno != errno.ENOSPC or err.filename:
        return err
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}; free some space and run the same command again, "
                                 "it goes on from where it stopped", path)


class LocalWriter(io.BufferedWriter):
    """A buffered local file whose writes, flushes and close turn a full device into `no_space`'s error."""

    def __init__(self, path: str):
        super().__init__(io.FileIO(path, "wb"))
        self.path = path

    def write(self, data):
        try:
            return super().write(data)
        except OSError as err:
            raise no_space(err, self.path) from err

    def flush(self):
        try:
            return super().flush()
        except OSError as err:
            raise no_space(err, self.path) from err

    def close(self):
        try:
            return super().close()
        except OSError as err:
            raise no_space(err, self.path) from err


def mkdirs(path: str) -> None:
    """Makes a directory and its parents; nothing on object stores, which have no directories."""
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
    elif FileSystems.get_filesystem(path).has_dirs():
        FileSystems.mkdirs(path)


def rename(sources: list[str], destinations: list[str]) -> None:
    """Moves files; a destination that exists is replaced (os.rename locally; copy then delete on object stores,
    in batches of 100 on GCS), so nothing asks first."""
    if sources:
        FileSystems.rename(list(sources), list(destinations))


def delete(paths: Iterable[str]) -> None:
    """Deletes files; paths that do not exist are ignored, without asking first: locally each missing file is
    skipped, on GCS up to 100 deletes go in one batch request (a 404 is fine), elsewhere Beam's per-path
    not-found errors are dropped."""
    paths = list(paths)
    if not paths:
        return
    if is_local(paths[0]):
        for path in paths:
            try:
                os.remove(_local(path))
            except FileNotFoundError:
                pass
        return
    batch = _batch_delete(FileSystems.get_filesystem(paths[0]))
    if batch is not None:
        failed = {path: error for path, error in batch(paths) if error is not None}
    else:
        try:
            FileSystems.delete(paths)
            failed = {}
        except BeamIOError as err:
            failed = {path: e for path, e in (err.exception_details or {}).items() if not _not_found(e)}
    if failed:
        raise BeamIOError("Delete operation failed", failed)


def _batch_delete(filesystem):
    """The filesystem's batch delete, `paths -> [(path, error or None)]` with not-found as success (GCS's, at
    100 objects per request), or None. Beam's GCSFileSystem.delete asks for each path's metadata before
    deleting it, one request per path; its GcsIO.delete_batch does not."""
    try:
        from apache_beam.io.gcp.gcsfilesystem import GCSFileSystem
    except ImportError:  # Beam without its GCP extra
        GCSFileSystem = None
    if GCSFileSystem is not None and isinstance(filesystem, GCSFileSystem):
        return filesystem._gcsIO().delete_batch
    return getattr(filesystem, "delete_batch", None)


def _not_found(error) -> bool:
    return isinstance(error, FileNotFoundError) or "not found" in str(error).lower() or "404" in str(error)


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def dir_exists(directory: str) -> bool:
    """Whether a directory exists (local), or any object lies below the prefix (object stores have no dirs)."""
    return os.path.isdir(_local(directory)) if is_local(directory) else bool(match(join(directory, "**")))


def delete_dir(directory: str) -> None:
    """Deletes a directory and everything below it in one call: locally a tree removal; on object stores a
    delete of the prefix ending in '/', which Beam's GCS filesystem does as one listing and batches of 100
    deletes, without a request per object."""
    if is_local(directory):
        shutil.rmtree(_local(directory), ignore_errors=True)
    else:
        FileSystems.delete([directory.rstrip("/") + "/"])


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_atomic(path: str, data: bytes, tmp: str | None = None) -> None:
    """Writes a whole file or nothing: readers never see part of it, and a kill leaves the old file or the new one.

    Locally the bytes go to `tmp` (by default `PATH.tmp` beside it, a fixed name the next write replaces; a stage
    passes a name in its temp dir, which its next run clears), then a rename replaces `path` in one step. On an
    object store an object appears only when its upload completes, so it is written in place."""
    if not is_local(path):
        with create(path) as f:
            f.write(data)
        return
    tmp = _local(tmp or f"{path}.tmp")
    try:
        with create(tmp) as f:
            f.write(data)
    except OSError:
        try:
            os.remove(tmp)  # a full device: the part written goes, the old file stays
        except FileNotFoundError:
            pass
        raise
    os.replace(tmp, _local(path))


def write_json(path: str, value, tmp: str | None = None) -> None:
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode(), tmp)


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
