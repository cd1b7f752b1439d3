"""An object store for tests: `fakestore://bucket/key` paths, kept in a local folder, with the semantics of GCS or S3
(no directories: a "folder" is a key prefix, `exists` is true for objects only). Registering it with Beam (by
subclassing FileSystem) sends every `fakestore://` path through the same code a `gs://` path takes.

It counts the requests a GCS client would make (`FakeObjectStore.requests`): a listing per 1,000 objects, a
metadata request (`stat`) per exists/size/metadata, one per object read or written, and batches of up to 100
copies or deletes as one request each, as Beam's GCS filesystem makes them."""
from __future__ import annotations

import collections
import math
import os
import shutil

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem

SCHEME = "fakestore"
PREFIX = f"{SCHEME}://"


class FakeObjectStore(FileSystem):
    root: str | None = None  # the local folder holding the objects; set by the `object_store` fixture
    requests: collections.Counter = collections.Counter()  # kind -> requests; the fixture resets it
    BATCH, PAGE = 100, 1000  # objects per batch request, per listing page (GCS's limits)

    @classmethod
    def count(cls, kind: str, n: int = 1) -> None:
        cls.requests[kind] += n

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
        found = list(self._objects(dir_or_prefix))
        self.count("list", max(1, math.ceil(len(found) / self.PAGE)))
        return found

    def _objects(self, dir_or_prefix):
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
        self.count("write")
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return open(self._local(path), "wb")

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        self._check(compression_type)
        self.count("read")
        return open(self._local(path), "rb")

    def copy(self, source_file_names, destination_file_names):
        self.count("batch", math.ceil(len(source_file_names) / self.BATCH))
        for src, dst in zip(source_file_names, destination_file_names):
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            shutil.copyfile(self._local(src), self._local(dst))

    def rename(self, source_file_names, destination_file_names):
        self.count("batch", 2 * math.ceil(len(source_file_names) / self.BATCH))  # copies, then deletes
        for src, dst in zip(source_file_names, destination_file_names):
            if not os.path.isfile(self._local(src)):
                raise BeamIOError("Rename operation failed", {(src, dst): FileNotFoundError(src)})
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            os.replace(self._local(src), self._local(dst))

    def exists(self, path):
        self.count("stat")
        return os.path.isfile(self._local(path))

    def size(self, path):
        self.count("stat")
        return os.path.getsize(self._local(path))

    def last_updated(self, path):
        self.count("stat")
        return os.path.getmtime(self._local(path))

    def checksum(self, path):
        return str(self.size(path))

    def metadata(self, path):
        self.count("stat")
        local = self._local(path)
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def delete(self, paths):
        """As Beam's GCS filesystem: a path ending in '/' deletes every object below it (a listing, then batches);
        any other path is looked up first (a metadata request), then deleted (a batch of one)."""
        missing = {}
        for p in paths:
            if p.endswith("/"):
                self.delete_batch([m.path for m in self._list(p)])
            elif self.exists(p):
                self.delete_batch([p])
            else:
                missing[p] = FileNotFoundError(p)
        if missing:
            raise BeamIOError("Delete operation failed", missing)

    def delete_batch(self, paths):
        """As GcsIO.delete_batch: one request per 100 objects; an object that is not there is not an error."""
        self.count("batch", math.ceil(len(paths) / self.BATCH))
        for p in paths:
            try:
                os.remove(self._local(p))
            except FileNotFoundError:
                pass
        return [(p, None) for p in paths]
