"""Image files, one image each: id = the file's path below the id root, offset null."""
from __future__ import annotations

import os
import stat

from ns_data import fs
from ns_data.images import IMAGE_EXTENSIONS
from ns_data.sources.base import NOT_A_REGULAR_FILE, UNREADABLE, ImageFormat, ImageRecord, failed
from ns_data.sources.listing import NotUsable, file_type, path_fault, plain_local
from ns_data.sources.registry import register


@register
class Files(ImageFormat):
    kind = "files"
    extensions = IMAGE_EXTENSIONS

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
                data = read_file(path) if with_data else None
            except NotUsable as err:
                yield ImageRecord(rid, path, None, error=err.reason, detail=err.detail)
                continue
            except Exception as err:  # noqa: BLE001 - an unreadable file is data, not a crash
                yield ImageRecord(rid, path, None, error=UNREADABLE, detail=str(err))
                continue
            yield ImageRecord(rid, path, None, data)

    def read_back(self, source, offsets, settings):
        try:
            data = read_file(source)
        except NotUsable as err:  # e.g. replaced by a FIFO since it was labeled: never read, never blocks
            yield from failed(offsets, err.reason, err.detail)
            return
        for _ in offsets:
            yield data, None, ""


def read_file(path: str) -> bytes:
    """A file's bytes. A local file is read only when it is a regular file (checked before opening it, and on
    the opened file): a FIFO, socket or device is never read, so it cannot block the run."""
    if not plain_local(path):
        return fs.read_bytes(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise NotUsable(NOT_A_REGULAR_FILE, f"{path}: a {file_type(st.st_mode)}; not opened")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise NotUsable(*path_fault(path, err)) from err
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotUsable(NOT_A_REGULAR_FILE, f"{path}: a {file_type(mode)}; not read")
        return f.read()
