"""webdataset / img2dataset tars: id = the container's path + '/' + member name, offset = the byte offset of the
member's data."""
from __future__ import annotations

import os
import tarfile

from ns_data import fs
from ns_data.images import IMAGE_EXTENSIONS
from ns_data.sources.base import CORRUPT_RECORD, NOT_A_REGULAR_FILE, UNREADABLE, ImageFormat, ImageRecord
from ns_data.sources.registry import register


@register
class Tar(ImageFormat):
    """KEY.jpg beside KEY.json and KEY.txt; only image members are images."""

    kind = "tar"
    extensions = (".tar",)

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
