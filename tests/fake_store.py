"""An object store for tests: `fakestore://bucket/key` paths, kept in a local folder, with the semantics of GCS or S3
(no directories: a "folder" is a key prefix, `exists` is true for objects only). Registering it with Beam (by
subclassing FileSystem) sends every `fakestore://` path through the same code a `gs://` path takes."""
from __future__ import annotations

import os
import shutil

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem

SCHEME = "fakestore"
PREFIX = f"{SCHEME}://"


class FakeObjectStore(FileSystem):
    root: str | None = None  # the local folder holding the objects; set by the `object_store` fixture

    @classmethod
    def scheme(cls):
        return SCHEME

    def _local(self, path: str) -> str:
        assert path.startswith(PREFIX) and self.root, path
        return os.path.join(self.root, path[len(PREFIX):])

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):  # object stores have no directories
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                local = os.path.join(dirpath, name)
                path = PREFIX + os.path.relpath(local, self.root)
                if path.startswith(dir_or_prefix):
                    yield FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def _check(self, compression_type):
        assert compression_type == CompressionTypes.UNCOMPRESSED, "ns-data reads and writes raw bytes"

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        self._check(compression_type)
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return open(self._local(path), "wb")

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        self._check(compression_type)
        return open(self._local(path), "rb")

    def copy(self, source_file_names, destination_file_names):
        for src, dst in zip(source_file_names, destination_file_names):
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            shutil.copyfile(self._local(src), self._local(dst))

    def rename(self, source_file_names, destination_file_names):
        for src, dst in zip(source_file_names, destination_file_names):
            if not os.path.isfile(self._local(src)):
                raise BeamIOError("Rename operation failed", {(src, dst): FileNotFoundError(src)})
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            os.replace(self._local(src), self._local(dst))

    def exists(self, path):
        return os.path.isfile(self._local(path))

    def size(self, path):
        return os.path.getsize(self._local(path))

    def last_updated(self, path):
        return os.path.getmtime(self._local(path))

    def checksum(self, path):
        return str(self.size(path))

    def metadata(self, path):
        return FileMetadata(path, self.size(path), self.last_updated(path))

    def delete(self, paths):
        missing = {p: FileNotFoundError(p) for p in paths if not self.exists(p)}
        if missing:
            raise BeamIOError("Delete operation failed", missing)
        for p in paths:
            os.remove(self._local(p))
